"""tests/postgres.py: a missing server skips a developer's run but fails a CI run."""

from __future__ import annotations

import pytest

from tests import postgres


def test_unreachable_server_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postgres, "postgres_available", lambda: False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="not reachable"):
        postgres.require_postgres()


def test_unreachable_server_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postgres, "postgres_available", lambda: False)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not reachable"):
        postgres.require_postgres()


def test_a_reachable_server_gives_a_fresh_empty_schema() -> None:
    from sqlalchemy import create_engine, text

    with postgres.fresh_schema("probe") as url:
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                schema = conn.execute(text("SELECT current_schema()")).scalar_one()
                tables = conn.execute(
                    text("SELECT count(*) FROM information_schema.tables WHERE table_schema = :s"),
                    {"s": schema},
                ).scalar_one()
        finally:
            engine.dispose()
    assert schema.startswith("probe_") and tables == 0
