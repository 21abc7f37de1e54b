"""Resuming another node's generation without losing text at the seam.

A resumed request carries the token ids an earlier node streamed (``resume_token_ids``)
and, from a current coordinator, how much of their text the client has
(``resume_text_chars``). The two differ when the earlier node's engine held text back:
vLLM keeps the last (longest stop string - 1) characters of its output unsent while they
could be the start of a stop string, but sends their token ids at once (measured with
the packaged model and a 10-character stop string: 9 characters behind at every delta).
Had the node died then, those characters would be missing from the client's answer.

So this node decodes the resumed ids and sends what the client lacks first (the
*pending* text). A stop string can also straddle the seam: start in the pending text and
end in new output, where the engine, which checks only its own output, cannot see it.
:func:`after_resume` holds the new output back until it is one stop string long, and
ends the generation at such a stop as the engine would have.

A resumed sequence that already ends with an end-of-sequence id (the earlier node died
between its last delta and its final) is finished: nothing more is generated.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from node.engine import Delta, Engine, FinishReason

_INCOMPLETE = "\ufffd"  # what decoding shows for a character whose bytes are cut off
_CONTEXT_TOKENS = 8  # prompt tokens decoded with the resumed ones


def pending_text(
    engine: Engine,
    prompt_token_ids: Sequence[int],
    resume_token_ids: Sequence[int],
    delivered_chars: int,
) -> str:
    """The text of ``resume_token_ids`` past the ``delivered_chars`` the client has.

    The ids are decoded after the prompt's last few tokens, as the engine decodes its
    output (a tokenizer that drops a leading space at the start of a text keeps it
    there). A character whose bytes the resumed ids end in the middle of is left out: the
    engine sends it whole with the token that completes it (it decodes the prompt's last
    tokens with its output), as it would have without the resume.
    """
    context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
    head = engine.decode(context)
    whole = engine.decode(context + list(resume_token_ids))
    text = whole[len(head) :] if whole.startswith(head) else engine.decode(resume_token_ids)
    return text.rstrip(_INCOMPLETE)[delivered_chars:]


def ends_generation(engine: Engine, resume_token_ids: Sequence[int]) -> bool:
    """Whether the resumed ids end with an end-of-sequence id."""
    return bool(resume_token_ids) and resume_token_ids[-1] in engine.end_token_ids


async def finished(pending: str) -> AsyncIterator[Delta]:
    """The stream of a resumed generation that is already over."""
    yield Delta(pending, (), FinishReason.STOP)


async def after_resume(
    deltas: AsyncIterator[Delta], pending: str, stops: Sequence[str]
) -> AsyncIterator[Delta]:
    """``deltas`` with ``pending`` before the first one, ended at a stop string that
    starts in ``pending`` and ends in the new output (the stop string and what follows
    left out, the token ids that made it kept, as the engine does at a stop).

    Closes ``deltas`` when it is closed or ends early.
    """
    try:
        if not pending:
            async for delta in deltas:
                yield delta
            return
        # New output is held until it is this long: no stop string starting in the
        # pending text can end later than that.
        reach = max((len(stop) for stop in stops), default=1) - 1
        text = pending
        token_ids: list[int] = []
        async for delta in deltas:
            text += delta.text
            token_ids.extend(delta.token_ids)
            cut = _seam_stop(text, len(pending), stops)
            if cut is not None:
                yield Delta(text[:cut], token_ids, FinishReason.STOP)
                return
            if len(text) - len(pending) >= reach or delta.finish_reason is not None:
                yield Delta(text, token_ids, delta.finish_reason)
                break
        else:
            if text:  # the engine ended without a delta: the pending text still goes
                yield Delta(text, token_ids, None)
            return
        async for delta in deltas:
            yield delta
    finally:
        await deltas.aclose()  # type: ignore[attr-defined]


def _seam_stop(text: str, seam: int, stops: Sequence[str]) -> int | None:
    """Where the first stop string starting before ``seam`` begins in ``text``, if any."""
    first: int | None = None
    for stop in stops:
        if not stop:
            continue
        position = text.find(stop, max(0, seam - len(stop) + 1))
        if 0 <= position < seam and (first is None or position < first):
            first = position
    return first
