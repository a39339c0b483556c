"""bf16 products on CPU for serving (`--matmul-dtype bf16`): Linear layers and routed experts multiply in bfloat16,
with float32 sums, as a GPU's bf16 matmul does.

A decode step of 16 sequences on a CPU is bound by arithmetic, not by reading weights: the float32 Linear kernel ran
at ~90% of this VM's matmul peak there (docs/LOG.md, 2026-12-01). CPUs with AVX512-BF16 (AMD Zen 4 and later, Intel
Cooper Lake, Sapphire Rapids and later) have `vdpbf16ps`: 32 products of bf16 pairs into 16 float32 sums, one
instruction where float32 takes two FMAs. So the weights are stored in bf16 (half the bytes, which a one-sequence
step is bound by), packed once at load into the panels the kernels read (infer/kernels.cpp: pairs of inputs side
by side), and each product's other input (a Linear layer's x, an expert's x and hidden activation) is rounded to
bf16 as the kernel reads it. MLA's `kv_b_proj` is a Linear layer too: absorbed attention multiplies each head's
query by W_UKᵀ and its latent output by W_UV, both packed per head (`PackedKVB`). The rest stays float32: the
residual stream, norms, the router, the attention scores over the latent cache, the softmax, the logits' sums.

What it changes: the model computes with weights and Linear/expert inputs rounded to bf16 (8 bits of mantissa);
docs/LOG.md has the logits' difference from float32. Where the CPU lacks AVX512-BF16 the kernels compute the same
products by widening both factors to float32 (equal up to the rounding of sums taken in another order; slower than
float32 products), and the loader warns. Inference only: the packed module's state_dict gives, and
load_state_dict takes, weights in the usual layout ([out, in]; [E, 2I, H] and [E, H, I]), so `save_pretrained`
writes a bf16 checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.infer import kernels
from nanoseek.model.mla import MLA
from nanoseek.model.moe import Experts


class PackedExperts(Experts):
    """`Experts` whose stacked weights are bf16 panels for `kernels.routed_experts_bf16` (kernels.pack_experts):
    `gate_up_proj` [E, 2I / P, H / 2, P, 2], `down_proj` [E, H / P, I / 2, P, 2]. Every forward without gradients
    goes through the kernel, at any number of rows (decode steps, prefills, the model's own forward): one set of
    numbers. With gradients wanted (the kernel has no backward) it multiplies unpacked copies as `Experts` does.
    Moved off the CPU or cast, the module unpacks and is an `Experts` again."""

    def __init__(self, experts: Experts):
        nn.Module.__init__(self)  # not Experts.__init__, which would allocate the float weights again
        self.n_experts = experts.n_experts
        self.gate_up_proj = nn.Parameter(kernels.pack_experts(experts.gate_up_proj), requires_grad=False)
        self.down_proj = nn.Parameter(kernels.pack_experts(experts.down_proj), requires_grad=False)
        self.train(experts.training)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                counts: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or not kernels.takes_packed(x):
            return super().forward(x, indices, weights, counts)
        return kernels.routed_experts_bf16(x, indices, weights, self.gate_up_proj, self.down_proj)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        return kernels.unpack_experts(self.gate_up_proj), kernels.unpack_experts(self.down_proj)

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        return kernels.unpack_experts(self.gate_up_proj[e:e + 1])[0], kernels.unpack_experts(self.down_proj[e:e + 1])[0]

    @staticmethod
    def takes(experts: nn.Module) -> bool:
        """Plain `Experts` on the CPU whose matrices the panels take as Linear weights: H and 2I multiples of the
        panel width, H and I even."""
        return (type(experts) is Experts and experts.n_experts > 0
                and all(kernels.covers_linear(w[0], torch.bfloat16) for w in (experts.gate_up_proj, experts.down_proj)))

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        super()._apply(fn, recurse)
        if self.gate_up_proj.device.type != "cpu" or self.gate_up_proj.dtype != torch.bfloat16:
            for name in ("gate_up_proj", "down_proj"):
                setattr(self, name, nn.Parameter(kernels.unpack_experts(getattr(self, name).detach()),
                                                 requires_grad=False))
            self.__class__ = Experts
        return self

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in ("gate_up_proj", "down_proj"):
            destination[prefix + name] = kernels.unpack_experts(destination[prefix + name])

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        state_dict = {**state_dict, **{prefix + name: kernels.pack_experts(state_dict[prefix + name])
                                       for name in ("gate_up_proj", "down_proj")
                                       if getattr(state_dict.get(prefix + name), "dim", lambda: 0)() == 3}}
        super()._load_from_state_dict(state_dict, prefix, *args)


class PackedKVB(nn.Linear):
    """MLA's `kv_b_proj` [heads·(dn + dv), r] for bf16 products, stored as the two per-head products absorbed attention
    computes with it (infer/forward.py), each packed as pack_experts packs an expert's weights: `uk` = W_UKᵀ [heads, r /
    P, dn / 2, P, 2] (q_nope -> the query in latent space) and `uv` = W_UV [heads, dv / P, r / 2, P, 2] (a head's latent
    output -> its value). One kernel call each instead of torch's batched products over the float32 weight: 1.6-2.9x
    faster at 1-16 rows, cold; a compiled decode step of the `small` preset 2-8% faster, of the demo preset as fast
    (docs/LOG.md, 2026-12-01). The model's own forward (keys and values expanded, as a long prompt's prefill also runs)
    multiplies an unpacked copy in float32: the latent is not rounded there. state_dict gives, and load_state_dict
    takes, the weight [out, in]; moved off the CPU or cast, the layer is an nn.Linear again."""

    def __init__(self, linear: nn.Linear, heads: int, nope: int):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.heads, self.nope = heads, nope
        self.register_parameter("bias", None)
        self.uk, self.uv = (nn.Parameter(p, requires_grad=False) for p in self._panels(linear.weight.detach()))
        self.train(linear.training)

    def _panels(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """weight [heads·(dn + dv), r] -> the panels of W_UKᵀ [heads, r, dn] and of W_UV [heads, dv, r]."""
        w = weight.view(self.heads, -1, self.in_features)
        return kernels.pack_experts(w[:, :self.nope].transpose(1, 2)), kernels.pack_experts(w[:, self.nope:])

    def unpacked(self) -> torch.Tensor:
        """The weight [heads·(dn + dv), r] in the panels' dtype (a copy)."""
        uk, uv = kernels.unpack_experts(self.uk), kernels.unpack_experts(self.uv)
        return torch.cat((uk.transpose(1, 2), uv), dim=1).reshape(self.out_features, self.in_features)

    def query_latent(self, q_nope: torch.Tensor) -> torch.Tensor:
        """W_UK_hᵀ q_nope_h for every head: [..., heads, dn] -> [..., heads, r]."""
        return self._per_head(q_nope, self.uk, lambda w: torch.einsum("...hd,hdr->...hr", q_nope, w[:, :self.nope]))

    def values(self, out_latent: torch.Tensor) -> torch.Tensor:
        """W_UV_h o_h for every head: [..., heads, r] -> [..., heads, dv]."""
        return self._per_head(out_latent, self.uv,
                              lambda w: torch.einsum("...hr,hvr->...hv", out_latent, w[:, self.nope:]))

    def _per_head(self, x: torch.Tensor, panels: torch.Tensor,
                  unpacked: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The kernel over `panels` for float32 activations; for others (a model cast to bf16 after packing, whose
        panels stay as they are) torch's product over the unpacked weight [heads, dn + dv, r] in x's dtype."""
        if not kernels.takes_packed(x):
            return unpacked(self.unpacked().to(x.dtype).view(self.heads, -1, self.in_features))
        out = kernels.heads_linear_bf16(x.reshape(-1, self.heads, x.shape[-1]), panels)
        return out.view(*x.shape[:-1], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.unpacked().to(x.dtype))

    @staticmethod
    def takes(attn: nn.Module) -> bool:
        """An MLA layer on the CPU whose two per-head products the panels take (as Linear weights): r and dv multiples
        of the panel width, dn and r even."""
        linear = attn.kv_b_proj
        if type(linear) is not nn.Linear or linear.bias is not None:
            return False
        w = linear.weight.detach().view(attn.n_heads, -1, linear.in_features)
        return all(kernels.covers_linear(part, torch.bfloat16)
                   for part in (w[0, :attn.qk_nope_head_dim].T, w[0, attn.qk_nope_head_dim:]))

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        super()._apply(fn, recurse)
        if self.uk.device.type != "cpu" or self.uk.dtype != torch.bfloat16:
            weight = self.unpacked().detach()
            del self.uk, self.uv
            self.weight = nn.Parameter(weight, requires_grad=False)
            self.__class__ = nn.Linear
        return self

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        del destination[prefix + "uk"], destination[prefix + "uv"]
        destination[prefix + "weight"] = self.unpacked().detach()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        """Takes prefix + "weight" [out, in] (what state_dict gives), packed into the panels in place; keys are
        reported as nn.Linear(bias=False) reports them: the weight missing, others unexpected, a shape mismatched."""
        key = prefix + "weight"
        weight = state_dict.get(key)
        shape = torch.Size((self.out_features, self.in_features))
        if weight is None:
            if strict:
                missing_keys.append(key)
        elif weight.shape != shape:
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {weight.shape} from checkpoint, "
                              f"the shape in current model is {shape}.")
        else:
            uk, uv = self._panels(weight.detach())
            with torch.no_grad():
                self.uk.copy_(uk)
                self.uv.copy_(uv)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k != key)


def use_bf16_products(model: nn.Module) -> tuple[int, int]:
    """Pack the model's Linear layers (as infer/layout.py's kernel path takes them) and routed experts for bf16
    products, one module at a time (each float copy is freed as it is replaced); returns (Linear layers, expert
    modules) packed."""
    from nanoseek.infer.layout import use_decode_kernel

    linears = use_decode_kernel(model, torch.bfloat16)
    places = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
              if PackedExperts.takes(child)]
    for parent, name in places:
        setattr(parent, name, PackedExperts(getattr(parent, name)))
    for attn in model.modules():
        if isinstance(attn, MLA) and PackedKVB.takes(attn):
            attn.kv_b_proj = PackedKVB(attn.kv_b_proj, attn.n_heads, attn.qk_nope_head_dim)
            linears += 1
    return linears, len(places)
