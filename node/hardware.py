"""What the node computes with: NVIDIA GPUs through NVML, else the CPU.

The probe never fails: a machine without the NVIDIA driver (or without ``pynvml``) is a
CPU node. Counts come from what this process may use (CPU affinity), not the whole host.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from mercato.v1 import market_pb2

logger = logging.getLogger(__name__)

_CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One GPU as its driver reports it."""

    name: str
    memory_bytes: int


@dataclass(frozen=True, slots=True)
class HardwareInfo:
    """The node's hardware at start-up."""

    cpu_cores: int
    memory_bytes: int
    cpu_model: str
    gpus: tuple[GpuInfo, ...] = field(default=())

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    def to_proto(self) -> market_pb2.Hardware:
        return market_pb2.Hardware(
            accelerator=(
                market_pb2.ACCELERATOR_KIND_NVIDIA_GPU
                if self.gpus
                else market_pb2.ACCELERATOR_KIND_CPU
            ),
            gpus=[market_pb2.Gpu(name=g.name, memory_bytes=g.memory_bytes) for g in self.gpus],
            cpu_cores=self.cpu_cores,
            memory_bytes=self.memory_bytes,
            cpu_model=self.cpu_model,
        )


def probe() -> HardwareInfo:
    """Probe GPUs (NVML) and the CPU; never raises for missing drivers."""
    return HardwareInfo(
        cpu_cores=usable_cpu_cores(),
        memory_bytes=int(psutil.virtual_memory().total),
        cpu_model=cpu_model(),
        gpus=probe_nvidia_gpus(),
    )


def probe_nvidia_gpus() -> tuple[GpuInfo, ...]:
    """The NVIDIA GPUs NVML sees; empty without the driver or the library."""
    try:
        import pynvml
    except ImportError:
        return ()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        logger.debug("no NVIDIA driver (%s); this is a CPU node", exc)
        return ()
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            if isinstance(name, bytes):
                name = name.decode(errors="replace")
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(GpuInfo(name=str(name), memory_bytes=int(memory.total)))
        return tuple(gpus)
    except pynvml.NVMLError as exc:
        logger.warning("NVML is present but the GPU query failed (%s); treating as CPU", exc)
        return ()
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def cpu_has_native_bf16(cpuinfo: Path = _CPUINFO) -> bool:
    """Whether the CPU computes in bfloat16 natively (AVX512_BF16 or AMX)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags = set(value.split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def usable_cpu_cores() -> int:
    """Logical cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model(cpuinfo: Path = _CPUINFO) -> str:
    """The CPU model name from /proc/cpuinfo, else what the platform says."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                return value.strip()[:256]
    except OSError:
        pass
    return (platform.processor() or platform.machine() or "unknown")[:256]
