"""Peak FLOP/s to measure utilisation against: a datasheet table for common accelerators, a matmul probe elsewhere.

MFU is only meaningful against a stated peak, so every figure here comes with a label saying where it is from.
The table holds the vendors' *dense* tensor-core figures (datasheets usually headline the 2:4-sparsity number,
twice as large; that is never what a training step can reach). "fp32" is the plain (non-TF32) FP32 rate, because
torch runs fp32 matmuls without TF32 unless asked (`torch.backends.cuda.matmul.allow_tf32` is False by default).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
import time
from dataclasses import dataclass

import torch

from nanoseek.device import cpu_identity
from nanoseek.io import cache_dir, write_atomic


@dataclass(frozen=True)
class Accelerator:
    """One accelerator's datasheet figures (FLOP/s, GB, W) and the document they come from."""

    name: str
    bf16: float | None  # dense BF16 tensor-core FLOP/s with FP32 accumulate; None: no BF16 tensor cores
    fp32: float  # non-tensor FP32 FLOP/s
    memory_gb: float
    tdp_w: float  # board power / TDP, used for the energy estimate
    source: str
    pattern: str  # regex matched against torch.cuda.get_device_name()


T = 1e12
_H100 = "NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100)"
_A100 = "NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/a100)"
ACCELERATORS: dict[str, Accelerator] = {a.name: a for a in (
    Accelerator("H100-SXM", 989.4 * T, 67 * T, 80, 700, _H100, r"H100(?!.*(PCIe|NVL))"),
    Accelerator("H100-PCIe", 756 * T, 51 * T, 80, 350, _H100, r"H100.*PCIe"),
    Accelerator("H200", 989.4 * T, 67 * T, 141, 700,
                "NVIDIA H200 Tensor Core GPU datasheet, SXM (nvidia.com/en-us/data-center/h200)", r"H200"),
    Accelerator("A100-80GB", 312 * T, 19.5 * T, 80, 400, _A100, r"A100.*80G"),
    Accelerator("A100-40GB", 312 * T, 19.5 * T, 40, 400, _A100, r"A100"),
    Accelerator("L4", 121 * T, 30.3 * T, 24, 72,
                "NVIDIA L4 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/l4)", r"\bL4\b"),
    # Turing has FP16 tensor cores (65 TFLOP/s) but none for BF16: torch emulates bf16 there at FP32 speed
    Accelerator("T4", None, 8.1 * T, 16, 70,
                "NVIDIA T4 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/tesla-t4)", r"\bT4\b"),
    Accelerator("RTX-4090", 165.2 * T, 82.6 * T, 24, 450,
                "NVIDIA Ada Lovelace GPU Architecture whitepaper v2.1, Appendix A (GeForce RTX 4090)", r"4090"),
    Accelerator("RTX-3090", 71 * T, 35.6 * T, 24, 350,
                "NVIDIA Ampere GA102 GPU Architecture whitepaper v2, Appendix A (GeForce RTX 3090)", r"3090"),
)}

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def _dtype_name(dtype: str) -> str:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be fp32 or bf16, got {dtype!r}")
    return "bf16" if _DTYPES[dtype] is torch.bfloat16 else "fp32"


def accelerator(name: str) -> Accelerator:
    """Look a table entry up by its name (case-insensitive); the error lists the known names."""
    for key, acc in ACCELERATORS.items():
        if key.lower() == name.lower():
            return acc
    raise ValueError(f"unknown accelerator {name!r}; known: {', '.join(ACCELERATORS)}")


def match_device_name(device_name: str) -> Accelerator | None:
    """The table entry a CUDA device name ("NVIDIA A100-SXM4-80GB", "Tesla T4", ...) belongs to, if any. None for
    a MIG slice (a fraction of the card), a laptop part, a Grace-Hopper superchip or an NVL card, whose peaks and
    power differ from the table's: their MFU is then measured against a matmul probe."""
    if re.search(r"\bMIG\b|Laptop|Mobile|GH200|\bNVL\b", device_name, re.IGNORECASE):
        return None
    for acc in ACCELERATORS.values():  # order matters: A100-80GB is tried before the catch-all A100
        if re.search(acc.pattern, device_name, re.IGNORECASE):
            return acc
    return None


def table_peak(acc: Accelerator, dtype: str) -> tuple[float, str]:
    """Datasheet peak for a dtype; bf16 on a card without bf16 tensor cores runs at its fp32 rate."""
    if _dtype_name(dtype) == "bf16" and acc.bf16 is not None:
        return acc.bf16, f"{acc.name} datasheet bf16 dense"
    if _dtype_name(dtype) == "bf16":
        return acc.fp32, f"{acc.name} datasheet fp32 (no bf16 tensor cores)"
    return acc.fp32, f"{acc.name} datasheet fp32"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def matmul_probe(device: torch.device, dtype: str, seconds: float = 0.5, n: int = 1024) -> float:
    """Best FLOP/s of n×n matmuls (2·n³ FLOPs each) over three short windows on `device`.

    The best window, not the mean, because a shared machine's load only ever slows a window down.
    """
    dt = _DTYPES[dtype]
    gen = torch.Generator(device=device).manual_seed(0)  # its own generator: a probe must not move the global RNG
    a, b = (torch.randn(n, n, dtype=dt, device=device, generator=gen) for _ in range(2))
    a @ b  # warm-up: first call pays for allocation and kernel selection
    _sync(device)
    best = 0.0
    for _ in range(3):
        t, it = time.perf_counter(), 0
        while time.perf_counter() - t < seconds / 3:
            a @ b
            it += 1
        _sync(device)
        best = max(best, 2 * n**3 * it / (time.perf_counter() - t))
    return best


_cpu_peaks: dict[tuple[str, int], float] = {}
PEAKS_FILE = "cpu_peaks.json"


def cpu_matmul_probe(dtype: str, seconds: float = 0.5, again: bool = False) -> float:
    """This CPU's matmul FLOP/s for a dtype: the best of this process's probes and of earlier ones on this machine
    (kept in nanoseek's cache), since load only ever slows a probe down and on a shared VM one probe moved 2.6x
    from minute to minute (docs/LOG.md). Measured once per process and thread count; `again` measures anew."""
    key = (_dtype_name(dtype), torch.get_num_threads())
    if again or key not in _cpu_peaks:
        measured = matmul_probe(torch.device("cpu"), key[0], seconds)
        _cpu_peaks[key] = max(_cpu_peaks.get(key, 0.0), _best_on_this_machine(key, measured))
    return _cpu_peaks[key]


def _best_on_this_machine(key: tuple[str, int], measured: float) -> float:
    """The best probe stored for this CPU, thread count, dtype and torch version, after storing `measured` if it
    is better. A cache that cannot be read or written counts as empty."""
    path = cache_dir(PEAKS_FILE)
    name = "|".join((hashlib.sha256(cpu_identity().encode()).hexdigest()[:16], f"{key[1]} threads", key[0],
                     f"torch {torch.__version__}"))
    try:
        peaks = json.loads(path.read_text())
        peaks = peaks if isinstance(peaks, dict) else {}
    except (OSError, ValueError):
        peaks = {}
    stored = peaks.get(name)
    best = max(measured, stored if isinstance(stored, int | float) else 0.0)
    if best > measured:
        return best
    with contextlib.suppress(OSError):  # a read-only home: this process still uses its probe
        write_atomic(path, json.dumps({**peaks, name: measured}, indent=1))
    return measured


@functools.cache
def _device_probe(device: str, dtype: str) -> float:
    return matmul_probe(torch.device(device), dtype, n=4096)


def peak_flops(device: torch.device, dtype: str) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from) for `device` at `dtype` ("fp32" or "bf16").

    CUDA devices found in the table get their datasheet figure; anything else is measured with a matmul probe.
    """
    dtype = _dtype_name(dtype)
    device = torch.device(device)
    if device.type == "cpu":
        return cpu_matmul_probe(dtype), f"CPU matmul probe {dtype}"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        acc = match_device_name(name)
        if acc is not None:
            return table_peak(acc, dtype)
        return _device_probe(str(device), dtype), f"{name} matmul probe {dtype}"
    return _device_probe(str(device), dtype), f"{device.type} matmul probe {dtype}"
