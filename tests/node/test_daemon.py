"""`mercato node start --engine fake` as a real process: ready line, registration, serving,
clean exit on SIGTERM. (The fake engine keeps this a unit test: no model is loaded.)"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from mercato.v1 import common_pb2, node_pb2

from node.daemon import READY_PREFIX

from .control_fake import RecordingControl, start_control

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
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            code = await process.wait()
        assert code == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await server.stop(0)
