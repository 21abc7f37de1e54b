"""`mercato bench NAME [--json]`: benchmarks that print a table and, last, one JSON line.

Each benchmark lives beside the code it measures and exposes ``run(json_output: bool)
-> dict``; this module only dispatches to it, importing it lazily.
"""

from __future__ import annotations

import importlib
import json

import typer

app = typer.Typer(no_args_is_help=True)

# name -> (module, help). Modules are imported only when their benchmark runs.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "e2e": (
        "marketplace.cli.bench_e2e",
        "Engine in-process vs routed through coordinator and node.",
    ),
    "overhead": ("coordinator.benchmarks.overhead", "Latency the coordinator adds (fake engine)."),
    "relay": ("coordinator.benchmarks.relay", "Tokens/s one coordinator relays per core."),
    "matching": ("coordinator.benchmarks.matching", "One routing decision over 1k..100k nodes."),
    "spread": ("coordinator.benchmarks.spread", "Queue spread of a burst over 1,000 nodes."),
    "ledger": (
        "marketplace.ledger.bench",
        "Settlements/s and durability delay, SQLite and PostgreSQL.",
    ),
}


def _make_command(name: str, module_name: str, help_text: str) -> None:
    @app.command(name=name, help=help_text)
    def command(
        json_output: bool = typer.Option(False, "--json", help="End with one JSON line."),
    ) -> None:
        module = importlib.import_module(module_name)
        result = module.run(json_output=json_output)
        if json_output:
            print(json.dumps(result, sort_keys=True))


for _name, (_module, _help) in BENCHMARKS.items():
    _make_command(_name, _module, _help)
