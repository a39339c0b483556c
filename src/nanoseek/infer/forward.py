"""The model's forward pass over a latent KV cache: MLA in its absorbed form (DeepSeek-V2 §2.1.2, Appendix C).

The cache keeps, per layer and per token, only what MLA's keys and values are made of: the normalised latent
c_kv (kv_lora_rank wide) and the rotated shared key k_rope (qk_rope_head_dim wide). Nothing per head.
`kv_b_proj` (W_UK for keys, W_UV for values) is never applied to the cache; it is folded into the query and
the output instead, which is what makes decoding cheap:

    score_h(t, j) = q_nope_h(t)·(W_UK_h c_j) + q_rope_h(t)·k_rope_j = (W_UK_hᵀ q_nope_h(t))·c_j + q_rope_h(t)·k_rope_j
    out_h(t)      = Σ_j p_h(t, j) W_UV_h c_j = W_UV_h (Σ_j p_h(t, j) c_j)

so every head attends over the same [c_kv | k_rope] rows: one batched matrix product for all heads, like
multi-query attention with a (kv_lora_rank + rope) wide key and a kv_lora_rank wide value. A long prompt's
prefill, where every query meets many keys, expands keys and values instead, as training does (absorbing costs
h·(2r + rope) products per query and key against h·(dn + rope + dv) expanded: it pays where few queries read a long
cache); the cache still gets only the latent rows.

The functions here read the model's own modules (`layer.self_attn.q_proj`, ...), so the model file stays the
training model and a checkpoint serves as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.infer import kernels, quant
from nanoseek.infer.bf16 import PackedExperts, PackedKVB
from nanoseek.model.mla import MLA
from nanoseek.model.model import NanoSeek
from nanoseek.model.moe import Experts, MoE
from nanoseek.model.rope import apply_rope, rope_halves


class LatentCache:
    """Per layer (+1 for the MTP module) a [slots, max_len, kv_lora_rank + qk_rope_head_dim] tensor: one row per
    token. A slot is one sequence; its length lives with the engine (rows past it are stale and never read).

    One tensor per layer rather than one for all: a compiled decode step writes each in place, while a write into
    a slice of one big tensor is compiled as a copy of the whole tensor.
    """

    def __init__(self, config: ModelConfig, slots: int, max_len: int, device: torch.device, dtype: torch.dtype,
                 mtp: bool = False):
        self.layers = config.num_hidden_layers + (1 if mtp else 0)
        self.width = config.kv_lora_rank + config.qk_rope_head_dim
        self.rows = tuple(torch.zeros(slots, max_len, self.width, device=device, dtype=dtype)
                          for _ in range(self.layers))

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.rows)

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        """(kv_lora_rank + qk_rope_head_dim) × layers × bytes: what one token of context costs."""
        return config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * dtype.itemsize

    @staticmethod
    def mha_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        """The same model with a plain multi-head cache: per head a full key (nope + rope) and a value."""
        per_layer = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
        return config.num_hidden_layers * per_layer * dtype.itemsize


@dataclass
class Batch:
    """Where a forward over the cache reads and writes: row b is slot `slots[b]`, whose first `starts[b]`
    positions are cached, and `n_new[b]` of its T input tokens are real (the rest pad a ragged batch)."""

    slots: torch.Tensor  # [B] long
    positions: torch.Tensor  # [B, T] long: starts[b] + t
    write: tuple[torch.Tensor, ...]  # (row, column, slot, position) of each real input token
    visible: torch.Tensor  # [B, T, K] bool: key j is visible to query t of row b
    # every row starts at position 0, right-padded (as `make` builds it): its keys are its own input tokens, and
    # causal attention alone hides the padding (a prompt's prefill, which absorbed_attention may expand)
    fresh: bool = False

    @property
    def n_keys(self) -> int:
        """K = max(starts + n_new); read off the mask so that a compiled step sees it as a dynamic size."""
        return self.visible.shape[-1]

    @classmethod
    def make(cls, slots: list[int], starts: list[int], n_new: list[int], T: int, device: torch.device) -> Batch:
        slot_t = torch.tensor(slots, device=device)
        start_t = torch.tensor(starts, device=device)
        t = torch.arange(T, device=device)
        positions = start_t[:, None] + t
        new_t = torch.tensor(n_new, device=device)
        real = t < new_t[:, None]
        row, col = real.nonzero(as_tuple=True)
        n_keys = max(s + n for s, n in zip(starts, n_new))
        keys = torch.arange(n_keys, device=device)
        # causal (j <= own position) and real: a row's keys past its own length are another request's stale rows,
        # which a ragged batch's padding queries would otherwise see
        visible = (keys <= positions[..., None]) & (keys < (start_t + new_t)[:, None, None])
        return cls(slot_t, positions, (row, col, slot_t[row], positions[row, col]), visible, not any(starts))


SCORE_ELEMENTS = 1 << 22  # fp32 attention scores a prefill holds at once (16 MB)
# Which attention a forward over the cache runs. A decode step (one query row a sequence, two with MTP speculation)
# or a short prefill (up to KERNEL_KEYS keys): the decode kernel, reading the cache in place. A longer prompt's
# prefill: keys and values expanded from the latent and fused causal attention, as in training. Anything else
# (a long continuation of cached rows): the absorbed form in batched products. One `small` layer's attention
# with its projections, bf16 products (docs/LOG.md, 2026-12-01): at 16 prompts of 22 tokens the three tie
# (7.0-7.4 ms); at one of 256 the expanded form takes 7.4 ms against 11.4 absorbed, at 2,048 131 ms against 522.
KERNEL_QUERIES = 2
KERNEL_KEYS = 64


def _attend(q: torch.Tensor, keys: torch.Tensor, keys32: torch.Tensor, visible: torch.Tensor, scale: float,
            r: int) -> torch.Tensor:
    """Queries q [B, T, h, r + rope] over the cached keys [B, K, r + rope] (and keys32, the same in fp32) -> latent
    outputs [B, T, h, r]. Scores are fp32 from the product on: a bf16 one would round them (by 0.25 near 64)
    before the softmax."""
    B, T, h, _ = q.shape
    scores = torch.bmm(q.reshape(B, T * h, -1).float(), keys32.transpose(1, 2)).view(B, T, h, -1).mul_(scale)
    scores.masked_fill_(~visible[:, :, None], float("-inf"))
    values = (keys if q.dtype == keys.dtype else keys32)[..., :r]  # the latents themselves; fp32 math over a bf16
    p = scores.softmax(dim=-1).to(values.dtype).view(B, T * h, -1)  # cache (--kv-dtype) for an fp32 model
    return torch.bmm(p, values).view(B, T, h, r).to(q.dtype)  # (and a bf16 model's output over an fp32 one)


def _attend_gathered(q: torch.Tensor, rows: torch.Tensor, batch: Batch, scale: float, r: int) -> torch.Tensor:
    """_attend over the batch's cached rows gathered into one tensor (where the decode kernel does not run)."""
    B, T, h, _ = q.shape
    keys = rows[batch.slots, : batch.n_keys]  # [B, K, r + rope]: shared by all heads
    # A shorter row's slot holds stale rows (an earlier request's) up to the longest row: its softmax gives them
    # weight 0, but 0 · NaN is NaN, so one request's non-finite rows would reach the next one to use the slot.
    keys = keys.masked_fill(~batch.visible.any(1)[..., None], 0)
    keys32 = keys.float()  # for the scores (the same tensor when the cache is fp32)
    if torch.compiler.is_compiling():  # decode steps: one or two query rows
        return _attend(q, keys, keys32, batch.visible, scale, r)
    # A long prefill attends in slices of query rows: the fp32 scores are [B, rows, h, K], and in one pass a
    # 2,048-token prompt with 16 heads held ~0.5 GB of them. Each row's softmax is its own: the same numbers.
    step = max(1, SCORE_ELEMENTS // (B * h * batch.n_keys))
    if step >= T:  # one slice: no copy through cat
        return _attend(q, keys, keys32, batch.visible, scale, r)
    return torch.cat([_attend(q[:, t:t + step], keys, keys32, batch.visible[:, t:t + step], scale, r)
                      for t in range(0, T, step)], dim=1)


def absorbed_attention(attn: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor,
                       batch: Batch) -> torch.Tensor:
    """MLA over x [B, T, hidden] (already normalised) with the layer's cache rows [slots, max_len, width]:
    writes this step's latent rows, then attends over every cached row of the batch's slots (absorbed; a long
    prompt's prefill in the expanded form, see KERNEL_KEYS)."""
    B, T, _ = x.shape
    h, dn, r = attn.n_heads, attn.qk_nope_head_dim, attn.kv_lora_rank
    q_nope, q_rope = attn.query(x).split([dn, attn.qk_rope_head_dim], dim=-1)
    q_rope = rope_halves(q_rope, cos, sin, attn.interleave)  # joined once, into q or SDPA's layout
    c_kv, k_rope = attn.latent(x)
    k_rope = apply_rope(k_rope, cos, sin, attn.interleave)  # [B, T, 1, rope]
    new_rows = torch.cat((c_kv, k_rope.squeeze(2)), dim=-1)
    b, t, slot, pos = batch.write
    rows.index_put_((slot, pos), new_rows[b, t].to(rows.dtype))  # a cache may be kept in another dtype (--kv-dtype)
    if batch.fresh and T > KERNEL_KEYS:
        # A long prompt's prefill: its keys are its own tokens, right-padded (a real query sees no padding under
        # the causal mask). Keys and values expanded from the latent, as in training, and fused causal attention:
        # per query and key h·(dn + rope + dv) products instead of h·(2r + rope) absorbed.
        return attn.o_proj(attn.attend(q_nope, q_rope, c_kv, (k_rope,)))

    packed = isinstance(attn.kv_b_proj, PackedKVB)  # bf16 products (infer/bf16.py): both products in the kernel
    if packed:
        q_latent = attn.kv_b_proj.query_latent(q_nope)
    else:
        w_kv = attn.kv_b_proj.weight.view(h, dn + attn.v_head_dim, r)
        w_uk, w_uv = w_kv[:, :dn], w_kv[:, dn:]  # [h, dn, r], [h, dv, r]
        q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)  # W_UKᵀ q_nope: the query in latent space
    q = torch.cat((q_latent, *q_rope), dim=-1)  # [B, T, h, r + rope]
    # decode steps and short prefills on CPU: the cache read in place
    if (T <= KERNEL_QUERIES or batch.n_keys <= KERNEL_KEYS) and kernels.covers_attention(q, rows, r):
        out_latent = kernels.latent_attention(q, rows, batch.slots, batch.visible, attn.softmax_scale, r)
    else:
        out_latent = _attend_gathered(q, rows, batch, attn.softmax_scale, r)
    # W_UV, applied once per query instead of per key
    out = attn.kv_b_proj.values(out_latent) if packed else torch.einsum("bthr,hvr->bthv", out_latent, w_uv)
    return attn.o_proj(out.reshape(B, T, h * attn.v_head_dim))


# Rows up to which the eager path routes experts through the decode kernel: decode steps and small prefills. With
# many rows per expert the model's grouped GEMMs win: one demo layer, grouped time / kernel time = 2.47x at 16 rows,
# 1.63x at 64, 1.38x at 128, 1.04x at 256, 0.63x at 1,024 (docs/LOG.md).
DECODE_ROWS = 128
# The same for int8 experts, whose grouped path first dequantizes every expert: one demo layer, kernel vs
# dequantized grouped GEMM, 4.8 vs 29.8 ms at 128 rows, 18.7 vs 26.6 at 576, 33.2 vs 29.0 at 1,024 (docs/LOG.md).
INT8_ROWS = 768


def decode_moe(moe: MoE, x: torch.Tensor, kernel: bool) -> torch.Tensor:
    """DeepSeekMoE for a decode step. Routed experts through the decode kernel if `kernel` (infer/kernels.py: each
    chosen expert's weights read once for all its tokens); otherwise each (token, chosen expert) pair reads that
    expert's weights by index: no data-dependent shapes for the compiler (the model's path sorts tokens by expert,
    which breaks the graph), and inductor fuses the indexed read into the mat-vec, with no weight copy. Either way
    the math is in x's dtype, also over expert weights stored in bf16 or int8 (`--expert-dtype`, infer/quant.py)."""
    B, T, H = x.shape
    flat = x.reshape(-1, H)
    weights, indices, _ = moe.gate(flat)
    experts = moe.experts
    gate_up_scale, down_scale = quant.scales(experts)
    if isinstance(experts, PackedExperts):  # the index path below cannot read packed panels (_block: always kernel)
        out = kernels.routed_experts_bf16(flat, indices, weights, experts.gate_up_proj, experts.down_proj)
    elif kernel:
        out = kernels.routed_experts(flat, indices, weights, experts.gate_up_proj, experts.down_proj, gate_up_scale,
                                     down_scale)
    else:
        N, k = indices.shape
        chosen = indices.flatten()
        xs = flat.repeat_interleave(k, dim=0)  # row n*k + j: token n, j-th expert
        gate_up = (experts.gate_up_proj[chosen].to(xs.dtype) * xs[:, None]).sum(-1)
        if gate_up_scale is not None:  # int8 experts: W x = s ⊙ (Q x), one scale per output row
            gate_up = gate_up * gate_up_scale[chosen].to(xs.dtype)
        gate, up = gate_up.chunk(2, dim=-1)
        mid = F.silu(gate) * up * weights.flatten()[:, None].to(xs.dtype)  # gate weight before down_proj (linear)
        down = (experts.down_proj[chosen].to(xs.dtype) * mid[:, None]).sum(-1)
        if down_scale is not None:
            down = down * down_scale[chosen].to(xs.dtype)
        out = down.view(N, k, H).sum(1)
    out = out.view(B, T, H)
    return out if moe.shared_experts is None else out + moe.shared_experts(x)


def _block(layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor,
           batch: Batch) -> torch.Tensor:
    """One decoder block (DecoderLayer or the MTP module's block) with cached attention."""
    h = x + absorbed_attention(layer.self_attn, layer.input_layernorm(x), cos, sin, rows, batch)
    x = layer.post_attention_layernorm(h)
    mlp = layer.mlp
    # the model's own experts only: a parallel wrapper (train/parallel.py) holds a shard and exchanges tokens
    if isinstance(mlp, MoE) and isinstance(mlp.experts, Experts):
        n, compiling = x.shape[0] * x.shape[1], torch.compiler.is_compiling()
        if isinstance(mlp.experts, PackedExperts):  # packed for bf16 products: their kernel at any number of rows
            if kernels.takes_packed(x):
                return h + decode_moe(mlp, x, True)
        else:
            int8 = mlp.experts.gate_up_proj.dtype == torch.int8
            # compiled, one row: inductor's kernel, fused with its neighbours, was 4-13% faster than the decode
            # kernel; several rows: the decode kernel where this CPU has the registers for its tiles
            # (kernels.beats_inductor). int8 experts: always the kernel (inductor's int8 reads made the batch-16
            # engine 0.34x as fast, docs/LOG.md)
            if compiling:
                kernel = int8 or (n != 1 and kernels.beats_inductor())
            else:
                kernel = n <= (INT8_ROWS if int8 else DECODE_ROWS)
            kernel = kernel and kernels.covers(x, mlp.experts.gate_up_proj, mlp.experts.down_proj)
            if compiling or kernel:
                return h + decode_moe(mlp, x, kernel)
    y = mlp(x)
    return h + (y[0] if isinstance(y, tuple) else y)  # MoE also returns its (unused) balance term


def forward_cached(model: NanoSeek, cache: LatentCache, tokens: torch.Tensor, batch: Batch) -> torch.Tensor:
    """tokens [B, T] at batch.positions -> final-normed hidden states [B, T, hidden] (lm_head gives logits)."""
    cos, sin = model.rotary_emb(batch.positions)
    h = model.embed_tokens(tokens)
    for i, layer in enumerate(model.layers):
        h = _block(layer, h, cos, sin, cache.rows[i], batch)
    return model.norm(h)


def decode_step(model: NanoSeek, cache: LatentCache, tokens: torch.Tensor,
                batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's decode step, whole so that it can be compiled as one graph: (hidden [B, T, H], fp32 logits)."""
    h = forward_cached(model, cache, tokens, batch)
    return h, model.lm_head(h).float()


def mtp_cached(model: NanoSeek, cache: LatentCache, hidden: torch.Tensor, next_tokens: torch.Tensor,
               batch: Batch) -> torch.Tensor:
    """MTP module 1 at batch.positions: hidden [B, T, H] (the main model's output at position i) and the token
    at i+1 -> its normed output [B, T, H], whose head predicts the token at i+2. Its cache is the last layer."""
    mtp = model.mtp[0]
    cos, sin = model.rotary_emb(batch.positions)
    x = mtp.eh_proj(torch.cat((mtp.enorm(model.embed_tokens(next_tokens)), mtp.hnorm(hidden)), dim=-1))
    return mtp.shared_head.norm(_block(mtp, x, cos, sin, cache.rows[-1], batch))
