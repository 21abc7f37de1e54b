"""Request checks as a pure function (the gRPC tests cover each bad field end to end)."""

from __future__ import annotations

import uuid

import pytest
from mercato.v1 import common_pb2, inference_pb2

from coordinator.errors import RequestInvalid
from coordinator.routing.request import estimate_input_tokens
from coordinator.settings import CoordinatorSettings
from coordinator.validation import validate_request

SETTINGS = CoordinatorSettings(
    max_prompt_chars=100, max_messages=3, max_tokens_limit=50, default_max_tokens=20
)


def request(**kwargs) -> inference_pb2.GenerateRequest:
    base = inference_pb2.GenerateRequest(model="m", prompt="hello")
    for name, value in kwargs.items():
        if name == "chat":
            base.chat.CopyFrom(value)
        else:
            setattr(base, name, value)
    return base


def chat(*pairs: tuple[str, str]) -> common_pb2.ChatInput:
    return common_pb2.ChatInput(
        messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in pairs]
    )


def test_valid_request_builds_the_worker_request() -> None:
    r = request(chat=chat(("system", "be brief"), ("user", "hi")))
    r.sampling.temperature = 0.0
    r.sampling.seed = 7
    valid = validate_request(r, SETTINGS)
    assert uuid.UUID(valid.request_id).version == 7  # time-ordered (marketplace.ids)
    worker = valid.worker_request
    assert worker.request_id == valid.request_id
    assert worker.WhichOneof("input") == "chat"
    assert [m.role for m in worker.chat.messages] == ["system", "user"]
    assert worker.sampling.max_tokens == 20
    assert worker.sampling.HasField("temperature") and worker.sampling.seed == 7
    assert not worker.sampling.HasField("top_p")


def test_limits_from_settings() -> None:
    with pytest.raises(RequestInvalid, match=r"^prompt"):
        validate_request(request(prompt="x" * 101), SETTINGS)
    validate_request(request(prompt="x" * 100), SETTINGS)
    with pytest.raises(RequestInvalid, match=r"^chat\.messages: 4 messages"):
        validate_request(request(chat=chat(*[("user", "a")] * 4)), SETTINGS)
    with pytest.raises(RequestInvalid, match=r"^chat\.messages: 101 characters"):
        validate_request(request(chat=chat(("user", "a" * 51), ("user", "b" * 50))), SETTINGS)
    r = request()
    r.sampling.max_tokens = 51
    with pytest.raises(RequestInvalid, match=r"^sampling\.max_tokens"):
        validate_request(r, SETTINGS)


@pytest.mark.parametrize("request_id", ["a", "A-z_0.9".replace("_", "-"), "x" * 120])
def test_good_request_ids(request_id: str) -> None:
    assert validate_request(request(request_id=request_id), SETTINGS).request_id == request_id


# ':' and the last 8 of 128 characters are the coordinator's: a resumed segment's node
# request id is "<request id>:<index>", never another request's id ("r:1" would be the
# id of request "r"'s second segment, whose receipt would then refuse r:1's settlement).
@pytest.mark.parametrize("request_id", ["a b", "x" * 121, "ä", "a\n", "a/b", "r:1"])
def test_bad_request_ids(request_id: str) -> None:
    with pytest.raises(RequestInvalid, match=r"^request_id"):
        validate_request(request(request_id=request_id), SETTINGS)


def test_routing_fields() -> None:
    r = request()
    r.routing.sort = 99
    with pytest.raises(RequestInvalid, match=r"^routing\.sort"):
        validate_request(r, SETTINGS)
    r = request()
    r.routing.only_nodes.append("")
    with pytest.raises(RequestInvalid, match=r"^routing\.only_nodes\[0\]"):
        validate_request(r, SETTINGS)
    r = request()
    r.routing.ignore_nodes.extend(["n"] * 257)
    with pytest.raises(RequestInvalid, match=r"^routing\.ignore_nodes"):
        validate_request(r, SETTINGS)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("temperature", 2.5, r"^sampling\.temperature: 2\.5 must be in \[0, 2\]"),
        ("temperature", -0.1, r"^sampling\.temperature"),
        ("temperature", float("inf"), r"^sampling\.temperature"),
        ("top_p", 0.0, r"^sampling\.top_p"),
        ("seed", 2**63, r"^sampling\.seed: 9223372036854775808 is above"),
    ],
)
def test_sampling_bounds(field: str, value: float, needle: str) -> None:
    # What passes here the engine must take: an engine refusal would reach the client as
    # the node's error (vLLM refuses temperatures above 2).
    r = request()
    setattr(r.sampling, field, value)
    with pytest.raises(RequestInvalid, match=needle):
        validate_request(r, SETTINGS)


def test_sampling_at_the_bounds_passes() -> None:
    r = request()
    r.sampling.temperature = 2.0
    r.sampling.top_p = 1.0
    r.sampling.seed = 2**63 - 1
    assert validate_request(r, SETTINGS).worker_request.sampling.seed == 2**63 - 1


def test_stop_strings() -> None:
    r = request()
    r.sampling.stop.append("x" * 129)
    with pytest.raises(RequestInvalid, match=r"^sampling\.stop\[0\]"):
        validate_request(r, SETTINGS)


def test_lease_goes_to_the_node() -> None:
    # Whether the lease exists is billing's check; the node's receipt names the lease.
    assert validate_request(request(lease_id="l-1"), SETTINGS).worker_request.lease_id == "l-1"
    with pytest.raises(RequestInvalid, match=r"^lease_id"):
        validate_request(request(lease_id="l" * 129), SETTINGS)


def test_the_routing_estimates_are_counted_while_checking() -> None:
    chatted = request(chat=chat(("system", "be brief"), ("user", "x" * 41)))
    valid = validate_request(chatted, SETTINGS)
    assert valid.input_tokens_estimate == estimate_input_tokens(chatted) == (2 + 4) + (11 + 4)
    assert valid.max_tokens == valid.worker_request.sampling.max_tokens == 20  # the default
    prompted = request(prompt="y" * 9)
    prompted.sampling.max_tokens = 7
    valid = validate_request(prompted, SETTINGS)
    assert valid.input_tokens_estimate == estimate_input_tokens(prompted) == 3
    assert valid.max_tokens == valid.worker_request.sampling.max_tokens == 7
