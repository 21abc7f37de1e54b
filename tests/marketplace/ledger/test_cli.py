"""The operator commands through Typer's CliRunner, with --json (structured answers)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from marketplace.cli.app import app
from marketplace.identity import Identity
from marketplace.ledger import Ledger, LedgerSettings
from tests.marketplace.ledger.conftest import receipt_for

runner = CliRunner()


def mercato(url: str, *args: str, ok: bool = True) -> dict:
    result = runner.invoke(app, [*args, "--database-url", url, "--json"])
    assert (result.exit_code == 0) == ok, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def _provider_account(url: str) -> tuple[Identity, dict[str, Any]]:
    """The provider account gpu-1, bound to a fixed node identity (the node, the JSON)."""
    node = Identity.from_seed(b"n" * 32)
    created = mercato(
        url,
        "accounts",
        "create",
        "--name",
        "gpu-1",
        "--kind",
        "provider",
        "--node-id",
        node.node_id,
    )
    return node, created


def _settle_one_request(url: str, tmp_path: Path, api_key: str, node: Identity) -> None:
    """Request req-1 held and settled through the ledger, as a coordinator would: 1,000
    input and 1,000 output tokens on ``node`` (400 micro-USD)."""

    async def request() -> None:
        settings = LedgerSettings(database_url=url, intent_log_dir=tmp_path / "intents")
        async with Ledger(settings, coordinator=Identity.from_seed(b"c" * 32)) as ledger:
            principal = await ledger.authenticate(api_key)
            await ledger.place_hold("req-1", principal, 10_000)
            signed, relayed = receipt_for(node, "req-1#0", 1000, 1000)
            await (await ledger.settle("req-1", [signed], [relayed])).durable

    asyncio.run(request())


def test_operator_flow(database_url: str, tmp_path: Path) -> None:
    url = database_url
    alice = mercato(url, "accounts", "create", "--name", "alice")
    assert alice["kind"] == "client"
    node, provider = _provider_account(url)
    assert provider["node_id"] == node.node_id
    issued = mercato(
        url, "keys", "issue", "--account", "alice", "--spend-limit-micro-usd", "5000000"
    )
    assert issued["api_key"].startswith("mk_") and "secret" not in json.dumps(issued["key"])
    deposit = mercato(url, "credits", "deposit", "alice", "2000000", "--transfer-id", "dep-1")
    assert deposit["account"]["available_micro_usd"] == 2_000_000
    again = mercato(url, "credits", "deposit", "alice", "2000000", "--transfer-id", "dep-1")
    assert again["transfer"]["created"] is False
    assert mercato(url, "balance", "alice")["available_micro_usd"] == 2_000_000
    _settle_one_request(url, tmp_path, issued["api_key"], node)
    usage = mercato(url, "usage", "--account", "alice")
    assert [(u["model"], u["requests"], u["cost_micro_usd"]) for u in usage] == [("smol", 1, 400)]
    shown = mercato(url, "receipts", "show", "req-1")
    assert shown["receipts"][0]["output_tokens"] == 1000
    receipts_file = tmp_path / "receipts.json"
    receipts_file.write_text(json.dumps(shown))
    verified = mercato(
        url,
        "receipts",
        "verify",
        "--file",
        str(receipts_file),
        "--coordinator-key",
        Identity.from_seed(b"c" * 32).public_key.hex(),
    )
    assert verified["ok"] is True
    untrusted = mercato(
        url,
        "receipts",
        "verify",
        "--file",
        str(receipts_file),
        "--coordinator-key",
        "00" * 32,
        ok=False,
    )
    assert untrusted["ok"] is False
    assert mercato(url, "ledger", "verify")["ok"] is True
    paid = mercato(url, "payouts", "run", "--batch-id", "p1")
    assert paid["created"] and paid["total_micro_usd"] == 360
    assert mercato(url, "payouts", "run", "--batch-id", "p1")["created"] is False
    assert mercato(url, "payouts", "run")["payouts"] == []
    revoked = mercato(url, "keys", "revoke", issued["key"]["id"])
    assert revoked["revoked_at_unix_ms"] is not None
    accounts = mercato(url, "accounts", "list")
    assert {a["name"] for a in accounts} >= {"alice", "gpu-1", "platform.fees"}


def test_errors_say_what_to_do(database_url: str) -> None:
    url = database_url
    error = mercato(url, "credits", "deposit", "nobody", "10", ok=False)
    assert error["error"] == "unknown_account" and "mercato accounts list" in error["message"]
    mercato(url, "accounts", "create", "--name", "alice")
    error = mercato(url, "credits", "deposit", "alice", "0", ok=False)
    assert error["error"] == "invalid_amount"
    error = mercato(url, "accounts", "create", "--name", "alice", ok=False)
    assert error["error"] == "id_conflict"
    error = mercato(url, "accounts", "create", "--name", "p", "--kind", "provider", ok=False)
    assert "--node-id" in error["message"]
    error = mercato(url, "receipts", "show", "nope", ok=False)
    assert error["error"] == "unknown_receipt"
    result = runner.invoke(app, ["balance", "nobody", "--database-url", url])
    assert result.exit_code == 1 and "error:" in result.stderr


def test_ledger_verify_exits_1_on_a_tampered_ledger(database_url: str) -> None:
    """`ledger verify` fails (exit 1, ok false, the bad entry named) once an amount is edited."""
    from sqlalchemy import create_engine, text

    url = database_url
    mercato(url, "accounts", "create", "--name", "alice")
    mercato(url, "credits", "deposit", "alice", "1000", "--transfer-id", "dep-1")
    assert mercato(url, "ledger", "verify")["ok"] is True
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE transfers SET amount = 1 WHERE seq = (SELECT MAX(seq) FROM transfers)")
            )
    finally:
        engine.dispose()
    report = mercato(url, "ledger", "verify", ok=False)
    assert report["ok"] is False and report["first_bad_seq"] is not None
    human = runner.invoke(app, ["ledger", "verify", "--database-url", url])
    assert human.exit_code == 1 and "DOES NOT VERIFY" in human.stderr


def test_keys_issue_shows_the_secret_once_and_never_again(database_url: str) -> None:
    """The human output of `keys issue` prints the secret exactly once; `keys list` never."""
    url = database_url
    mercato(url, "accounts", "create", "--name", "alice")
    result = runner.invoke(app, ["keys", "issue", "--account", "alice", "--database-url", url])
    assert result.exit_code == 0, result.output
    [secret] = [w for w in result.stdout.split() if w.startswith("mk_")]
    assert result.stdout.count(secret) == 1
    listed = runner.invoke(app, ["keys", "list", "--database-url", url, "--json"])
    assert secret not in listed.stdout and secret.split("_", 2)[2] not in listed.stdout


def test_receipts_show_json_has_every_field(database_url: str, tmp_path: Path) -> None:
    """`receipts show --json`: each receipt carries the documented keys, with the cost."""
    url = database_url
    mercato(url, "accounts", "create", "--name", "alice")
    node, _ = _provider_account(url)
    mercato(url, "credits", "deposit", "alice", "2000000")
    issued = mercato(url, "keys", "issue", "--account", "alice")
    _settle_one_request(url, tmp_path, issued["api_key"], node)
    [shown] = mercato(url, "receipts", "show", "req-1")["receipts"]
    assert set(shown) == {
        "request_id", "node_request_id", "node_id", "model", "segment_index", "input_tokens",
        "output_tokens", "price_input_micro_usd_per_mtok", "price_output_micro_usd_per_mtok",
        "cost_micro_usd", "coordinator_public_key", "signed_receipt_b64",
    }  # fmt: skip
    assert shown["node_id"] == node.node_id and shown["cost_micro_usd"] == 400
    assert shown["coordinator_public_key"] == Identity.from_seed(b"c" * 32).public_key.hex()


def test_receipts_verify_without_a_request_or_file_exits_1(database_url: str) -> None:
    """`receipts verify` with nothing to verify is an error (exit 1), not an empty success."""
    error = mercato(database_url, "receipts", "verify", ok=False)
    assert error["error"] == "invalid_argument" and "--file" in error["message"]


def _one_line_error(args: list[str]) -> str:
    """Run ``mercato`` expecting a refusal: exit 1, one line on stderr, no traceback;
    and with --json, ``{"error", "message"}`` on stdout. Returns the message."""
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ")
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 1, result.output
    error = json.loads(result.stdout.strip().splitlines()[-1])
    assert error["error"] == "invalid_argument" and error["message"] == line[len("error: ") :]
    return error["message"]


@pytest.mark.parametrize("key", ["not-hex", "abc", "00" * 31, "00" * 33])
def test_receipts_verify_with_a_bad_coordinator_key_is_one_line(tmp_path: Path, key: str) -> None:
    """Before, a --coordinator-key that is not hex printed a traceback."""
    receipts_file = tmp_path / "receipts.json"
    receipts_file.write_text(json.dumps({"receipts": []}))
    args = ["receipts", "verify", "--file", str(receipts_file), "--coordinator-key", key]
    message = _one_line_error(args)
    assert repr(key) in message and "64 hex characters" in message


@pytest.mark.parametrize(
    ("document", "says"),
    [
        ({"receipts": [{"request_id": "r", "signed_receipt_b64": "////"}]}, "not a signed"),
        ({"receipts": [{"request_id": "r", "signed_receipt_b64": 5}]}, "shape"),
        ({"receipts": ["r"]}, "shape"),
        ({"receipts": 5}, "shape"),
        ([], "shape"),
        ("text", "shape"),
        ({}, "missing"),
    ],
)
def test_receipts_verify_with_a_file_that_is_not_receipts_is_one_line(
    tmp_path: Path, document: object, says: str
) -> None:
    """Before, valid base64 that is not a protobuf (DecodeError) or JSON of another shape
    (TypeError) printed a traceback."""
    receipts_file = tmp_path / "receipts.json"
    receipts_file.write_text(json.dumps(document))
    message = _one_line_error(["receipts", "verify", "--file", str(receipts_file)])
    assert str(receipts_file) in message and says in message
    assert "mercato receipts show <request id> --json" in message


def test_receipts_verify_with_a_file_that_is_not_json_is_one_line(tmp_path: Path) -> None:
    receipts_file = tmp_path / "receipts.json"
    receipts_file.write_bytes(b"\xff\xfe not json")
    _one_line_error(["receipts", "verify", "--file", str(receipts_file)])
    _one_line_error(["receipts", "verify", "--file", str(tmp_path / "missing.json")])
