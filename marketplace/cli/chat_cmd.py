"""`mercato chat "question"`: stream an answer from a coordinator to the terminal.

The API key is ``$MERCATO_API_KEY``, else the one ``mercato up`` stored in
``<home>/client.key``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from marketplace.paths import default_home


def register(app: typer.Typer) -> None:
    """Adds ``chat`` to the root app."""
    app.command("chat")(chat)


def chat(
    question: str = typer.Argument(..., help="What to ask."),
    coordinator: str = typer.Option("127.0.0.1:7700", help="Coordinator gRPC address."),
    model: str = typer.Option("", help="Model name; empty: the first model listed."),
    system: str = typer.Option("", help="Optional system message."),
    max_tokens: int = typer.Option(256, help="Most tokens to generate."),
    temperature: float = typer.Option(0.7, help="0 for greedy decoding."),
    seed: int | None = typer.Option(
        None, min=0, max=2**63 - 1, help="Sampler seed, for reproducible output."
    ),
    region: list[str] = typer.Option([], help="Allowed region (repeatable); a hard constraint."),
    lease: str = typer.Option(
        "", help="Run on the node of this lease of yours (mercato lease list); no per-token cost."
    ),
    timeout_s: float = typer.Option(120.0, help="Deadline of the whole request, seconds."),
    home: Path | None = typer.Option(
        None,
        help="Data directory whose client.key to use (default: $MERCATO_HOME or ~/.mercato); "
        "$MERCATO_API_KEY wins over it.",
    ),
) -> None:
    """Ask a question and stream the answer as it is generated."""
    import grpc
    from mercato.v1 import common_pb2, inference_pb2, inference_pb2_grpc

    api_key = api_key_for(home)
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    messages = [common_pb2.ChatMessage(role="system", content=system)] if system else []
    messages.append(common_pb2.ChatMessage(role="user", content=question))
    with grpc.insecure_channel(coordinator) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        try:
            if not model:
                listed = stub.ListModels(
                    inference_pb2.ListModelsRequest(), timeout=10, metadata=metadata
                )
                if not listed.models:
                    _fail("no model is served right now; start a node (mercato node start)")
                model = listed.models[0].model
            sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature)
            if seed is not None:
                sampling.seed = seed
            request = inference_pb2.GenerateRequest(
                model=model,
                chat=common_pb2.ChatInput(messages=messages),
                sampling=sampling,
                routing=inference_pb2.RoutingPreferences(regions=region),
                lease_id=lease,
            )
            for response in stub.Generate(request, timeout=timeout_s, metadata=metadata):
                kind = response.WhichOneof("chunk")
                if kind == "delta":
                    sys.stdout.write(response.delta.text)
                    sys.stdout.flush()
                elif kind == "final":
                    final = response.final
                    sys.stdout.write("\n")
                    sys.stderr.write(
                        f"[{final.input_tokens} in, {final.output_tokens} out, "
                        f"{final.finish_reason and _finish_name(final.finish_reason)}, "
                        f"node {final.node_id[:16]}… in {final.region}"
                        + (
                            f", cost {final.cost_micro_usd} micro-USD"
                            if final.cost_micro_usd
                            else ""
                        )
                        + "]\n"
                    )
                elif kind == "error":
                    _fail(response.error.message)
        except grpc.RpcError as exc:
            _fail(f"{exc.code().name}: {exc.details()}")


def api_key_for(home: Path | None) -> str:
    """$MERCATO_API_KEY, else the key ``mercato up`` stored; empty if neither exists."""
    from marketplace.cli.up_cmd import client_key_path

    from_env = os.environ.get("MERCATO_API_KEY", "").strip()
    if from_env:
        return from_env
    path = client_key_path((home or default_home()).expanduser())
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _finish_name(value: int) -> str:
    from mercato.v1 import common_pb2

    return common_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def _fail(message: str) -> None:
    sys.stdout.write("\n")
    sys.stderr.write(f"error: {message}\n")
    raise typer.Exit(code=1)
