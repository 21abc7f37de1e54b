"""Child processes of the command line: start a service, wait for its ready line, stop it.

A Mercato service prints one structured line when it is ready to serve, e.g.
``MERCATO_NODE_READY {"node_id": ..., "worker_address": ...}``. ``start_service`` starts
the child, copies its output to a log file (and optionally to the terminal), and
returns once that line arrives, with its JSON parsed. Children die with their parent
(``PR_SET_PDEATHSIG``), so even a parent killed with SIGKILL leaves no stray process.
Used by ``mercato up``, ``mercato bench e2e`` and the integration tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

_PR_SET_PDEATHSIG = 1


class ServiceStartError(RuntimeError):
    """A child service exited or timed out before printing its ready line."""


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Service:
    """A started child service."""

    name: str
    process: subprocess.Popen[bytes]
    ready: dict[str, Any]
    log_path: Path
    _pump: threading.Thread | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._close_output()
        return self.process.returncode

    def _close_output(self) -> None:
        if self._pump is not None:
            self._pump.join(timeout=5)
        if self.process.stdout is not None and not self.process.stdout.closed:
            self.process.stdout.close()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._close_output()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def mercato_command(*args: str) -> list[str]:
    """The command line that runs ``mercato ARGS`` with this interpreter."""
    return [sys.executable, "-m", "marketplace.cli", *args]


def start_service(
    name: str,
    argv: list[str],
    ready_prefix: str,
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    timeout_s: float = 300.0,
    echo: IO[str] | None = None,
) -> Service:
    """Start ``argv`` and wait for the line that begins with ``ready_prefix``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=child_env,
        preexec_fn=_die_with_parent,
    )
    ready: dict[str, Any] = {}
    ready_event = threading.Event()

    def pump() -> None:
        assert process.stdout is not None
        with log_path.open("ab") as log:
            for raw in process.stdout:
                log.write(raw)
                log.flush()
                line = raw.decode(errors="replace")
                if echo is not None and not line.startswith(ready_prefix):
                    echo.write(f"[{name}] {line}")
                    echo.flush()
                if not ready_event.is_set() and line.startswith(ready_prefix):
                    ready.update(json.loads(line[len(ready_prefix) :].strip() or "{}"))
                    ready_event.set()
        ready_event.set()  # the child closed its output: wake the waiter

    thread = threading.Thread(target=pump, name=f"{name}-output", daemon=True)
    thread.start()
    service = Service(name, process, ready, log_path, thread)
    deadline = time.monotonic() + timeout_s
    while not ready:
        ready_event.wait(timeout=0.5)
        if ready:
            break
        if process.poll() is not None or time.monotonic() > deadline:
            reason = (
                f"exited with code {process.returncode}"
                if process.poll() is not None
                else f"was not ready within {timeout_s:.0f} s"
            )
            service.stop(timeout_s=5)
            raise ServiceStartError(
                f"{name} {reason}; last lines of {log_path}:\n{service.log_tail()}"
            )
    return service
