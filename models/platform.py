"""Where a number came from: the CPU, its instruction sets that change INT8 kernels, and the
onnxruntime that ran. Recorded in the bundle manifest (where it was exported), the bench JSON
(where it was measured) and the appliance's status (where it runs). Stdlib only.

The flags are the ones that pick onnxruntime's INT8 kernel path on x86 (AVX2 without VNNI
adds pairs of u8 x s8 products in 16 bits; AVX-512 VNNI / AVX-VNNI accumulate in 32 bits)
and NEON (asimd) on ARM.
"""
from __future__ import annotations

import platform
from pathlib import Path

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "asimd")
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """The ISA_FLAGS this CPU has, sorted (empty where /proc/cpuinfo cannot be read)."""
    text = cpuinfo if cpuinfo is not None else _read(CPUINFO)
    words = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            words.update(value.split())
    return sorted(f for f in ISA_FLAGS if f in words)


def has_vnni(flags: list[str]) -> bool:
    return "avx512_vnni" in flags or "avx_vnni" in flags


def int8_kernel_path(flags: list[str], machine: str | None = None) -> str:
    """Which INT8 dot-product path onnxruntime takes here, in words."""
    machine = machine or platform.machine()
    if machine in ("aarch64", "arm64"):
        return "arm (32-bit accumulation)"
    if has_vnni(flags):
        return "x86 VNNI (32-bit accumulation)"
    if "avx2" in flags:
        return "x86 AVX2 without VNNI (u8 x s8 pairs summed in 16 bits)"
    return "x86 without AVX2"


def cpu_model(cpuinfo: str | None = None) -> str:
    text = cpuinfo if cpuinfo is not None else _read(CPUINFO)
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def onnxruntime_version() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def platform_record(provider: str | None = None) -> dict:
    """The record itself: JSON-ready, the same keys everywhere it is written."""
    flags = cpu_flags()
    return {"cpu": cpu_model(), "machine": platform.machine(), "isa": flags, "vnni": has_vnni(flags),
            "int8_kernel_path": int8_kernel_path(flags), "onnxruntime": onnxruntime_version(),
            "provider": provider, "python": platform.python_version()}


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
