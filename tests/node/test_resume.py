"""Resuming another node's generation: the text the client lacks goes first, a stop
string across the seam ends it, an end-of-sequence id at the seam finishes it
(node/resume.py; with the real engine in test_vllm_integration.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from mercato.v1 import common_pb2, node_pb2

from node.engine import Delta, FinishReason
from node.resume import after_resume, pending_text

from .conftest import MODEL, WorkerHarness, collect


class Engine:
    """Scripted deltas; records whether it was closed."""

    def __init__(self, *deltas: Delta) -> None:
        self.deltas = deltas
        self.closed = False

    async def stream(self) -> AsyncIterator[Delta]:
        try:
            for delta in self.deltas:
                yield delta
        finally:
            self.closed = True


async def resumed(engine: Engine, pending: str, stops: Sequence[str]) -> list[Delta]:
    return [d async for d in after_resume(engine.stream(), pending, stops)]


def d(text: str, *ids: int, end: FinishReason | None = None) -> Delta:
    return Delta(text, ids, end)


async def test_without_pending_text_the_engine_stream_is_untouched() -> None:
    deltas = (d(" a", 1), d(" b", 2, end=FinishReason.LENGTH))
    assert await resumed(Engine(*deltas), "", ["zz"]) == list(deltas)


async def test_pending_text_goes_before_the_first_delta() -> None:
    out = await resumed(Engine(d(" new", 7), d(" more", 8, end=FinishReason.LENGTH)), "held", [])
    assert [(x.text, list(x.token_ids), x.finish_reason) for x in out] == [
        ("held new", [7], None),
        (" more", [8], FinishReason.LENGTH),
    ]


async def test_new_output_waits_until_no_stop_can_straddle_the_seam() -> None:
    """With a 4-character stop, new text is held until it is 3 characters long."""
    engine = Engine(d("c", 1), d("de", 2), d("fgh", 3), d("i", 4, end=FinishReason.LENGTH))
    out = await resumed(engine, "ab", ["STOP"])
    assert [(x.text, list(x.token_ids)) for x in out] == [
        ("abcde", [1, 2]),
        ("fgh", [3]),
        ("i", [4]),
    ]
    assert out[-1].finish_reason is FinishReason.LENGTH


async def test_a_stop_string_across_the_seam_ends_the_generation() -> None:
    """The earlier node's held-back "...ST" and this node's "OP" make "STOP": the text
    ends before it, the token ids that made it count, the engine is stopped."""
    engine = Engine(d("O", 5), d("P and on", 6), d(" never sent", 7))
    out = await resumed(engine, "the end. ST", ["STOP"])
    assert [(x.text, list(x.token_ids), x.finish_reason) for x in out] == [
        ("the end. ", [5, 6], FinishReason.STOP)
    ]
    assert engine.closed


async def test_the_engine_ending_first_still_delivers_the_pending_text() -> None:
    out = await resumed(Engine(d("", end=FinishReason.STOP)), "tail", ["STOP!"])
    assert [(x.text, x.finish_reason) for x in out] == [("tail", FinishReason.STOP)]
    out = await resumed(Engine(), "tail", ["STOP!"])
    assert [x.text for x in out] == ["tail"]


def test_resumed_tokens_are_decoded_after_the_prompt_as_the_engine_decodes_them() -> None:
    """A SentencePiece-style tokenizer drops the space a text starts with: " Hello" alone
    decodes to "Hello", but the engine streamed it after the prompt, as " Hello". The
    client has " Hello wo" of " Hello world": "rld" is what it lacks, not "ld"."""

    words = {1: "ctx", 2: " Hello", 3: " world"}

    class Tokenizer:
        end_token_ids = frozenset()

        def decode(self, ids: Sequence[int]) -> str:
            return "".join(words[i] for i in ids).removeprefix(" ")

    engine = Tokenizer()
    assert pending_text(engine, [1], [2, 3], len(" Hello wo")) == "rld"  # type: ignore[arg-type]
    assert pending_text(engine, [], [2, 3], len("Hello wo")) == "rld"  # type: ignore[arg-type]


async def test_the_worker_sends_the_resumed_text_the_client_lacks(harness: WorkerHarness) -> None:
    """Fake engine: ids 256+ are words (" alpha", ...). The client has 3 characters of
    the resumed tokens' text; the rest comes first, before any new token."""
    engine = harness.engine
    resume_ids = [256, 257]
    text = engine.decode(resume_ids)
    request = node_pb2.WorkerGenerateRequest(
        request_id="r:1",
        model=MODEL,
        prompt="abc",
        sampling=common_pb2.SamplingParams(max_tokens=2),
        resume_token_ids=resume_ids,
        resume_text_chars=3,
    )
    deltas, final = await collect(harness.stub.Generate(request))
    assert final is not None and final.output_tokens == 2
    assert deltas[0].text.startswith(text[3:])
    assert "".join(x.text for x in deltas)[: len(text) - 3] == text[3:]

    # From a coordinator that does not say (field unset): no text for resumed tokens.
    request.ClearField("resume_text_chars")
    deltas, _ = await collect(harness.stub.Generate(request))
    assert not "".join(x.text for x in deltas).startswith(text[3:])


async def test_a_resume_that_ends_with_end_of_sequence_is_finished(
    harness: WorkerHarness,
) -> None:
    """The earlier node died between its end-of-sequence token and its final: nothing
    more is generated (the fake engine's end id is 0)."""
    request = node_pb2.WorkerGenerateRequest(
        request_id="r:1",
        model=MODEL,
        prompt="abc",
        sampling=common_pb2.SamplingParams(max_tokens=5),
        resume_token_ids=[256, 0],
        resume_text_chars=0,
    )
    deltas, final = await collect(harness.stub.Generate(request))
    assert final is not None
    assert (final.output_tokens, final.finish_reason) == (0, common_pb2.FINISH_REASON_STOP)
    assert [x.text for x in deltas] == [harness.engine.decode([256])]  # the text lacked
    assert not any(x.token_ids for x in deltas)
