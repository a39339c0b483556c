"""Parameter accounting by component: total, and active per token (routed experts count k of E)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class ParamCount:
    component: str
    total: int
    active: int


def _component(name: str) -> str:
    if name.startswith("mtp."):
        return "MTP modules"
    if name.startswith("embed_tokens."):
        return "embedding"
    if name.startswith("lm_head."):
        return "output head"
    if ".self_attn." in name:
        return "attention (MLA)"
    if ".mlp.experts." in name:
        return "routed experts"
    if ".mlp.shared_experts." in name:
        return "shared experts"
    if ".mlp.gate." in name:
        return "router"
    if ".mlp." in name:
        return "dense MLP"
    return "norms"


ORDER = ["embedding", "attention (MLA)", "dense MLP", "shared experts", "routed experts", "router", "norms",
         "output head", "MTP modules"]


def parameter_counts(model: nn.Module) -> list[ParamCount]:
    """One row per component, in a fixed order. Tied weights count once. MTP is its own row: it serves
    training and speculative decoding, not the main model's next-token prediction."""
    config = model.config
    # a dense-only config (first_k_dense_replace = layers, no MTP) may set no routed experts at all
    routed_fraction = config.num_experts_per_tok / config.n_routed_experts if config.n_routed_experts else 0.0
    rows = {c: ParamCount(c, 0, 0) for c in ORDER}
    for name, p in model.named_parameters():  # named_parameters yields a tied tensor once
        row = rows[_component(name)]
        row.total += p.numel()
        row.active += round(p.numel() * routed_fraction) if ".mlp.experts." in name else p.numel()
    return [r for r in rows.values() if r.total]
