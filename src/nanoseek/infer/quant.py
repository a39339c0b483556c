"""Routed experts stored in int8 for serving (`--expert-dtype int8`): a quarter of their fp32 bytes, half of bf16's.

Most of a DeepSeekMoE model's parameters are routed experts, and a decode step on a CPU costs what reading the
chosen ones costs; at 16 sequences a step reads nearly every expert (docs/LOG.md). Weight-only, symmetric, one
scale per output row of each expert matrix (the row one output's dot product reads):

    s_r = max_i |W[r, i]| / 127,    Q[r, i] = round(W[r, i] / s_r) in [-127, 127],    |W - s ⊙ Q| <= s / 2

and since the scale is per output row, W x = s ⊙ (Q x): the decode paths widen Q's bytes to float32, take the dot
product, then multiply the output by its row's scale. Activations, the router, attention and the shared experts
keep their dtype. For inference only: a model with int8 experts is not trained or saved (`save_pretrained`
refuses it); quantize the checkpoint again at load time instead.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.model.fp32 import KeepsFP32
from nanoseek.model.moe import Experts

LEVELS = 127  # symmetric: -128 is never used, so that Q and -Q are both representable


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., rows, n] -> (int8 Q [..., rows, n], float32 scales [..., rows]) with w ≈ scales[..., None] * Q. An
    all-zero row gets scale 0 (its Q is zeros)."""
    w = w.detach().float()
    scale = w.abs().amax(dim=-1, keepdim=True) / LEVELS
    # by the stored scale itself, however small (a clamped divisor would leave tiny rows off by up to a step)
    q = torch.where(scale > 0, w / scale, 0).round_().clamp_(-LEVELS, LEVELS)
    scale = scale.squeeze(-1)
    return q.to(torch.int8), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scale[..., None]).to(dtype)


class Int8Experts(KeepsFP32, Experts):
    """`Experts` whose stacked weights are int8 (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]) with float32
    scales per output row (`gate_up_scale` [E, 2I], `down_scale` [E, H]; they stay float32 when the model is cast).
    Decoding reads the int8 bytes (infer/forward.py, infer/kernels.cpp); the model's own path (long prefills)
    multiplies dequantized copies."""

    gate_up_scale: torch.Tensor
    down_scale: torch.Tensor

    def __init__(self, experts: Experts):
        nn.Module.__init__(self)  # not Experts.__init__, which would allocate the float weights again
        self.n_experts = experts.n_experts
        gate_up, gate_up_scale = quantize_rows(experts.gate_up_proj)
        down, down_scale = quantize_rows(experts.down_proj)
        self.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
        self.down_proj = nn.Parameter(down, requires_grad=False)
        self.register_buffer("gate_up_scale", gate_up_scale)
        self.register_buffer("down_scale", down_scale)
        self.train(experts.training)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (dequantize_rows(self.gate_up_proj, self.gate_up_scale),
                dequantize_rows(self.down_proj, self.down_scale))

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (dequantize_rows(self.gate_up_proj[e], self.gate_up_scale[e]),
                dequantize_rows(self.down_proj[e], self.down_scale[e]))


@torch.no_grad()
def quantize_experts(model: nn.Module) -> int:
    """Replace every routed-experts module of `model` (main layers and MTP) by its int8 copy, one at a time (the
    full-precision weights of each are freed as it is replaced); returns how many."""
    # (parent, name) only: a list holding the modules themselves would keep every float copy until the end
    places = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
              if type(child) is Experts]
    for parent, name in places:
        setattr(parent, name, Int8Experts(getattr(parent, name)))
    return len(places)


def scales(experts: Experts) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(gate_up_scale, down_scale) of int8 experts, (None, None) for experts stored as floats."""
    if isinstance(experts, Int8Experts):
        return experts.gate_up_scale, experts.down_scale
    return None, None
