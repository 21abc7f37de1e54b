"""Checks of a client's GenerateRequest, before anything else happens to it.

Every rule failure raises :class:`RequestInvalid` whose message starts with the field's
path (``sampling.top_p: ...``), so a person sees what to change. A request that passes
becomes a :class:`ValidRequest`, with defaults filled in and the worker request built.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from mercato.v1 import common_pb2, inference_pb2, node_pb2

from coordinator.errors import RequestInvalid
from coordinator.offers import MODEL_NAME_PATTERN, REGION_PATTERN
from coordinator.routing.request import estimate_chat_tokens, estimate_prompt_tokens
from coordinator.settings import CoordinatorSettings
from marketplace.ids import time_ordered_id

# No ':' and at most 120 characters: a resumed segment's node request id is
# "<request id>:<segment index>" (coordinator/outcome.py), which must never be another
# request's id (receipts are keyed by it) and must fit the node's 128 characters.
REQUEST_ID_CHARS_MAX = 120
REQUEST_ID_PATTERN = re.compile(rf"^[A-Za-z0-9._-]{{1,{REQUEST_ID_CHARS_MAX}}}$")
ROLES = frozenset({"system", "user", "assistant"})
STOP_SEQUENCES_MAX = 8
STOP_SEQUENCE_CHARS_MAX = 128
ROUTING_LIST_MAX = 256
NODE_ID_CHARS_MAX = 128
LEASE_ID_CHARS_MAX = 128
TEMPERATURE_MAX = 2.0  # as OpenAI's API and vLLM have it
SEED_MAX = 2**63 - 1  # what engines take (vLLM: a signed 64-bit seed)
_SORT_MODES = frozenset(inference_pb2.SortMode.values())


@dataclass(frozen=True, slots=True)
class ValidRequest:
    """A request that passed every check, ready to send to a node."""

    request_id: str
    model: str
    routing: inference_pb2.RoutingPreferences
    # The work for the first node (segment 0, nothing to resume); copy before changing.
    worker_request: node_pb2.WorkerGenerateRequest
    # The prompt's tokens as routing estimates them (``estimate_input_tokens``), counted
    # while the input was checked.
    input_tokens_estimate: int
    # ``worker_request.sampling.max_tokens``: the client's, or the default.
    max_tokens: int
    # Nodes held by leases this request is not under (billing sets them): a hard
    # constraint kept apart from the client's ignore_nodes so a refusal names it.
    leased_nodes: frozenset[str] = frozenset()
    # True when the coordinator generated request_id (the client sent none): a fresh id
    # that no earlier request can have used, so billing skips the ledger's look-up.
    id_assigned: bool = False


def validate_request(
    request: inference_pb2.GenerateRequest, settings: CoordinatorSettings
) -> ValidRequest:
    """Check every field of ``request``; raise RequestInvalid naming the first bad one."""
    request_id = request.request_id
    id_assigned = not request_id
    if request_id:
        if not REQUEST_ID_PATTERN.fullmatch(request_id):
            raise RequestInvalid(
                f"request_id: {request_id[:40]!r} must be 1..{REQUEST_ID_CHARS_MAX} characters "
                "of [A-Za-z0-9._-], or empty to let the coordinator assign one"
            )
    else:
        request_id = time_ordered_id()  # keeps the ledger's indexes append-mostly
    if not request.model:
        raise RequestInvalid("model: required; ListModels lists the models served")
    if not MODEL_NAME_PATTERN.fullmatch(request.model):
        raise RequestInvalid(
            f"model: {request.model[:40]!r} is not a model name; ListModels lists the models served"
        )
    worker = node_pb2.WorkerGenerateRequest(request_id=request_id, model=request.model)
    input_tokens_estimate = _check_input(request, worker, settings)
    max_tokens = _check_sampling(request, worker, settings)
    if request.HasField("routing"):
        _check_routing(request.routing)
    if request.lease_id:
        if len(request.lease_id) > LEASE_ID_CHARS_MAX:
            raise RequestInvalid(f"lease_id: more than {LEASE_ID_CHARS_MAX} characters")
        # Whether the lease exists and is the caller's is billing's check
        # (coordinator.billing.Billing.constrain); the node's receipt names the lease.
        worker.lease_id = request.lease_id
    return ValidRequest(
        request_id=request_id,
        model=request.model,
        routing=request.routing,
        worker_request=worker,
        input_tokens_estimate=input_tokens_estimate,
        max_tokens=max_tokens,
        id_assigned=id_assigned,
    )


def _check_input(
    request: inference_pb2.GenerateRequest,
    worker: node_pb2.WorkerGenerateRequest,
    settings: CoordinatorSettings,
) -> int:
    """Check the input, copy it into ``worker``; the prompt's estimated tokens."""
    kind = request.WhichOneof("input")
    if kind is None:
        raise RequestInvalid("input: set either chat (a conversation) or prompt (raw text)")
    limit = settings.max_prompt_chars
    if kind == "prompt":
        if not request.prompt:
            raise RequestInvalid("prompt: empty; send the text to complete")
        if len(request.prompt) > limit:
            raise RequestInvalid(
                f"prompt: {len(request.prompt)} characters, more than the limit of {limit}"
            )
        worker.prompt = request.prompt
        return estimate_prompt_tokens(len(request.prompt))
    messages = request.chat.messages
    if not messages:
        raise RequestInvalid("chat.messages: empty; send at least one message")
    if len(messages) > settings.max_messages:
        raise RequestInvalid(
            f"chat.messages: {len(messages)} messages, more than the limit of {settings.max_messages}"
        )
    lengths: list[int] = []
    for index, message in enumerate(messages):
        if message.role not in ROLES:
            raise RequestInvalid(
                f"chat.messages[{index}].role: {message.role[:20]!r} is not one of "
                "system, user, assistant"
            )
        length = len(message.content)
        if not length:
            raise RequestInvalid(f"chat.messages[{index}].content: empty")
        lengths.append(length)
    total = sum(lengths)
    if total > limit:
        raise RequestInvalid(
            f"chat.messages: {total} characters of content, more than the limit of {limit}"
        )
    worker.chat.CopyFrom(request.chat)
    return estimate_chat_tokens(lengths)


def _check_sampling(
    request: inference_pb2.GenerateRequest,
    worker: node_pb2.WorkerGenerateRequest,
    settings: CoordinatorSettings,
) -> int:
    """Check the sampling parameters, copy them into ``worker``; its max_tokens."""
    sampling = request.sampling
    out: common_pb2.SamplingParams = worker.sampling
    out.CopyFrom(sampling)
    if sampling.HasField("max_tokens"):
        max_tokens = sampling.max_tokens
        if not 1 <= max_tokens <= settings.max_tokens_limit:
            raise RequestInvalid(
                f"sampling.max_tokens: {max_tokens} is outside 1..{settings.max_tokens_limit}"
            )
    else:
        max_tokens = out.max_tokens = settings.default_max_tokens
    if sampling.HasField("temperature") and not (
        math.isfinite(sampling.temperature) and 0 <= sampling.temperature <= TEMPERATURE_MAX
    ):
        raise RequestInvalid(
            f"sampling.temperature: {sampling.temperature} must be in [0, {TEMPERATURE_MAX:g}] "
            "(0 is greedy)"
        )
    if sampling.HasField("top_p") and not 0 < sampling.top_p <= 1:
        raise RequestInvalid(f"sampling.top_p: {sampling.top_p} must be in (0, 1]")
    if sampling.seed > SEED_MAX:
        raise RequestInvalid(f"sampling.seed: {sampling.seed} is above {SEED_MAX}")
    if len(sampling.stop) > STOP_SEQUENCES_MAX:
        raise RequestInvalid(
            f"sampling.stop: {len(sampling.stop)} strings, more than {STOP_SEQUENCES_MAX}"
        )
    for index, stop in enumerate(sampling.stop):
        if not 1 <= len(stop) <= STOP_SEQUENCE_CHARS_MAX:
            raise RequestInvalid(
                f"sampling.stop[{index}]: {len(stop)} characters; each stop string has "
                f"1..{STOP_SEQUENCE_CHARS_MAX}"
            )
    return max_tokens


def _check_routing(routing: inference_pb2.RoutingPreferences) -> None:
    for name in ("regions", "only_nodes", "ignore_nodes"):
        values = getattr(routing, name)
        if len(values) > ROUTING_LIST_MAX:
            raise RequestInvalid(
                f"routing.{name}: {len(values)} entries, more than {ROUTING_LIST_MAX}"
            )
    for index, region in enumerate(routing.regions):
        if not REGION_PATTERN.fullmatch(region):
            raise RequestInvalid(
                f"routing.regions[{index}]: {region[:40]!r} is not a region code "
                "(lowercase letters, digits, '-')"
            )
    for name in ("only_nodes", "ignore_nodes"):
        for index, node_id in enumerate(getattr(routing, name)):
            if not 1 <= len(node_id) <= NODE_ID_CHARS_MAX:
                raise RequestInvalid(
                    f"routing.{name}[{index}]: a node id has 1..{NODE_ID_CHARS_MAX} characters"
                )
    if routing.sort not in _SORT_MODES:
        raise RequestInvalid(f"routing.sort: {routing.sort} is not a known SortMode")
