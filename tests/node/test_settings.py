"""NodeSettings: defaults derived from home, bounds, and cross-field errors naming the flag."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from node.settings import EngineBackend, NodeSettings


def test_paths_default_under_home(tmp_path: Path) -> None:
    settings = NodeSettings(home=tmp_path)
    assert settings.identity_path == tmp_path / "node" / "identity.key"
    assert settings.models_dir == tmp_path / "models"
    assert settings.engine is EngineBackend.VLLM
    assert settings.worker_address(4242) == "127.0.0.1:4242"


def test_environment_is_read_with_the_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MERCATO_NODE_REGION", "us-east-2")
    monkeypatch.setenv("MERCATO_NODE_ENGINE", "fake")
    monkeypatch.setenv("MERCATO_NODE_PORT", "0")
    settings = NodeSettings(home=tmp_path)
    assert (settings.region, settings.engine, settings.port) == ("us-east-2", EngineBackend.FAKE, 0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"region": "EU West"},
        {"region": "-x"},
        {"port": 70000},
        {"max_concurrency": 0},
        {"max_model_len": 63},
        {"stream_interval_max": 0},
        {"price_input_micro_usd_per_mtok": -1},
        {"price_output_micro_usd_per_mtok": -1},
        {"price_micro_usd_per_gpu_hour": -1},
        {"region": "r" * 33},
        {"engine": "tensorrt"},
        {"register_backoff_initial_ms": 5000, "register_backoff_max_ms": 100},
    ],
)
def test_out_of_bounds_values_are_refused(tmp_path: Path, overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        NodeSettings(home=tmp_path, **overrides)  # type: ignore[arg-type]


def test_a_wildcard_listen_host_needs_an_advertised_address(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="advertise_address"):
        NodeSettings(home=tmp_path, listen_host="0.0.0.0")
    settings = NodeSettings(
        home=tmp_path, listen_host="0.0.0.0", advertise_address="node.example:7701"
    )
    assert settings.worker_address(1234) == "node.example:7701"


def test_node_start_flags_reach_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    import node.daemon
    import node.orphan_guard
    from marketplace.cli.app import app

    seen: list[NodeSettings] = []

    async def run_node(settings: NodeSettings) -> None:  # the node itself is not started
        seen.append(settings)

    monkeypatch.setattr(node.daemon, "run_node", run_node)
    monkeypatch.setattr(node.orphan_guard, "install_orphan_guard", lambda: None)
    home = ["--home", str(tmp_path)]
    result = CliRunner().invoke(
        app, ["node", "start", *home, "--no-cuda-graphs", "--gpu-memory-permille", "400"]
    )
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["node", "start", *home])
    assert result.exit_code == 0, result.output
    assert [(s.cuda_graphs, s.gpu_memory_utilization_permille) for s in seen] == [
        (False, 400),
        (True, 900),
    ]
    refused = CliRunner().invoke(app, ["node", "start", *home, "--gpu-memory-permille", "2000"])
    assert refused.exit_code != 0 and not seen[2:]
    assert "gpu_memory_utilization_permille" in refused.output
