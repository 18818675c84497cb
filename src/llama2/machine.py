"""What a run ran on: the CPU (and GPU), its vector extensions, cores, threads and torch version.

Timings mean little without it. The demo preset pretrained at 11,100 tokens/s on a 2-core Intel Xeon with AMX
(bf16 autocast) and at 3,670 on a 2-core AMD EPYC with AVX2 only (fp32: bf16 autocast trained 12x slower than
fp32 there), and took 26.8 and 60.0 minutes. Both are "a 2-core x86 VM", so the report records the vector
extensions too, and per stage, since a resumed pipeline can finish on another machine.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch


def native_bf16_matmul() -> bool:
    """True on CPUs whose bf16 matrix products run natively (AMX or AVX512-BF16). Elsewhere they ran 25-110x
    slower than fp32 ones (2-core AMD EPYC with AVX2, 4096-row products of the demo model's shapes)."""
    return bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())


def amx() -> bool:
    """True on CPUs with AMX tiles (Intel Xeons from Sapphire Rapids on), where bf16 attention kernels run at
    least as fast as fp32 ones. With AVX512-BF16 alone they do not (`masked_attention.FAST_BF16_ATTENTION`)."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def describe_machine() -> dict[str, Any]:
    """The facts that decide this machine's speed, as JSON-ready values."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16_matmul(),
        "cores": cores,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def machine_line(info: dict[str, Any]) -> str:
    """One line for a report or a benchmark header: "AMD EPYC (AVX2, no native bf16), 2 cores, ..."."""
    bf16 = "native bf16" if info.get("native_bf16") else "no native bf16"
    line = (f"{info.get('cpu', '?')} ({info.get('cpu_capability', '?')}, {bf16}), {info.get('cores', '?')} cores, "
            f"{info.get('threads', '?')} threads, torch {info.get('torch', '?')}")
    gpus = info.get("gpus")
    return line + (f", GPU {', '.join(gpus)}" if gpus else "")
