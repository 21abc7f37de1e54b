"""`mercato up`: a coordinator and one local node on 127.0.0.1, in one command.

Everything lives in one data directory (``--home``, default ``$MERCATO_HOME`` or
``~/.mercato``). The first run prepares the packaged model with a progress display;
later runs reuse it. Ctrl-C stops the node, then the coordinator, and waits for both.

Billing is on, as in production: the first run also creates a local client account
(``local``) with demo credits and an API key, stores the key in ``<home>/client.key``
(mode 0600) and prints it once; ``mercato chat`` reads it from there (or from
``$MERCATO_API_KEY``). The ledger is ``$MERCATO_DATABASE_URL``, else SQLite at
``<home>/mercato.db`` -- the same database the coordinator and the operator CLI open.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import typer

from marketplace.paths import default_home

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
CLIENT_KEY_FILE = "client.key"
LOCAL_ACCOUNT = "local"
DEMO_CREDITS_MICRO_USD = 10_000_000  # 10 USD: tens of thousands of demo requests


def client_key_path(home: Path) -> Path:
    """Where ``mercato up`` keeps the local client's API key."""
    return home / CLIENT_KEY_FILE


def ensure_client_key(
    home: Path,
    database_url: str | None = None,
    *,
    account: str = LOCAL_ACCOUNT,
    credits_micro_usd: int = DEMO_CREDITS_MICRO_USD,
    key_path: Path | None = None,
) -> tuple[str, bool]:
    """The API key of the local client account, made on first use: the account (with
    ``credits_micro_usd`` deposited once) and a key written to ``key_path`` (default
    ``home/client.key``, mode 0600). Returns ``(key, created)``; a stored key that the
    ledger no longer accepts (revoked, or a new database) is replaced."""
    from marketplace.ledger.api_keys import parse_key, secret_matches
    from marketplace.ledger.errors import LedgerError, UnknownAccount
    from marketplace.ledger.models import AccountKind
    from marketplace.ledger.settings import LedgerSettings
    from marketplace.ledger.store import LedgerStore

    path = key_path or client_key_path(home)
    settings = LedgerSettings()
    if database_url is not None:
        settings = LedgerSettings(database_url=database_url)
    elif "database_url" not in settings.model_fields_set:
        settings = LedgerSettings(database_url=f"sqlite:///{home / 'mercato.db'}")
    store = LedgerStore.open(settings)
    try:
        if path.exists():
            stored = path.read_text().strip()
            try:
                key_id, secret = parse_key(stored)
                record = store.key_record(key_id)
            except LedgerError:
                record = None
            if (
                record is not None
                and not record.revoked
                and secret_matches(secret, record.secret_sha256)
            ):
                return stored, False
        try:
            view = store.account(account)
        except UnknownAccount:
            view = store.create_account(AccountKind.CLIENT, account)
        store.deposit(view.id, credits_micro_usd, f"demo-credits-{view.id}")
        issued = store.issue_key(view.id, "mercato-up")
    finally:
        store.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(issued.secret_key + "\n")
    os.chmod(path, 0o600)
    return issued.secret_key, True


def register(app: typer.Typer) -> None:
    """Adds ``up`` to the root app."""
    app.command("up")(up)


def up(
    home: Path | None = typer.Option(
        None, help="Data directory (default: $MERCATO_HOME or ~/.mercato)."
    ),
    coordinator_port: int = typer.Option(7700, help="Coordinator gRPC port."),
    node_port: int = typer.Option(7701, help="Node worker gRPC port."),
    region: str = typer.Option("local", help="Region code the local node advertises."),
    model: str = typer.Option(DEFAULT_MODEL, help="Model the local node serves."),
) -> None:
    """Run a coordinator and one local node until Ctrl-C."""
    from rich.console import Console
    from rich.panel import Panel

    from marketplace.cli.processes import ServiceStartError, mercato_command, start_service

    console = Console(stderr=True)
    home = (home or default_home()).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    logs = home / "logs"

    from node.model_store import ensure_model  # the edge: lazy import

    ensure_model(home / "models", model, show_progress=True)

    api_key, created = ensure_client_key(home)
    if created:
        console.print(
            Panel.fit(
                f"Created the local client account [bold]{LOCAL_ACCOUNT}[/bold] with "
                f"{DEMO_CREDITS_MICRO_USD / 1_000_000:.2f} USD of demo credits.\n"
                f"Its API key (shown once; stored in {client_key_path(home)}):\n"
                f"[bold]{api_key}[/bold]",
                title="API key",
            )
        )

    services = []

    def stop_all() -> None:
        for service in reversed(services):
            service.stop()

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C stops everything, even where a parent started us with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with console.status("starting the coordinator…"):
            coordinator = start_service(
                "coordinator",
                mercato_command(
                    "coordinator", "start", "--home", str(home), "--port", str(coordinator_port)
                ),
                "MERCATO_COORDINATOR_READY",
                logs / "coordinator.log",
                timeout_s=60,
            )
        services.append(coordinator)
        address = coordinator.ready.get("address", f"127.0.0.1:{coordinator_port}")
        with console.status("starting the node and loading the engine…"):
            node = start_service(
                "node",
                mercato_command(
                    "node",
                    "start",
                    "--home",
                    str(home),
                    "--coordinator",
                    address,
                    "--port",
                    str(node_port),
                    "--region",
                    region,
                    "--model",
                    model,
                ),
                "MERCATO_NODE_READY",
                logs / "node.log",
                timeout_s=300,
            )
        services.append(node)
    except ServiceStartError as exc:
        stop_all()
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=1) from exc
    except KeyboardInterrupt:
        stop_all()
        raise typer.Exit(code=130) from None

    console.print(
        Panel.fit(
            f"[bold]Mercato is up[/bold]\n"
            f"gRPC API (InferenceService): [cyan]{address}[/cyan]\n"
            f"node {node.ready.get('node_id', '?')} serving {model} in region {region}\n"
            f"data: {home}   logs: {logs}\n\n"
            f'try:  [green]mercato chat "What is a GPU?"[/green]\n'
            f"Ctrl-C stops everything.",
            title="mercato up",
        )
    )
    try:
        while all(service.alive() for service in services):
            time.sleep(0.5)
        dead = [s for s in services if not s.alive()]
        for service in dead:
            console.print(f"[red]{service.name} exited[/red]; last lines:\n{service.log_tail(20)}")
        stop_all()
        raise typer.Exit(code=1)
    except KeyboardInterrupt:
        console.print("stopping…")
        stop_all()
        console.print("stopped.")
    sys.exit(0)
