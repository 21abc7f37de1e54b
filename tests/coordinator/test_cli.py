"""`mercato coordinator start` as a process: ready line, key file, clean exit on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from mercato.v1 import inference_pb2, inference_pb2_grpc

from tests.marketplace.test_placement import thread_cpus
from tests.taken_port import assert_refused_in_one_line, start_on_a_taken_port

_START = [sys.executable, "-m", "marketplace.cli", "coordinator", "start", "--port", "0"]


def _spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """A coordinator process whose output the test reads (text pipes)."""
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _end(process: subprocess.Popen[str]) -> None:
    """Kill ``process`` if a failed check left it running; close its pipes."""
    if process.poll() is None:
        process.kill()
        process.wait()
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def test_start_prints_ready_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "MERCATO_HOME": str(tmp_path / "ignored")}
    process = _spawn([*_START, "--home", str(tmp_path)], env)
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
        _end(process)


def test_a_taken_port_is_one_line_and_exit_1(tmp_path: Path) -> None:
    port, done = start_on_a_taken_port("coordinator", "start", "--home", str(tmp_path))
    assert_refused_in_one_line(port, done)


def test_a_second_coordinator_on_the_same_data_directory_is_refused(tmp_path: Path) -> None:
    """Same identity, same data directory, another port: the second would run the crash
    recovery of a live coordinator (voiding its open holds), so it is refused."""
    env = {k: v for k, v in os.environ.items() if k != "MERCATO_DATABASE_URL"}  # SQLite
    env["MERCATO_HOME"] = str(tmp_path)
    first = _spawn(_START, env)
    try:
        assert first.stdout is not None
        assert first.stdout.readline().startswith("MERCATO_COORDINATOR_READY ")
        second = subprocess.run(_START, capture_output=True, text=True, timeout=60, env=env)
        assert second.returncode == 1, second.stderr
        assert f"error: another process (pid {first.pid}) is this ledger writer" in second.stderr
        assert "Traceback" not in second.stderr
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0
    finally:
        _end(first)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="--cpus is Linux-only")
def test_cpus_put_every_thread_of_the_coordinator_on_those_cpus(tmp_path: Path) -> None:
    env = {**os.environ, "MERCATO_COORDINATOR_BILLING_ENABLED": "false"}
    process = _spawn([*_START, "--home", str(tmp_path), "--cpus", "0"], env)
    try:
        assert process.stdout is not None
        prefix, _, payload = process.stdout.readline().partition(" ")
        assert prefix == "MERCATO_COORDINATOR_READY"
        with grpc.insecure_channel(json.loads(payload)["address"]) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            stub.ListModels(inference_pb2.ListModelsRequest(), timeout=10)  # it serves
        threads = thread_cpus(process.pid)
        assert len(threads) > 1  # gRPC's threads too, not only the main one
        assert set(threads.values()) == {"0"}
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        _end(process)


def _start_on_cpus(home: Path, cpus: str) -> subprocess.CompletedProcess[str]:
    """``mercato coordinator start --cpus CPUS``, expected to be refused (it returns)."""
    return subprocess.run(
        [*_START, "--home", str(home), "--cpus", cpus], capture_output=True, text=True, timeout=60
    )


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="--cpus is Linux-only")
def test_cpus_the_machine_lacks_are_one_line_and_exit_1(tmp_path: Path) -> None:
    done = _start_on_cpus(tmp_path, "4000")
    assert done.returncode == 1, done.stderr
    assert "error: CPU 4000 is not on this machine; it has CPUs 0" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_malformed_cpu_list_is_refused_before_anything_starts(tmp_path: Path) -> None:
    done = _start_on_cpus(tmp_path, "1-x")
    assert done.returncode == 2, done.stderr
    flat = " ".join(done.stderr.replace("│", " ").split())
    assert "cpus: Value error, '1-x' in '1-x': not a CPU number" in flat
    assert "MERCATO_COORDINATOR_CPUS" in flat
    assert not (tmp_path / "coordinator").exists()  # refused before the data directory
