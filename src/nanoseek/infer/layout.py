"""How a decode step computes a Linear layer's x·Wᵀ on CPU: through the decode kernel, or through the BLAS with
W in the layout it reads fastest.

`nn.Linear` computes x @ Wᵀ with W stored [out, in]. A decode step has a few rows (one per sequence), and how fast
the BLAS does that depends on the CPU. On an AMD EPYC, MKL's one-row kernel streamed a cold 8 MB lm_head at 4 GB/s,
and at 11 GB/s with W stored transposed ([in, out]); at 16 rows its sgemm repacked the whole weight at every call
and ran at 15 GFLOP/s (54 on large products). The decode kernel's `linear_rows` (infer/kernels.cpp) reads each
weight row once for all the rows: on that CPU the demo model decoded 1.09x faster at batch 1, 1.46x at batch 4
and 1.30x at batch 16 with every Linear through it (docs/LOG.md, 2026-11-30). On the Intel CPUs of earlier
measurements MKL's one-row kernel was as fast in both layouts.

So the engine's loader times the three on a weight of the model's lm_head shape, at 1 row and at 16, with the
cache flushed before each call, and takes the kernel where one call of each size, added together, takes less than
with the BLAS in either layout (the lm_head alone is not the whole step: here the kernel was slower than MKL on the
transposed lm_head at one row, and the whole batch-1 step 1.09x faster with it); otherwise it transposes the wide
weights where that is clearly faster at one row. Both keep the model's parameters and code: the kernel swaps the
Linear modules' class for one whose forward calls it at up to KERNEL_ROWS rows (prefill keeps the BLAS), and a
transposed weight is a view with the same shape and values. The sums may round differently in the last bit. Only
for inference on CPU in fp32: training keeps its own path.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from nanoseek.infer import kernels

CLEARLY_FASTER = 0.85  # the transposed layout's time over the stored one's, at most
ROWS = (1, 16)  # the timed decode steps: one sequence, a full batch
# Rows up to which a Linear uses the decode kernel. At 64 rows the BLAS was as fast on most of the demo model's
# shapes, at 128 faster on all (it blocks for cache reuse; the kernel streams the weight once per step).
KERNEL_ROWS = 32


class KernelLinear(nn.Linear):
    """nn.Linear whose products of up to KERNEL_ROWS rows go through the decode kernel (same parameters). The kernel
    has no backward: where gradients are wanted (a loaded model being fine-tuned) the BLAS computes. A compiled
    step (the engine's decode step) always takes the kernel: a test of the row count there would be a guard, and a
    batch past it would recompile the step while serving."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        few = torch.compiler.is_compiling() or rows <= KERNEL_ROWS
        if grad or not few or not kernels.covers_linear(x, self.weight):
            return super().forward(x)
        y = kernels.linear_rows(x.reshape(rows, self.in_features), self.weight)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def eligible(model: nn.Module) -> list[nn.Linear]:
    """Linear layers that are wider than deep (out >= in: lm_head, the up-projections), where the layout shows.
    Left alone: kv_b_proj, which absorbed attention reads through a view of its stored layout, and a weight another
    module shares (an lm_head tied to the embedding)."""
    others = {id(p) for m in model.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    return [m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.out_features >= m.in_features and not name.endswith("kv_b_proj")
            and id(m.weight) not in others]


def timings(out_features: int, in_features: int, repeats: int = 9) -> dict[str, float]:
    """Median seconds of x @ Wᵀ at 1 row and at 16 rows, summed, with W [out, in] stored as is, stored transposed,
    and (where it is built) as is through the decode kernel; each call after a pass over 64 MB (as a decode step
    finds the weight: evicted by the rest of the model), alternating. Key "stored@1" etc.: one row alone."""
    w = torch.randn(out_features, in_features)
    wt = w.t().contiguous().t()
    ways = {"stored": lambda x: torch.nn.functional.linear(x, w),
            "transposed": lambda x: torch.nn.functional.linear(x, wt)}
    if kernels.covers_linear(torch.empty(0, in_features), w):
        ways["kernel"] = lambda x: kernels.linear_rows(x, w)
    xs = {rows: torch.randn(rows, in_features) for rows in ROWS}
    flush = torch.empty(16 << 20)  # 64 MB of float32
    times: dict[tuple[str, int], list[float]] = {(name, rows): [] for name in ways for rows in ROWS}
    for _ in range(repeats):
        for (name, rows), ts in times.items():
            flush.fill_(1.0)
            t = time.perf_counter()
            ways[name](xs[rows])
            ts.append(time.perf_counter() - t)
    median = {key: statistics.median(ts) for key, ts in times.items()}
    return {**{name: sum(median[name, rows] for rows in ROWS) for name in ways},
            **{f"{name}@1": median[name, 1] for name in ways}}


def use_decode_kernel(model: nn.Module) -> int:
    """Route every Linear layer the kernel takes (weights as stored) through it at up to KERNEL_ROWS rows; returns
    how many."""
    layers = [m for m in model.modules() if type(m) is nn.Linear
              and kernels.covers_linear(torch.empty(0, m.in_features), m.weight)]
    for m in layers:
        m.__class__ = KernelLinear
    return len(layers)


def transpose_linears(model: nn.Module) -> int:
    """Store each eligible Linear weight transposed (same shape and values, a view); returns how many."""
    layers = eligible(model)
    for m in layers:
        m.weight = nn.Parameter(m.weight.detach().t().contiguous().t(), requires_grad=m.weight.requires_grad)
    return len(layers)


def choose_linear_layout(model: nn.Module) -> str:
    """For a CPU fp32 inference model: the decode kernel, or the wide Linear weights transposed, where this CPU
    decodes faster so, judged on the largest of them (the lm_head). Returns what was done, for the log."""
    probe = max(eligible(model), default=None, key=lambda m: m.weight.numel())
    if probe is None or probe.weight.device.type != "cpu" or probe.weight.dtype != torch.float32:
        return "linear weights as stored"
    t = timings(probe.out_features, probe.in_features)
    if "kernel" in t and t["kernel"] < min(t["stored"], t["transposed"]):
        return (f"{use_decode_kernel(model)} linear layers through the decode kernel at up to {KERNEL_ROWS} rows "
                "(faster than this CPU's BLAS)")
    if t["transposed@1"] < CLEARLY_FASTER * t["stored@1"]:
        return f"{transpose_linears(model)} linear weights stored transposed (faster mat-vecs on this CPU's BLAS)"
    return "linear weights as stored (as fast here)"
