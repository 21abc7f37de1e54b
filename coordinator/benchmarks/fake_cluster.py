"""A coordinator and one fake-engine node as child processes, for the relay benchmarks.

Both run as the command line runs them (``mercato coordinator start``, ``mercato node
start --engine fake``), each in its own process, on 127.0.0.1 with free ports. The
node's engine is the FakeEngine (made-up tokens at a fixed rate, no model), and the
model it serves is named ``FAKE_MODEL`` so nobody mistakes the figures for inference.
Billing is off: these benchmarks measure the relay, not the ledger.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from marketplace.cli.processes import Service, mercato_command, start_service
from marketplace.placement import format_cpus, pin

__all__ = ["FAKE_MODEL", "FakeCluster", "fake_cluster", "load_average"]

FAKE_MODEL = "fake-engine-benchmark-only"


@dataclass(frozen=True)
class FakeCluster:
    """The running pair: where to reach each, and their processes (for CPU times)."""

    coordinator_address: str
    node_address: str
    coordinator: psutil.Process
    node: psutil.Process


@contextlib.contextmanager
def fake_cluster(
    *,
    tokens_per_s: float,
    max_concurrency: int,
    stream_interval_max: int | None = None,
    coordinator_cpus: frozenset[int] | None = None,
    node_cpus: frozenset[int] | None = None,
) -> Iterator[FakeCluster]:
    """Start a coordinator and a node whose fake engine streams ``tokens_per_s`` per
    request; stop both on exit. ``stream_interval_max`` sets the node's
    ``MERCATO_NODE_STREAM_INTERVAL_MAX`` (None: whatever the environment says).
    ``coordinator_cpus`` / ``node_cpus``: the CPUs each runs on (None: any); the
    coordinator pins itself (``--cpus``), the node is pinned once it is up, before it
    serves a request."""
    node_env = {"MERCATO_NODE_FAKE_ENGINE_TOKENS_PER_S": str(tokens_per_s)}
    if stream_interval_max is not None:
        node_env["MERCATO_NODE_STREAM_INTERVAL_MAX"] = str(stream_interval_max)
    with (
        tempfile.TemporaryDirectory(prefix="mercato-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        home = Path(tmp)
        coordinator = _start(
            stack,
            "coordinator",
            [
                *("coordinator", "start", "--home", str(home / "c"), "--port", "0"),
                *(("--cpus", format_cpus(coordinator_cpus)) if coordinator_cpus else ()),
            ],
            "MERCATO_COORDINATOR_READY",
            home / "coordinator.log",
            {"MERCATO_COORDINATOR_BILLING_ENABLED": "false"},
        )
        address = coordinator.ready["address"]
        node = _start(
            stack,
            "node",
            [
                *("node", "start", "--engine", "fake", "--model", FAKE_MODEL),
                *("--home", str(home / "n"), "--coordinator", address, "--port", "0"),
                *("--max-concurrency", str(max_concurrency)),
            ],
            "MERCATO_NODE_READY",
            home / "node.log",
            node_env,
        )
        if node_cpus:
            pin(node_cpus, node.pid)
        _wait_until_listed(address)
        yield FakeCluster(
            coordinator_address=address,
            node_address=node.ready["worker_address"],
            coordinator=psutil.Process(coordinator.pid),
            node=psutil.Process(node.pid),
        )


def _start(
    stack: contextlib.ExitStack,
    name: str,
    args: list[str],
    ready_prefix: str,
    log_path: Path,
    env: dict[str, str],
) -> Service:
    argv = [*mercato_command(*args), "--log-level", "WARNING"]
    service = start_service(name, argv, ready_prefix, log_path, env=env, timeout_s=60)
    stack.callback(service.stop)
    return service


def _wait_until_listed(address: str, timeout_s: float = 30.0) -> None:
    import grpc
    from mercato.v1 import inference_pb2, inference_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        while time.monotonic() < deadline:
            listed = stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5)
            if any(m.model == FAKE_MODEL and m.nodes for m in listed.models):
                return
            time.sleep(0.1)
    raise TimeoutError(f"the fake node did not join the coordinator at {address}")


def load_average() -> tuple[float, float, float]:
    """The machine's 1, 5 and 15 minute load averages (as `uptime` shows them)."""
    return psutil.getloadavg()
