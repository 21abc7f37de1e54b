"""Fixtures shared by the whole suite.

``vllm_engine``: the real vLLM engine, loaded at most once per test process (vLLM's
in-process engine sets up process-wide state, so two in one process would clash).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

# The test process talks gRPC while it starts nodes and coordinators; importing the CLI
# turns gRPC's fork support off before grpc loads (marketplace/cli/__init__.py).
import marketplace.cli  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
MODEL = "SmolLM2-135M-Instruct"


def test_models_dir() -> Path:
    """Where tests keep the converted packaged model (prepared once, reused)."""
    return Path(os.environ.get("MERCATO_TEST_MODELS_DIR", REPO / ".cache" / "models"))


test_models_dir.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


@pytest.fixture(scope="session")
async def vllm_engine() -> AsyncIterator[object]:
    from node.engine import create_engine
    from node.settings import NodeSettings

    engine = await create_engine(
        NodeSettings(models_dir=test_models_dir(), model=MODEL, kv_cache_space_gib=1)
    )
    yield engine
    await engine.shutdown()
