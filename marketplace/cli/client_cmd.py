"""A client's commands against a running coordinator, over its gRPC API:
`mercato nodes` (the live market), `mercato whoami` (your balance and your key's spend,
`AccountService.GetBalance`) and `mercato lease create/list/show/end` (dedicated leases,
`AccountService`).

The API key is found as `mercato chat` finds it: ``$MERCATO_API_KEY``, else the one
``mercato up`` stored in ``<home>/client.key``. ``--json`` prints one JSON document on
stdout (the response message, fields in their protobuf JSON names); a refusal is one
line on stderr, ``error: CODE: what to do``, exit code 1 (``{"error": ..., "message":
...}`` on stdout with ``--json``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from marketplace.cli.chat_cmd import api_key_for
from marketplace.cli.ledger_cmd import JsonOutput, table

if TYPE_CHECKING:
    import grpc
    from google.protobuf.message import Message
    from mercato.v1 import account_pb2

lease_app = typer.Typer(
    no_args_is_help=True, help="Lease a node for dedicated use (paid per GPU-hour, up front)."
)

Coordinator = typer.Option("127.0.0.1:7700", help="Coordinator gRPC address.")
Home = typer.Option(
    None,
    help="Data directory whose client.key to use (default: $MERCATO_HOME or ~/.mercato); "
    "$MERCATO_API_KEY wins over it.",
)


@contextmanager
def _channel(address: str, json_output: bool) -> Iterator[grpc.Channel]:
    """A channel to the coordinator; a refused call becomes one line and exit code 1."""
    import grpc

    with grpc.insecure_channel(address) as channel:
        try:
            yield channel
        except grpc.RpcError as exc:
            code = exc.code()
            message = exc.details() or ""
            if code is grpc.StatusCode.UNAVAILABLE and "connect" in message:
                message = (
                    f"cannot reach a coordinator at {address}; start one (mercato up) or "
                    "pass --coordinator HOST:PORT"
                )
            if json_output:
                print(json.dumps({"error": code.name.lower(), "message": message}))
            else:
                print(f"error: {code.name}: {message}", file=sys.stderr)
            raise typer.Exit(1) from None


def _metadata(home: Path | None) -> tuple[tuple[str, str], ...]:
    key = api_key_for(home)
    return (("authorization", f"Bearer {key}"),) if key else ()


def _emit(message: Message, json_output: bool, human: Callable[[], None]) -> None:
    if json_output:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps(MessageToDict(message), sort_keys=True))
    else:
        human()


def _utc(unix_ms: int) -> str:
    if not unix_ms:
        return "-"
    return datetime.fromtimestamp(unix_ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


# ---------------------------------------------------------------- nodes


def nodes(
    model: str = typer.Option("", help="Only nodes serving this model."),
    coordinator: str = Coordinator,
    home: Path | None = Home,
    json_output: bool = JsonOutput,
) -> None:
    """The live nodes: region, models, prices, whether leased, measured latency.

    Prices are the nodes' signed offers; TTFT and the backed-off state are what the
    coordinator measured itself."""
    from mercato.v1 import inference_pb2, inference_pb2_grpc

    with _channel(coordinator, json_output) as channel:
        listed = inference_pb2_grpc.InferenceServiceStub(channel).ListNodes(
            inference_pb2.ListNodesRequest(model=model), timeout=10, metadata=_metadata(home)
        )

    def human() -> None:
        rows = []
        for info in listed.nodes:
            offer = info.offer
            gpus = len(offer.hardware.gpus)
            hardware = (
                f"{gpus}× {offer.hardware.gpus[0].name}"
                if gpus
                else f"CPU ({offer.hardware.cpu_cores} cores)"
            )
            measured = info.measurements
            for terms in offer.models:
                rows.append(
                    [
                        info.node_id,
                        offer.region,
                        terms.model,
                        f"{terms.price_input_micro_usd_per_mtok}"
                        f"/{terms.price_output_micro_usd_per_mtok}",
                        offer.price_micro_usd_per_gpu_hour,
                        hardware,
                        "leased" if info.leased else "free",
                        f"{measured.ttft_us / 1000:.1f}" if measured.ttft_us else "-",
                        "backed off" if measured.backed_off else "ok",
                    ]
                )
        table(
            "Nodes (prices in micro-USD)",
            [
                "node",
                "region",
                "model",
                "in/out per Mtok",
                "per GPU-hour",
                "hardware",
                "lease",
                "TTFT ms",
                "state",
            ],
            rows,
            whole={"node", "model", "in/out per Mtok"},
        )
        if not listed.nodes:
            print("no node is live; start one (mercato node start)", file=sys.stderr)

    _emit(listed, json_output, human)


# ---------------------------------------------------------------- whoami


def whoami(
    coordinator: str = Coordinator,
    home: Path | None = Home,
    json_output: bool = JsonOutput,
) -> None:
    """Your account and API key as the coordinator sees them: balance, and what the key
    has spent, holds in flight and has left under its spend limit (all coordinators of
    the ledger counted)."""
    from mercato.v1 import account_pb2, account_pb2_grpc

    with _channel(coordinator, json_output) as channel:
        answer = account_pb2_grpc.AccountServiceStub(channel).GetBalance(
            account_pb2.GetBalanceRequest(), timeout=10, metadata=_metadata(home)
        )

    def human() -> None:
        limit = (
            f"{answer.key_spend_limit_micro_usd} (left {answer.key_spend_left_micro_usd})"
            if answer.HasField("key_spend_limit_micro_usd")
            else "none"
        )
        table(
            f"Account {answer.account_name} ({answer.account_id}), key {answer.api_key_id}",
            ["", "micro-USD"],
            [
                ["balance posted", answer.posted_micro_usd],
                ["held for requests and leases", answer.held_micro_usd],
                ["available", answer.available_micro_usd],
                ["key spent", answer.key_spent_micro_usd],
                ["key held in flight", answer.key_held_micro_usd],
                ["key spend limit", limit],
            ],
            whole={""},
        )

    _emit(answer, json_output, human)


# ---------------------------------------------------------------- leases


def _lease_rows(leases: list[account_pb2.Lease]) -> list[list[Any]]:
    from mercato.v1 import account_pb2

    return [
        [
            lease.lease_id,
            lease.node_id,
            account_pb2.LeaseStatus.Name(lease.status).removeprefix("LEASE_STATUS_").lower(),
            lease.held_micro_usd,
            lease.charged_micro_usd,
            lease.refunded_micro_usd,
            f"{lease.periods_charged}/{lease.periods_total}",
            _utc(lease.started_at_unix_ms),
            _utc(lease.ends_at_unix_ms),
        ]
        for lease in leases
    ]


_LEASE_COLUMNS = [
    "lease",
    "node",
    "status",
    "paid µUSD",
    "charged µUSD",
    "refunded µUSD",
    "hours charged",
    "started",
    "ends",
]
_WHOLE = {"lease", "node", "started", "ends"}


def _show_lease(title: str, lease: account_pb2.Lease) -> None:
    table(title, _LEASE_COLUMNS, _lease_rows([lease]), whole=_WHOLE)


@lease_app.command("create")
def lease_create(
    node_id: str = typer.Argument(..., help="Node to lease, as `mercato nodes` shows it."),
    # max: marketplace.ledger.ledger.LEASE_HOURS_MAX (not imported: the ledger's modules
    # take 0.4 s to import, and this command never opens the ledger).
    hours: int = typer.Option(..., min=1, max=24 * 366, help="How long, in whole hours."),
    max_price: int = typer.Option(
        0, min=0, help="Refuse if the node costs more per GPU-hour (micro-USD); 0: no cap."
    ),
    lease_id: str = typer.Option(
        "", "--id", help="Your own lease id, so a retry cannot lease twice; empty: a new one."
    ),
    coordinator: str = Coordinator,
    home: Path | None = Home,
    json_output: bool = JsonOutput,
) -> None:
    """Lease a whole node; its price for all the hours is taken up front.

    The price is the node's micro-USD per GPU-hour × its GPUs × hours. The hours not
    started come back if you end the lease early; if the node fails, the hour it failed
    in comes back too."""
    from mercato.v1 import account_pb2, account_pb2_grpc

    request = account_pb2.CreateLeaseRequest(
        node_id=node_id,
        hours=hours,
        lease_id=lease_id,
        max_price_micro_usd_per_gpu_hour=max_price,
    )
    with _channel(coordinator, json_output) as channel:
        created = account_pb2_grpc.AccountServiceStub(channel).CreateLease(
            request, timeout=30, metadata=_metadata(home)
        )

    def human() -> None:
        _show_lease("Lease created", created.lease)
        print(
            f'use it: mercato chat --lease {created.lease.lease_id} "..."; '
            f"end it: mercato lease end {created.lease.lease_id}"
        )

    _emit(created, json_output, human)


@lease_app.command("list")
def lease_list(
    active: bool = typer.Option(False, "--active", help="Only the leases in force now."),
    coordinator: str = Coordinator,
    home: Path | None = Home,
    json_output: bool = JsonOutput,
) -> None:
    """Your leases, newest first."""
    from mercato.v1 import account_pb2, account_pb2_grpc

    leases: list[account_pb2.Lease] = []
    with _channel(coordinator, json_output) as channel:
        stub = account_pb2_grpc.AccountServiceStub(channel)
        token = ""
        while True:
            page = stub.ListLeases(
                account_pb2.ListLeasesRequest(page_size=500, page_token=token, active_only=active),
                timeout=30,
                metadata=_metadata(home),
            )
            leases.extend(page.leases)
            token = page.next_page_token
            if not token:
                break
    _emit(
        account_pb2.ListLeasesResponse(leases=leases),
        json_output,
        lambda: table("Leases", _LEASE_COLUMNS, _lease_rows(leases), whole=_WHOLE),
    )


@lease_app.command("show")
def lease_show(
    lease_id: str = typer.Argument(..., help="One of your leases."),
    coordinator: str = Coordinator,
    home: Path | None = Home,
    json_output: bool = JsonOutput,
) -> None:
    """One of your leases: what was paid, charged and refunded."""
    from mercato.v1 import account_pb2, account_pb2_grpc

    with _channel(coordinator, json_output) as channel:
        got = account_pb2_grpc.AccountServiceStub(channel).GetLease(
            account_pb2.GetLeaseRequest(lease_id=lease_id), timeout=30, metadata=_metadata(home)
        )
    _emit(got, json_output, lambda: _show_lease("Lease", got.lease))


@lease_app.command("end")
def lease_end(
    lease_id: str = typer.Argument(..., help="One of your active leases."),
    coordinator: str = Coordinator,
    home: Path | None = Home,
    json_output: bool = JsonOutput,
) -> None:
    """End a lease early: the hours not started are refunded."""
    from mercato.v1 import account_pb2, account_pb2_grpc

    with _channel(coordinator, json_output) as channel:
        ended = account_pb2_grpc.AccountServiceStub(channel).EndLease(
            account_pb2.EndLeaseRequest(lease_id=lease_id), timeout=30, metadata=_metadata(home)
        )
    _emit(ended, json_output, lambda: _show_lease("Lease ended", ended.lease))


def register(app: typer.Typer) -> None:
    """Adds ``nodes``, ``whoami`` and ``lease`` to the root app."""
    app.command("nodes")(nodes)
    app.command("whoami")(whoami)
    app.add_typer(
        lease_app, name="lease", help="Lease a node for dedicated use (per GPU-hour, up front)."
    )
