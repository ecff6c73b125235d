"""Run-time choice of the C++ kernel build: the best CPU level this machine supports.

``setup.py`` compiles ``csrc/`` once per level into ``iis_fast._C_<level>``; a wheel built anywhere therefore
runs anywhere, and the vectorised kernels are used only where the CPU has them (no illegal instruction).

Levels, best first: ``avx2`` (x86-64-v3: AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE) and ``base`` (the target's
baseline; scalar kernels). ``IIS_FAST_CPU_LEVEL=base`` forces a lower level (tests use it to run the fallback).
"""
from __future__ import annotations

import importlib
import os
import platform
from types import ModuleType

__all__ = ["LEVELS", "supported_levels", "load_extension"]

#: Levels best first, with the /proc/cpuinfo flags each needs (x86-64-v3's feature set).
LEVELS: dict[str, frozenset[str]] = {
    "avx2": frozenset({"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "abm", "movbe"}),
    "base": frozenset(),
}


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux); None where that file does not exist."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return set()


def supported_levels() -> list[str]:
    """Levels this CPU can run, best first (``base`` always). Off Linux, torch's own CPUID check decides AVX2."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["base"]
    flags = _cpu_flags()
    if flags is None:
        import torch
        ok = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        return ["avx2", "base"] if ok else ["base"]
    return [lv for lv, need in LEVELS.items() if need <= flags]


def load_extension() -> tuple[ModuleType | None, str, str]:
    """(module, level, error): the best built extension this CPU supports, or (None, "", why) if none is built.

    Raises:
        ValueError: ``IIS_FAST_CPU_LEVEL`` names an unknown level or one this CPU lacks.
    """
    levels = supported_levels()
    forced = os.environ.get("IIS_FAST_CPU_LEVEL", "").strip().lower()
    if forced:
        if forced not in LEVELS:
            raise ValueError(f"IIS_FAST_CPU_LEVEL={forced!r}: choose from {', '.join(LEVELS)}")
        if forced not in levels:
            raise ValueError(f"IIS_FAST_CPU_LEVEL={forced!r}: this CPU supports only {', '.join(levels)}")
        levels = levels[levels.index(forced):]
    errors = []
    for lv in levels:
        try:
            return importlib.import_module(f"iis_fast._C_{lv}"), lv, ""
        except ImportError as e:
            errors.append(f"{lv}: {e}")
    return None, "", "iis_fast's C++ kernels are not built (pip install -e .): " + "; ".join(errors)
