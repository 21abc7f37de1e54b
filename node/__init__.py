"""Mercato's provider node: engine, worker gRPC server, and the agent that joins a market.

Run one with ``mercato node start`` (or :func:`run_node`). Nothing here imports vLLM until
an engine of that backend is built.
"""

from node.daemon import READY_PREFIX, run_node
from node.engine import Engine, FakeEngine, GenerationRequest, create_engine
from node.hardware import HardwareInfo, probe
from node.model_store import ensure_model
from node.settings import EngineBackend, NodeSettings

__all__ = [
    "READY_PREFIX",
    "Engine",
    "EngineBackend",
    "FakeEngine",
    "GenerationRequest",
    "HardwareInfo",
    "NodeSettings",
    "create_engine",
    "ensure_model",
    "probe",
    "run_node",
]
