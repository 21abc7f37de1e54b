"""A ``mercato ... start`` command run on a port another socket already listens on: what
the CLI tests of the coordinator and the node both check (one error line, exit 1)."""

from __future__ import annotations

import socket
import subprocess
import sys


def start_on_a_taken_port(*command: str) -> tuple[int, subprocess.CompletedProcess[str]]:
    """Run ``python -m marketplace.cli *command --port P`` while P is taken; return P and
    the finished process (its output captured as text)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "marketplace.cli", *command, "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    return port, done


def assert_refused_in_one_line(port: int, done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 1, done.stderr
    assert f"error: cannot listen on 127.0.0.1:{port}; is the port in use?" in done.stderr
    assert "Traceback" not in done.stderr
