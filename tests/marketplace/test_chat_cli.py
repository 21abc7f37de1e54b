"""`mercato chat` refuses what the protocol cannot carry before it connects anywhere."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from marketplace.cli.app import app


@pytest.mark.parametrize("seed", ["-1", str(2**63)])
def test_a_seed_out_of_range_is_a_usage_error(seed: str) -> None:
    # Before, -1 reached the protobuf setter and crashed with a traceback.
    result = CliRunner().invoke(app, ["chat", "hi", "--coordinator", "127.0.0.1:9", "--seed", seed])
    assert result.exit_code == 2, result.output
    assert "--seed" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
