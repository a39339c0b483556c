"""Linear weights in the layout this CPU's BLAS reads fastest when decoding a few rows.

`nn.Linear` computes x @ Wᵀ with W stored [out, in]. At one row that is a mat-vec over W, and how fast the BLAS
does it depends on the CPU: on an AMD EPYC, MKL's kernel for this case (sgemv over Wᵀ) streamed a cold 8 MB
lm_head at 4 GB/s, and at 11 GB/s with W stored transposed ([in, out], so x @ Wᵀ is a plain product), which made
the demo model's batch-1 decode step 1.07-1.23x faster (docs/LOG.md, 2026-11-30). On the Intel CPUs of earlier
measurements the stored layout was as fast. So the engine's loader times both layouts once, on a weight of the
model's lm_head shape with the cache flushed between calls, and transposes only where that is clearly faster.

The transposed weight is a view with the same shape and values: the model's code and its results do not change
(the sums may round differently in the last bit). Only for inference on CPU in fp32: training keeps its layout.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

CLEARLY_FASTER = 0.85  # the transposed layout's time over the stored one's, at most


def eligible(model: nn.Module) -> list[nn.Linear]:
    """Linear layers that are wider than deep (out >= in: lm_head, the up-projections), where the difference shows.
    Left alone: kv_b_proj, which absorbed attention reads through a view of its stored layout, and a weight another
    module shares (an lm_head tied to the embedding)."""
    others = {id(p) for m in model.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    return [m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.out_features >= m.in_features and not name.endswith("kv_b_proj")
            and id(m.weight) not in others]


def transposed_is_faster(out_features: int, in_features: int, repeats: int = 15) -> bool:
    """Time x @ Wᵀ for one row with W [out, in] stored as is and stored transposed, alternating, each after a pass
    over 64 MB (as a decode step finds the weight: evicted by the rest of the model)."""
    w = torch.randn(out_features, in_features)
    layouts = {"stored": w, "transposed": w.t().contiguous().t()}
    x = torch.randn(1, in_features)
    flush = torch.empty(16 << 20)  # 64 MB of float32
    times: dict[str, list[float]] = {name: [] for name in layouts}
    for _ in range(repeats):
        for name, weight in layouts.items():
            flush.fill_(1.0)
            t = time.perf_counter()
            torch.nn.functional.linear(x, weight)
            times[name].append(time.perf_counter() - t)
    return statistics.median(times["transposed"]) < CLEARLY_FASTER * statistics.median(times["stored"])


def transpose_linears(model: nn.Module) -> int:
    """Store each eligible Linear weight transposed (same shape and values, a view); returns how many."""
    layers = eligible(model)
    for m in layers:
        m.weight = nn.Parameter(m.weight.detach().t().contiguous().t(), requires_grad=m.weight.requires_grad)
    return len(layers)


def choose_linear_layout(model: nn.Module) -> str:
    """For a CPU fp32 inference model: transpose its eligible Linear weights where this CPU decodes faster so,
    judged on the largest of them (the lm_head). Returns what was done, for the log."""
    probe = max(eligible(model), default=None, key=lambda m: m.weight.numel())
    if probe is None or probe.weight.device.type != "cpu" or probe.weight.dtype != torch.float32:
        return "linear weights as stored"
    if not transposed_is_faster(probe.out_features, probe.in_features):
        return "linear weights as stored (as fast here)"
    return f"{transpose_linears(model)} linear weights stored transposed (faster mat-vecs on this CPU's BLAS)"
