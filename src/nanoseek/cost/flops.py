"""Analytic FLOPs of a DeepSeek-V3 config (multiply-add = 2 FLOPs).

Per token, a forward pass costs 2 FLOPs per weight it multiplies (embedding lookups are free; routed experts
count k of E) plus causal attention: position t scores t+1 keys, 2·h·(d_qk + d_v)·(t+1) FLOPs, on average
h·(d_qk + d_v)·(T+1) per token. Training (forward + backward) is 3x the forward.
"""

from __future__ import annotations

from nanoseek.config import ModelConfig


def matmul_params_per_token(c: ModelConfig, mtp: bool = False) -> int:
    """Weights one token multiplies in a forward pass (lm_head included, embedding lookup excluded)."""
    H, h = c.hidden_size, c.num_attention_heads
    if c.q_lora_rank is None:
        attn = H * h * c.qk_head_dim
    else:
        attn = H * c.q_lora_rank + c.q_lora_rank * h * c.qk_head_dim
    attn += H * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim)
    attn += h * c.v_head_dim * H
    dense = 3 * H * c.intermediate_size
    moe = 3 * H * c.moe_intermediate_size * (c.num_experts_per_tok + c.n_shared_experts) + H * c.n_routed_experts
    layers = c.num_hidden_layers * attn + c.num_dense_layers * dense + c.num_moe_layers * moe
    head = H * c.vocab_size
    if mtp:  # each MTP module: eh_proj, one MoE block, the shared head
        layers += c.num_nextn_predict_layers * (2 * H * H + attn + moe + head)
    return layers + head


def attention_flops_per_token(c: ModelConfig, seq_len: int, mtp: bool = False) -> float:
    """Forward score + value FLOPs per token, averaged over a causal sequence of `seq_len`."""
    blocks = c.num_hidden_layers + (c.num_nextn_predict_layers if mtp else 0)
    return blocks * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * (seq_len + 1)


def forward_flops_per_token(c: ModelConfig, seq_len: int, mtp: bool = False) -> float:
    return 2 * matmul_params_per_token(c, mtp) + attention_flops_per_token(c, seq_len, mtp)


def train_flops_per_token(c: ModelConfig, seq_len: int, mtp: bool = False) -> float:
    return 3 * forward_flops_per_token(c, seq_len, mtp)
