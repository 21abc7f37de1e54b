"""CoordinatorSettings: defaults, the environment prefix, bounds, cross-field rules."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from coordinator.settings import CoordinatorSettings


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MERCATO_HOME", str(tmp_path))
    settings = CoordinatorSettings()
    assert settings.listen_host == "127.0.0.1"
    assert settings.port == 7700
    assert settings.heartbeat_interval_ms == 1000
    assert settings.liveness_timeout_ms == 3000
    assert settings.default_max_tokens == 256
    assert settings.late_receipt_wait_s == 3.0
    assert settings.home == tmp_path
    assert settings.identity_path == tmp_path / "coordinator" / "identity.key"


def test_environment_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MERCATO_COORDINATOR_PORT", "0")
    monkeypatch.setenv("MERCATO_COORDINATOR_HOME", str(tmp_path))
    monkeypatch.setenv("MERCATO_COORDINATOR_MAX_PROMPT_CHARS", "100")
    settings = CoordinatorSettings()
    assert settings.port == 0
    assert settings.max_prompt_chars == 100
    assert settings.identity_path == tmp_path / "coordinator" / "identity.key"
    assert CoordinatorSettings(identity_path=tmp_path / "k").identity_path == tmp_path / "k"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("port", -1),
        ("port", 65536),
        ("heartbeat_interval_ms", 0),
        ("max_tokens_limit", 0),
        ("late_receipt_wait_s", -1),
    ],
)
def test_bounds(field: str, value: int) -> None:
    with pytest.raises(ValidationError, match=field):
        CoordinatorSettings(**{field: value})


def test_cross_field_errors_name_the_setting() -> None:
    with pytest.raises(ValidationError, match="MERCATO_COORDINATOR_LIVENESS_TIMEOUT_MS"):
        CoordinatorSettings(heartbeat_interval_ms=2000, liveness_timeout_ms=1000)
    with pytest.raises(ValidationError, match="MERCATO_COORDINATOR_DEFAULT_MAX_TOKENS"):
        CoordinatorSettings(default_max_tokens=100, max_tokens_limit=10)


def test_unknown_field_is_refused() -> None:
    with pytest.raises(ValidationError):
        CoordinatorSettings(no_such_setting=1)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MAX_MESSAGES", "0"),
        ("MAX_MESSAGES", "65537"),
        ("MAX_ATTEMPTS", "0"),
        ("MAX_ATTEMPTS", "65"),
    ],
)
def test_out_of_range_environment_values_are_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """A value outside a setting's bounds in the environment fails start-up, naming the
    setting, instead of being accepted silently."""
    monkeypatch.setenv(f"MERCATO_COORDINATOR_{variable}", value)
    with pytest.raises(ValidationError, match=variable.lower()):
        CoordinatorSettings()


def test_cpus_are_a_cpu_list_or_empty() -> None:
    assert CoordinatorSettings().cpus == ""
    assert CoordinatorSettings(cpus=" 0,2-3 ").cpus == "0,2-3"
    with pytest.raises(ValidationError, match="a range goes low-high"):
        CoordinatorSettings(cpus="3-1")
