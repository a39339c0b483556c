"""Device choice: CUDA, then Apple MPS, then CPU; the user may name one."""

from __future__ import annotations

import ctypes
import functools
import os
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


def cpu_quota(cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The CPUs a container's quota allows (`docker run --cpus 2`, a Kubernetes CPU limit), rounded up; None
    without one. cgroup v2's cpu.max ("200000 100000", or "max ..."), else v1's cpu.cfs_quota_us / cfs_period_us."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota, period = ((cgroup / "cpu" / f"cpu.cfs_{k}_us").read_text().strip() for k in ("quota", "period"))
        except OSError:
            return None
    if quota in ("max", "-1") or not quota.isdigit() or not period.isdigit() or int(period) == 0:
        return None
    return max(1, -(-int(quota) // int(period)))


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, within a container's CPU quota. torch's default thread
    count follows the affinity alone, so in a container limited to 2 CPUs on a 64-core host it would run 64
    threads on 2 CPUs' worth of time."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, cpu_quota() or cores)


def fit_threads_to_quota() -> None:
    """torch's threads down to the container's CPU quota, unless OMP_NUM_THREADS chose them."""
    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > usable_cores():
        torch.set_num_threads(usable_cores())


@functools.cache
def _openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch runs its CPU threads on (libgomp in Linux wheels, libomp/libiomp elsewhere), if it
    has OpenMP 5's omp_pause_resource_all. Looked up through torch's own CPU library: a symbol lookup on a
    library's handle searches the libraries it links, so this is torch's runtime even where another package has
    loaded a second one into the process (pausing that one would change nothing)."""
    for path in sorted((Path(torch.__file__).parent / "lib").glob("*torch_cpu.*")):
        try:
            lib = ctypes.CDLL(str(path))  # already loaded by torch: the same library
        except OSError:
            continue
        if hasattr(lib, "omp_pause_resource_all"):
            return lib
    return None


def release_openmp_threads() -> bool:
    """Let the calling thread's OpenMP worker threads exit, before another thread starts its own team.

    OpenMP gives every thread that runs a parallel region a team of its own that lives as long as that thread. A
    process whose main thread loaded a model (team 1) and then decodes in an engine thread (team 2) has twice as
    many OpenMP threads as cores, and libgomp then cuts the time idle workers spin to ~1,000 iterations: they sleep
    between parallel regions and each region waits for a wake-up, 60-70 µs on a 2-vCPU VM against ~6 µs for a
    spinning worker. A decode step has hundreds of regions; it ran 2-3x slower on 2 threads than on 1
    (docs/LOG.md, 2026-12-01). A thread that runs parallel work again later gets a new team. Returns whether a
    runtime was found to ask (soft pause: LLVM's libomp keeps its state and only lets the threads sleep)."""
    lib = _openmp_runtime()
    return lib is not None and lib.omp_pause_resource_all(1) == 0  # 1: omp_pause_soft


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
