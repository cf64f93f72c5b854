"""Readable names of compute devices, for `info`, the dashboard and the start event: "cpu (AMD EPYC 7B13,
16 cores)", "gpu (Apple M2 Pro)", "cuda:0 (NVIDIA H200)" instead of `Device(cpu, 0)` / `cpu`.

The backends give the kind and, where their runtime knows it, the accelerator's name (MLX's `device_info`,
torch's `cuda.get_device_name`); the CPU's name comes from the operating system.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cpu_name() -> str:
    """The CPU's model name: /proc/cpuinfo on Linux, sysctl on macOS, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("model name", "Hardware", "Processor") and ":" in line:
                name = line.split(":", 1)[1].strip()
                if name:
                    return " ".join(name.split())
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe(kind: str, name: str | None = None) -> str:
    """"{kind} ({name})"; for a CPU the name is the CPU's model and the cores this process may use."""
    if kind == "cpu":
        cores = cpu_cores()
        return f"cpu ({name or cpu_name()}, {cores} core{'s' if cores != 1 else ''})"
    return f"{kind} ({name})" if name else kind
