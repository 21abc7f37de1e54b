"""The simple node choice: hard constraints kept, least loaded first, ties by node id."""

from __future__ import annotations

from mercato.v1 import inference_pb2

from coordinator.choice import choose_nodes
from coordinator.market import MarketSnapshot, NodeLoadView, NodeView
from coordinator.offers import ModelTerms, VerifiedOffer


def view(
    node_id: str,
    *,
    region: str = "eu-west",
    models: tuple[str, ...] = ("m",),
    running: int = 0,
    waiting: int = 0,
    in_flight: int = 0,
    price_input: int = 10,
    price_output: int = 20,
) -> NodeView:
    offer = VerifiedOffer(
        node_id=node_id,
        node_public_key=b"",
        worker_address="127.0.0.1:1",
        region=region,
        models=tuple(ModelTerms(m, price_input, price_output, 2048) for m in models),
        max_concurrency=8,
        price_micro_usd_per_gpu_hour=0,
        accelerator=1,
        gpu_count=0,
        issued_at_unix_ms=0,
        sequence=1,
        offer_bytes=b"",
        signature=b"",
    )
    return NodeView(
        node_id=node_id,
        offer=offer,
        load=NodeLoadView(running_requests=running, waiting_requests=waiting),
        in_flight=in_flight,
    )


def snapshot(*views: NodeView) -> MarketSnapshot:
    known = frozenset(t.model for v in views for t in v.offer.models)
    return MarketSnapshot.build(1, tuple(views), known)


def ids(nodes) -> list[str]:
    return [n.node_id for n in nodes]


NO_PREFS = inference_pb2.RoutingPreferences()


def test_least_loaded_first_ties_by_node_id() -> None:
    market = snapshot(view("c", running=1), view("b", waiting=2), view("a", running=1), view("d"))
    assert ids(choose_nodes(market, "m", NO_PREFS, 10)) == ["d", "a", "c", "b"]


def test_own_in_flight_counts_when_heartbeats_lag() -> None:
    market = snapshot(view("a", in_flight=3), view("b", running=2))
    assert ids(choose_nodes(market, "m", NO_PREFS, 10)) == ["b", "a"]


def test_only_nodes_serving_the_model() -> None:
    market = snapshot(view("a", models=("x",)), view("b"))
    assert ids(choose_nodes(market, "m", NO_PREFS, 10)) == ["b"]
    assert choose_nodes(market, "nope", NO_PREFS, 10) == []


def test_limit_and_no_fallbacks() -> None:
    market = snapshot(view("a"), view("b"), view("c"))
    assert ids(choose_nodes(market, "m", NO_PREFS, 2)) == ["a", "b"]
    prefs = inference_pb2.RoutingPreferences(allow_fallbacks=False)
    assert ids(choose_nodes(market, "m", prefs, 3)) == ["a"]
    prefs = inference_pb2.RoutingPreferences(allow_fallbacks=True)
    assert ids(choose_nodes(market, "m", prefs, 3)) == ["a", "b", "c"]


def test_hard_constraints() -> None:
    market = snapshot(
        view("a", region="eu-west", price_input=5, price_output=50),
        view("b", region="us-east", price_input=50, price_output=5),
        view("c", region="us-east", price_input=5, price_output=5),
    )
    regions = inference_pb2.RoutingPreferences(regions=["us-east"])
    assert ids(choose_nodes(market, "m", regions, 10)) == ["b", "c"]
    cap_in = inference_pb2.RoutingPreferences(max_price_input_micro_usd_per_mtok=5)
    assert ids(choose_nodes(market, "m", cap_in, 10)) == ["a", "c"]
    cap_out = inference_pb2.RoutingPreferences(max_price_output_micro_usd_per_mtok=5)
    assert ids(choose_nodes(market, "m", cap_out, 10)) == ["b", "c"]
    cap_zero = inference_pb2.RoutingPreferences(max_price_output_micro_usd_per_mtok=0)
    assert choose_nodes(market, "m", cap_zero, 10) == []
    only = inference_pb2.RoutingPreferences(only_nodes=["c", "a"])
    assert ids(choose_nodes(market, "m", only, 10)) == ["a", "c"]
    ignore = inference_pb2.RoutingPreferences(ignore_nodes=["a"])
    assert ids(choose_nodes(market, "m", ignore, 10)) == ["b", "c"]
