"""`mercato coordinator start` as a process: ready line, key file, clean exit on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from mercato.v1 import inference_pb2, inference_pb2_grpc


def test_start_prints_ready_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "MERCATO_HOME": str(tmp_path / "ignored")}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "marketplace.cli",
            "coordinator",
            "start",
            "--port",
            "0",
            "--home",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        prefix, _, payload = line.partition(" ")
        assert prefix == "MERCATO_COORDINATOR_READY", line
        ready = json.loads(payload)
        key = tmp_path / "coordinator" / "identity.key"
        assert key.stat().st_mode & 0o777 == 0o600
        with grpc.insecure_channel(ready["address"]) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            # Billing is on by default: a call without an API key is refused.
            with pytest.raises(grpc.RpcError) as caught:
                stub.ListModels(inference_pb2.ListModelsRequest(), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert ready["billing"] is True
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def test_a_taken_port_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                *(sys.executable, "-m", "marketplace.cli", "coordinator", "start"),
                *("--port", str(port), "--home", str(tmp_path)),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "MERCATO_DATABASE_URL": ""},
        )
    assert done.returncode == 1, done.stderr
    assert f"error: cannot listen on 127.0.0.1:{port}; is the port in use?" in done.stderr
    assert "Traceback" not in done.stderr
