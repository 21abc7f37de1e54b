"""The hardware probe: never fails, describes the CPU, and fills the proto."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from mercato.v1 import market_pb2

from node import hardware
from node.hardware import GpuInfo, HardwareInfo


def test_probe_on_this_machine_reports_usable_cores_and_memory() -> None:
    info = hardware.probe()
    assert info.cpu_cores == len(os.sched_getaffinity(0))
    assert info.memory_bytes > 0
    assert info.cpu_model


def test_missing_nvml_means_a_cpu_node(monkeypatch: pytest.MonkeyPatch) -> None:
    import pynvml

    def no_driver() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)
    assert hardware.probe_nvidia_gpus() == ()
    assert hardware.probe().to_proto().accelerator == market_pb2.ACCELERATOR_KIND_CPU


def test_absent_pynvml_module_means_a_cpu_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    assert hardware.probe_nvidia_gpus() == ()


def fake_nvml(
    monkeypatch: pytest.MonkeyPatch, count: int, name: Callable[[int], str | bytes]
) -> None:
    """NVML reporting ``count`` GPUs of 80 GiB, the i-th named ``name(i)``, UUID GPU-<i>."""
    import pynvml

    class Memory:
        total = 80 * 2**30

    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: count)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda index: index)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", name)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lambda handle: Memory())
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUUID", lambda handle: f"GPU-{handle}")


def test_gpus_reported_by_nvml_become_the_proto(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvml(monkeypatch, 2, lambda handle: b"NVIDIA H100 80GB HBM3")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpus = hardware.probe_nvidia_gpus()
    assert gpus == (GpuInfo("NVIDIA H100 80GB HBM3", 80 * 2**30),) * 2
    proto = HardwareInfo(cpu_cores=16, memory_bytes=2**37, cpu_model="x", gpus=gpus).to_proto()
    assert proto.accelerator == market_pb2.ACCELERATOR_KIND_NVIDIA_GPU
    assert [g.name for g in proto.gpus] == ["NVIDIA H100 80GB HBM3"] * 2
    assert proto.gpus[0].memory_bytes == 80 * 2**30


def test_cpu_model_is_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Example CPU @ 3.00GHz\nflags\t: avx\n")
    assert hardware.cpu_model(cpuinfo) == "Example CPU @ 3.00GHz"
    assert hardware.cpu_model(tmp_path / "missing")  # falls back, never empty


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: X\nflags\t\t: fpu avx2 avx512f\n")
    assert not hardware.cpu_has_native_bf16(cpuinfo)
    cpuinfo.write_text("model name\t: X\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert hardware.cpu_has_native_bf16(cpuinfo)
    assert not hardware.cpu_has_native_bf16(tmp_path / "missing")


@pytest.mark.parametrize(
    ("visible", "indexes"),
    [
        (None, [0, 1, 2, 3]),
        ("2", [2]),
        ("3,1", [3, 1]),
        ("GPU-2b", [2]),  # a unique UUID prefix
        ("GPU-", []),  # names four: no GPU, as CUDA stops there
        ("", []),
        ("-1", []),
        ("1,7,2", [1]),  # CUDA stops at the first entry that names no GPU
        ("0,0", [0]),
    ],
)
def test_cuda_visible_devices_limits_the_gpus(visible: str | None, indexes: list[int]) -> None:
    """NVML sees every GPU of the host; a node given some of them (CUDA_VISIBLE_DEVICES)
    must not offer the others."""
    uuids = ["GPU-0a", "GPU-1a", "GPU-2b", "GPU-3c"]
    assert hardware.visible_gpu_indexes(4, uuids, visible) == indexes


def test_the_offer_sells_the_one_gpu_the_engine_runs_on(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvml(monkeypatch, 4, lambda handle: f"GPU {handle}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    visible = hardware.probe_nvidia_gpus()
    assert [g.name for g in visible] == ["GPU 2", "GPU 3"]
    info = HardwareInfo(cpu_cores=16, memory_bytes=2**37, cpu_model="x", gpus=visible)
    assert [g.name for g in info.serving().to_proto().gpus] == ["GPU 2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert hardware.probe_nvidia_gpus() == ()  # a CPU node
