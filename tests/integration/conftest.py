"""Real processes on 127.0.0.1: a coordinator and nodes with the real vLLM engine.

The engine is loaded once per node process, and the processes live for the whole test
session. Every child is stopped at the end; children also die with the test process.

Billing is on in every coordinator (the default): :meth:`Cluster.start_coordinator`
gives each one a funded client account and puts its API key in the service's ready
dict (``ready["api_key"]``); :func:`authorized_channel` sends it on every call.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from mercato.v1 import inference_pb2, inference_pb2_grpc

from marketplace.cli.processes import Service, mercato_command, start_service
from tests.conftest import MODEL
from tests.conftest import test_models_dir as models_dir

# API key of the funded test client of each coordinator, by address.
API_KEYS: dict[str, str] = {}
TEST_CREDITS_MICRO_USD = 100_000_000  # 100 USD


def funded_key(
    home: Path,
    database_url: str | None = None,
    *,
    account: str = "test-client",
    credits_micro_usd: int = TEST_CREDITS_MICRO_USD,
) -> str:
    """An API key of a client account with ``credits_micro_usd`` deposited once, in the
    ledger a coordinator with this home uses (``database_url``, else home/mercato.db)."""
    from marketplace.cli.up_cmd import ensure_client_key

    key, _ = ensure_client_key(
        home,
        database_url or f"sqlite:///{home / 'mercato.db'}",
        account=account,
        credits_micro_usd=credits_micro_usd,
        key_path=home / f"{account}.key",
    )
    return key


class Cluster:
    """Processes started for the tests, stopped together."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.services: list[Service] = []

    def start_coordinator(
        self,
        name: str = "coordinator",
        *extra: str,
        env: dict[str, str] | None = None,
        database_url: str | None = None,
    ) -> Service:
        """Start a coordinator (home: root/name) with a funded client key in
        ``ready["api_key"]``; ``database_url`` sets MERCATO_DATABASE_URL (PostgreSQL)."""
        home = self.root / name
        child_env = dict(env or {})
        if database_url is not None:
            child_env["MERCATO_DATABASE_URL"] = database_url
        service = start_service(
            name,
            mercato_command("coordinator", "start", "--home", str(home), "--port", "0", *extra),
            "MERCATO_COORDINATOR_READY",
            home / "log.txt",
            env=child_env,
            timeout_s=60,
        )
        self.services.append(service)
        if service.ready.get("billing"):
            key = funded_key(home, database_url)
            service.ready["api_key"] = key
            API_KEYS[str(service.ready["address"])] = key
        return service

    def start_node(
        self,
        name: str,
        coordinator_address: str,
        *extra: str,
        engine: str = "vllm",
        env: dict[str, str] | None = None,
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
            env=env,
            timeout_s=300,
        )
        self.services.append(service)
        return service

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop(timeout_s=30)
        self.services.clear()


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class _BearerKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds ``authorization: Bearer <key>`` to every call."""

    def __init__(self, api_key: str) -> None:
        self._header = ("authorization", f"Bearer {api_key}")

    def _details(self, details: Any) -> _CallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), self._header],
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)


@contextmanager
def authorized_channel(address: str, api_key: str | None = None) -> Iterator[grpc.Channel]:
    """A channel to ``address`` that sends the API key (default: the funded test key of
    the coordinator at ``address``) on every call."""
    key = api_key if api_key is not None else API_KEYS.get(address)
    with grpc.insecure_channel(address) as channel:
        yield grpc.intercept_channel(channel, _BearerKey(key)) if key else channel


def wait_for_nodes(address: str, model: str, count: int, timeout_s: float = 60.0) -> None:
    """Wait until the coordinator lists ``model`` on ``count`` live nodes."""
    deadline = time.monotonic() + timeout_s
    with authorized_channel(address) as channel:
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
