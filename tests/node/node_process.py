"""`mercato node start --engine fake` as a real process, for the tests that need one."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from node.daemon import READY_PREFIX

REPO = Path(__file__).resolve().parents[2]


async def start_fake_node(
    home: Path, coordinator: str, env: dict[str, str]
) -> tuple[asyncio.subprocess.Process, dict[str, Any]]:
    """Start a fake-engine node registering with ``coordinator`` (``env`` added to the
    environment); returns the process and its ready line. The caller stops it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "marketplace.cli", "node", "start", "--engine", "fake",
        "--home", str(home), "--port", "0", "--coordinator", coordinator,
        cwd=REPO, stdout=asyncio.subprocess.PIPE, env={**os.environ, **env},
    )  # fmt: skip
    try:
        assert process.stdout is not None
        async with asyncio.timeout(60):
            line = (await process.stdout.readline()).decode()
        return process, json.loads(line[len(READY_PREFIX) + 1 :])
    except BaseException:
        process.kill()
        await process.wait()
        raise


async def stop_with_sigterm(process: asyncio.subprocess.Process, timeout_s: float = 30.0) -> int:
    """SIGTERM, then the exit code (TimeoutError if the process is still there after
    ``timeout_s``)."""
    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(timeout_s):
        return await process.wait()


async def kill_if_running(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.kill()
        await process.wait()
