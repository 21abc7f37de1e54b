"""Engine backends behind one interface (see ``node.engine.base``)."""

from node.engine.base import (
    Delta,
    Engine,
    EngineLoad,
    FinishReason,
    GenerationRequest,
    TokenRateMeter,
)
from node.engine.fake_engine import FakeEngine
from node.engine.registry import ENGINE_BACKENDS, build_engine, create_engine

__all__ = [
    "ENGINE_BACKENDS",
    "Delta",
    "Engine",
    "EngineLoad",
    "FakeEngine",
    "FinishReason",
    "GenerationRequest",
    "TokenRateMeter",
    "build_engine",
    "create_engine",
]
