"""`mercato bench ledger`: settlements per second and the delay to durable.

For SQLite (a temporary folder) and PostgreSQL (a temporary schema in the ``test``
database on 127.0.0.1:5432, dropped afterwards), each settlement being a hold and its
settlement (one verified, countersigned receipt; 4 journal entries, a settlement row,
a receipt row, the hold index, the key's spend), for ``CLIENTS`` client accounts each
paying with its own API key, as every request through the coordinator does. A hold is
placed when its request starts and the settlement comes ``REQUEST_SECONDS`` later, as
live traffic has it (before the eighth session, each hold went in with its own
settlement, in the same batch, where the open-hold row was never written at all: 12-15 %
less writer CPU per settlement than the live pattern):

* ``settle_per_s_*``: saturating throughput of the group-commit writer — all
  settlements queued as fast as possible, counted until the last one is durable;
* ``durable_ms_p99_*``: at a steady offered load (10,000/s SQLite, 5,000/s PostgreSQL),
  the 99th percentile of the delay from the settlement being queued (the response can
  go to the client) to its commit being durable. If the writer cannot sustain that rate
  the queue grows and this number shows it; ``durable_ms_p99_half_load_*`` is the same
  delay at half the measured throughput (the group-commit latency when not saturated).

Receipts are signed, verified and countersigned before timing starts: that CPU cost
belongs to the request path and is reported apart (``receipt_check_us``).

``machine_stall_ms_max_*`` / ``machine_stalls_over_5ms_*``: while the target rate runs,
another process sleeps 1 ms in a loop and notes its worst late wake-up: on a virtual
machine a disk flush can stop every process for 5-25 ms, and such stalls, not the
writer, decide the p99 of a run that has them. ``checkpoints_started_postgres`` and
``checkpoint_buffers_written_postgres``: PostgreSQL checkpoint activity in that window
(a checkpoint there is the other known cause of a bad PostgreSQL p99). Before its
throughput run, and so before that window, the benchmark asks PostgreSQL for a
CHECKPOINT (``checkpoint_before_window_postgres``: 1 if it ran), so that the server
recycles WAL segments in the window as a server under steady load does, and
``wal_segments_added_postgres`` counts the segments it had to create instead (each one
a 16 MB file of zeros written first: see ``_checkpoint_now``).

Wall-clock rates depend on what else the machine runs, so the output also carries the CPU
time the writer's database thread spent per settlement in the throughput run
(``writer_cpu_us_per_settle_*``: the capacity of one free core is 10⁶ divided by it) and
the machine's load average before and after (``load_avg_1m_*``, ``cpu_count``).
"""

from __future__ import annotations

import asyncio
import gc
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mercato.v1 import market_pb2

from marketplace.identity import Identity
from marketplace.ids import uuid7
from marketplace.ledger.applier import now_unix_ms
from marketplace.ledger.models import AccountKind
from marketplace.ledger.operations import PlaceHold, Settle, SettleSegment
from marketplace.ledger.receipts import RelayedSegment, check_receipt, countersign, sign_receipt
from marketplace.ledger.settings import LedgerSettings
from marketplace.ledger.store import LedgerStore
from marketplace.ledger.writer import GroupCommitWriter

POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
CLIENTS = 64
NODES = 16
THROUGHPUT_SETTLEMENTS = 20_000
STEADY_SECONDS = 2.0
# A hold is placed when its request starts and settled when it ends, in another batch:
# requests here last this long, so the writer sees each settlement's hold come and go
# as it would live (its row inserted, later deleted, rather than never written).
REQUEST_SECONDS = 0.5
RATE_SQLITE_PER_S = 10_000
RATE_POSTGRES_PER_S = 5_000


def _make_ops(
    count: int,
    clients: list[tuple[str, str]],
    nodes: list[Identity],
    coordinator: Identity,
    rate_per_s: int,
) -> list[tuple[PlaceHold, Settle]]:
    """``count`` settlements whose request ids are what the coordinator makes
    (time-ordered, :mod:`marketplace.ids`), dated as if the requests arrived at
    ``rate_per_s`` from now: the ledger's indexes see the key order they would see."""
    template: dict[int, tuple[bytes, bytes]] = {}
    pairs = []
    start_ms = now_unix_ms()
    expires = start_ms + 3_600_000
    # Identity.node_id and public_key are derived on every access (base58 of the key).
    node_ids = [node.node_id for node in nodes]
    public_keys = [node.public_key for node in nodes]
    coordinator_key = coordinator.public_key
    for i in range(count):
        node = nodes[i % len(nodes)]
        node_id = node_ids[i % len(nodes)]
        request_id = str(uuid7(start_ms + i * 1000 // rate_per_s))
        usage = market_pb2.UsageReceipt(
            request_id=f"{request_id}#0",
            node_id=node_id,
            model="bench-model",
            input_tokens=200 + i % 50,
            output_tokens=100 + i % 200,
            price_input_micro_usd_per_mtok=100_000,
            price_output_micro_usd_per_mtok=300_000,
        )
        data = usage.SerializeToString(deterministic=True)
        # Signing every receipt would dominate set-up time; the signature bytes are real
        # for one receipt per node and reused (the writer does not re-verify).
        sig, csig = template.get(i % len(nodes), (b"", b""))
        if not sig:
            signed = sign_receipt(usage, node)
            sig = signed.node_signature
            csig = countersign(signed, coordinator).coordinator_signature
            template[i % len(nodes)] = (sig, csig)
        cost = -(-(usage.input_tokens * 100_000 + usage.output_tokens * 300_000) // 1_000_000)
        account, key_id = clients[i % len(clients)]
        hold = PlaceHold(request_id, account, 200, expires, "bench", key_id)
        settle = Settle(
            request_id=request_id,
            account_id=account,
            model="bench-model",
            fee_bps=1000,
            hold_micro_usd=200,
            api_key_id=key_id,
            segments=(
                SettleSegment(
                    worker_request_id=f"{request_id}#0",
                    segment_index=0,
                    node_id=node_id,
                    model="bench-model",
                    input_tokens=usage.input_tokens,
                    output_tokens=usage.output_tokens,
                    cost_micro_usd=cost,
                    receipt=data,
                    node_public_key=public_keys[i % len(nodes)],
                    node_signature=sig,
                    coordinator_public_key=coordinator_key,
                    coordinator_signature=csig,
                ),
            ),
        )
        pairs.append((hold, settle))
    return pairs


async def _place_holds(writer: GroupCommitWriter, pairs: list[tuple[PlaceHold, Settle]]) -> None:
    """Place the holds of requests already running when timing starts (not timed)."""
    for start in range(0, len(pairs), 2_000):
        await asyncio.gather(*(writer.submit(hold) for hold, _ in pairs[start : start + 2_000]))


def _freeze_scaffolding() -> None:
    """Move the pre-built operations out of the collector's sight.

    Tens of thousands of operations built ahead of time are this benchmark's scaffolding:
    a coordinator never holds them all at once (it builds each when its request ends),
    and it freezes its own long-lived state at start (``coordinator.server``). Left in
    the heap, every full collection would walk them, adding pauses of 50-150 ms that
    measure the benchmark, not the ledger.
    """
    gc.collect()
    gc.freeze()


def _receipt_check_us(coordinator: Identity, node: Identity, rounds: int = 500) -> float:
    usage = market_pb2.UsageReceipt(
        request_id="r#0",
        node_id=node.node_id,
        model="m",
        input_tokens=10,
        output_tokens=20,
        price_input_micro_usd_per_mtok=1,
        price_output_micro_usd_per_mtok=2,
    )
    signed = sign_receipt(usage, node)
    relayed = RelayedSegment("r#0", node.node_id, "m", 10, 20, 1, 2)
    start = time.perf_counter()
    for _ in range(rounds):
        check_receipt(signed, relayed)
        countersign(signed, coordinator)
    return (time.perf_counter() - start) / rounds * 1e6


_WATCH_CODE = """
import sys, time
sys.stdin.readline()  # go
stop = []
import threading
threading.Thread(target=lambda: (sys.stdin.readline(), stop.append(1)), daemon=True).start()
worst = 0.0
over = 0
while not stop:
    t = time.perf_counter()
    time.sleep(0.001)
    late = time.perf_counter() - t - 0.001
    worst = max(worst, late)
    over += late > 0.005
print(round(worst * 1000, 2), over, flush=True)
"""


class _StallWatch:
    """Another process that sleeps 1 ms in a loop and notes how late it wakes.

    It shares nothing with the benchmark (no GIL, no event loop), so a late wake-up is
    the machine stopping every process at once, as a virtual machine's host can during
    a disk flush: the worst oversleep and the count over 5 ms say whether a run's tail
    came from the ledger or from the machine.
    """

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-c", _WATCH_CODE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def start(self) -> None:
        assert self._process.stdin is not None
        self._process.stdin.write("go\n")
        self._process.stdin.flush()

    def stop(self) -> tuple[float, int]:
        """(worst oversleep ms, oversleeps over 5 ms) since ``start``."""
        out, _ = self._process.communicate("stop\n", timeout=30)
        worst, over = out.split()
        return float(worst), int(over)


async def _steady(
    writer: GroupCommitWriter,
    clients: list[tuple[str, str]],
    nodes: list[Identity],
    coordinator: Identity,
    rate_per_s: int,
) -> tuple[float, float, tuple[float, int]]:
    """Offer ``rate_per_s`` settlements for a while; (p99, p50) queued-to-durable in ms,
    and the machine's stalls meanwhile (worst oversleep ms, count over 5 ms)."""
    watch = _StallWatch()
    count = int(rate_per_s * STEADY_SECONDS)
    lag = int(rate_per_s * REQUEST_SECONDS)
    steady = _make_ops(count + lag, clients, nodes, coordinator, rate_per_s)
    await _place_holds(writer, steady[:lag])
    _freeze_scaffolding()
    watch.start()
    delays: list[float] = []
    loop = asyncio.get_running_loop()

    def _record(submitted: float) -> Any:
        return lambda _f: delays.append(loop.time() - submitted)

    start = loop.time()
    sent = 0
    pending = []
    while sent < count:
        due = min(count, int((loop.time() - start) * rate_per_s) + 1)
        while sent < due:
            future = writer.submit(steady[sent][1])
            future.add_done_callback(_record(loop.time()))
            writer.submit(steady[sent + lag][0])  # a request that starts now
            pending.append(future)
            sent += 1
        # asyncio's own loop (asyncio.run), not uvloop: uvloop's timers count whole
        # milliseconds, so this sleep would return at once and the loop would spin
        # (135,000 turns in 0.5 s against 453), holding the GIL the writer needs
        await asyncio.sleep(0.0005)
    await asyncio.gather(*pending)
    stalls = watch.stop()
    delays.sort()
    return delays[int(len(delays) * 0.99) - 1] * 1000, statistics.median(delays) * 1000, stalls


def _postgres_row(engine: Any, query: str, *, autocommit: bool = False) -> tuple[Any, ...] | None:
    """The first row of ``query`` on PostgreSQL (``()`` for a statement that returns
    none); None on SQLite, or when the server refuses it (a view this version lacks, a
    right this role lacks)."""
    if engine.dialect.name != "postgresql":
        return None
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    try:
        with engine.connect() as conn:
            if autocommit:
                conn.execution_options(isolation_level="AUTOCOMMIT")
            result = conn.execute(text(query))
            if not result.returns_rows:
                return ()
            row = result.first()
            return None if row is None else tuple(row)
    except DBAPIError:
        return None


def _checkpoint_counters(engine: Any) -> tuple[int, int] | None:
    """PostgreSQL's checkpoints so far and the buffers they wrote (None on SQLite)."""
    queries = (  # PostgreSQL 17 moved the counters to pg_stat_checkpointer
        "SELECT num_timed + num_requested, buffers_written FROM pg_stat_checkpointer",
        "SELECT checkpoints_timed + checkpoints_req, buffers_checkpoint FROM pg_stat_bgwriter",
    )
    for query in queries:
        row = _postgres_row(engine, query)
        if row is not None:
            return int(row[0]), int(row[1])
    return None


def _checkpoint_now(engine: Any) -> bool:
    """PostgreSQL: run a CHECKPOINT (needs superuser or ``pg_checkpoint``); True if it ran.

    Run before the timed window so that the server recycles its WAL segments during it,
    as a server under steady load does. A server that has written a lot of WAL since
    its last checkpoint (one run of this benchmark writes about 100 MB) has no
    segment to recycle and creates each new 16 MB segment by writing zeros through it
    first: at 5,000 settlements/s that happened every 0.75 s, and each time the commits
    waiting behind it stalled for about 50 ms (p99 56-75 ms in three runs; 11 ms with
    the checkpoint first). ``wal_segments_added_postgres`` reports any still created.
    """
    return _postgres_row(engine, "CHECKPOINT", autocommit=True) is not None


def _wal_segments(engine: Any) -> int | None:
    """PostgreSQL: files in ``pg_wal`` (a recycled segment is renamed, a new one adds a
    file); None on SQLite or without the right to list them."""
    row = _postgres_row(engine, "SELECT count(*) FROM pg_ls_waldir()")
    return None if row is None else int(row[0])


def _checkpoint_activity(
    before: tuple[int, int] | None, after: tuple[int, int] | None
) -> dict[str, int]:
    """Checkpoints begun and buffers they wrote while the target rate ran: a checkpoint
    in the window (its writes and the full-page images that follow it) took the p99 at
    5,000/s from 14-19 ms to 88-104 ms when one was forced there."""
    if before is None or after is None:
        return {}
    return {
        "checkpoints_started": after[0] - before[0],
        "checkpoint_buffers_written": after[1] - before[1],
    }


def _server_wal(
    engine: Any, checkpointed: bool, before: int | None, after: int | None
) -> dict[str, int]:
    if engine.dialect.name != "postgresql":
        return {}
    activity = {"checkpoint_before_window": int(checkpointed)}
    if before is not None and after is not None:
        activity["wal_segments_added"] = after - before
    return activity


async def _measure(settings: LedgerSettings, rate_per_s: int) -> dict[str, float]:
    store = LedgerStore.open(settings)
    engine = store.engine
    coordinator = Identity.generate()
    nodes = [Identity.generate() for _ in range(NODES)]
    clients = []
    for i in range(CLIENTS):
        account = store.create_account(AccountKind.CLIENT, f"bench-client-{i}")
        store.deposit(account.id, 10**12)
        clients.append((account.id, store.issue_key(account.id, "bench").key.id))
    writer = GroupCommitWriter(engine, batch_max=settings.commit_batch_max)
    writer.start()
    try:
        # warm-up (creates the provider accounts)
        warm = _make_ops(200, clients, nodes, coordinator, rate_per_s)
        await asyncio.gather(*(writer.submit(op) for pair in warm for op in pair))

        # Before the throughput run, not right before the timed window: after a checkpoint
        # each page's first change writes a full 8 KB image of it to the WAL, and the
        # throughput run takes that burst.
        checkpointed = _checkpoint_now(engine)
        lag = int(rate_per_s * REQUEST_SECONDS)
        pairs = _make_ops(THROUGHPUT_SETTLEMENTS + lag, clients, nodes, coordinator, rate_per_s)
        await _place_holds(writer, pairs[:lag])
        _freeze_scaffolding()
        batches_before = writer.batches
        cpu_before = writer.cpu_s
        start = time.perf_counter()
        futures = []
        for index in range(THROUGHPUT_SETTLEMENTS):
            futures.append(writer.submit(pairs[index][1]))
            writer.submit(pairs[index + lag][0])
            if index % 500 == 499:
                await asyncio.sleep(0)  # let the writer start early, as live traffic would
        await asyncio.gather(*futures)
        elapsed = time.perf_counter() - start
        throughput = THROUGHPUT_SETTLEMENTS / elapsed
        cpu_us = (writer.cpu_s - cpu_before) / THROUGHPUT_SETTLEMENTS * 1e6
        mean_batch = 2 * THROUGHPUT_SETTLEMENTS / max(1, writer.batches - batches_before)

        checkpoints_before = _checkpoint_counters(engine)
        segments_before = _wal_segments(engine)
        p99, p50, stalls = await _steady(writer, clients, nodes, coordinator, rate_per_s)
        checkpoints_after = _checkpoint_counters(engine)
        segments_after = _wal_segments(engine)
        half_rate = max(100, int(throughput / 2))
        p99_half, _, _ = await _steady(writer, clients, nodes, coordinator, half_rate)
    finally:
        await writer.close()
        store.close()
        gc.unfreeze()
    return (
        {
            "settle_per_s": round(throughput),
            "writer_cpu_us_per_settle": round(cpu_us, 1),
            "durable_ms_p99": round(p99, 2),
            "durable_ms_p50": round(p50, 2),
            "ops_per_batch_mean": round(mean_batch, 1),
            "offered_per_s": rate_per_s,
            "durable_ms_p99_half_load": round(p99_half, 2),
            "half_load_per_s": half_rate,
            "machine_stall_ms_max": stalls[0],
            "machine_stalls_over_5ms": stalls[1],
        }
        | _checkpoint_activity(checkpoints_before, checkpoints_after)
        | _server_wal(engine, checkpointed, segments_before, segments_after)
    )


def _sqlite() -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="mercato-bench-") as folder:
        settings = LedgerSettings(
            database_url=f"sqlite:///{Path(folder) / 'bench.db'}",
            intent_log_dir=Path(folder) / "intents",
        )
        return asyncio.run(_measure(settings, RATE_SQLITE_PER_S))


def _postgres() -> dict[str, float] | str:
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    schema = f"bench_{secrets.token_hex(4)}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
    except OperationalError as exc:
        admin.dispose()
        return f"PostgreSQL unreachable at 127.0.0.1:5432 ({exc.orig})"
    try:
        settings = LedgerSettings(
            database_url=f"{POSTGRES_ADMIN_URL}?options=-csearch_path%3D{schema}",
        )
        return asyncio.run(_measure(settings, RATE_POSTGRES_PER_S))
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def run(json_output: bool = False) -> dict[str, Any]:
    """Run both backends; print a table; return the numbers (keys as documented above)."""
    result: dict[str, Any] = {
        "receipt_check_us": round(_receipt_check_us(Identity.generate(), Identity.generate()), 1),
        "cpu_count": os.cpu_count(),
        "hold_to_settle_s": REQUEST_SECONDS,
        "load_avg_1m_before": round(os.getloadavg()[0], 2),
    }
    sqlite = _sqlite()
    for key, value in sqlite.items():
        result[f"{key}_sqlite"] = value
    postgres = _postgres()
    if isinstance(postgres, str):
        result["postgres_error"] = postgres
    else:
        for key, value in postgres.items():
            result[f"{key}_postgres"] = value
    result["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    print(
        "backend     settle/s   durable p50 ms   durable p99 ms   ops/batch   offered/s"
        "   p99 ms at half load"
    )
    for name in ("sqlite", "postgres"):
        if f"settle_per_s_{name}" in result:
            print(
                f"{name:<10} {result[f'settle_per_s_{name}']:>9} "
                f"{result[f'durable_ms_p50_{name}']:>16} {result[f'durable_ms_p99_{name}']:>16} "
                f"{result[f'ops_per_batch_mean_{name}']:>11} {result[f'offered_per_s_{name}']:>11}"
                f" {result[f'durable_ms_p99_half_load_{name}']:>10} "
                f"(at {result[f'half_load_per_s_{name}']}/s)"
            )
    for name in ("sqlite", "postgres"):
        if f"machine_stall_ms_max_{name}" in result:
            print(
                f"{name}: during the run at the target rate, a 1 ms sleep in another process "
                f"woke up to {result[f'machine_stall_ms_max_{name}']} ms late "
                f"({result[f'machine_stalls_over_5ms_{name}']} times over 5 ms): the "
                "machine's own stalls"
            )
    if "checkpoints_started_postgres" in result:
        print(
            "postgres: checkpoints begun during the run at the target rate: "
            f"{result['checkpoints_started_postgres']} (buffers they wrote: "
            f"{result['checkpoint_buffers_written_postgres']}); WAL segments created in it: "
            f"{result.get('wal_segments_added_postgres', 'unknown')}; CHECKPOINT before it: "
            f"{'yes' if result.get('checkpoint_before_window_postgres') else 'refused'}"
        )
    for name in ("sqlite", "postgres"):
        if f"writer_cpu_us_per_settle_{name}" in result:
            print(
                f"{name}: writer thread CPU {result[f'writer_cpu_us_per_settle_{name}']} us per "
                "settlement (throughput run)"
            )
    print(
        f"receipt check + countersign: {result['receipt_check_us']} us per receipt (request path)"
    )
    print(
        f"machine: {result['cpu_count']} CPUs, load average (1 min) "
        f"{result['load_avg_1m_before']} before, {result['load_avg_1m_after']} after"
    )
    if "postgres_error" in result:
        print(result["postgres_error"])
    return result
