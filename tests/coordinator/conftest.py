"""In-process fixtures: a coordinator on a free port, fake nodes, a client stub."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc.aio
import pytest
from mercato.v1 import inference_pb2, inference_pb2_grpc

from coordinator.server import Coordinator
from coordinator.settings import CoordinatorSettings
from marketplace.ledger.models import AccountKind
from marketplace.ledger.store import IssuedKey, LedgerStore

from .fakes import FakeNode


def fast_settings(home: Path, **overrides: object) -> CoordinatorSettings:
    values: dict[str, object] = {
        "home": home,
        "port": 0,
        "heartbeat_interval_ms": 50,
        "liveness_timeout_ms": 400,
        "connect_timeout_s": 2.0,
        "first_token_timeout_s": 2.0,
        "shutdown_grace_s": 0,
        # The relay and routing tests run without keys; tests/coordinator/test_billing.py
        # turns billing on.
        "billing_enabled": False,
    }
    values.update(overrides)
    return CoordinatorSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
async def coordinator(tmp_path: Path) -> AsyncIterator[Coordinator]:
    coordinator = Coordinator(fast_settings(tmp_path))
    await coordinator.start()
    yield coordinator
    await coordinator.stop(grace_s=0)


@pytest.fixture
async def client(
    coordinator: Coordinator,
) -> AsyncIterator[inference_pb2_grpc.InferenceServiceStub]:
    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


NodeFactory = Callable[..., Awaitable[FakeNode]]


@pytest.fixture
async def make_node(coordinator: Coordinator) -> AsyncIterator[NodeFactory]:
    nodes: list[FakeNode] = []

    async def make(**kwargs: object) -> FakeNode:
        start_kwargs = {k: kwargs.pop(k) for k in ("register", "heartbeat") if k in kwargs}
        node = FakeNode(coordinator.address, **kwargs)  # type: ignore[arg-type]
        nodes.append(node)
        await node.start(**start_kwargs)  # type: ignore[arg-type]
        return node

    yield make
    for node in nodes:
        await node.stop()


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def collect(
    stub: inference_pb2_grpc.InferenceServiceStub,
    request: inference_pb2.GenerateRequest,
    timeout_s: float = 10,
) -> list[inference_pb2.GenerateResponse]:
    return [response async for response in stub.Generate(request, timeout=timeout_s)]


def funded_client_key(store: LedgerStore, name: str) -> IssuedKey:
    """A client account ``name`` with 1 USD deposited, and an API key issued for it."""
    account = store.create_account(AccountKind.CLIENT, name)
    store.deposit(account.id, 1_000_000, f"fund-{name}")
    return store.issue_key(account.id, "k")


@contextlib.asynccontextmanager
async def billed_coordinator_and_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **settings: object
) -> AsyncIterator[tuple[Coordinator, FakeNode]]:
    """A whole coordinator (billing on, SQLite in ``tmp_path``, ``settings`` changed) and
    a fake node registered with it; both stopped at the end."""
    monkeypatch.delenv("MERCATO_DATABASE_URL", raising=False)
    coordinator = Coordinator(fast_settings(tmp_path, billing_enabled=True, **settings))
    await coordinator.start()
    node = FakeNode(coordinator.address)
    try:
        await node.start()
        yield coordinator, node
    finally:
        await node.stop()
        await coordinator.stop(grace_s=0)
