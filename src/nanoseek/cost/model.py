"""What a config costs before it runs: parameters, FLOPs per token, training and serving memory.

Everything here is arithmetic on a `ModelConfig`, so the planner can size models that were never built. The tests
hold it to the real thing: parameter counts to `model.parameters()`, FLOPs to `FlopCounterMode` on real forward
and backward passes, memory to the allocator's peak during a real training step.

Conventions: a multiply-add is 2 FLOPs; training = forward + backward = 3x the forward (d input and d weight each
cost a forward); "active" counts the routed experts a token uses (k of E); bytes are per rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nanoseek.config import ModelConfig
from nanoseek.cost.flops import attention_flops_per_token, matmul_params_per_token
from nanoseek.infer.forward import LatentCache

DTYPE_BYTES = {"fp32": 4, "bf16": 2}


# ---- parameters ------------------------------------------------------------------------------------------------
def _attention_params(c: ModelConfig) -> int:
    """One MLA block: q (plain or low-rank with its norm), kv_a (+ latent norm), kv_b, o_proj, optional biases."""
    H, h = c.hidden_size, c.num_attention_heads
    if c.q_lora_rank is None:
        q = H * h * c.qk_head_dim
    else:
        q = H * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * c.qk_head_dim
    kv = H * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
    kv += c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim)
    o = h * c.v_head_dim * H
    bias = ((c.q_lora_rank or 0) + c.kv_lora_rank + c.qk_rope_head_dim + H) if c.attention_bias else 0
    return q + kv + o + bias


def _moe_params(c: ModelConfig) -> tuple[int, int]:
    """(routed experts, the rest: router + shared experts) of one MoE block."""
    H = c.hidden_size
    routed = c.n_routed_experts * 3 * H * c.moe_intermediate_size
    return routed, c.n_routed_experts * H + 3 * H * c.moe_intermediate_size * c.n_shared_experts


@dataclass(frozen=True)
class Params:
    """Parameter counts. `embedding` is the vocabulary matrices (input embedding, and the output head unless tied):
    the scaling-law literature leaves them out of model scale. `total`/`active` include the MTP modules (`mtp`),
    which are trained along; `active` counts k of E routed experts."""

    total: int
    active: int
    embedding: int
    mtp: int

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding


def block_params(c: ModelConfig) -> tuple[int, int, int]:
    """Parameters of (a dense block, a MoE block, an MTP module): the units FSDP gathers one at a time."""
    H = c.hidden_size
    attn = _attention_params(c) + 2 * H  # + input and post-attention norms
    routed, moe_rest = _moe_params(c)
    moe_block = attn + routed + moe_rest
    return attn + 3 * H * c.intermediate_size, moe_block, 3 * H + 2 * H * H + moe_block  # enorm, hnorm, head norm


def count_params(c: ModelConfig) -> Params:
    H = c.hidden_size
    dense_block, moe_block, mtp_module = block_params(c)
    routed, _ = _moe_params(c)
    routed_active = c.num_experts_per_tok * 3 * H * c.moe_intermediate_size
    embedding = c.vocab_size * H * (1 if c.tie_word_embeddings else 2)
    mtp = c.num_nextn_predict_layers * mtp_module
    moe_blocks = c.num_moe_layers + c.num_nextn_predict_layers
    total = c.num_dense_layers * dense_block + c.num_moe_layers * moe_block + H + embedding + mtp
    return Params(total=total, active=total - moe_blocks * (routed - routed_active), embedding=embedding, mtp=mtp)


# ---- FLOPs -----------------------------------------------------------------------------------------------------
def nonembedding_flops_per_token(c: ModelConfig, seq_len: int) -> float:
    """DeepSeek LLM's model scale M (arXiv 2401.02954 §3.2, eq. 2), training FLOPs per token without the vocabulary:
    for a dense transformer M = 72·n_layer·d² + 12·n_layer·d·l_seq, i.e. 3 x (2 x non-embedding weights + attention
    over the full l_seq, 4·d·l_seq per layer). Here with MLA's head sizes and active experts; MTP left out (it is
    an auxiliary head, not model scale)."""
    weights = matmul_params_per_token(c) - c.hidden_size * c.vocab_size  # no lm_head
    attention = c.num_hidden_layers * 2 * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * seq_len
    return 3 * (2 * weights + attention)


def decode_attention_flops(c: ModelConfig, context: int) -> float:
    """Absorbed-MLA attention of one new token over `context` cached tokens (infer/forward.py): every head scores
    the [c_kv | k_rope] rows (2·(r + rope) per key) and sums the c_kv rows (2·r per key)."""
    return c.num_hidden_layers * 2 * c.num_attention_heads * (2 * c.kv_lora_rank + c.qk_rope_head_dim) * context


# ---- activations ---------------------------------------------------------------------------------------------
# Bytes a training forward keeps for the backward, per token (and the per-micro-batch constants), read off the
# modules in model/. Calibrated by counting what autograd really saves: a `saved_tensors_hooks` pack hook summed the
# unique storages saved during one forward of the demo/small presets (1 and 2 layers, q-LoRA on and off, fp32 and
# bf16 autocast on CPU) and each term below is one of those tensors; tests/test_cost_model.py checks the total
# against the allocator's peak in a real training step. Notation: c = compute bytes (4 fp32, 2 bf16); the residual
# stream and every norm's statistics stay fp32.

def _norm_bytes(dim: int, fp32_input: bool, c: int) -> int:
    """RMSNorm (model/norm.py): input and normalised copy in fp32 (4·dim each) and 1/rms (4). On an fp32 input the
    fused kernel keeps x̂ in fp32; a bf16 input is upcast (the fp32 copy is the saved input) and x̂ is kept in bf16."""
    return 4 * dim + 4 + (4 * dim if fp32_input else c * dim)


def _mlp_bytes(width: int, c: int) -> int:
    """SwiGLU: gate, up, silu(gate), product (the down projection's input), each `width` wide."""
    return 4 * width * c


def _block_bytes(c: ModelConfig, moe: bool, cb: int, cpu: bool, tokens: int) -> float:
    """One decoder block, per token. A bf16 linear saves its own bf16 copy of its input: two linears reading the same
    norm output keep two copies, while fp32 ones share the norm output."""
    H, h = c.hidden_size, c.num_attention_heads
    r, rope, ql = c.kv_lora_rank, c.qk_rope_head_dim, c.q_lora_rank
    fp32 = cb == 4

    def inputs(readers: int) -> int:
        """What the linears reading one H-wide norm output save of it."""
        return 4 * H if fp32 else readers * cb * H

    d = max(c.qk_head_dim, c.v_head_dim)  # SDPA gets q, k and v zero-padded to one head size (model/mla.py)
    attn_bytes = 4 if (fp32 or cpu) else cb  # CPU autocast runs SDPA in fp32 (model/mla.py)
    b = _norm_bytes(H, True, cb) + inputs(2)  # input_layernorm, read by q (or q_a) and kv_a
    if ql is not None:  # q_a output -> its norm -> q_b's input
        b += _norm_bytes(ql, fp32, cb) + ql * cb
    b += _norm_bytes(r, fp32, cb) + r * cb + (4 * rope if fp32 else 0)  # latent norm (fp32 keeps all of kv_a) + kv_b in
    b += 0 if fp32 else 2 * 2 * (rope // 2) * cb  # cos and sin, cast to bf16 once for q and once for k
    b += 4 * h * d * attn_bytes + 4 * h  # SDPA: q, k, v, output, logsumexp
    b += h * c.v_head_dim * cb  # o_proj's input
    b += _norm_bytes(H, True, cb)  # post_attention_layernorm
    if not moe:
        return b + inputs(2) + _mlp_bytes(c.intermediate_size, cb)
    E, k, inter = c.n_routed_experts, c.num_experts_per_tok, c.moe_intermediate_size
    b += 4 * H + 4 * E + 4 + 4 * k + 8 * k  # router: fp32 input, sigmoid scores, weights (+ their sum), indices
    b += 16 * k  # sort order and token index of each token copy (int64)
    rows = k  # token copies per token
    if not fp32:
        b += 2 * k * H * cb + 8 * k  # bf16 copies of the gathered rows and of the outputs; the padding slot index
        if cpu:  # CPU bf16 rounds each expert's rows up to a multiple of 64 (model/moe.py): half a slot on average
            rows = k + 32 * E / tokens
    b += rows * ((H + 5 * inter) * cb + cb)  # grouped GEMMs: input, gate|up (2I), silu, product, scaled, gate weight
    if fp32:
        b += k * H * 4  # the experts' outputs, before they are summed back per token
    if c.n_shared_experts:
        b += (0 if fp32 else inputs(2)) + _mlp_bytes(inter * c.n_shared_experts, cb)
    return b


def _head_bytes(c: ModelConfig) -> int:
    """Final norm and the fused head + cross-entropy (model/loss.py), which keeps d h (fp32) for the backward."""
    return _norm_bytes(c.hidden_size, True, 4) + 4 * c.hidden_size


def _mtp_extra_bytes(c: ModelConfig, cb: int) -> int:
    """An MTP module around its block: enorm(embedding), hnorm(h), eh_proj's input [2H], shared_head.norm, its
    cross-entropy, its shifted token ids."""
    H = c.hidden_size
    return 2 * _norm_bytes(H, True, cb) + 2 * H * cb + _head_bytes(c) + 8


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one micro-batch kept for the backward: all of them, or with per-block checkpointing only
    the blocks' inputs (`checkpointed`) plus one block recomputed at a time during the backward (`recompute`)."""

    saved: float
    checkpointed: float
    recompute: float
    forward_transient: float  # the largest short-lived buffer on top (the fused head's block of logits)


def activation_bytes(c: ModelConfig, tokens: int, dtype: str, cpu: bool, weight_copies: bool) -> Activations:
    """`tokens` = micro_batch x seq_len. `weight_copies`: autocast casts each fp32 weight to bf16 once per forward
    and keeps the copy for the backward (not under FSDP, whose gathered weights are already bf16)."""
    cb = DTYPE_BYTES[dtype]
    H, V = c.hidden_size, c.vocab_size
    n_mtp = c.num_nextn_predict_layers
    dense = _block_bytes(c, False, cb, cpu, tokens)
    moe = _block_bytes(c, True, cb, cpu, tokens)
    rope = 4 * c.qk_rope_head_dim if cb == 4 else 0  # fp32 cos/sin, shared by all layers
    outside = 8 + rope + _head_bytes(c)  # token ids, rotary tables, final norm and head
    per_token = outside + c.num_dense_layers * dense + c.num_moe_layers * moe
    per_token += n_mtp * (moe + _mtp_extra_bytes(c, cb))
    # constants: d lm_head of each cross-entropy (computed in the forward, [V, H] fp32), bf16 weight copies
    p = count_params(c)
    routers = (c.num_moe_layers + n_mtp) * c.n_routed_experts * H
    copies = (p.total - p.embedding - routers) * cb if (weight_copies and cb == 2) else 0
    fixed = (1 + n_mtp) * V * H * 4
    # checkpointing keeps each block's fp32 input (an MTP module also its embedding and its head's d h)
    blocks = c.num_hidden_layers + n_mtp
    ckpt_token = outside + 4 * H * (c.num_hidden_layers + 2 * n_mtp) + n_mtp * (_head_bytes(c) + 8)
    widest = max(moe + _mtp_extra_bytes(c, cb) if n_mtp else 0, moe if c.num_moe_layers else 0,
                 dense if c.first_k_dense_replace else 0)
    # the fused head works on blocks of rows: logits, log-softmax and probabilities of one block, fp32
    rows = min(tokens, max(64, min(4096, (1 << 20) // V)))
    transient = 3 * rows * V * 4 + (V * H * cb if cb == 2 else 0)
    return Activations(saved=tokens * per_token + fixed + copies, checkpointed=tokens * ckpt_token + fixed,
                       recompute=tokens * widest + (copies / blocks if blocks else 0), forward_transient=transient)


# ---- memory and the estimate -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainMemory:
    """Bytes per rank during a training step. fp32 master weights, gradients and AdamW's two moments (bf16 autocast
    keeps all of them fp32); FSDP shards them over the ranks and gathers one block at a time."""

    weights: float
    grads: float
    optimizer: float
    ddp_buckets: float  # DDP's flat gradient buckets, beside the gradients
    gathered: float  # FSDP: unsharded root (embedding, head) + the block in use and the next one, with gradients
    head_grad: float  # the fused head's backward turns its saved d lm_head into the gradient: a second [V, H] fp32
    activations: Activations
    checkpointing: bool

    @property
    def saved_activations(self) -> float:
        a = self.activations
        return a.checkpointed + a.recompute if self.checkpointing else a.saved

    @property
    def peak(self) -> float:
        """The backward frees activations while it allocates gradients, so the two barely coexist: the peak is the
        larger of (the activations + the head's transient block) at the end of the forward, and (all gradients + a
        second d lm_head) at the end of the backward. Checkpointing adds one recomputed block to either side."""
        a = self.activations
        extra = a.recompute if self.checkpointing else 0.0
        kept = a.checkpointed if self.checkpointing else a.saved
        return (self.weights + self.optimizer + self.ddp_buckets + self.gathered
                + max(kept + max(a.forward_transient, extra), self.grads + max(self.head_grad, extra)))


@dataclass(frozen=True)
class Estimate:
    """The analytic cost of training (and serving) `config` at one micro-batch shape, on one of `world` ranks."""

    config: ModelConfig
    seq_len: int
    micro_batch: int
    dtype: str
    dp: str
    world: int
    params: Params
    train_flops_per_token: float  # forward + backward, causal attention, lm_head and MTP included
    forward_flops_per_token: float
    nonembedding_flops_per_token: float  # DeepSeek LLM's M: the scaling laws' model scale
    memory: TrainMemory

    def decode_flops_per_token(self, context: int) -> float:
        """One generated token with `context` tokens in the latent cache (absorbed MLA, no MTP): the weights it
        multiplies (the absorbed kv_b costs what kv_b costs) plus the attention over the cache."""
        return 2 * matmul_params_per_token(self.config) + decode_attention_flops(self.config, context)

    def kv_bytes_per_token(self, dtype: str | None = None) -> int:
        return LatentCache.bytes_per_token(self.config, _torch_dtype(dtype or self.dtype))

    def serving_bytes(self, context_tokens: int, dtype: str | None = None, mtp: bool = False) -> float:
        """Weights (main model, plus the MTP module for self-speculation) + the latent cache of `context_tokens`
        tokens, summed over all sequences in flight."""
        dtype = dtype or self.dtype
        weights = self.params.total - (0 if mtp else self.params.mtp)
        return weights * DTYPE_BYTES[dtype] + context_tokens * self.kv_bytes_per_token(dtype)


def _torch_dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def estimate(config: ModelConfig, seq_len: int, micro_batch: int, dtype: str = "fp32", dp: str = "ddp",
             world: int = 1, activation_checkpointing: bool = False, device: str = "cuda") -> Estimate:
    """Parameters, FLOPs per token and per-rank training memory of `config` at micro_batch x seq_len.

    `device` ("cuda" or "cpu") only matters for bf16, where CPU kernels differ (SDPA in fp32, padded expert rows).
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    if dp not in ("ddp", "fsdp"):
        raise ValueError(f"dp must be 'ddp' or 'fsdp', got {dp!r}")
    if world < 1 or seq_len < 1 or micro_batch < 1:
        raise ValueError("world, seq_len and micro_batch must be >= 1")
    c = config
    p = count_params(c)
    mtp = c.num_nextn_predict_layers > 0
    fwd = 2 * matmul_params_per_token(c, mtp) + attention_flops_per_token(c, seq_len, mtp)
    fsdp = dp == "fsdp" and world > 1
    shard = world if fsdp else 1
    acts = activation_bytes(c, seq_len * micro_batch, dtype, device == "cpu", weight_copies=not fsdp)
    gathered = 0.0
    if fsdp:
        # FSDP2 (train/parallel.py): the root unit (embeddings, head, final norm) stays gathered for the whole step;
        # blocks are gathered in the parameter dtype, the next one prefetched; a unit's unsharded gradient (param
        # dtype) and its fp32 reduce-scatter input exist until the reduction.
        pb = DTYPE_BYTES[dtype]
        dense_block, moe_block, mtp_module = block_params(c)
        largest = max(dense_block if c.first_k_dense_replace else 0, moe_block if c.num_moe_layers else 0,
                      mtp_module if mtp else 0)
        gathered = (p.embedding + c.hidden_size) * (pb + pb + 4) + largest * (2 * pb + pb + 4)
    memory = TrainMemory(
        weights=4 * p.total / shard, grads=4 * p.total / shard, optimizer=8 * p.total / shard,
        ddp_buckets=4 * p.total if (dp == "ddp" and world > 1) else 0.0, gathered=gathered,
        head_grad=c.vocab_size * c.hidden_size * 4, activations=acts, checkpointing=activation_checkpointing)
    return Estimate(config=c, seq_len=seq_len, micro_batch=micro_batch, dtype=dtype, dp=dp, world=world, params=p,
                    train_flops_per_token=3 * fwd, forward_flops_per_token=fwd,
                    nonembedding_flops_per_token=nonembedding_flops_per_token(c, seq_len), memory=memory)


def fmt_figure(x: float) -> str:
    """Three significant digits, never in e-notation for a large figure: 0.25, 12.3, 1,235."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB': binary units, as torch and nvidia-smi report memory."""
    if n < 1024:
        return f"{n:.0f} B"
    exp = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024 ** exp:.1f} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][exp]}"
