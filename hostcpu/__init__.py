"""What the CPU can do, for the choices that depend on it: the converter's default profile, the runtime's and
IPEX's precision, the memory plan, benchmark labels. Shared by convert/ and runtime/.

Pure Python (reads /proc/cpuinfo where it exists); nothing here imports OpenVINO or torch.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

# The extensions that decide CPU speed, in the order they are printed: AVX2, AVX-VNNI (int8 dot products on
# 256-bit registers), AVX-512 and its VNNI/BF16/FP16 parts, AMX tiles.
SPEED_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags from /proc/cpuinfo (empty where that file does not exist)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.partition(":")[2].split())
                    break
    except OSError:
        pass
    return flags


def onednn_cpu_flags() -> set[str]:
    """:func:`cpu_flags` less the AVX-512 and AMX ones when ONEDNN_MAX_CPU_ISA caps oneDNN (and so IPEX)
    below AVX-512."""
    flags = cpu_flags()
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    if cap.startswith(("SSE", "AVX")) and not cap.startswith("AVX512"):
        flags = {flag for flag in flags if not flag.startswith(("avx512", "amx"))}
    return flags


def openvino_amx(flags: set[str] | None = None) -> bool:
    """Whether OpenVINO's CPU plugin computes on AMX tiles here: the CPU has them (``flags``, default this
    machine's) and OV_CPU_MAX_ISA does not cap the plugin below AMX."""
    cap = os.environ.get("OV_CPU_MAX_ISA", "").upper()
    return "amx_bf16" in (cpu_flags() if flags is None else flags) and (not cap or "AMX" in cap)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or what the platform module knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def topology() -> str:
    """Hybrid P/E cores and hyper-threading as Linux shows them (/sys), e.g. ``6 P-cores + 8 E-cores, SMT``;
    empty where nothing is known."""
    parts = []
    core, atom = Path("/sys/devices/cpu_core/cpus"), Path("/sys/devices/cpu_atom/cpus")
    if core.is_file() and atom.is_file():  # Intel hybrid: OpenVINO's SCHEDULING_CORE_TYPE picks among them
        parts.append(f"hybrid: {count_cpus(core.read_text())} P + {count_cpus(atom.read_text())} E logical cpus")
    siblings = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list")
    if siblings.is_file():
        parts.append("SMT" if count_cpus(siblings.read_text()) > 1 else "no SMT")
    return ", ".join(parts)


def count_cpus(cpu_list: str) -> int:
    """How many cpus a Linux cpu list such as ``0-5,12`` names."""
    total = 0
    for part in cpu_list.strip().split(","):
        low, _, high = part.partition("-")
        total += int(high or low) - int(low) + 1 if low else 0
    return total


def cpu_description() -> str:
    """The CPU's name, the extensions of SPEED_FLAGS it has and its topology, e.g.
    ``AMD EPYC (avx2 avx512f ...; no SMT)``.

    Where /proc/cpuinfo does not exist (Windows, macOS), the precisions OpenVINO's CPU plugin can run instead.
    """
    flags = cpu_flags()
    found = " ".join(flag for flag in SPEED_FLAGS if flag in flags)
    if not found:
        import openvino as ov

        found = "OpenVINO: " + " ".join(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    shape = topology()
    return f"{cpu_name()} ({found}{'; ' + shape if shape else ''})"


def cpu_kind(flags: set[str] | None = None) -> str:
    """The CPU kinds the project measures separately: ``amx`` (Xeon with AMX), ``avx512`` (AVX-512 without
    AMX, e.g. AMD EPYC Zen 4/5) or ``avx2`` (neither)."""
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return "amx"
    return "avx512" if "avx512f" in flags else "avx2"
