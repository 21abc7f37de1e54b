"""Root of the ``mercato`` command line; each area's commands live in their own module."""

from __future__ import annotations

import typer

from marketplace.cli import (
    accounts_cmd,
    bench_cmd,
    chat_cmd,
    client_cmd,
    coordinator_cmd,
    ledger_cmd,
    node_cmd,
    up_cmd,
)

app = typer.Typer(
    name="mercato",
    help="Mercato: a decentralized GPU inference marketplace.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold keys and secrets
)
app.add_typer(node_cmd.app, name="node", help="Run a provider node.")
app.add_typer(coordinator_cmd.app, name="coordinator", help="Run a coordinator.")
app.add_typer(bench_cmd.app, name="bench", help="Benchmarks that print numbers.")
up_cmd.register(app)
chat_cmd.register(app)
client_cmd.register(app)
accounts_cmd.register(app)
ledger_cmd.register(app)


def main() -> None:
    app()
