"""CPU placement: CPU lists, and pinning every thread of a process (``--cpus``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from marketplace.placement import PlacementError, format_cpus, machine_cpus, parse_cpus, pin

linux_only = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity"), reason="CPU placement is Linux-only (documented)"
)

# Starts three threads, says so, and waits for stdin to close.
_THREADED_CHILD = """
import sys, threading
stop = threading.Event()
for _ in range(3):
    threading.Thread(target=stop.wait, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
stop.set()
"""


def thread_cpus(pid: int) -> dict[int, str]:
    """Each thread of ``pid`` and the CPU list it may run on, as the kernel reports it."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                found[int(task.name)] = line.split(":", 1)[1].strip()
    return found


def _end(child: subprocess.Popen[str]) -> None:
    """Let a ``_THREADED_CHILD`` finish, and close its pipes."""
    assert child.stdin is not None and child.stdout is not None
    child.stdin.close()
    child.wait(timeout=30)
    child.stdout.close()


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("1", {1}),
        ("0,2-3", {0, 2, 3}),
        (" 3 , 0-1 ", {0, 1, 3}),
        ("2-2", {2}),
        ("0-3,2", {0, 1, 2, 3}),
    ],
)
def test_cpu_lists_read_as_linux_writes_them(text: str, cpus: set[int]) -> None:
    assert parse_cpus(text) == cpus


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty CPU list"),
        ("  ", "empty CPU list"),
        ("a", "'a' in 'a': not a CPU number"),
        ("1,,2", "'' in '1,,2': not a CPU number"),
        ("3-1", "'3-1' in '3-1': a range goes low-high"),
        ("1-", "'1-' in '1-': not a CPU number"),
        ("-1", "'-1' in '-1': not a CPU number"),
        ("\u0663", "not a CPU number"),  # an Arabic-Indic digit: isdigit, not a CPU number
        ("5000", "CPU 5000 is above 4095"),
        ("0," * 200, "longer than 256 characters"),
    ],
)
def test_a_bad_cpu_list_is_refused_with_what_to_write(text: str, says: str) -> None:
    with pytest.raises(PlacementError) as refused:
        parse_cpus(text)
    assert says in str(refused.value)


@given(st.frozensets(st.integers(min_value=0, max_value=4095), min_size=1, max_size=64))
def test_formatting_a_cpu_set_reads_back_as_the_same_set(cpus: frozenset[int]) -> None:
    text = format_cpus(cpus)
    assert parse_cpus(text) == cpus
    assert format_cpus(parse_cpus(text)) == text  # one spelling per set


def test_ranges_are_folded() -> None:
    assert format_cpus({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"


@linux_only
def test_pin_moves_every_thread_of_a_running_process_and_can_widen_again() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _THREADED_CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        everything = machine_cpus()
        assert len(thread_cpus(child.pid)) == 4  # the main thread and the three
        assert pin({0}, child.pid) == {0}
        assert set(thread_cpus(child.pid).values()) == {"0"}
        pin(everything, child.pid)
        assert set(thread_cpus(child.pid).values()) == {format_cpus(everything)}
    finally:
        _end(child)


@linux_only
def test_threads_started_after_the_pin_inherit_it() -> None:
    script = (
        "from marketplace.placement import pin\n"
        "pin({0})\n" + _THREADED_CHILD  # pinned first, then the threads start
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        threads = thread_cpus(child.pid)
        assert len(threads) == 4
        assert set(threads.values()) == {"0"}
    finally:
        _end(child)


@linux_only
def test_a_cpu_the_machine_lacks_is_refused_naming_the_ones_it_has() -> None:
    beyond = max(machine_cpus()) + 1
    before = os.sched_getaffinity(0)
    with pytest.raises(PlacementError) as refused:
        pin({0, beyond})
    assert f"CPU {beyond} is not on this machine; it has CPUs {format_cpus(machine_cpus())}" in (
        str(refused.value)
    )
    assert os.sched_getaffinity(0) == before  # nothing moved
    with pytest.raises(PlacementError, match="no CPU given"):
        pin(set())


@linux_only
def test_pinning_a_process_that_is_gone_says_so() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child.pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.01)  # reaped by wait(); the pid is free
    with pytest.raises(PlacementError, match=f"no process {child.pid} to pin"):
        pin({0}, child.pid)
