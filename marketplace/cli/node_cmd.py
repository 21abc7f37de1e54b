"""`mercato node ...` commands: run a provider node, or show what it would offer.

The node package is imported inside the commands only (the command line is the edge).
Options mirror ``NodeSettings``; an option left out falls back to ``MERCATO_NODE_*`` and
then to the documented default.
"""

from __future__ import annotations

import json
import logging
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer

from marketplace.cli.settings_errors import settings_refused

app = typer.Typer(no_args_is_help=True)


class EngineChoice(StrEnum):
    """Engine backends offered on the command line (same values as node.EngineBackend)."""

    # vLLM: the real engine.
    vllm = "vllm"
    # Made-up tokens: unit tests and routing-overhead benchmarks only.
    fake = "fake"


def _settings(overrides: dict[str, Any]) -> Any:
    from pydantic import ValidationError

    from node.settings import NodeSettings  # the edge: lazy import

    try:
        return NodeSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise settings_refused(exc, "MERCATO_NODE_") from exc


@app.command("start")
def start(
    coordinator: str | None = typer.Option(
        None, "--coordinator", help="host:port of the coordinator. [default: 127.0.0.1:7700]"
    ),
    host: str | None = typer.Option(
        None, "--host", help="Address to listen on. [default: 127.0.0.1]"
    ),
    port: int | None = typer.Option(
        None, "--port", help="Worker gRPC port; 0 picks a free one. [default: 7701]"
    ),
    advertise_address: str | None = typer.Option(
        None, "--advertise-address", help="host:port coordinators dial. [default: host:port]"
    ),
    region: str | None = typer.Option(None, "--region", help="Region code. [default: local]"),
    model: str | None = typer.Option(
        None, "--model", help="Model to serve. [default: SmolLM2-135M-Instruct]"
    ),
    engine: EngineChoice | None = typer.Option(
        None, "--engine", help="Engine backend (fake: tests/benchmarks only). [default: vllm]"
    ),
    home: Path | None = typer.Option(
        None, "--home", help="Mercato data directory. [default: $MERCATO_HOME or ~/.mercato]"
    ),
    models_dir: Path | None = typer.Option(
        None, "--models-dir", help="Where converted models live. [default: HOME/models]"
    ),
    price_input: int | None = typer.Option(
        None, "--price-input", help="Input price, micro-USD per million tokens. [default: 50000]"
    ),
    price_output: int | None = typer.Option(
        None,
        "--price-output",
        help="Output price, micro-USD per million tokens. [default: 150000]",
    ),
    price_gpu_hour: int | None = typer.Option(
        None, "--price-gpu-hour", help="Lease price, micro-USD per GPU-hour. [default: 400000]"
    ),
    max_concurrency: int | None = typer.Option(
        None, "--max-concurrency", help="Most requests in flight. [default: 64]"
    ),
    dtype: str | None = typer.Option(
        None, "--dtype", help="Engine number format: auto, bfloat16, float32. [default: auto]"
    ),
    kv_cache_space_gib: int | None = typer.Option(
        None, "--kv-cache-space-gib", help="KV cache on a CPU node, GiB. [default: 2]"
    ),
    max_model_len: int | None = typer.Option(
        None, "--max-model-len", help="Context length offered, tokens. [default: 2048]"
    ),
    gpu_memory_permille: int | None = typer.Option(
        None,
        "--gpu-memory-permille",
        help="GPU node: share of GPU memory vLLM may take, permille. [default: 900]",
    ),
    cuda_graphs: bool | None = typer.Option(
        None,
        "--cuda-graphs/--no-cuda-graphs",
        help="GPU node: compile and capture CUDA graphs at start. [default: on]",
    ),
    log_level: str = typer.Option("INFO", "--log-level", help="Python logging level."),
) -> None:
    """Run a provider node until Ctrl-C; prints MERCATO_NODE_READY {json} when serving."""
    settings = _settings(
        {
            "coordinator_address": coordinator,
            "listen_host": host,
            "port": port,
            "advertise_address": advertise_address,
            "region": region,
            "model": model,
            "engine": engine.value if engine is not None else None,
            "home": home,
            "models_dir": models_dir,
            "price_input_micro_usd_per_mtok": price_input,
            "price_output_micro_usd_per_mtok": price_output,
            "price_micro_usd_per_gpu_hour": price_gpu_hour,
            "max_concurrency": max_concurrency,
            "engine_dtype": dtype,
            "kv_cache_space_gib": kv_cache_space_gib,
            "max_model_len": max_model_len,
            "gpu_memory_utilization_permille": gpu_memory_permille,
            "cuda_graphs": cuda_graphs,
        }
    )
    import uvloop

    from node.daemon import run_node  # the edge: lazy import
    from node.errors import NodeError
    from node.orphan_guard import install_orphan_guard

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # This process is the node's own: its engine core process must die with it.
    install_orphan_guard()
    try:
        uvloop.run(run_node(settings))
    except (NodeError, OSError) as exc:  # OSError: the port is taken
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from exc


@app.command("info")
def info(
    home: Path | None = typer.Option(None, "--home", help="Mercato data directory."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Show this node's id and hardware (creates the identity key on first use)."""
    from marketplace.identity import Identity
    from node.hardware import probe  # the edge: lazy import

    settings = _settings({"home": home})
    identity = Identity.load_or_create(settings.identity_path)
    hardware = probe()
    data = {
        "node_id": identity.node_id,
        "identity_path": str(settings.identity_path),
        "accelerator": "nvidia-gpu" if hardware.gpus else "cpu",
        "gpus": [{"name": g.name, "memory_bytes": g.memory_bytes} for g in hardware.gpus],
        "cpu_cores": hardware.cpu_cores,
        "cpu_model": hardware.cpu_model,
        "memory_bytes": hardware.memory_bytes,
    }
    if json_output:
        typer.echo(json.dumps(data, sort_keys=True))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, title="mercato node")
    table.add_row("node id", data["node_id"])
    table.add_row("identity", data["identity_path"])
    table.add_row("accelerator", data["accelerator"])
    for index, gpu in enumerate(hardware.gpus):
        table.add_row(f"gpu {index}", f"{gpu.name} ({gpu.memory_bytes / 2**30:.1f} GiB)")
    table.add_row("cpu", f"{hardware.cpu_model} ({hardware.cpu_cores} usable cores)")
    table.add_row("memory", f"{hardware.memory_bytes / 2**30:.1f} GiB")
    Console().print(table)
