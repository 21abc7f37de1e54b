"""What routing needs to know about one request: model, size, and the client's wishes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from coordinator.routing.errors import InvalidRoutingRequestError
from coordinator.routing.sort_mode import SortMode

if TYPE_CHECKING:
    from mercato.v1 import inference_pb2

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "RouteRequest",
    "RoutingPreferences",
    "estimate_chat_tokens",
    "estimate_input_tokens",
    "estimate_prompt_tokens",
]

# mercato.v1.SamplingParams.max_tokens when unset (common.proto).
DEFAULT_MAX_TOKENS = 256
# Rough characters per token of English text with a BPE tokenizer; only used to estimate
# the expected cost for ranking, never to bill.
_CHARACTERS_PER_TOKEN = 4
# input_tokens_floor = input_tokens / this: an estimate at 4 characters per token becomes
# a bound at 16 characters per token, which real tokenizers do not exceed on average.
_CONTEXT_FILTER_SLACK = 4
# Template tokens per chat message (role markers, separators), roughly.
_TOKENS_PER_CHAT_MESSAGE = 4


@dataclass(frozen=True, slots=True)
class RoutingPreferences:
    """The client's routing wishes (mirrors ``mercato.v1.RoutingPreferences``).

    ``regions``, the two price caps, ``only_nodes``, ``ignore_nodes`` and
    ``leased_nodes`` are hard constraints: never relaxed, not on fallback and not on
    resume.
    """

    # Allowed regions; empty: any region.
    regions: frozenset[str] = frozenset()
    # Highest input price accepted, micro-USD per million tokens; None: no cap.
    max_price_input_micro_usd_per_mtok: int | None = None
    # Highest output price accepted, micro-USD per million tokens; None: no cap.
    max_price_output_micro_usd_per_mtok: int | None = None
    # Ordering of eligible nodes.
    sort: SortMode = SortMode.BALANCED
    # Whether the decision lists fallbacks after the pick.
    allow_fallbacks: bool = True
    # If not empty, only these node ids may serve.
    only_nodes: frozenset[str] = frozenset()
    # These node ids must not serve.
    ignore_nodes: frozenset[str] = frozenset()
    # Nodes held by dedicated leases this request is not under (set by billing, not by
    # the client): skipped like ignore_nodes, and named apart when they empty the list.
    leased_nodes: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for name in ("max_price_input_micro_usd_per_mtok", "max_price_output_micro_usd_per_mtok"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise InvalidRoutingRequestError(
                    f"{name}: must be a non-negative integer or None, got {value!r}"
                )
        if not isinstance(self.sort, SortMode):
            raise InvalidRoutingRequestError(f"sort: must be a SortMode, got {self.sort!r}")

    @classmethod
    def from_proto(cls, message: inference_pb2.RoutingPreferences) -> RoutingPreferences:
        """Preferences from the wire message (unset optional fields take their defaults)."""
        return cls(
            regions=frozenset(message.regions),
            max_price_input_micro_usd_per_mtok=(
                message.max_price_input_micro_usd_per_mtok
                if message.HasField("max_price_input_micro_usd_per_mtok")
                else None
            ),
            max_price_output_micro_usd_per_mtok=(
                message.max_price_output_micro_usd_per_mtok
                if message.HasField("max_price_output_micro_usd_per_mtok")
                else None
            ),
            sort=SortMode.from_proto(message.sort),
            allow_fallbacks=(
                message.allow_fallbacks if message.HasField("allow_fallbacks") else True
            ),
            only_nodes=frozenset(message.only_nodes),
            ignore_nodes=frozenset(message.ignore_nodes),
        )


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """One request as routing sees it.

    ``exclude`` holds nodes already tried for this request (failover, stream resume):
    they are skipped like ``ignore_nodes``, while every hard constraint stays.
    """

    # Model name, as in GenerateRequest.model.
    model: str
    # Estimated prompt tokens (for the expected cost and the context-length check).
    input_tokens: int
    # Most output tokens the request may produce.
    max_tokens: int = DEFAULT_MAX_TOKENS
    # The client's wishes.
    preferences: RoutingPreferences = field(default_factory=RoutingPreferences)
    # Node ids already tried in this request.
    exclude: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not self.model:
            raise InvalidRoutingRequestError("model: must not be empty")
        if not isinstance(self.input_tokens, int) or self.input_tokens < 0:
            raise InvalidRoutingRequestError(
                f"input_tokens: must be an integer >= 0, got {self.input_tokens!r}"
            )
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRoutingRequestError(
                f"max_tokens: must be an integer >= 1, got {self.max_tokens!r}"
            )

    @property
    def input_tokens_floor(self) -> int:
        """A deliberately low bound on the prompt's tokens, for the context-length filter.

        ``input_tokens`` is an estimate (characters / 4) that can exceed the true count, and
        a hard filter on it would refuse prompts that fit; a quarter of it (characters / 16)
        only refuses prompts that cannot fit. The node checks the exact count anyway.
        """
        return self.input_tokens // _CONTEXT_FILTER_SLACK

    @property
    def context_needed(self) -> int:
        """The least context length a node needs for this request: the prompt's floor plus
        ``max_tokens``, as the node itself checks (prompt + max_tokens <= context), so a
        node too small for the output asked for is never picked only to refuse."""
        return self.input_tokens_floor + self.max_tokens

    def excluding(self, node_ids: Iterable[str]) -> RouteRequest:
        """The same request with ``node_ids`` added to the tried set (for failover/resume)."""
        return replace(self, exclude=self.exclude | frozenset(node_ids))

    @classmethod
    def from_proto(
        cls, message: inference_pb2.GenerateRequest, *, input_tokens: int | None = None
    ) -> RouteRequest:
        """Descriptor of a ``GenerateRequest``.

        ``input_tokens``: the prompt's token count if the caller knows it; otherwise it is
        estimated from the text (:func:`estimate_input_tokens`).
        """
        sampling = message.sampling
        max_tokens = (
            sampling.max_tokens
            if message.HasField("sampling") and sampling.HasField("max_tokens")
            else DEFAULT_MAX_TOKENS
        )
        return cls(
            model=message.model,
            input_tokens=(estimate_input_tokens(message) if input_tokens is None else input_tokens),
            max_tokens=max_tokens,
            preferences=RoutingPreferences.from_proto(message.routing),
        )


def estimate_input_tokens(message: inference_pb2.GenerateRequest) -> int:
    """A rough prompt token count: characters / 4, plus a few tokens per chat turn.

    Good enough to rank nodes by expected cost; billing uses the node's exact count.
    """
    which = message.WhichOneof("input")
    if which == "prompt":
        return estimate_prompt_tokens(len(message.prompt))
    if which == "chat":
        return estimate_chat_tokens([len(turn.content) for turn in message.chat.messages])
    return 0


def estimate_prompt_tokens(characters: int) -> int:
    """:func:`estimate_input_tokens` of a raw prompt of ``characters``."""
    return -(-characters // _CHARACTERS_PER_TOKEN)


def estimate_chat_tokens(content_characters: Iterable[int]) -> int:
    """:func:`estimate_input_tokens` of a chat whose messages' contents have these lengths."""
    total = 0
    for characters in content_characters:
        total += -(-characters // _CHARACTERS_PER_TOKEN) + _TOKENS_PER_CHAT_MESSAGE
    return total
