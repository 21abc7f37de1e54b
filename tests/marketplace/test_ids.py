"""Time-ordered request ids (UUID version 7)."""

from __future__ import annotations

import itertools
import os
import time
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from marketplace.ids import time_ordered_id, uuid7


@given(st.integers(0, 2**48 - 1))
def test_layout_is_rfc_9562_version_7(unix_ms: int) -> None:
    value = uuid7(unix_ms)
    assert value.version == 7
    assert value.variant == uuid.RFC_4122
    assert value.int >> 80 == unix_ms  # the first 48 bits are the time


@given(st.integers(0, 2**48 - 2), st.integers(1, 10**6))
def test_later_milliseconds_sort_later(unix_ms: int, later_by: int) -> None:
    later = min(unix_ms + later_by, 2**48 - 1)
    assert str(uuid7(unix_ms)) < str(uuid7(later))  # as text too: what the indexes sort


def test_ids_are_unique_and_parse_back() -> None:
    before_ms = time.time_ns() // 1_000_000
    ids = [time_ordered_id() for _ in range(10_000)]
    after_ms = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    for text in ids:
        value = uuid.UUID(text)
        assert str(value) == text  # the canonical text form
        assert value.version == 7
        assert value.variant == uuid.RFC_4122
        assert before_ms <= value.int >> 80 <= after_ms  # dated now
    for earlier, later in itertools.pairwise(ids):
        earlier_ms, later_ms = uuid.UUID(earlier).int >> 80, uuid.UUID(later).int >> 80
        assert earlier_ms <= later_ms
        if earlier_ms < later_ms:
            assert earlier < later  # as text too: what the indexes sort


@pytest.mark.parametrize("unix_ms", [-1, 2**48])
def test_out_of_range_time_is_refused(unix_ms: int) -> None:
    with pytest.raises(ValueError, match="48 bits"):
        uuid7(unix_ms)


def test_a_forked_child_does_not_reuse_its_parents_random_tails() -> None:
    time_ordered_id()  # the parent holds a batch of tails now
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first id, then out without the test runner's cleanup
        os.write(write_end, time_ordered_id().encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end) as pipe:
        child = pipe.read()
    parent = time_ordered_id()
    # The random part (the last 20 hex digits, as text after the second '-'); the parent's
    # next tail would be the child's first without the fork hook.
    assert child.split("-", 2)[2] != parent.split("-", 2)[2]
    assert uuid.UUID(child).version == 7
