"""The agent against a tiny in-test NodeControlService: register, heartbeat, come back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mercato.v1 import market_pb2, node_pb2

from marketplace.dispatch import dispatch_tag
from marketplace.identity import Identity
from node.agent import NODE_ID_METADATA, SESSION_METADATA, NodeAgent
from node.hardware import HardwareInfo
from node.offer import build_offer, sign_offer
from node.receipts import ReceiptOutbox, sign_receipt
from node.settings import NodeSettings

from .control_fake import SESSION_TOKEN, RecordingControl, start_control


def _agent(  # type: ignore[no-untyped-def]
    address: str,
    identity: Identity,
    tmp_path,
    outbox: ReceiptOutbox | None = None,
    count_dispatched=None,
) -> NodeAgent:
    settings = NodeSettings(home=tmp_path)
    hardware = HardwareInfo(cpu_cores=2, memory_bytes=2**30, cpu_model="x")

    def signed(sequence: int) -> market_pb2.SignedOffer:
        return sign_offer(
            identity,
            build_offer(
                settings,
                public_key=identity.public_key,
                worker_address="127.0.0.1:9",
                hardware=hardware,
                context_length=2048,
                sequence=sequence,
            ),
        )

    return NodeAgent(
        address,
        signed,
        lambda: node_pb2.NodeLoad(running_requests=3, output_tokens_per_s=42),
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
        late_receipts=outbox,
        count_dispatched=count_dispatched,
    )


async def _until(predicate, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 (polling state owned by grpc tasks)
            await asyncio.sleep(0.01)


async def test_registers_then_heartbeats_with_session_metadata(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    control = RecordingControl()
    server, port = await start_control(control)
    identity = Identity.generate()
    agent = _agent(f"127.0.0.1:{port}", identity, tmp_path)
    agent.start()
    try:
        await _until(lambda: len(control.heartbeats) >= 3)
        assert agent.registered.is_set()
        assert agent.node_id == identity.node_id
        [offer] = control.offers
        assert offer.node_public_key == identity.public_key
        metadata, heartbeat = control.heartbeats[0]
        assert metadata[NODE_ID_METADATA] == identity.node_id
        assert metadata[SESSION_METADATA] == SESSION_TOKEN
        assert heartbeat.load.running_requests == 3
        assert heartbeat.load.output_tokens_per_s == 42
        assert not heartbeat.load.HasField("coordinator_requests")  # no counter given
        assert [hb.sequence for _, hb in control.heartbeats[:3]] == [1, 2, 3]
        await _until(lambda: agent.heartbeat_round_trip_s is not None)
    finally:
        await agent.stop()
        await server.stop(0)
    assert SESSION_TOKEN not in caplog.text


async def test_heartbeats_say_how_many_open_calls_the_coordinator_sent(tmp_path) -> None:  # type: ignore[no-untyped-def]
    control = RecordingControl()
    server, port = await start_control(control)
    asked: list[str] = []

    def count_dispatched(tag: str) -> int:
        asked.append(tag)
        return 2 if tag == dispatch_tag(SESSION_TOKEN) else 99

    agent = _agent(
        f"127.0.0.1:{port}", Identity.generate(), tmp_path, count_dispatched=count_dispatched
    )
    agent.start()
    try:
        await _until(lambda: len(control.heartbeats) >= 2)
        _, heartbeat = control.heartbeats[0]
        assert heartbeat.load.HasField("coordinator_requests")
        assert heartbeat.load.coordinator_requests == 2
        assert set(asked) == {dispatch_tag(SESSION_TOKEN)}  # the tag of this session
    finally:
        await agent.stop()
        await server.stop(0)


async def test_re_registers_when_the_stream_ends(tmp_path) -> None:  # type: ignore[no-untyped-def]
    control = RecordingControl()
    control.end_streams_after = 2
    server, port = await start_control(control)
    agent = _agent(f"127.0.0.1:{port}", Identity.generate(), tmp_path)
    agent.start()
    try:
        await _until(lambda: len(control.offers) >= 3)
        sequences = [offer.sequence for offer in control.offers]
        assert sequences == sorted(set(sequences))  # every new offer has a higher sequence
    finally:
        await agent.stop()
        await server.stop(0)


async def test_a_session_that_dies_at_once_backs_off(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Register succeeds but every heartbeat stream ends at once (a coordinator that
    refuses the session): the agent backs off as after a failed Register (0.05 s
    doubling to 0.2 s here), rather than registering again every 0.05 s."""
    control = RecordingControl()
    control.end_streams_after = 0  # ends each stream after its first answer
    server, port = await start_control(control)
    agent = _agent(f"127.0.0.1:{port}", Identity.generate(), tmp_path)
    agent.start()
    try:
        await _until(lambda: len(control.offers) >= 2)
        started = asyncio.get_running_loop().time()
        first = len(control.offers)
        await asyncio.sleep(1.2)
        registered = len(control.offers) - first
        elapsed = asyncio.get_running_loop().time() - started
        # At the cap, one Register per 0.2 s (plus its own round trips); without the
        # backoff it was one per 0.05 s: 20 or more in this time.
        assert registered <= elapsed / 0.2 + 2, registered
    finally:
        await agent.stop()
        await server.stop(0)


async def test_comes_back_after_the_coordinator_restarts(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    first = RecordingControl()
    server, port = await start_control(first)
    agent = _agent(f"127.0.0.1:{port}", Identity.generate(), tmp_path)
    agent.start()
    try:
        await _until(lambda: len(first.heartbeats) >= 1)
        await server.stop(0)
        await _until(lambda: not agent.registered.is_set())
        await asyncio.sleep(0.3)  # a few refused attempts while it is down
        second = RecordingControl()
        server, _ = await start_control(second, port)
        await _until(lambda: len(second.heartbeats) >= 2)
        assert len(second.offers) == 1
        assert agent.registrations >= 2
    finally:
        await agent.stop()
        await server.stop(0)
    assert SESSION_TOKEN not in caplog.text


def _late_receipt(identity: Identity, request_id: str) -> market_pb2.SignedReceipt:
    usage = market_pb2.UsageReceipt(
        request_id=request_id, node_id=identity.node_id, model="m", output_tokens=3
    )
    return sign_receipt(identity, usage)


@contextlib.asynccontextmanager
async def _receipt_agent(
    control: RecordingControl, tmp_path: Path
) -> AsyncIterator[tuple[Identity, ReceiptOutbox, NodeAgent]]:
    """An agent with an outbox, registered with ``control`` and past its first heartbeat."""
    server, port = await start_control(control)
    identity = Identity.generate()
    outbox = ReceiptOutbox()
    agent = _agent(f"127.0.0.1:{port}", identity, tmp_path, outbox)
    agent.start()
    try:
        await _until(lambda: len(control.heartbeats) >= 1)
        yield identity, outbox, agent
    finally:
        await agent.stop()
        await server.stop(0)


def _sent_receipts(control: RecordingControl) -> list[str]:
    return [
        market_pb2.UsageReceipt.FromString(signed.receipt).request_id
        for _, heartbeat in control.heartbeats
        for signed in heartbeat.late_receipts
    ]


async def test_late_receipts_go_out_at_once_on_a_heartbeat(tmp_path) -> None:  # type: ignore[no-untyped-def]
    control = RecordingControl(heartbeat_interval_ms=30_000)  # one periodic beat, then none
    async with _receipt_agent(control, tmp_path) as (identity, outbox, _):
        outbox.put(_late_receipt(identity, "r-1"))
        outbox.put(_late_receipt(identity, "r-2"))
        await _until(lambda: len(_sent_receipts(control)) == 2, timeout_s=5)
        assert _sent_receipts(control) == ["r-1", "r-2"]
        _, beat = next((m, hb) for m, hb in control.heartbeats if hb.late_receipts)
        assert beat.load.running_requests == 3  # a full heartbeat, with the load
        assert len(outbox) == 0


async def test_unacknowledged_late_receipts_are_sent_again_on_the_next_stream(tmp_path) -> None:  # type: ignore[no-untyped-def]
    control = RecordingControl(heartbeat_interval_ms=30_000)
    control.drop_late_receipts = 1  # the first stream ends without answering the receipt
    async with _receipt_agent(control, tmp_path) as (identity, outbox, _):
        outbox.put(_late_receipt(identity, "r-1"))
        await _until(lambda: len(_sent_receipts(control)) == 2)
        assert _sent_receipts(control) == ["r-1", "r-1"]
        assert len(control.offers) == 2  # it registered again in between
        await asyncio.sleep(0.2)
        assert len(_sent_receipts(control)) == 2 and len(outbox) == 0  # acknowledged now


def test_outbox_is_bounded_and_keeps_the_newest(caplog: pytest.LogCaptureFixture) -> None:
    identity = Identity.generate()
    outbox = ReceiptOutbox(max_receipts=3)

    def ids() -> list[str]:
        taken = outbox.take(10)
        outbox.put_back(taken)
        return [market_pb2.UsageReceipt.FromString(r.receipt).request_id for r in taken]

    outbox.put(_late_receipt(identity, "a"))
    outbox.put(_late_receipt(identity, "b"))
    taken = outbox.take(1)
    outbox.put(_late_receipt(identity, "c"))
    outbox.put_back(taken)  # not acknowledged: ahead of the newer ones
    assert ids() == ["a", "b", "c"] and outbox.dropped == 0
    outbox.put(_late_receipt(identity, "d"))
    assert ids() == ["b", "c", "d"] and outbox.dropped == 1
    assert "dropped 1 late usage receipt" in caplog.text


def test_closed_outbox_drops_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    identity = Identity.generate()
    outbox = ReceiptOutbox()
    outbox.put(_late_receipt(identity, "a"))
    outbox.close("the node stopped")
    outbox.put(_late_receipt(identity, "b"))
    assert len(outbox) == 0 and outbox.dropped == 2
    assert "the node stopped" in caplog.text


async def test_every_heartbeat_samples_the_load_afresh(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The load is read for each heartbeat, not once per stream: a coordinator sees it change."""
    control = RecordingControl()
    server, port = await start_control(control)
    reads = iter(range(1, 1000))
    agent = _agent(f"127.0.0.1:{port}", Identity.generate(), tmp_path)
    agent._read_load = lambda: node_pb2.NodeLoad(running_requests=next(reads))
    agent.start()
    try:
        await _until(lambda: len(control.heartbeats) >= 3)
        running = [hb.load.running_requests for _, hb in control.heartbeats[:3]]
        assert running == sorted(set(running)) and running[0] >= 1
    finally:
        await agent.stop()
        await server.stop(0)


class _ScriptedCall:
    """A heartbeat call whose answers the test hands over one at a time."""

    def __init__(self) -> None:
        self.answers: asyncio.Queue[node_pb2.HeartbeatResponse] = asyncio.Queue()
        self.reading = asyncio.Event()

    async def read(self) -> node_pb2.HeartbeatResponse:
        self.reading.set()
        return await self.answers.get()

    def cancel(self) -> bool:
        return True


@pytest.mark.parametrize("yields_between", [0, 1, 2, 3])
async def test_stop_wins_over_a_heartbeat_answer_arriving_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, yields_between: int
) -> None:
    """stop() must end the agent even when a heartbeat answer is delivered in the same
    loop turn. (Python 3.11's asyncio.wait_for returned the answer and dropped the
    cancellation then, so a node ignored SIGTERM until killed.)"""
    import node.agent as agent_module

    call = _ScriptedCall()

    class ScriptedStub:
        def __init__(self, channel: object) -> None:
            pass

        async def Register(self, request: object, **_: object) -> node_pb2.RegisterResponse:
            return node_pb2.RegisterResponse(
                node_id="n", heartbeat_interval_ms=60_000, liveness_timeout_ms=120_000
            )

        def Heartbeat(self, requests: object, metadata: object) -> _ScriptedCall:
            return call

    monkeypatch.setattr(agent_module.node_pb2_grpc, "NodeControlServiceStub", ScriptedStub)
    agent = _agent("127.0.0.1:9", Identity.generate(), tmp_path)
    agent.start()
    async with asyncio.timeout(10):
        await call.reading.wait()
    for sequence in range(1, 4):  # answers are read while the agent runs
        call.reading.clear()
        call.answers.put_nowait(node_pb2.HeartbeatResponse(sequence=sequence))
        async with asyncio.timeout(10):
            await call.reading.wait()
    call.answers.put_nowait(node_pb2.HeartbeatResponse(sequence=4))
    for _ in range(yields_between):
        await asyncio.sleep(0)
    stopping = asyncio.ensure_future(agent.stop())
    done, _ = await asyncio.wait((stopping,), timeout=5)
    if not done:  # a second cancel is not lost: clean up, then fail
        for task in asyncio.all_tasks():
            if task.get_name() == "mercato-node-agent":
                task.cancel()
        await stopping
    assert done, "the agent ignored stop(): the cancellation was lost"


async def test_wait_delivered_returns_once_the_coordinator_acknowledged(tmp_path) -> None:  # type: ignore[no-untyped-def]
    control = RecordingControl(heartbeat_interval_ms=30_000)
    control.drop_late_receipts = 1  # the first stream ends without answering the receipt
    async with _receipt_agent(control, tmp_path) as (identity, outbox, agent):
        assert agent.delivered() and await agent.wait_delivered(0)
        outbox.put(_late_receipt(identity, "r-1"))
        assert not agent.delivered()
        assert await agent.wait_delivered(10)
        # Sent twice (the first stream dropped it), acknowledged on the second.
        assert _sent_receipts(control) == ["r-1", "r-1"] and len(control.offers) == 2


async def test_wait_delivered_gives_up_when_nothing_acknowledges(tmp_path) -> None:  # type: ignore[no-untyped-def]
    control = RecordingControl(heartbeat_interval_ms=30_000)
    control.drop_late_receipts = 1_000  # never answered
    async with _receipt_agent(control, tmp_path) as (identity, outbox, agent):
        outbox.put(_late_receipt(identity, "r-1"))
        assert not await agent.wait_delivered(0.5)


async def test_drain_sends_a_draining_heartbeat_at_once_and_on_every_beat_after(tmp_path) -> None:  # type: ignore[no-untyped-def]
    control = RecordingControl(heartbeat_interval_ms=30_000)  # no periodic beat in this test
    async with _receipt_agent(control, tmp_path) as (_, outbox, agent):
        assert not any(beat.draining for _, beat in control.heartbeats)
        agent.drain()
        await _until(lambda: any(beat.draining for _, beat in control.heartbeats), timeout_s=5)
        outbox.put(_late_receipt(Identity.generate(), "r-1"))
        await _until(lambda: len(_sent_receipts(control)) == 1, timeout_s=5)
        assert all(beat.draining for _, beat in control.heartbeats[1:])
