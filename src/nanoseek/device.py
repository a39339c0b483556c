"""Device choice: CUDA, then Apple MPS, then CPU; the user may name one."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from nanoseek.config import ConfigError


def cpu_identity() -> str:
    """This CPU's model and feature flags (/proc/cpuinfo): what a kernel built for it, or a peak measured on it,
    depends on (a shared home can be mounted on machines with different CPUs)."""
    fallback = f"{platform.machine()} {platform.processor()}"
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return fallback
    # x86 says "model name" and "flags"; Linux on ARM says "CPU implementer", "CPU part" and "Features" instead
    keys = ("model name", "flags", "CPU implementer", "CPU part", "Features")
    found = [next((x for x in lines if x.startswith(key)), "") for key in keys]
    return "\n".join(x for x in found if x) or fallback


def pick_dtype(name: str, device: torch.device) -> str:
    """`auto`: bf16 where it is fast (CUDA with bf16, CPUs with AMX tiles), else fp32."""
    if name != "auto":
        return name
    if device.type == "cuda":
        # emulated bf16 (T4, V100: no bf16 tensor cores) is slower than fp32 there
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return "bf16" if device.type == "cpu" and amx() else "fp32"


def pick_device(name: str | None = None) -> torch.device:
    """`auto` (or None): the best device present. A named one must exist: asking for a GPU and getting the CPU
    would make a run quietly hundreds of times slower."""
    if name and name != "auto":
        fix = "use auto (the best present) or cpu: --device cpu, or train.device=cpu in a config"
        try:
            dev = torch.device(name)
        except RuntimeError as e:
            raise ConfigError(f"device {name!r} is not a device name (auto, cpu, cuda, cuda:N, mps): {fix}") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for, but torch sees no CUDA GPU: {fix}")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise ConfigError(f"device {name!r} asked for, but MPS is not available: {fix}")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
