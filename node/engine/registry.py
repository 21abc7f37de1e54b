"""Engine backends by name: the settings' ``EngineBackend`` picks one, nothing else does.

Backends are imported lazily (vLLM takes seconds to import), so a node running the fake
engine, and every unit test, never imports vLLM.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from node.engine.base import Engine, StreamInterval
from node.settings import EngineBackend, EngineDtype, NodeSettings

if TYPE_CHECKING:
    from pathlib import Path


def _build_vllm(settings: NodeSettings, model_path: Path | None) -> Engine:
    from node.engine.vllm_engine import VllmEngine
    from node.hardware import cpu_has_native_bf16, probe_nvidia_gpus

    assert model_path is not None
    use_gpu = bool(probe_nvidia_gpus())
    dtype = settings.engine_dtype
    if dtype is EngineDtype.AUTO:
        bf16 = use_gpu or cpu_has_native_bf16()
        dtype = EngineDtype.BFLOAT16 if bf16 else EngineDtype.FLOAT32
    return VllmEngine(
        model_path,
        settings.model,
        max_model_len=settings.max_model_len,
        kv_cache_space_gib=settings.kv_cache_space_gib,
        gpu_memory_utilization=settings.gpu_memory_utilization_permille / 1000,
        use_gpu=use_gpu,
        cuda_graphs=settings.cuda_graphs,
        dtype=dtype.value,
        cpu_omp_threads_bind=settings.cpu_omp_threads_bind,
        stream_interval=_stream_interval(settings),
    )


def _build_fake(settings: NodeSettings, model_path: Path | None) -> Engine:
    from node.engine.fake_engine import FakeEngine

    return FakeEngine(
        settings.model,
        tokens_per_s=settings.fake_engine_tokens_per_s,
        context_length=settings.fake_engine_context_length,
        stream_interval=_stream_interval(settings),
    )


def _stream_interval(settings: NodeSettings) -> StreamInterval:
    """The node's stream-interval policy; every engine backend follows it."""
    return StreamInterval(settings.stream_interval_max, settings.stream_interval_step_requests)


# backend -> (builder, whether it needs the model's folder on disk)
ENGINE_BACKENDS: dict[EngineBackend, tuple[Callable[[NodeSettings, Path | None], Engine], bool]] = {
    EngineBackend.VLLM: (_build_vllm, True),
    EngineBackend.FAKE: (_build_fake, False),
}


def build_engine(settings: NodeSettings, model_path: Path | None = None) -> Engine:
    """An engine of the configured backend, not started yet."""
    builder, _ = ENGINE_BACKENDS[settings.engine]
    return builder(settings, model_path)


def needs_model_files(backend: EngineBackend) -> bool:
    return ENGINE_BACKENDS[backend][1]


async def create_engine(settings: NodeSettings, *, show_progress: bool = False) -> Engine:
    """The configured engine, started (the model is prepared first if it needs one)."""
    model_path = None
    if needs_model_files(settings.engine):
        from node.model_store import ensure_model

        model_path = await asyncio.to_thread(
            ensure_model, settings.models_dir, settings.model, show_progress=show_progress
        )
    engine = build_engine(settings, model_path)
    await engine.start(timeout_s=settings.engine_start_timeout_s)
    return engine
