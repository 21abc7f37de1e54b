"""Real processes on 127.0.0.1: a coordinator and nodes with the real vLLM engine.

The engine is loaded once per node process, and the processes live for the whole test
session. Every child is stopped at the end; children also die with the test process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from mercato.v1 import inference_pb2, inference_pb2_grpc

from marketplace.cli.processes import Service, mercato_command, start_service
from tests.conftest import MODEL
from tests.conftest import test_models_dir as models_dir


class Cluster:
    """Processes started for the tests, stopped together."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.services: list[Service] = []

    def start_coordinator(self, name: str = "coordinator", *extra: str) -> Service:
        home = self.root / name
        service = start_service(
            name,
            mercato_command("coordinator", "start", "--home", str(home), "--port", "0", *extra),
            "MERCATO_COORDINATOR_READY",
            home / "log.txt",
            timeout_s=60,
        )
        self.services.append(service)
        return service

    def start_node(
        self,
        name: str,
        coordinator_address: str,
        *extra: str,
        engine: str = "vllm",
    ) -> Service:
        home = self.root / name
        service = start_service(
            name,
            mercato_command(
                "node",
                "start",
                "--home",
                str(home),
                "--models-dir",
                str(models_dir()),
                "--coordinator",
                coordinator_address,
                "--port",
                "0",
                "--engine",
                engine,
                *extra,
            ),
            "MERCATO_NODE_READY",
            home / "log.txt",
            timeout_s=300,
        )
        self.services.append(service)
        return service

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop(timeout_s=30)
        self.services.clear()


def wait_for_nodes(address: str, model: str, count: int, timeout_s: float = 60.0) -> None:
    """Wait until the coordinator lists ``model`` on ``count`` live nodes."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        while True:
            listed = stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5)
            nodes = {m.model: m.nodes for m in listed.models}
            if nodes.get(model, 0) == count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"coordinator lists {nodes}, wanted {count} node(s) of {model}")
            time.sleep(0.2)


@pytest.fixture(scope="session")
def prepared_model() -> Path:
    from node.model_store import ensure_model

    return ensure_model(models_dir(), MODEL, show_progress=False)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, prepared_model: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def coordinator(cluster: Cluster) -> Service:
    return cluster.start_coordinator()


@pytest.fixture(scope="session")
def coordinator_address(coordinator: Service) -> str:
    return str(coordinator.ready["address"])


@pytest.fixture(scope="session")
def node(cluster: Cluster, coordinator_address: str) -> Service:
    service = cluster.start_node("node-a", coordinator_address, "--region", "eu-west")
    wait_for_nodes(coordinator_address, MODEL, 1)
    return service
