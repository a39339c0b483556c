"""Rotary position embeddings, with DeepSeek's YaRN context extension and the interleaved pair layout.

Only the `qk_rope_head_dim` slice of each query head and the single shared key carry position.
"""

from __future__ import annotations

import math

import torch

from nanoseek.config import ModelConfig, yarn_get_mscale
from nanoseek.model.fp32 import KeepsFP32


def yarn_inv_freq(dim: int, base: float, rs: dict) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071) as DeepSeek-V3 and transformers compute it.

    Frequencies that turn fewer than `beta_slow` times over the original context are interpolated
    (divided by `factor`), those that turn more than `beta_fast` times are kept, and a linear ramp blends
    the band in between. Returns (inv_freq, cos/sin scale = mscale(s, mscale) / mscale(s, mscale_all_dim)).
    """
    factor = rs["factor"]
    orig_ctx = rs["original_max_position_embeddings"]
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        # the rotary dimension whose wavelength fits `num_rotations` times in the original context
        return dim * math.log(orig_ctx / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate

    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate

    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)
    return inv_freq, float(attention_factor)


class RotaryEmbedding(KeepsFP32):
    """cos/sin tables for the rotary half-dimension; shared by every layer of a model. Its frequencies stay fp32."""

    inv_freq: torch.Tensor

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dim = config.qk_rope_head_dim
        self.base = config.rope_theta
        self.scaling = config.rope_scaling
        self.register_buffer("inv_freq", torch.empty(self.dim // 2, dtype=torch.float32), persistent=False)
        self.attention_scaling = 1.0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.scaling is None:
            inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim))
        else:
            inv_freq, self.attention_scaling = yarn_inv_freq(self.dim, self.base, self.scaling)
        with torch.no_grad():
            self.inv_freq.copy_(inv_freq.to(self.inv_freq.device))

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] (or [T]) -> cos, sin of shape [B, T, 1, dim/2] in fp32."""
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        angles = position_ids[..., None].float() * self.inv_freq.float()
        return (angles.cos() * self.attention_scaling)[:, :, None], (angles.sin() * self.attention_scaling)[:, :, None]


def rope_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                interleave: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate x [B, T, heads, d] by the angles in cos/sin [B, T, 1, d/2]; returns the two output halves.

    Pairs are (x_j, x_{j+d/2}) ("rotate half") or, with `interleave`, (x_{2j}, x_{2j+1}) as DeepSeek lays
    them out. Both produce the half-split order: queries and keys are permuted alike, so q·k is unchanged,
    and it is the order transformers produces too. Returning halves lets the caller build q (or k) with one cat.
    """
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    return torch.cat(rope_halves(x, cos, sin, interleave), dim=-1)
