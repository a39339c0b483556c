"""DeepSeekMoE (DeepSeek-V3 §2.1.2): shared experts plus fine-grained routed experts.

Routing: sigmoid affinities s = σ(W_gate·x) in fp32. The per-expert bias (`e_score_correction_bias`) is
added only to *choose* experts (auxiliary-loss-free balancing); the gate values come from the unbiased s,
normalised over the chosen k and scaled by `routed_scaling_factor`. Group-limited routing first keeps the
`topk_group` best of `n_group` expert groups (a group scores by the sum of its two best experts).

Routed experts run grouped: token copies are sorted by expert so that each expert multiplies one contiguous
slice, in a single grouped GEMM where torch has one (experts that got no tokens cost nothing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """`mlp.gate`: sigmoid scores, bias-corrected group-limited top-k choice, unbiased gate weights."""

    e_score_correction_bias: torch.Tensor
    expert_load: torch.Tensor

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size, dtype=torch.float32))
        # In the checkpoint; changed by the training loop, never by the optimiser.
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        # Token copies routed to each expert since the last reset: the load the bias update balances.
        self.register_buffer("expert_load", torch.zeros(self.n_experts, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> (gate weights [N, k] fp32, expert indices [N, k], sigmoid scores [N, E] fp32)."""
        with torch.autocast(x.device.type, enabled=False):  # routing stays fp32 (V3 §3.3.2)
            scores = F.linear(x.float(), self.weight.float()).sigmoid()
        with torch.no_grad():
            choice = scores + self.e_score_correction_bias
            if self.topk_group < self.n_group:
                grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
                keep = group_scores.topk(self.topk_group, dim=-1).indices
                group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
                choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view_as(choice)
            indices = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, indices, scores


def _grouped_mm_ok(x: torch.Tensor, *dims: int) -> bool:
    """torch's grouped GEMM: CPU (any float) and CUDA sm80+ (bf16), rows 16-byte aligned, not under compile
    in fp32 (inductor lowers it for bf16 only)."""
    if not hasattr(F, "grouped_mm"):
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False
    if any(d * x.element_size() % 16 for d in dims):
        return False
    if x.device.type == "cpu":
        return True
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return False


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by expert (expert e owns `counts[e]` rows) times weight[e]^T ([E, out, in])."""
    if _grouped_mm_ok(x, weight.shape[1], weight.shape[2]):
        return F.grouped_mm(x, weight.to(x.dtype).transpose(1, 2), offs=offsets)
    # Fallback: one matmul per expert that received tokens. unbind/split keep autograd to one node each.
    sizes = counts.tolist()
    out = [F.linear(xe, we.to(x.dtype)) for xe, we, n in zip(x.split(sizes), weight.unbind(0), sizes) if n]
    return torch.cat(out) if out else x.new_zeros(0, weight.shape[1])


class Experts(nn.Module):
    """`mlp.experts`: all routed experts stacked ([E, 2I, H] gate+up, [E, H, I] down).

    The checkpoint stores them one by one (`mlp.experts.{e}.gate_proj.weight`, ...); model/hf.py converts.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        e, h, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.n_experts = e
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                counts: torch.Tensor) -> torch.Tensor:
        """x [N, H]; indices, weights [N, k]; counts [E] = token copies per expert -> [N, H]."""
        k = indices.shape[1]
        order = indices.flatten().argsort(stable=True)  # token copies grouped by expert
        token = order // k
        offsets = counts.cumsum(0).to(torch.int32)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        xs = x.index_select(0, token).to(dtype)
        gate, up = grouped_linear(xs, self.gate_up_proj, counts, offsets).chunk(2, dim=-1)
        # Scale by the gate weight before the down projection (it is linear): I wide instead of H.
        h = F.silu(gate) * up * weights.flatten().index_select(0, order).unsqueeze(1).to(dtype)
        y = grouped_linear(h, self.down_proj, counts, offsets)
        return torch.zeros_like(x, dtype=y.dtype).index_add_(0, token, y)


class MoE(nn.Module):
    """`mlp` of layers >= first_k_dense_replace: shared experts + routed experts."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts > 0 else None
        )

    def forward(self, x: torch.Tensor, balance_loss: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, H] -> (output [B, T, H], sequence-wise balance loss or None)."""
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        weights, indices, scores = self.gate(flat)
        counts = torch.bincount(indices.flatten(), minlength=self.n_experts)
        if self.training:
            with torch.no_grad():
                self.gate.expert_load += counts.float()
        out = self.experts(flat, indices, weights, counts).view(B, T, H).to(x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        aux = self.sequence_balance_loss(scores.view(B, T, -1), indices.view(B, T, -1)) if balance_loss else None
        return out, aux

    def sequence_balance_loss(self, scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Σ_i f_i·P_i per sequence, averaged over sequences (V3 eq. 17-20; the caller multiplies by α).

        f_i = E/(k·T) · #tokens of the sequence routed to i, P_i = mean over its tokens of s_i / Σ_j s_j.
        """
        B, T, E = scores.shape
        with torch.no_grad():
            routed = torch.zeros(B, E, device=scores.device).scatter_add_(
                1, indices.reshape(B, -1), torch.ones(B, T * self.top_k, device=scores.device))
            f = routed * (E / (self.top_k * T))
        p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)
        return (f * p).sum(dim=-1).mean()
