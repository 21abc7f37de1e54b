from __future__ import annotations

import pytest
from mercato.v1 import common_pb2, inference_pb2

from coordinator.routing import (
    InvalidRoutingRequestError,
    RouteRequest,
    RoutingPreferences,
    SortMode,
)
from coordinator.routing.request import DEFAULT_MAX_TOKENS


def test_sort_mode_mirrors_the_proto_enum() -> None:
    names = {v.name: v.number for v in inference_pb2.SortMode.DESCRIPTOR.values}
    for mode in SortMode:
        assert names[f"SORT_MODE_{mode.name}"] == mode.to_proto()
        assert SortMode.from_proto(mode.to_proto()) is mode
    assert SortMode.from_proto(inference_pb2.SORT_MODE_UNSPECIFIED) is SortMode.BALANCED


def test_from_proto_reads_every_preference() -> None:
    message = inference_pb2.GenerateRequest(
        model="m",
        prompt="x" * 41,
        sampling=common_pb2.SamplingParams(max_tokens=64),
        routing=inference_pb2.RoutingPreferences(
            regions=["eu-west", "eu-north"],
            max_price_input_micro_usd_per_mtok=0,
            max_price_output_micro_usd_per_mtok=500,
            sort=inference_pb2.SORT_MODE_LATENCY,
            allow_fallbacks=False,
            only_nodes=["a"],
            ignore_nodes=["b"],
        ),
    )
    request = RouteRequest.from_proto(message)
    assert request.model == "m" and request.max_tokens == 64 and request.input_tokens == 11
    prefs = request.preferences
    assert prefs.regions == {"eu-west", "eu-north"}
    assert prefs.max_price_input_micro_usd_per_mtok == 0, "an explicit 0 cap is a cap"
    assert prefs.max_price_output_micro_usd_per_mtok == 500
    assert prefs.sort is SortMode.LATENCY and prefs.allow_fallbacks is False
    assert prefs.only_nodes == {"a"} and prefs.ignore_nodes == {"b"}


def test_from_proto_defaults() -> None:
    chat = common_pb2.ChatInput(messages=[common_pb2.ChatMessage(role="user", content="hello")])
    request = RouteRequest.from_proto(inference_pb2.GenerateRequest(model="m", chat=chat))
    assert request.max_tokens == DEFAULT_MAX_TOKENS
    assert request.input_tokens > 0
    assert request.preferences == RoutingPreferences()
    assert (
        RouteRequest.from_proto(
            inference_pb2.GenerateRequest(model="m"), input_tokens=7
        ).input_tokens
        == 7
    )


def test_excluding_accumulates_and_keeps_preferences() -> None:
    prefs = RoutingPreferences(regions=frozenset({"eu-west"}))
    request = RouteRequest("m", 10, preferences=prefs).excluding(["a"]).excluding(["b"])
    assert request.exclude == {"a", "b"} and request.preferences is prefs


def test_request_validation() -> None:
    with pytest.raises(InvalidRoutingRequestError, match="max_tokens"):
        RouteRequest("m", 10, max_tokens=0)
    with pytest.raises(InvalidRoutingRequestError, match="input_tokens"):
        RouteRequest("m", -1)
    with pytest.raises(InvalidRoutingRequestError, match="model"):
        RouteRequest("", 1)
    with pytest.raises(InvalidRoutingRequestError, match="max_price_output"):
        RoutingPreferences(max_price_output_micro_usd_per_mtok=-5)
