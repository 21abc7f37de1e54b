"""The Python example in docs/api.md runs against a live coordinator and node."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from marketplace.cli.processes import Service

pytestmark = pytest.mark.integration
DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_api_example_streams_an_answer(
    coordinator: Service, coordinator_address: str, node: Service
) -> None:
    match = re.search(r"<!-- tested: [^>]*-->\n```python\n(.*?)```", DOC.read_text(), re.S)
    assert match, "docs/api.md lost its tested example"
    completed = subprocess.run(
        [sys.executable, "-c", match.group(1)],
        env={
            **os.environ,
            "MERCATO_ADDRESS": coordinator_address,
            "MERCATO_API_KEY": coordinator.ready["api_key"],
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    last = completed.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\[\d+ in, [1-9]\d* out, node 12D3KooW\w+\]", last), completed.stdout
