"""`mercato coordinator ...` commands."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer

from marketplace.cli.settings_errors import settings_refused

app = typer.Typer(no_args_is_help=True)


@app.command("start")
def start(
    host: str | None = typer.Option(
        None, "--host", help="Address to listen on (default 127.0.0.1; 0.0.0.0 for all)."
    ),
    port: int | None = typer.Option(
        None, "--port", help="gRPC port (default 7700; 0 picks a free port)."
    ),
    home: Path | None = typer.Option(
        None, "--home", help="Mercato data directory (default $MERCATO_HOME or ~/.mercato)."
    ),
    identity_path: Path | None = typer.Option(
        None, "--identity", help="Coordinator key file (default HOME/coordinator/identity.key)."
    ),
    liveness_timeout_ms: int | None = typer.Option(
        None, "--liveness-timeout-ms", help="Drop a node silent this long (default 3000)."
    ),
    cpus: str | None = typer.Option(
        None,
        "--cpus",
        help="Run on these CPUs only, e.g. 1 or 2-3 (Linux). [default: any]",
    ),
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING, ERROR."),
) -> None:
    """Run a coordinator until Ctrl-C / SIGTERM. Prints MERCATO_COORDINATOR_READY {json}
    when it listens. Every option can also be set as MERCATO_COORDINATOR_<NAME>."""
    from pydantic import ValidationError

    from coordinator.server import main
    from coordinator.settings import CoordinatorSettings
    from marketplace.ledger.errors import LedgerBusy
    from marketplace.placement import PlacementError

    overrides: dict[str, Any] = {
        "listen_host": host,
        "port": port,
        "home": home,
        "identity_path": identity_path,
        "liveness_timeout_ms": liveness_timeout_ms,
        "cpus": cpus,
    }
    try:
        settings = CoordinatorSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise settings_refused(exc, "MERCATO_COORDINATOR_") from exc
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        main(settings)
    # The port is taken; this coordinator already runs; its --cpus are not available here.
    except (OSError, LedgerBusy, PlacementError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from exc
