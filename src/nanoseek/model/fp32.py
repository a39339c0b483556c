"""Modules whose tensors stay fp32 whatever the model is cast to (`model.to(torch.bfloat16)`, `.half()`, ...).

The router: V3 routes in fp32 (§3.3.2), and its bias moves in steps of γ = 1e-3 that bf16 (8 bits of mantissa)
cannot hold. The rotary frequencies: rounded to bf16 they move a position's angle by up to 0.4% (demo and small
presets), ~0.09 rad at position 511, and more the longer the text.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class KeepsFP32(nn.Module):
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        def keep(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if t.is_floating_point() and out.dtype != t.dtype:  # a cast: only the device move applies
                return t.to(out.device, torch.float32)
            return out

        return super()._apply(keep, recurse)
