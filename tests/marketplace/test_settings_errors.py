"""Bad start-up settings are refused one line per field, naming the option's variable."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from marketplace.cli.app import app


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (
            ["node", "start", "--engine", "fake", "--region", "EU_WEST", "--price-input", "-3"],
            [
                "region: String should match pattern",
                "got 'EU_WEST'; set by its option or MERCATO_NODE_REGION",
                "price_input_micro_usd_per_mtok: Input should be greater than or equal to 0",
            ],
        ),
        (
            ["coordinator", "start", "--port", "99999"],
            ["port: Input should be less than or equal to 65535", "MERCATO_COORDINATOR_PORT"],
        ),
    ],
)
def test_bad_settings_name_the_field_and_where_it_comes_from(
    tmp_path: Path, arguments: list[str], expected: list[str]
) -> None:
    result = CliRunner().invoke(app, [*arguments, "--home", str(tmp_path)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.replace("│", " ").split())  # the error box wraps lines
    for needle in expected:
        assert needle in text
    assert "errors.pydantic.dev" not in text
