"""How a decode step computes a Linear layer's x·Wᵀ on CPU: through the decode kernel over W packed into panels,
or through the BLAS with W in the layout it reads fastest.

`nn.Linear` computes x @ Wᵀ with W stored [out, in]. A decode step has a few rows (one per sequence), and how fast
the BLAS does that depends on the CPU. On an AMD EPYC, MKL's one-row kernel streamed a cold 8 MB lm_head at 4 GB/s,
and at 11 GB/s with W stored transposed ([in, out]); at 16 rows its sgemm repacked the whole weight into panels at
every call and ran at 15 GFLOP/s (54 on large products). The decode kernel's `linear_panels` (infer/kernels.cpp)
takes W packed into those panels once, at load, and reads it as one stream for all the rows: there it computes
the demo model's Linear layers 1.05-1.6x faster than its first kernel over W as stored (which beat MKL 1.5-2.7x) at
1-16 rows, and a 576-row prefill's 1.13x faster than MKL (docs/LOG.md, 2026-11-30). On the Intel CPUs of earlier
measurements MKL's one-row kernel was as fast in both layouts.

So the engine's loader times the three on a weight of the model's lm_head shape, at 1 row and at 16, with the
cache flushed before each call, and takes the kernel where one call of each size, added together, takes less than
with the BLAS in either layout (the lm_head alone is not the whole step); otherwise it transposes the wide weights
where that is clearly faster at one row. The kernel packs each Linear weight it takes in place of the stored one
(no second copy) and swaps the module's class for one whose forward calls it; its state_dict still gives, and
load_state_dict still takes, weights [out, in]. A transposed weight is a view with the same shape and values. The
sums may round differently in the last bit. Only for inference on CPU in fp32: training keeps its own path.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.infer import kernels

CLEARLY_FASTER = 0.85  # the transposed layout's time over the stored one's, at most
ROWS = (1, 16)  # the timed decode steps: one sequence, a full batch


class KernelLinear(nn.Linear):
    """nn.Linear whose weight is packed into the decode kernel's panels (kernels.pack_linear: float32 [out / P, in, P],
    or bf16 [out / P, in / 2, P, 2] for bf16 products, infer/bf16.py) and whose products go through the kernel, at
    any number of rows. state_dict gives, and load_state_dict takes, the
    weight [out, in] (a copy: `state_dict(keep_vars=True)` does not give the live parameter). The kernel has no
    backward: a forward whose gradients are wanted computes with the BLAS over an unpacked copy, and gradients reach
    the panels; a model to train comes from `load_pretrained`, not from the inference loader (the model's fused
    loss reads lm_head.weight as [out, in]). Moved off the CPU or cast, the layer unpacks and is an nn.Linear
    again."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if grad or not kernels.takes_panels(x, self.weight):
            return F.linear(x, kernels.unpack_linear(self.weight).to(x.dtype), self.bias)
        y = kernels.linear_panels(x.reshape(-1, self.in_features), self.weight)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        super()._apply(fn, recurse)
        packed = (torch.float32, 3), (torch.bfloat16, 4)
        if self.weight.device.type != "cpu" or (self.weight.dtype, self.weight.dim()) not in packed:  # `.to(...)`
            self.weight = nn.Parameter(kernels.unpack_linear(self.weight.detach()),
                                       requires_grad=self.weight.requires_grad)
            self.__class__ = nn.Linear
        return self

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = kernels.unpack_linear(destination[prefix + "weight"])

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        key = prefix + "weight"
        weight = state_dict.get(key)
        if weight is not None and weight.dim() == 2 and weight.shape[0] % kernels.panel_width() == 0:  # else super()
            state_dict = {**state_dict, key: kernels.pack_linear(weight, self.weight.dtype)}  # names the sizes
        super()._load_from_state_dict(state_dict, prefix, *args)


def eligible(model: nn.Module) -> list[nn.Linear]:
    """Linear layers that are wider than deep (out >= in: lm_head, the up-projections), where the layout shows.
    Left alone: kv_b_proj, which absorbed attention reads through a view of its stored layout, and a weight another
    module shares (an lm_head tied to the embedding)."""
    shared = _shared(model)
    return [m for name, m in model.named_modules()
            if type(m) is nn.Linear and m.out_features >= m.in_features and not name.endswith("kv_b_proj")
            and id(m.weight) not in shared]


def _shared(model: nn.Module) -> set[int]:
    """ids of the parameters of modules other than Linear layers (an embedding an lm_head may be tied to)."""
    return {id(p) for m in model.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}


def timings(out_features: int, in_features: int, repeats: int = 9) -> dict[str, float]:
    """Median seconds of x @ Wᵀ at 1 row and at 16 rows, summed, with W [out, in] stored as is, stored transposed,
    and (where it is built) packed for the decode kernel; each call after a pass over 64 MB (as a decode step
    finds the weight: evicted by the rest of the model), alternating. Key "stored@1" etc.: one row alone."""
    w = torch.randn(out_features, in_features)
    wt = w.t().contiguous().t()
    ways = {"stored": lambda x: torch.nn.functional.linear(x, w),
            "transposed": lambda x: torch.nn.functional.linear(x, wt)}
    if kernels.covers_linear(w):
        panels = kernels.pack_linear(w)
        ways["kernel"] = lambda x: kernels.linear_panels(x, panels)
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


def use_decode_kernel(model: nn.Module, products: torch.dtype = torch.float32) -> int:
    """Pack every Linear weight the kernel takes into its panels for products in `products` (float32, or bfloat16:
    infer/bf16.py) and route the layer through it; returns how many. Left as they are: kv_b_proj, whose weight
    absorbed attention reads as stored, and a weight another module shares (an lm_head tied to the embedding)."""
    shared = _shared(model)
    layers = [m for name, m in model.named_modules() if type(m) is nn.Linear and not name.endswith("kv_b_proj")
              and id(m.weight) not in shared and kernels.covers_linear(m.weight, products)]
    for m in layers:
        m.weight = nn.Parameter(kernels.pack_linear(m.weight, products), requires_grad=m.weight.requires_grad)
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
        return (f"{use_decode_kernel(model)} linear layers packed for the decode kernel (faster than this CPU's "
                "BLAS)")
    if t["transposed@1"] < CLEARLY_FASTER * t["stored@1"]:
        return f"{transpose_linears(model)} linear weights stored transposed (faster mat-vecs on this CPU's BLAS)"
    return "linear weights as stored (as fast here)"
