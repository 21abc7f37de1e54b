"""`mercato up`: a coordinator and one local node on 127.0.0.1, in one command.

Everything lives in one data directory (``--home``, default ``$MERCATO_HOME`` or
``~/.mercato``). The first run prepares the packaged model with a progress display;
later runs reuse it. Ctrl-C stops the node, then the coordinator, and waits for both.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import typer

from marketplace.paths import default_home

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


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

    services = []

    def stop_all() -> None:
        for service in reversed(services):
            service.stop()

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
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
