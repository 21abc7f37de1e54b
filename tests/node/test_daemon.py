"""`mercato node start --engine fake` as a real process: ready line, registration, serving,
clean exit on SIGTERM. (The fake engine keeps this a unit test: no model is loaded.)"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from mercato.v1 import common_pb2, node_pb2

from node.daemon import READY_PREFIX
from tests.taken_port import assert_refused_in_one_line, start_on_a_taken_port

from .control_fake import RecordingControl, start_control
from .node_process import kill_if_running, start_fake_node, stop_with_sigterm

REPO = Path(__file__).resolve().parents[2]


async def test_node_process_registers_serves_and_stops_cleanly(tmp_path: Path) -> None:
    import grpc.aio
    from mercato.v1 import node_pb2_grpc

    control = RecordingControl(heartbeat_interval_ms=50)
    server, port = await start_control(control)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "marketplace.cli",
        "node",
        "start",
        "--engine",
        "fake",
        "--home",
        str(tmp_path),
        "--port",
        "0",
        "--coordinator",
        f"127.0.0.1:{port}",
        "--region",
        "test-1",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "MERCATO_NODE_FAKE_ENGINE_TOKENS_PER_S": "0"},
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(60):
            line = (await process.stdout.readline()).decode()
        assert line.startswith(READY_PREFIX + " "), line
        ready = json.loads(line[len(READY_PREFIX) + 1 :])
        assert ready["registered"] is True
        assert ready["region"] == "test-1"
        assert ready["model"] == "SmolLM2-135M-Instruct"
        assert (tmp_path / "node" / "identity.key").stat().st_mode & 0o777 == 0o600
        [offer] = control.offers
        assert offer.worker_address == ready["worker_address"]
        async with grpc.aio.insecure_channel(ready["worker_address"]) as channel:
            stub = node_pb2_grpc.NodeWorkerServiceStub(channel)
            request = node_pb2.WorkerGenerateRequest(
                request_id="d1",
                model=ready["model"],
                prompt="hi",
                sampling=common_pb2.SamplingParams(max_tokens=4),
            )
            responses = [r async for r in stub.Generate(request)]
        assert responses[-1].final.output_tokens == 4
        async with asyncio.timeout(10):
            await control.heartbeat_seen.wait()
        assert await stop_with_sigterm(process) == 0
    finally:
        await kill_if_running(process)
        await server.stop(0)


def test_node_load_reports_the_engine_view_never_below_the_workers_count() -> None:
    """node_load: running from the engine, raised to the worker's calls not waiting;
    waiting as the engine says (not swapped); KV usage in permille, clamped to 0..1000."""
    from types import SimpleNamespace

    from node.daemon import node_load
    from node.engine.base import EngineLoad

    def load(running: int, waiting: int, kv: float, in_flight: int) -> node_pb2.NodeLoad:
        engine = SimpleNamespace(load=lambda: EngineLoad(running, waiting, kv, 12.6))
        return node_load(engine, SimpleNamespace(in_flight=in_flight))  # type: ignore[arg-type]

    got = load(running=2, waiting=3, kv=0.25, in_flight=9)
    assert (got.running_requests, got.waiting_requests) == (6, 3)  # 9 in flight, 3 waiting
    assert (got.kv_cache_usage_permille, got.output_tokens_per_s) == (250, 13)
    got = load(running=4, waiting=1, kv=1.7, in_flight=0)
    assert (got.running_requests, got.waiting_requests, got.kv_cache_usage_permille) == (4, 1, 1000)


async def test_node_process_offers_and_serves_with_its_settings(tmp_path: Path) -> None:
    """Settings reach the offer (engine context length, concurrency) and the worker
    (receipt prices, the max_concurrency limit) of a real node process."""
    import grpc
    import grpc.aio
    from mercato.v1 import market_pb2, node_pb2_grpc

    control = RecordingControl(heartbeat_interval_ms=50)
    server, port = await start_control(control)
    env = {
        "MERCATO_NODE_FAKE_ENGINE_TOKENS_PER_S": "20",
        "MERCATO_NODE_FAKE_ENGINE_CONTEXT_LENGTH": "1000",
        "MERCATO_NODE_PRICE_INPUT_MICRO_USD_PER_MTOK": "7",
        "MERCATO_NODE_PRICE_OUTPUT_MICRO_USD_PER_MTOK": "11",
        "MERCATO_NODE_MAX_CONCURRENCY": "1",
    }
    process, ready = await start_fake_node(tmp_path, f"127.0.0.1:{port}", env)
    try:
        [offer] = control.offers
        [model] = offer.models
        assert (model.context_length, offer.max_concurrency) == (1000, 1)
        assert (model.price_input_micro_usd_per_mtok, model.price_output_micro_usd_per_mtok) == (
            7,
            11,
        )
        async with grpc.aio.insecure_channel(ready["worker_address"]) as channel:
            stub = node_pb2_grpc.NodeWorkerServiceStub(channel)

            def request(request_id: str, max_tokens: int) -> node_pb2.WorkerGenerateRequest:
                return node_pb2.WorkerGenerateRequest(
                    request_id=request_id, model=ready["model"], prompt="hi",
                    sampling=common_pb2.SamplingParams(max_tokens=max_tokens),
                )  # fmt: skip

            slow = stub.Generate(request("slow", 200))
            await slow.read()  # first delta: the one slot is taken
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in stub.Generate(request("second", 2)):
                    pass
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            slow.cancel()
            responses = []
            async with asyncio.timeout(10):
                while not responses:
                    try:
                        responses = [r async for r in stub.Generate(request("d2", 2))]
                    except grpc.aio.AioRpcError:  # the cancelled call still holds the slot
                        await asyncio.sleep(0.05)
        usage = market_pb2.UsageReceipt.FromString(responses[-1].final.receipt.receipt)
        assert (usage.price_input_micro_usd_per_mtok, usage.price_output_micro_usd_per_mtok) == (
            7,
            11,
        )
        # A cancelled call and a late receipt behind it, heartbeats every 50 ms: SIGTERM
        # still stops the node (a stop that met a heartbeat answer in the same loop turn
        # was lost once; see test_agent's test_stop_wins_over_a_heartbeat_answer_...).
        assert await stop_with_sigterm(process) == 0
    finally:
        await kill_if_running(process)
        await server.stop(0)


async def test_sigterm_drains_then_cuts_off_and_delivers_the_late_receipt(tmp_path: Path) -> None:
    """SIGTERM with a generation in flight: the coordinator hears ``draining`` at once
    (not at the next of its 5 s heartbeats), a new request is refused UNAVAILABLE, the open
    one runs for the grace and is then cut off, and its late receipt, counting at least
    what the client got, is acknowledged on the heartbeat stream before the node exits."""
    import grpc
    import grpc.aio
    from mercato.v1 import market_pb2, node_pb2_grpc

    control = RecordingControl(heartbeat_interval_ms=5_000)
    server, port = await start_control(control)
    env = {"MERCATO_NODE_FAKE_ENGINE_TOKENS_PER_S": "20", "MERCATO_NODE_SHUTDOWN_GRACE_S": "1.0"}
    process, ready = await start_fake_node(tmp_path, f"127.0.0.1:{port}", env)
    try:

        def request(request_id: str, max_tokens: int) -> node_pb2.WorkerGenerateRequest:
            return node_pb2.WorkerGenerateRequest(
                request_id=request_id, model=ready["model"], prompt="hi",
                sampling=common_pb2.SamplingParams(max_tokens=max_tokens),
            )  # fmt: skip

        async with grpc.aio.insecure_channel(ready["worker_address"]) as channel:
            stub = node_pb2_grpc.NodeWorkerServiceStub(channel)
            slow = stub.Generate(request("slow", 200))
            received = 0 if (await slow.read()).HasField("final") else 1
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(3):  # well within one 5 s heartbeat interval
                while not any(beat.draining for _, beat in control.heartbeats):  # noqa: ASYNC110 (the control's list, filled by grpc)
                    await asyncio.sleep(0.01)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(request("new", 2)).read()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (refused.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError):
                while (response := await slow.read()) is not grpc.aio.EOF:
                    received += response.HasField("delta")
        assert 10 <= received < 200  # the grace (1 s at 20 tokens/s), then the cut
        async with asyncio.timeout(30):
            code = await process.wait()
        assert code == 0
        late = [
            (beat.sequence, market_pb2.UsageReceipt.FromString(signed.receipt))
            for _, beat in control.heartbeats
            for signed in beat.late_receipts
        ]
        [(sequence, usage)] = late
        assert usage.request_id == "slow" and usage.output_tokens >= received
        first_draining = min(b.sequence for _, b in control.heartbeats if b.draining)
        assert first_draining < sequence
        assert all(b.draining for _, b in control.heartbeats if b.sequence >= first_draining)
    finally:
        await kill_if_running(process)
        await server.stop(0)


def test_a_taken_port_is_one_line_and_exit_1(tmp_path: Path) -> None:
    port, done = start_on_a_taken_port(
        *("node", "start", "--engine", "fake", "--coordinator", "127.0.0.1:1"),
        *("--home", str(tmp_path)),
    )
    assert_refused_in_one_line(port, done)
    assert "engine ready" not in done.stderr  # refused before the engine loads
