"""`mercato ledger verify`, `mercato usage`, `mercato receipts show/verify`,
`mercato payouts run`: the ledger's operator commands (money out and audits).

Every command takes ``--database-url`` (default: MERCATO_DATABASE_URL, else SQLite in the
data directory) and ``--json`` (one JSON document on stdout, for scripts). Errors go to
stderr as one line saying what to do, with exit code 1 (``{"error": code, "message":
...}`` on stdout with ``--json``).
"""

from __future__ import annotations

import base64
import json
import sys
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from marketplace.ledger.store import LedgerStore

DatabaseUrl = typer.Option(
    None,
    "--database-url",
    help="Ledger database URL (default: MERCATO_DATABASE_URL, else SQLite in the data dir).",
)
JsonOutput = typer.Option(False, "--json", help="Print one JSON document (for scripts).")

receipts_app = typer.Typer(no_args_is_help=True, help="Show and verify usage receipts.")
ledger_app = typer.Typer(no_args_is_help=True, help="Audit the ledger.")
payouts_app = typer.Typer(no_args_is_help=True, help="Pay provider earnings out (records).")


def to_jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {k: to_jsonable(v) for k, v in asdict(value).items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.hex()
    return value


def emit(value: Any, json_output: bool, human: Callable[[], None]) -> None:
    if json_output:
        print(json.dumps(to_jsonable(value), sort_keys=True))
    else:
        human()


@contextmanager
def open_store(database_url: str | None, json_output: bool) -> Iterator[LedgerStore]:
    """Open the ledger; turn LedgerErrors into a one-line message and exit code 1."""
    from marketplace.ledger.errors import LedgerError
    from marketplace.ledger.settings import LedgerSettings
    from marketplace.ledger.store import LedgerStore

    store = None
    try:
        settings = LedgerSettings(database_url=database_url) if database_url else LedgerSettings()
        store = LedgerStore.open(settings)
        yield store
    except LedgerError as exc:
        if json_output:
            print(json.dumps({"error": exc.code, "message": str(exc)}))
        else:
            print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    finally:
        if store is not None:
            store.close()


def table(
    title: str, columns: list[str], rows: list[list[Any]], *, whole: Collection[str] = ()
) -> None:
    """Print a table for people; the ``whole`` columns (ids to copy) wrap instead of being
    cut short with an ellipsis in a narrow terminal."""
    from rich.console import Console
    from rich.table import Table

    out = Table(title=title)
    for column in columns:
        out.add_column(column, overflow="fold" if column in whole else "ellipsis")
    for row in rows:
        out.add_row(*(str(v) for v in row))
    Console().print(out)


# ---------------------------------------------------------------- usage


def usage(
    account: str | None = typer.Option(None, "--account", help="Account id, name or node id."),
    key: str | None = typer.Option(None, "--key", help="Only this API key id."),
    days: int | None = typer.Option(None, "--days", min=1, help="Only the last N days."),
    database_url: str | None = DatabaseUrl,
    json_output: bool = JsonOutput,
) -> None:
    """Requests, tokens and cost by day, key and model."""
    with open_store(database_url, json_output) as store:
        since = None if days is None else int(time.time() * 1000) - days * 86_400_000
        rows = store.usage(account, since_unix_ms=since, api_key_id=key)
    emit(
        rows,
        json_output,
        lambda: table(
            "Usage",
            ["day", "key", "model", "requests", "input tokens", "output tokens", "cost µUSD"],
            [
                [
                    r.day,
                    r.api_key_id or "-",
                    r.model,
                    r.requests,
                    r.input_tokens,
                    r.output_tokens,
                    r.cost_micro_usd,
                ]
                for r in rows
            ],
        ),
    )


# ---------------------------------------------------------------- receipts


def _receipt_json(request_id: str, signed: Any) -> dict[str, Any]:
    from marketplace.ledger.receipts import parse_receipt, receipt_cost_micro_usd

    usage = parse_receipt(signed)
    return {
        "request_id": request_id,
        "node_request_id": usage.request_id,
        "node_id": usage.node_id,
        "model": usage.model,
        "segment_index": usage.segment_index,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "price_input_micro_usd_per_mtok": usage.price_input_micro_usd_per_mtok,
        "price_output_micro_usd_per_mtok": usage.price_output_micro_usd_per_mtok,
        "cost_micro_usd": receipt_cost_micro_usd(usage),
        "coordinator_public_key": signed.coordinator_public_key.hex(),
        "signed_receipt_b64": base64.b64encode(signed.SerializeToString()).decode(),
    }


@receipts_app.command("show")
def receipts_show(
    request_id: str = typer.Argument(..., help="The request id."),
    database_url: str | None = DatabaseUrl,
    json_output: bool = JsonOutput,
) -> None:
    """The countersigned receipts of a request (``--json`` output feeds ``receipts verify``)."""
    with open_store(database_url, json_output) as store:
        receipts = [_receipt_json(request_id, r) for r in store.receipts(request_id)]
    emit(
        {"receipts": receipts},
        json_output,
        lambda: table(
            f"Receipts of {request_id}",
            ["segment", "node", "model", "input", "output", "cost µUSD"],
            [
                [
                    r["segment_index"],
                    r["node_id"],
                    r["model"],
                    r["input_tokens"],
                    r["output_tokens"],
                    r["cost_micro_usd"],
                ]
                for r in receipts
            ],
        ),
    )


@receipts_app.command("verify")
def receipts_verify(
    request_id: str | None = typer.Argument(None, help="Verify this request's stored receipts."),
    file: Path | None = typer.Option(
        None, "--file", help="Verify offline: the JSON of 'mercato receipts show --json'."
    ),
    coordinator_key: list[str] = typer.Option(
        [], "--coordinator-key", help="Trusted coordinator public key (hex); repeatable."
    ),
    database_url: str | None = DatabaseUrl,
    json_output: bool = JsonOutput,
) -> None:
    """Check node signatures and coordinator countersignatures with the public keys only."""
    from google.protobuf.message import DecodeError
    from mercato.v1 import market_pb2

    from marketplace.ledger.errors import BadReceipt, InvalidInput, LedgerError
    from marketplace.ledger.receipts import verify_offline

    trusted = [_coordinator_key(k, json_output) for k in coordinator_key] or None
    results: list[dict[str, Any]] = []
    try:
        if file is not None:
            document = json.loads(file.read_text())
            signed_list = [
                (
                    r["request_id"],
                    market_pb2.SignedReceipt.FromString(base64.b64decode(r["signed_receipt_b64"])),
                )
                for r in document["receipts"]
            ]
        elif request_id is not None:
            with open_store(database_url, json_output) as store:
                signed_list = [(request_id, r) for r in store.receipts(request_id)]
        else:
            raise InvalidInput(
                "give a request id, or --file with the JSON of 'receipts show --json'"
            )
    except LedgerError as exc:
        _fail(exc.code, str(exc), json_output)
    except KeyError as exc:
        _fail("invalid_argument", _unreadable(file, f"a field is missing: {exc}"), json_output)
    except (TypeError, AttributeError) as exc:
        _fail("invalid_argument", _unreadable(file, f"not the expected shape ({exc})"), json_output)
    except DecodeError as exc:
        reason = f"a signed_receipt_b64 is not a signed receipt ({exc})"
        _fail("invalid_argument", _unreadable(file, reason), json_output)
    except (OSError, ValueError) as exc:
        _fail("invalid_argument", _unreadable(file, str(exc)), json_output)
    for rid, signed in signed_list:
        try:
            usage = verify_offline(signed, trusted)
            results.append(
                {"request_id": rid, "node_request_id": usage.request_id, "ok": True, "error": None}
            )
        except BadReceipt as exc:
            results.append(
                {"request_id": rid, "node_request_id": None, "ok": False, "error": str(exc)}
            )
    ok = all(r["ok"] for r in results)
    emit(
        {"ok": ok, "receipts": results},
        json_output,
        lambda: table(
            "Receipt verification",
            ["request", "node request", "ok", "error"],
            [
                [r["request_id"], r["node_request_id"] or "-", r["ok"], r["error"] or ""]
                for r in results
            ],
        ),
    )
    if not ok:
        raise typer.Exit(1)


def _coordinator_key(text: str, json_output: bool) -> bytes:
    """A ``--coordinator-key``: an Ed25519 public key, 64 hex characters."""
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        _fail(
            "invalid_argument",
            f"--coordinator-key {text!r} is not a coordinator public key: give its 64 hex "
            "characters, as the coordinator prints them in its ready line "
            "(coordinator_public_key)",
            json_output,
        )
    return key


def _unreadable(file: Path | None, reason: str) -> str:
    return (
        f"cannot read receipts file {file}: {reason}; give the JSON that "
        "'mercato receipts show <request id> --json' prints"
    )


def _fail(code: str, message: str, json_output: bool) -> None:
    if json_output:
        print(json.dumps({"error": code, "message": message}))
    else:
        print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(1)


# ---------------------------------------------------------------- ledger verify


@ledger_app.command("verify")
def ledger_verify(
    database_url: str | None = DatabaseUrl,
    json_output: bool = JsonOutput,
) -> None:
    """Recompute the hash chain and every balance; name the first entry that does not match."""
    from marketplace.ledger.audit import verify_ledger

    with open_store(database_url, json_output) as store:
        report = verify_ledger(store.engine)

    def human() -> None:
        if report.ok:
            print(
                f"ledger OK: {report.entries} entries, {report.accounts} accounts, balances sum to zero"
            )
        else:
            where = (
                f"first bad entry: {report.first_bad_seq} ({report.first_bad_id})"
                if report.first_bad_seq is not None
                else "no single entry to blame"
            )
            print(f"ledger DOES NOT VERIFY; {where}", file=sys.stderr)
            for problem in report.problems:
                print(f"  {problem}", file=sys.stderr)

    emit(report, json_output, human)
    if not report.ok:
        raise typer.Exit(1)


# ---------------------------------------------------------------- payouts


@payouts_app.command("run")
def payouts_run(
    batch_id: str | None = typer.Option(
        None, "--batch-id", help="Id of the batch; running the same id twice pays once."
    ),
    min_micro_usd: int | None = typer.Option(
        None, "--min-micro-usd", min=1, help="Pay only balances of at least this much."
    ),
    database_url: str | None = DatabaseUrl,
    json_output: bool = JsonOutput,
) -> None:
    """Pay every provider's available earnings out (payout records; no real money moves)."""
    with open_store(database_url, json_output) as store:
        result = store.run_payouts(batch_id, min_micro_usd)
    document = {
        "batch_id": result.batch_id,
        "created": result.created,
        "total_micro_usd": result.total_micro_usd,
        "payouts": [{"account_id": a, "amount_micro_usd": m} for a, m in result.payouts],
    }

    def human() -> None:
        if not result.payouts:
            print("nothing to pay out: no provider has earnings due")
            return
        table(
            f"Payout batch {result.batch_id}" + ("" if result.created else " (ran before)"),
            ["account", "amount µUSD"],
            [[a, m] for a, m in result.payouts],
        )

    emit(document, json_output, human)


def register(app: typer.Typer) -> None:
    """Adds this module's commands to the root app."""
    app.command("usage")(usage)
    app.add_typer(receipts_app, name="receipts", help="Show and verify usage receipts.")
    app.add_typer(ledger_app, name="ledger", help="Audit the ledger.")
    app.add_typer(payouts_app, name="payouts", help="Pay provider earnings out (records).")
