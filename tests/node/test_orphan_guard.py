"""A child of a node dies with the node, even when the node is killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

# Plays the node: installs the guard, spawns a long-lived child (as vLLM spawns its
# engine core), prints the child's pid, then waits to be killed.
_NODE = """
import subprocess, sys, time
from node.orphan_guard import install_orphan_guard
install_orphan_guard()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(child.pid, flush=True)
time.sleep(600)
"""


def _gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_engine_child_dies_when_the_node_is_killed() -> None:
    node = subprocess.Popen(
        [sys.executable, "-c", _NODE], stdout=subprocess.PIPE, start_new_session=False
    )
    assert node.stdout is not None
    child_pid = int(node.stdout.readline())
    assert psutil.pid_exists(child_pid)
    assert os.getpgid(node.pid) == node.pid  # the node leads its own group
    node.send_signal(signal.SIGKILL)
    node.wait(timeout=10)
    node.stdout.close()
    try:
        assert _gone(child_pid), "the child outlived its SIGKILLed parent"
    finally:
        if not _gone(child_pid, 0):
            os.kill(child_pid, signal.SIGKILL)


def test_without_the_guard_the_child_would_be_orphaned() -> None:
    """The control: the same program without the guard leaves its child running."""
    program = _NODE.replace("install_orphan_guard()", "pass")
    node = subprocess.Popen(
        [sys.executable, "-c", program], stdout=subprocess.PIPE, start_new_session=True
    )
    assert node.stdout is not None
    child_pid = int(node.stdout.readline())
    node.send_signal(signal.SIGKILL)
    node.wait(timeout=10)
    node.stdout.close()
    try:
        assert not _gone(child_pid, 1.0)
    finally:
        os.kill(child_pid, signal.SIGKILL)
