"""CPU placement: run a process, every thread of it, on a chosen set of CPUs.

The coordinator is a latency-bound relay: each request and each streamed token crosses
its event loop and gRPC's threads, and each crossing is a thread wake-up. On a host it
shares with other busy processes (a node, clients, a database), the scheduler moves
those threads between CPUs and the other processes evict its caches between requests.
On a 2-CPU machine shared with a node and a client, a CPU of its own halved what its
two gRPC hops cost and cut the latency it adds to a request's first token from
0.52-0.64 ms to 0.28-0.53 ms (``mercato bench overhead``, docs/benchmarks.md). ``mercato coordinator start --cpus``
gives it CPUs of its own.

A CPU list is written as Linux writes one (``taskset -c``, ``/proc/PID/status``):
CPU numbers and ranges separated by commas, e.g. ``1``, ``0,2``, ``2-3,6``. Pinning
needs Linux's ``sched_setaffinity``; ``sched_setaffinity(pid)`` moves one thread only,
so :func:`pin` moves every thread the process has (``/proc/PID/task``), and threads
started later inherit the CPUs of the thread that starts them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "CPU_LIST_CHARS_MAX",
    "PlacementError",
    "format_cpus",
    "machine_cpus",
    "parse_cpus",
    "pin",
]

CPU_LIST_CHARS_MAX = 256
_CPU_MAX = 4095  # Linux's largest NR_CPUS on common builds


class PlacementError(ValueError):
    """A CPU list that cannot be used here; the message says what to change."""


def parse_cpus(text: str) -> frozenset[int]:
    """The CPUs of a list such as ``"0,2-3"``; PlacementError for anything else."""
    text = text.strip()
    if not text:
        raise PlacementError("empty CPU list; give CPU numbers or ranges, e.g. 1 or 0,2-3")
    if len(text) > CPU_LIST_CHARS_MAX:
        raise PlacementError(f"CPU list longer than {CPU_LIST_CHARS_MAX} characters")
    cpus: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            low = _cpu_number(first)
            high = _cpu_number(last) if dash else low
        except PlacementError as exc:
            raise PlacementError(f"{part.strip()!r} in {text!r}: {exc}") from None
        if high < low:
            raise PlacementError(f"{part.strip()!r} in {text!r}: a range goes low-high")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def _cpu_number(text: str) -> int:
    text = text.strip()
    if not text.isascii() or not text.isdigit():
        raise PlacementError("not a CPU number (CPU lists look like 1 or 0,2-3)")
    number = int(text)
    if number > _CPU_MAX:
        raise PlacementError(f"CPU {number} is above {_CPU_MAX}")
    return number


def format_cpus(cpus: Iterable[int]) -> str:
    """``{0, 2, 3}`` as ``"0,2-3"`` (the form :func:`parse_cpus` reads)."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    start = 0
    for index in range(1, len(ordered) + 1):
        if index == len(ordered) or ordered[index] != ordered[index - 1] + 1:
            low, high = ordered[start], ordered[index - 1]
            parts.append(str(low) if low == high else f"{low}-{high}")
            start = index
    return ",".join(parts)


def machine_cpus() -> frozenset[int]:
    """The CPU numbers this machine has (0 .. ``os.cpu_count()`` - 1)."""
    if not hasattr(os, "sched_setaffinity"):
        raise PlacementError("CPU placement needs Linux (sched_setaffinity); leave --cpus unset")
    return frozenset(range(os.cpu_count() or 1))


def pin(cpus: Iterable[int], pid: int | None = None) -> frozenset[int]:
    """Run every thread of process ``pid`` (default: this one) on ``cpus`` only.

    A pin may widen a process's CPUs as well as narrow them (a process may undo its own
    pin). PlacementError when a CPU is not one of the machine's, or when the kernel
    refuses the set (none of it is in the cgroup's cpuset). Threads the process starts
    later inherit the CPUs of the thread starting them. Returns the CPUs.
    """
    chosen = frozenset(cpus)
    machine = machine_cpus()
    if not chosen:
        raise PlacementError("no CPU given")
    missing = chosen - machine
    if missing:
        raise PlacementError(
            f"CPU {format_cpus(missing)} is not on this machine; it has CPUs {format_cpus(machine)}"
        )
    target = os.getpid() if pid is None else pid
    tasks = Path(f"/proc/{target}/task")
    pinned: set[int] = set()
    while True:  # again until no new thread shows up (one may start while this runs)
        try:
            thread_ids = {int(entry.name) for entry in tasks.iterdir()} - pinned
        except FileNotFoundError:
            raise PlacementError(f"no process {target} to pin") from None
        if not thread_ids:
            return chosen
        for thread_id in thread_ids:
            try:
                os.sched_setaffinity(thread_id, chosen)
            except ProcessLookupError:
                pass  # the thread ended meanwhile
            except OSError as exc:
                raise PlacementError(
                    f"CPUs {format_cpus(chosen)} refused ({exc.strerror}); this process was "
                    f"allowed CPUs {format_cpus(os.sched_getaffinity(0))}"
                ) from exc
        pinned |= thread_ids
