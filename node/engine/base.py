"""The one interface every engine backend implements, and the values that cross it.

An engine turns a request (chat, raw prompt, or ready token ids) into a stream of
:class:`Delta` values; the last one carries the finish reason. The stream is an async
generator: when its consumer stops early (``aclose()``, cancellation, an exception), the
backend aborts the request in the engine, so no request is ever left running orphaned.

Start-up is a handshake with a timeout (:meth:`Engine.start` raises
:class:`~node.errors.EngineStartError`); a dead engine raises
:class:`~node.errors.EngineDeadError` from :meth:`Engine.generate` instead of hanging.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from enum import Enum


class FinishReason(Enum):
    """Why a generation stopped."""

    # The model produced its end-of-sequence token or a stop string matched.
    STOP = "stop"
    # The output reached max_tokens or the context length.
    LENGTH = "length"
    # The request was aborted before it finished.
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation job. Exactly one of ``messages``, ``prompt``, ``prompt_token_ids``.

    ``prompt_token_ids`` is a prompt already rendered and tokenized (the worker renders
    first to count tokens and append resumed ones); ``messages`` are ``(role, content)``
    pairs rendered with the model's chat template; ``prompt`` is raw text.
    """

    request_id: str
    messages: Sequence[tuple[str, str]] | None = None
    prompt: str | None = None
    prompt_token_ids: Sequence[int] | None = None
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = field(default=())


@dataclass(frozen=True, slots=True)
class Delta:
    """New output since the previous delta; ``finish_reason`` is set on the last one."""

    text: str
    token_ids: Sequence[int]
    finish_reason: FinishReason | None = None


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """A snapshot of how busy the engine is."""

    running_requests: int
    waiting_requests: int
    kv_cache_usage: float  # share of the KV cache in use, 0..1
    output_tokens_per_s: float  # over the last few seconds


@dataclass(frozen=True, slots=True)
class StreamInterval:
    """How many output tokens an engine gathers into one streamed delta: 1 on a lightly
    loaded engine; one more for each ``step_requests`` requests already running when a
    request starts, up to ``maximum``. The first token always goes out at once.

    Every delta costs the same host work however many tokens it carries (a pass of the
    output processor, a gRPC message through node, coordinator and client), and on a
    busy engine that work is taken from the forward passes: fewer, larger deltas when
    many streams run keep throughput close to the engine's own. The price is burstier
    text for those streams; at low load nothing changes. Both engines follow it (vLLM
    through its ``stream_interval``), so the fake engine streams as a real node would.
    """

    maximum: int = 1
    step_requests: int = 4

    def __post_init__(self) -> None:
        if self.maximum < 1 or self.step_requests < 1:
            raise ValueError("stream_interval_max and stream_interval_step_requests: must be >= 1")

    def tokens_per_delta(self, running_requests: int) -> int:
        """The interval of a request that starts while ``running_requests`` others run."""
        return max(1, min(self.maximum, 1 + running_requests // self.step_requests))


class TokenRateMeter:
    """Output tokens per second over a sliding window of whole seconds; O(1) per record."""

    __slots__ = ("_counts", "_seconds", "_window_s")

    def __init__(self, window_s: int = 5) -> None:
        self._window_s = window_s
        self._counts = [0] * (window_s + 1)
        self._seconds = [0] * (window_s + 1)

    def record(self, tokens: int, now_s: float | None = None) -> None:
        second = int(time.monotonic() if now_s is None else now_s)
        slot = second % len(self._counts)
        if self._seconds[slot] != second:
            self._seconds[slot] = second
            self._counts[slot] = 0
        self._counts[slot] += tokens

    def rate(self, now_s: float | None = None) -> float:
        """Tokens/s over the last ``window_s`` complete seconds."""
        second = int(time.monotonic() if now_s is None else now_s)
        total = sum(
            count
            for count, at in zip(self._counts, self._seconds, strict=True)
            if second - self._window_s <= at < second
        )
        return total / self._window_s


class Engine(ABC):
    """An inference engine serving one model, driven from the asyncio loop."""

    @property
    @abstractmethod
    def model_name(self) -> str:
        """The name clients use for the served model."""

    @property
    @abstractmethod
    def context_length(self) -> int:
        """Most tokens (prompt plus output) one request may use."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Token ids are below this."""

    @property
    @abstractmethod
    def healthy(self) -> bool:
        """False once the engine has died (or before it started)."""

    @abstractmethod
    async def start(self, timeout_s: float) -> None:
        """Load the model; raises EngineStartError on failure or after ``timeout_s``."""

    @abstractmethod
    async def shutdown(self) -> None:
        """Stop the engine; call inside the running loop. Idempotent."""

    @abstractmethod
    def render_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Prompt token ids of a conversation, with the generation prompt appended."""

    @abstractmethod
    def render_prompt(self, prompt: str) -> list[int]:
        """Prompt token ids of raw text, as the model's tokenizer encodes it."""

    @abstractmethod
    def decode(self, token_ids: Sequence[int]) -> str:
        """The text of output token ids, as the engine's own streamed text would have
        it (special tokens left out)."""

    @property
    @abstractmethod
    def end_token_ids(self) -> frozenset[int]:
        """Token ids that end a generation (the model's end-of-sequence ids)."""

    def prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        """The token ids the request's prompt becomes."""
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        if request.messages is not None:
            return self.render_chat(request.messages)
        if request.prompt is not None:
            return self.render_prompt(request.prompt)
        raise ValueError("a GenerationRequest needs messages, prompt or prompt_token_ids")

    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream the output. Closing the iterator early aborts the engine request."""

    @abstractmethod
    def load(self) -> EngineLoad:
        """How busy the engine is now (cheap; called for every heartbeat)."""
