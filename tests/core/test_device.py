"""Readable device names (core/device.py and each backend's `device_name`) instead of `Device(cpu, 0)`."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from mlx_mistral.core.device import cpu_cores, cpu_name, describe


def test_describe():
    assert describe("cuda:0", "NVIDIA H200") == "cuda:0 (NVIDIA H200)"
    assert describe("gpu", "Apple M2 Pro") == "gpu (Apple M2 Pro)"
    assert describe("gpu") == "gpu"
    assert describe("cpu") == f"cpu ({cpu_name()}, {cpu_cores()} core{'s' if cpu_cores() != 1 else ''})"


@pytest.mark.skipif(shutil.which("lscpu") is None or not os.path.exists("/proc/cpuinfo"), reason="Linux with lscpu")
def test_cpu_name_is_what_lscpu_says():
    out = subprocess.run(["lscpu"], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}).stdout
    names = [ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name:")]
    assert " ".join(names[0].split()) == cpu_name()
    assert cpu_cores() == len(os.sched_getaffinity(0))


def test_backends_name_their_device():
    import torch

    from mlx_mistral.backends.mlx.trainer import device_name as mlx_name
    from mlx_mistral.backends.torch.trainer import device_name as torch_name

    assert mlx_name().startswith(("cpu (", "gpu")) and "Device(" not in mlx_name()
    assert torch_name(torch.device("cpu")) == describe("cpu")
