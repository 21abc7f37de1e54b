"""`mercato nodes`, `mercato whoami`, `mercato lease ...` and `mercato chat --lease` against a whole
coordinator (billing on, SQLite) and a fake node, as a person and a script use them.

The CLI makes blocking gRPC calls, so each command runs in a thread while this test's
event loop serves the coordinator."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from typer.testing import CliRunner

from marketplace.cli.app import app

from . import fakes
from .conftest import billed_coordinator_and_node, funded_client_key

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


async def _run(*args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, app, list(args))


def _json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


async def test_nodes_and_a_lease_from_create_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # rich tables: room for whole node ids
    async with billed_coordinator_and_node(tmp_path, monkeypatch) as (coordinator, node):
        assert coordinator.billing is not None
        store = coordinator.billing.ledger.store
        issued = funded_client_key(store, "fay")
        store.deposit(issued.key.account_id, 2_000_000, "more")  # 3 USD in all
        monkeypatch.setenv("MERCATO_API_KEY", issued.secret_key)
        at = ("--coordinator", coordinator.address)
        node_id = node.identity.node_id

        listed = _json(await _run("nodes", "--json", *at))
        assert [n["nodeId"] for n in listed["nodes"]] == [node_id]
        assert not listed["nodes"][0].get("leased", False)

        created = _json(await _run("lease", "create", node_id, "--hours", "2", "--json", *at))
        lease = created["lease"]
        assert lease["status"] == "LEASE_STATUS_ACTIVE" and lease["nodeId"] == node_id
        assert lease["heldMicroUsd"] == "2000000"  # 1 USD per GPU-hour, a CPU node, 2 hours
        lease_id = lease["leaseId"]

        people = await _run("nodes", *at)
        assert people.exit_code == 0, people.output
        row = next(line for line in people.stdout.splitlines() if node_id in line)
        assert fakes.MODEL in row and "leased" in row

        chat = await _run("chat", "hi", "--lease", lease_id, "--model", fakes.MODEL, *at)
        assert chat.exit_code == 0, chat.output
        assert "Hello, world" in chat.stdout and node_id[:16] in chat.stderr
        assert "cost" not in chat.stderr  # a lease pays nothing per token

        again = await _run("lease", "create", node_id, "--hours", "1", *at)
        assert again.exit_code == 1
        assert "FAILED_PRECONDITION" in again.stderr and lease_id in again.stderr

        active = _json(await _run("lease", "list", "--active", "--json", *at))
        assert [x["leaseId"] for x in active["leases"]] == [lease_id]
        shown = await _run("lease", "show", lease_id, *at)
        assert shown.exit_code == 0 and lease_id in shown.stdout and "active" in shown.stdout

        ended = _json(await _run("lease", "end", lease_id, "--json", *at))["lease"]
        assert ended["status"] == "LEASE_STATUS_ENDED"
        assert (ended["chargedMicroUsd"], ended["refundedMicroUsd"]) == ("1000000", "1000000")
        assert _json(await _run("lease", "list", "--active", "--json", *at)) == {}
        assert not _json(await _run("nodes", "--json", *at))["nodes"][0].get("leased", False)


async def test_whoami_shows_the_balance_and_the_keys_spend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    async with billed_coordinator_and_node(tmp_path, monkeypatch) as (coordinator, node):
        assert coordinator.billing is not None
        store = coordinator.billing.ledger.store
        account_id = funded_client_key(store, "hal").key.account_id
        issued = store.issue_key(account_id, "capped", spend_limit_micro_usd=50_000)
        monkeypatch.setenv("MERCATO_API_KEY", issued.secret_key)
        at = ("--coordinator", coordinator.address)
        node.worker.final_receipt = node.signed_usage
        chat = await _run("chat", "hi", "--model", fakes.MODEL, *at)
        assert chat.exit_code == 0, chat.output
        await coordinator.billing.ledger.flush()
        spent = store.key_spent_micro_usd(issued.key.id)
        assert spent > 0

        shown = _json(await _run("whoami", "--json", *at))
        assert shown["accountId"] == account_id and shown["apiKeyId"] == issued.key.id
        assert shown["keySpentMicroUsd"] == str(spent)
        assert shown["keySpendLimitMicroUsd"] == "50000"
        assert shown["keySpendLeftMicroUsd"] == str(50_000 - spent)
        assert shown["availableMicroUsd"] == str(1_000_000 - spent)

        people = await _run("whoami", *at)
        assert people.exit_code == 0, people.output
        assert f"50000 (left {50_000 - spent})" in people.stdout
        assert "hal" in people.stdout and issued.key.id in people.stdout


async def test_client_commands_refuse_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with billed_coordinator_and_node(tmp_path, monkeypatch) as (coordinator, _node):
        assert coordinator.billing is not None
        issued = funded_client_key(coordinator.billing.ledger.store, "gus")
        at = ("--coordinator", coordinator.address)

        monkeypatch.delenv("MERCATO_API_KEY", raising=False)
        keyless = await _run("lease", "list", "--home", str(tmp_path / "nobody"), *at)
        assert keyless.exit_code == 1
        assert keyless.stderr.startswith("error: UNAUTHENTICATED: missing API key")

        monkeypatch.setenv("MERCATO_API_KEY", issued.secret_key)
        unknown = await _run("lease", "show", "no-such-lease", "--json", *at)
        assert unknown.exit_code == 1
        assert json.loads(unknown.stdout)["error"] == "not_found"
        poor = await _run("lease", "create", "12D3KooWnobody", "--hours", "1", *at)
        assert poor.exit_code == 1 and poor.stderr.startswith("error: NOT_FOUND: ")
        assert len(poor.stderr.strip().splitlines()) == 1
        hours = await _run("lease", "create", "12D3KooWnobody", "--hours", "0", *at)
        assert hours.exit_code == 2  # a usage error, before any call

    nowhere = await _run("nodes", "--coordinator", "127.0.0.1:9")
    assert nowhere.exit_code == 1
    assert "cannot reach a coordinator at 127.0.0.1:9" in nowhere.stderr
