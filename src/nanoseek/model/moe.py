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
from torch.utils.flop_counter import register_flop_formula

from nanoseek.config import ModelConfig
from nanoseek.model.fp32 import KeepsFP32


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(KeepsFP32):
    """`mlp.gate`: sigmoid scores, bias-corrected group-limited top-k choice, unbiased gate weights. Its weight
    and bias stay fp32 when the model is cast."""

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


def _grouped_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch's fused grouped GEMM runs on CPU (any float dtype) and CUDA sm80+ (bf16), with 16-byte rows."""
    if not hasattr(F, "grouped_mm") or any(d * a.element_size() % 16 for d in b.shape[1:]):
        return False
    if a.device.type == "cpu":
        return True
    cuda_bf16 = a.device.type == "cuda" and a.dtype == torch.bfloat16
    return cuda_bf16 and torch.cuda.get_device_capability(a.device) >= (8, 0)


# The grouped GEMM is a custom op: torch.compile treats it as one opaque kernel (inductor lowers torch's own
# grouped_mm for bf16 only, and a per-expert loop would break the graph), and its backward is two more
# grouped GEMMs instead of an autograd node per expert, with the weight gradient born in the weight's layout.
@torch.library.custom_op("nanoseek::grouped_linear", mutates_args=())
def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Row block e of x (rows offsets[e-1]:offsets[e]) times weight[e]ᵀ: x [S, in], weight [E, out, in] -> [S, out].
    Experts with no rows cost nothing."""
    if _grouped_mm_ok(x, weight):
        return F.grouped_mm(x, weight.transpose(1, 2), offs=offsets)
    out = x.new_empty(x.shape[0], weight.shape[1])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(x[start:end], weight[e].t(), out=out[start:end])
        start = end
    return out


@torch.library.custom_op("nanoseek::grouped_linear_input_grad", mutates_args=())
def grouped_linear_input_grad(grad: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """d x = grad_e · weight[e]: [S, in]."""
    if _grouped_mm_ok(grad, weight.transpose(1, 2)):
        return F.grouped_mm(grad, weight, offs=offsets)
    out = grad.new_empty(grad.shape[0], weight.shape[2])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(grad[start:end], weight[e], out=out[start:end])
        start = end
    return out


@torch.library.custom_op("nanoseek::grouped_linear_weight_grad", mutates_args=())
def grouped_linear_weight_grad(grad: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """d weight[e] = grad_eᵀ · x_e: [E, out, in], zeros for experts without rows."""
    if _grouped_mm_ok(grad, x[None]) and grad.shape[1] * grad.element_size() % 16 == 0:
        return F.grouped_mm(grad.t(), x, offs=offsets)
    out = x.new_zeros(offsets.shape[0], grad.shape[1], x.shape[1])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(grad[start:end].t(), x[start:end], out=out[e])
        start = end
    return out


@grouped_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[1])


@grouped_linear_input_grad.register_fake
def _(grad: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return grad.new_empty(grad.shape[0], weight.shape[2])


@grouped_linear_weight_grad.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return x.new_empty(offsets.shape[0], grad.shape[1], x.shape[1])


def _grouped_linear_setup(ctx, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _grouped_linear_backward(ctx, grad: torch.Tensor):
    x, weight, offsets = ctx.saved_tensors
    grad = grad.contiguous()  # the fused kernel rejects broadcast (stride-0) gradients
    grad_x = grouped_linear_input_grad(grad, weight, offsets) if ctx.needs_input_grad[0] else None
    grad_w = grouped_linear_weight_grad(grad, x, offsets) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


torch.library.register_autograd("nanoseek::grouped_linear", _grouped_linear_backward,
                                setup_context=_grouped_linear_setup)


# FLOP formulas, so that torch.utils.flop_counter.FlopCounterMode counts the experts' GEMMs (2 FLOPs/MAC).
@register_flop_formula(torch.ops.nanoseek.grouped_linear)
def _flops_fwd(x_shape, w_shape, offsets_shape, out_shape=None, **kwargs) -> int:
    return 2 * x_shape[0] * w_shape[1] * w_shape[2]


@register_flop_formula(torch.ops.nanoseek.grouped_linear_input_grad)
def _flops_dx(g_shape, w_shape, offsets_shape, out_shape=None, **kwargs) -> int:
    return 2 * g_shape[0] * w_shape[1] * w_shape[2]


@register_flop_formula(torch.ops.nanoseek.grouped_linear_weight_grad)
def _flops_dw(g_shape, x_shape, offsets_shape, out_shape=None, **kwargs) -> int:
    return 2 * g_shape[0] * g_shape[1] * x_shape[1]


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
        if indices.numel() < self.n_experts and not torch.is_grad_enabled():
            return self._few_tokens(x, indices, weights)
        order = indices.flatten().argsort(stable=True)  # token copies grouped by expert
        token = order // indices.shape[1]
        xs = x.index_select(0, token)
        gate_w = weights.flatten().index_select(0, order)
        y = expert_mlp(xs, gate_w, counts, *self.stacked())
        return torch.zeros_like(x, dtype=y.dtype).index_add_(0, token, y)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up_proj, down_proj) as the math reads them; a storage-only format for serving (infer/quant.py)
        gives dequantized copies."""
        return self.gate_up_proj, self.down_proj

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's (gate_up [2I, H], down [H, I]), as `stacked` has them."""
        return self.gate_up_proj[e], self.down_proj[e]

    def _few_tokens(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Decoding: fewer token copies than experts. One mat-vec per (token, chosen expert) on views of the
        stacked weights: only the chosen experts' weights are read, while the grouped GEMM on CPU visits all
        experts (docs/LOG.md). The gate weight scales the output (linear, so the same as scaling the input).
        The math is in x's dtype, as in `expert_mlp` (weights stored in bf16 for serving are widened)."""
        rows = []
        for n, (chosen, gates) in enumerate(zip(indices.tolist(), weights.tolist())):
            acc = None
            for e, g in zip(chosen, gates):
                gate_up, down = self.expert(e)
                gate, up = F.linear(x[n], gate_up.to(x.dtype)).chunk(2)
                y = F.linear(F.silu(gate) * up, down.to(x.dtype))
                acc = y * g if acc is None else acc.add_(y, alpha=g)
            rows.append(acc)
        return torch.stack(rows).to(x.dtype)


def expert_mlp(xs: torch.Tensor, gate_w: torch.Tensor, counts: torch.Tensor, gate_up_proj: torch.Tensor,
               down_proj: torch.Tensor) -> torch.Tensor:
    """Rows grouped by expert (expert e owns the next counts[e] rows) -> gate_w · down(silu(gate(x)) · up(x)).
    Shared by the local experts and by expert parallelism, which runs it on the rows it received."""
    dtype = torch.get_autocast_dtype(xs.device.type) if torch.is_autocast_enabled(xs.device.type) else xs.dtype
    xs = xs.to(dtype)
    # Scale by the gate weight before the down projection (it is linear): I wide instead of H.
    gate_w = gate_w.unsqueeze(1).to(dtype)
    slot = None
    if xs.device.type == "cpu" and dtype == torch.bfloat16:
        # oneDNN (bf16 on CPU) builds a kernel per matrix shape, and the rows per expert change every step.
        # Rounding each expert's rows up to a multiple of 64 (zero rows) keeps the shapes few and the
        # kernels cached: 3x faster grouped GEMMs for ~10% padding (docs/LOG.md).
        slot, counts = _padded_slots(counts, 64)
        xs = xs.new_zeros(int(counts.sum()), xs.shape[1]).index_copy(0, slot, xs)
        gate_w = gate_w.new_zeros(xs.shape[0], 1).index_copy(0, slot, gate_w)
    offsets = counts.cumsum(0).to(torch.int32)
    gate, up = grouped_linear(xs, gate_up_proj.to(dtype), offsets).chunk(2, dim=-1)
    y = grouped_linear(F.silu(gate) * up * gate_w, down_proj.to(dtype), offsets)
    return y.index_select(0, slot) if slot is not None else y


def _padded_slots(counts: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of each expert rounded up to `multiple`: (slot of each sorted row in the padded layout, new counts)."""
    padded = (counts + multiple - 1) // multiple * multiple
    shift = (padded.cumsum(0) - padded) - (counts.cumsum(0) - counts)  # start moves by the padding before it
    rows = int(counts.sum())
    slot = torch.arange(rows, device=counts.device) + shift.repeat_interleave(counts, output_size=rows)
    return slot, padded


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
