"""Multi-head Latent Attention (DeepSeek-V2 §2.1, V3 §2.1.1).

Keys and values are compressed into one latent vector per token, c_kv (kv_lora_rank wide), plus a single
rotary key shared by all heads (qk_rope_head_dim wide). Training and prefill expand the latent into per-head
keys and values (`kv_b_proj`); that is the cheap way when every query sees many keys. Parameter names are
the checkpoint's: `model.layers.{i}.self_attn.<name>`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import rope_halves


class MLA(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.n_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.v_head_dim = config.v_head_dim
        self.softmax_scale = config.softmax_scale
        self.interleave = config.rope_interleave
        self.dropout = config.attention_dropout
        hidden, bias = config.hidden_size, config.attention_bias

        # Query: plain projection, or low-rank (down, RMSNorm, up) as in V2/V3.
        # The latent norms use eps 1e-6 whatever rms_norm_eps says: that is what the released model does.
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, self.n_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.n_heads * self.qk_head_dim, bias=False)
        # Key/value: down to [c_kv | k_rope], then c_kv up to per-head [k_nope | v].
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.n_heads * (self.qk_nope_head_dim + self.v_head_dim),
                                   bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_head_dim, hidden, bias=bias)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, hidden] -> q [B, T, heads, qk_head_dim] (nope part first, then rope part)."""
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.unflatten(-1, (self.n_heads, self.qk_head_dim))

    def latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, hidden] -> normalised c_kv [B, T, kv_lora_rank], un-rotated k_rope [B, T, 1, rope_dim]."""
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(c_kv), k_rope.unsqueeze(2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Causal self-attention over x [B, T, hidden]; cos/sin [B, T, 1, rope_dim/2] from RotaryEmbedding."""
        q_nope, q_rope = self.query(x).split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        c_kv, k_rope = self.latent(x)
        out = self.attend(q_nope, rope_halves(q_rope, cos, sin, self.interleave), c_kv,
                          rope_halves(k_rope, cos, sin, self.interleave))
        return self.o_proj(out)

    def attend(self, q_nope: torch.Tensor, q_rope: tuple[torch.Tensor, ...], c_kv: torch.Tensor,
               k_rope: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Causal attention of q_nope [B, T, heads, dn] over keys and values expanded from c_kv [B, T, r]; q_rope and
        k_rope: the rotated rope parts of the queries [B, T, heads, *] and of the shared key [B, T, 1, *] (widths
        adding up to qk_rope_head_dim) -> the heads' outputs [B, T, heads · v_head_dim], before o_proj."""
        B, T = c_kv.shape[:2]
        kv = self.kv_b_proj(c_kv).unflatten(-1, (self.n_heads, self.qk_nope_head_dim + self.v_head_dim))
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)

        # Assemble q and k straight into SDPA's [B, heads, T, d] layout, one copy each. The fused (flash) SDPA
        # kernels want equal q/k and v head sizes: zero-pad the smaller (zero columns of q and k add 0 to q·k;
        # zero columns of v give output columns that are sliced off). ~2.5x faster than the fallback on CPU.
        d = max(self.qk_head_dim, self.v_head_dim)
        extra = d - self.qk_head_dim
        pad_qk = [q_nope.new_zeros(1, 1, 1, 1).expand(B, T, self.n_heads, extra)] if extra else []
        q = torch.cat([t.transpose(1, 2) for t in (q_nope, *q_rope, *pad_qk)], dim=-1)
        k_parts = [t.expand(B, T, self.n_heads, -1) for t in k_rope]
        k = torch.cat([t.transpose(1, 2) for t in (k_nope, *k_parts, *pad_qk)], dim=-1)
        v = F.pad(v.transpose(1, 2), (0, d - self.v_head_dim))
        out = self._sdpa(q, k, v)
        return out.transpose(1, 2)[..., : self.v_head_dim].reshape(B, T, self.n_heads * self.v_head_dim)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dropout = self.dropout if self.training else 0.0
        if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # CPU's fused attention is faster in fp32 than in bf16 (docs/LOG.md): leave autocast for it
            with torch.autocast("cpu", enabled=False):
                return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True,
                                                      scale=self.softmax_scale, dropout_p=dropout)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale, dropout_p=dropout)
