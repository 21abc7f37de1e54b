"""No engine process outlives its node, even a node killed with SIGKILL.

vLLM's ``AsyncLLM`` runs its engine core in a child process that has no way to notice
its parent's death: a node killed with SIGKILL (or by the OOM killer) would leave an
orphaned engine holding memory and, mid-request, burning CPU. The guard closes that gap:

1. the node makes itself the leader of its own process group, so the engine core it
   spawns later belongs to that group (and nothing else does);
2. it starts a tiny watchdog process with ``PR_SET_PDEATHSIG``: the kernel sends the
   watchdog SIGTERM the moment the node dies, however it dies;
3. the watchdog then sends SIGKILL to the node's process group.

On a clean shutdown the node has already stopped its engine, so the group is empty but
for the watchdog, which exits. The watchdog ignores SIGINT so a Ctrl-C to a terminal's
process group does not fire it early.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1

# Runs in the watchdog: wait for SIGTERM (sent by the kernel when the node dies),
# then kill the node's whole process group, the watchdog included.
_WATCHDOG = """
import os, signal, sys
group = int(sys.argv[1])
signal.signal(signal.SIGINT, signal.SIG_IGN)
def fire(signum, frame):
    os.killpg(group, signal.SIGKILL)
    os._exit(0)
signal.signal(signal.SIGTERM, fire)
if os.getppid() != int(sys.argv[2]):  # the node died before the handler was set
    fire(0, None)
print("armed", flush=True)
while True:
    signal.pause()
"""


def _die_with_parent() -> None:  # runs in the watchdog between fork and exec
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def install_orphan_guard() -> subprocess.Popen[bytes] | None:
    """Lead a process group and start the watchdog; call before the engine starts.

    Returns the watchdog process (None where the platform cannot do this)."""
    if not sys.platform.startswith("linux"):
        return None
    with contextlib.suppress(PermissionError):  # a session leader already leads its group
        os.setpgid(0, 0)
    group = os.getpgid(0)
    if group != os.getpid():
        logger.warning("cannot lead a process group; an engine may outlive a killed node")
        return None
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(group), str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        preexec_fn=_die_with_parent,
        close_fds=True,
    )
    assert watchdog.stdout is not None
    armed = watchdog.stdout.readline()  # returns once its SIGTERM handler is in place
    watchdog.stdout.close()
    if armed.strip() != b"armed":
        logger.warning("the orphan guard did not start; an engine may outlive a killed node")
    return watchdog
