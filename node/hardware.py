"""What the node computes with: NVIDIA GPUs through NVML, else the CPU.

The probe never fails: a machine without the NVIDIA driver (or without ``pynvml``) is a
CPU node. Counts come from what this process may use, not the whole host: CPU affinity,
and the GPUs ``CUDA_VISIBLE_DEVICES`` leaves visible (NVML itself sees every GPU of the
host, so two nodes sharing a host would otherwise each claim them all).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from dataclasses import dataclass, field, replace
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

    def serving(self) -> HardwareInfo:
        """What the engine computes with, as offered: the first visible GPU (vLLM runs
        on one GPU here; a lease is priced per GPU, so idle ones are not sold), or the
        CPU."""
        return replace(self, gpus=self.gpus[:1])

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


def visible_gpu_indexes(count: int, uuids: list[str], visible: str | None) -> list[int]:
    """Which of the host's ``count`` GPUs (NVML order, with their ``uuids``) a CUDA
    process may use under ``CUDA_VISIBLE_DEVICES`` = ``visible``: all when unset; else
    the listed indexes or UUIDs (a unique prefix will do), in the listed order, stopping
    at the first entry that names no GPU, as CUDA does (so "" and "-1" hide every GPU).
    MIG instances are not told apart: "MIG-..." entries stop the list."""
    if visible is None:
        return list(range(count))
    chosen: list[int] = []
    for entry in (e.strip() for e in visible.split(",")):
        if entry.isdigit() and int(entry) < count:
            index = int(entry)
        else:
            matches = [i for i, uuid in enumerate(uuids) if entry and uuid.startswith(entry)]
            if len(matches) != 1:
                break
            index = matches[0]
        if index in chosen:
            break
        chosen.append(index)
    return chosen


def probe_nvidia_gpus() -> tuple[GpuInfo, ...]:
    """The NVIDIA GPUs this process may use (NVML, filtered by ``CUDA_VISIBLE_DEVICES``);
    empty without the driver or the library."""
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
        handles = [
            pynvml.nvmlDeviceGetHandleByIndex(index) for index in range(pynvml.nvmlDeviceGetCount())
        ]
        uuids = [_text(pynvml.nvmlDeviceGetUUID(handle)) for handle in handles]
        gpus = []
        for index in visible_gpu_indexes(
            len(handles), uuids, os.environ.get("CUDA_VISIBLE_DEVICES")
        ):
            handle = handles[index]
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = _text(pynvml.nvmlDeviceGetName(handle))
            gpus.append(GpuInfo(name=name, memory_bytes=int(memory.total)))
        return tuple(gpus)
    except pynvml.NVMLError as exc:
        logger.warning("NVML is present but the GPU query failed (%s); treating as CPU", exc)
        return ()
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


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
