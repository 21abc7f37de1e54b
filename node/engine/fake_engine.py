"""FakeEngine: deterministic made-up tokens at a fixed rate, with no model at all.

FOR UNIT TESTS AND ROUTING-OVERHEAD BENCHMARKS ONLY. It serves no real model, its text is
meaningless, and a node running it must never face real clients. It exists so that the
worker, the agent and the coordinator can be tested without loading vLLM, and so that
the cost of routing can be measured apart from the cost of inference.

What it does: the "tokenizer" maps each UTF-8 byte of the text to one token id (so counts
are exact and reproducible); output token ``i`` of a request is a function of the prompt
and ``i`` only; each stream emits ``tokens_per_s`` tokens per second (0: as fast as the
loop allows). Stop strings are honoured. It records what it aborted, for tests.

It streams as the vLLM engine does under the node's :class:`~node.engine.base.StreamInterval`
(the node passes its settings): a request that starts while many others run gets its
tokens in deltas of up to ``stream_interval.maximum`` tokens (the first token alone),
so relay benchmarks see the message sizes a real node of that load sends. The default
interval is 1: every token its own delta.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator, Sequence

from node.engine.base import (
    Delta,
    Engine,
    EngineLoad,
    FinishReason,
    GenerationRequest,
    StreamInterval,
    TokenRateMeter,
)
from node.errors import EngineDeadError, EngineStartError

_WORDS = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
    "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
)  # fmt: skip
_VOCAB_SIZE = 256 + len(_WORDS)
# The fake's end-of-sequence id: it never generates it, but a resumed request can end in
# it (an earlier node's last token), as with a real model.
_END_TOKEN_IDS = frozenset({0})


class FakeEngine(Engine):
    """Deterministic fake engine; see the module docstring (tests and benchmarks only)."""

    def __init__(
        self,
        model_name: str = "fake-model",
        *,
        tokens_per_s: float = 1000.0,
        context_length: int = 2048,
        stream_interval: StreamInterval | None = None,
    ) -> None:
        self._model_name = model_name
        self._stream_interval = stream_interval if stream_interval is not None else StreamInterval()
        self._tokens_per_s = tokens_per_s
        self._context_length = context_length
        self._started = False
        self._dead = False
        self._running: set[str] = set()
        self._meter = TokenRateMeter()
        self.aborted_request_ids: list[str] = []
        self.finished_request_ids: list[str] = []

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def stream_interval(self) -> StreamInterval:
        """Tokens gathered per streamed delta as the engine gets busy."""
        return self._stream_interval

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def vocab_size(self) -> int:
        return _VOCAB_SIZE

    @property
    def healthy(self) -> bool:
        return self._started and not self._dead

    @property
    def running_request_ids(self) -> frozenset[str]:
        return frozenset(self._running)

    async def start(self, timeout_s: float) -> None:
        if self._dead:
            raise EngineStartError("the fake engine was killed")
        self._started = True

    async def shutdown(self) -> None:
        self._started = False

    def kill(self) -> None:
        """Make the engine die, as a crashed engine would (tests)."""
        self._dead = True

    def render_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        text = "".join(f"<{role}>{content}\n" for role, content in messages) + "<assistant>"
        return list(text.encode())

    def render_prompt(self, prompt: str) -> list[int]:
        return list(prompt.encode())

    def decode(self, token_ids: Sequence[int]) -> str:
        words = (
            " " + _WORDS[i - 256] if i >= 256 else bytes([i]).decode("latin-1")
            for i in token_ids
            if i not in _END_TOKEN_IDS  # special: no text, as a tokenizer skips them
        )
        return "".join(words)

    @property
    def end_token_ids(self) -> frozenset[int]:
        return _END_TOKEN_IDS

    def load(self) -> EngineLoad:
        return EngineLoad(
            running_requests=len(self._running),
            waiting_requests=0,
            kv_cache_usage=0.0,
            output_tokens_per_s=self._meter.rate(),
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if self._dead or not self._started:
            raise EngineDeadError("the fake engine is not running")
        prompt_ids = self.prompt_token_ids(request)
        limit = min(request.max_tokens, self._context_length - len(prompt_ids))
        seed = zlib.crc32(bytes(i & 0xFF for i in prompt_ids)) ^ (request.seed or 0)
        interval = self._stream_interval.tokens_per_delta(len(self._running))
        self._running.add(request.request_id)
        finished = False
        text_so_far = ""
        pending_text = ""  # gathered, not yet yielded
        pending_ids: list[int] = []
        interval_s = 1.0 / self._tokens_per_s if self._tokens_per_s > 0 else 0.0
        started = time.monotonic()
        try:
            for index in range(max(limit, 0)):
                if interval_s:
                    delay_s = started + (index + 1) * interval_s - time.monotonic()
                    await asyncio.sleep(max(delay_s, 0.0))
                else:
                    await asyncio.sleep(0)
                if self._dead:
                    raise EngineDeadError("the fake engine died mid-request")
                word_index = (seed + index * 7) % len(_WORDS)
                text = " " + _WORDS[word_index]
                text_so_far += text
                pending_text += text
                pending_ids.append(256 + word_index)
                self._meter.record(1)
                hit = _first_stop(text_so_far, request.stop)
                if hit is not None:
                    # Drop the stop string and what follows, as vLLM does.
                    keep = len(pending_text) - (len(text_so_far) - hit)
                    finished = True
                    yield Delta(pending_text[: max(keep, 0)], pending_ids, FinishReason.STOP)
                    return
                last = index == limit - 1
                # The first token alone, then every ``interval`` tokens, and the last.
                if last or index == 0 or len(pending_ids) >= interval:
                    finished = last
                    yield Delta(pending_text, pending_ids, FinishReason.LENGTH if last else None)
                    pending_text = ""
                    pending_ids = []
            if limit <= 0:
                finished = True
                yield Delta("", [], FinishReason.LENGTH)
        finally:
            self._running.discard(request.request_id)
            if finished:
                self.finished_request_ids.append(request.request_id)
            else:
                self.aborted_request_ids.append(request.request_id)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    positions = [p for p in (text.find(s) for s in stops) if p >= 0]
    return min(positions) if positions else None
