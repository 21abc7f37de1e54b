"""``mercato bench overhead``'s placement of its processes on CPUs."""

from __future__ import annotations

import pytest

from coordinator.benchmarks.overhead import Placement, plan_placement


def test_dedicated_gives_the_relays_the_highest_cpu_and_the_rest_the_others() -> None:
    plan = plan_placement("dedicated", frozenset({0, 1}))
    assert plan == Placement("dedicated", frozenset({1}), frozenset({0}))
    assert plan.describe() == {
        "placement": "dedicated",
        "relay_cpus": "1",
        "node_and_client_cpus": "0",
    }
    wide = plan_placement("dedicated", frozenset({2, 3, 5, 7}))
    assert wide.relay_cpus == {7}
    assert wide.rest_cpus == {2, 3, 5}
    assert wide.describe()["node_and_client_cpus"] == "2-3,5"


def test_shared_or_a_single_cpu_pins_nothing() -> None:
    for plan in (plan_placement("shared", frozenset({0, 1})), plan_placement("dedicated", {0})):
        assert plan == Placement("shared")
        assert plan.describe() == {
            "placement": "shared",
            "relay_cpus": "any",
            "node_and_client_cpus": "any",
        }


def test_an_unknown_placement_is_refused() -> None:
    with pytest.raises(ValueError, match="placement 'spread': one of dedicated, shared"):
        plan_placement("spread", frozenset({0, 1}))
