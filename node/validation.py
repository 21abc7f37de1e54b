"""Checks on a WorkerGenerateRequest, before anything reaches the engine.

Pure functions of the request and the engine's limits: each failure raises
:class:`~node.errors.RequestInvalid` (or :class:`~node.errors.ModelNotServed`) with a
message that starts with the field and says the limit, so a person can fix the request.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from mercato.v1 import common_pb2, node_pb2

from node.errors import ContextTooLong, ModelNotServed, RequestInvalid

DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
TEMPERATURE_MAX = 2.0  # as OpenAI's API and vLLM have it
STOP_STRINGS_MAX = 8
STOP_STRING_CHARS_MAX = 128
REQUEST_ID_CHARS_MAX = 128
CHAT_ROLES = frozenset({"system", "user", "assistant"})
SEED_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class CheckedSampling:
    """Sampling parameters with defaults filled in and bounds checked."""

    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]


def check_request(
    request: node_pb2.WorkerGenerateRequest, model_name: str, vocab_size: int
) -> CheckedSampling:
    """Everything checkable without the tokenizer; returns the effective sampling."""
    if not request.request_id or len(request.request_id) > REQUEST_ID_CHARS_MAX:
        raise RequestInvalid(f"request_id: must be 1..{REQUEST_ID_CHARS_MAX} characters")
    if request.model != model_name:
        raise ModelNotServed(f"model: this node serves {model_name!r}, not {request.model!r}")
    kind = request.WhichOneof("input")
    if kind is None:
        raise RequestInvalid("input: set either chat or prompt")
    if kind == "chat":
        check_messages([(m.role, m.content) for m in request.chat.messages])
    elif not request.prompt:
        raise RequestInvalid("prompt: must not be empty")
    for token_id in request.resume_token_ids:
        if token_id >= vocab_size:
            raise RequestInvalid(
                f"resume_token_ids: token id {token_id} is not below the vocabulary size "
                f"{vocab_size}"
            )
    return check_sampling(request.sampling)


def check_messages(messages: Sequence[tuple[str, str]]) -> None:
    if not messages:
        raise RequestInvalid("chat.messages: at least one message is required")
    for index, (role, _content) in enumerate(messages):
        if role not in CHAT_ROLES:
            raise RequestInvalid(
                f"chat.messages[{index}].role: {role[:32]!r} is not one of "
                f"{', '.join(sorted(CHAT_ROLES))}"
            )


def check_sampling(sampling: common_pb2.SamplingParams) -> CheckedSampling:
    max_tokens = sampling.max_tokens if sampling.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    if max_tokens < 1:
        raise RequestInvalid(f"sampling.max_tokens: must be >= 1, got {max_tokens}")
    temperature = sampling.temperature if sampling.HasField("temperature") else DEFAULT_TEMPERATURE
    if not (math.isfinite(temperature) and 0 <= temperature <= TEMPERATURE_MAX):
        raise RequestInvalid(
            f"sampling.temperature: must be in [0, {TEMPERATURE_MAX:g}] (0 is greedy), "
            f"got {temperature}"
        )
    top_p = sampling.top_p if sampling.HasField("top_p") else DEFAULT_TOP_P
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise RequestInvalid(f"sampling.top_p: must be in (0, 1], got {top_p}")
    seed = sampling.seed if sampling.HasField("seed") else None
    if seed is not None and seed > SEED_MAX:
        raise RequestInvalid(f"sampling.seed: must be <= {SEED_MAX}")
    if len(sampling.stop) > STOP_STRINGS_MAX:
        raise RequestInvalid(
            f"sampling.stop: at most {STOP_STRINGS_MAX} stop strings, got {len(sampling.stop)}"
        )
    for index, stop in enumerate(sampling.stop):
        if not 1 <= len(stop) <= STOP_STRING_CHARS_MAX:
            raise RequestInvalid(
                f"sampling.stop[{index}]: must be 1..{STOP_STRING_CHARS_MAX} characters, "
                f"got {len(stop)}"
            )
    return CheckedSampling(max_tokens, temperature, top_p, seed, tuple(sampling.stop))


def check_context(prompt_tokens: int, max_tokens: int, context_length: int) -> None:
    """The prompt plus the requested output must fit the model's context."""
    if prompt_tokens + max_tokens > context_length:
        raise ContextTooLong(
            f"sampling.max_tokens: prompt ({prompt_tokens} tokens, resumed tokens included) "
            f"plus max_tokens ({max_tokens}) exceeds the context length {context_length}; "
            f"lower max_tokens to at most {max(context_length - prompt_tokens, 0)} or shorten "
            "the prompt"
        )
