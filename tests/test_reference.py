"""MLA, MoE routing and RoPE/YaRN against naive references written here (loops, complex rotations,
closed forms), outputs and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import nanoseek
from nanoseek.model import moe as moe_mod
from nanoseek.model.mla import MLA
from nanoseek.model.moe import MoE
from nanoseek.model.rope import RotaryEmbedding


def _cfg(**kw) -> nanoseek.ModelConfig:
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
                topk_group=2, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=64, initializer_range=0.2)
    return nanoseek.ModelConfig(**{**base, **kw})


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _lin(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    y = x @ layer.weight.T
    return y + layer.bias if layer.bias is not None else y


def _rotate_complex(v: torch.Tensor, pos: int, inv_freq: torch.Tensor, interleave: bool, scale: float):
    """Rotate each pair as a complex number z·e^{i·pos·θ_j}, in the vector's own layout."""
    d = v.shape[-1]
    idx_a = torch.arange(0, d, 2) if interleave else torch.arange(d // 2)
    idx_b = idx_a + 1 if interleave else idx_a + d // 2
    z = torch.complex(v[..., idx_a], v[..., idx_b]) * torch.polar(torch.ones(d // 2), pos * inv_freq) * scale
    out = torch.empty_like(v)
    out[..., idx_a] = z.real
    out[..., idx_b] = z.imag
    return out


def naive_mla(attn: MLA, x: torch.Tensor, inv_freq: torch.Tensor, rope_scale: float, softmax_scale: float,
              interleave: bool) -> torch.Tensor:
    """Expanded heads, one query position at a time, explicit causal softmax."""
    B, T, _ = x.shape
    h, dn, dr, dv, r = attn.n_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim, attn.kv_lora_rank
    if attn.q_lora_rank is None:
        q = _lin(x, attn.q_proj)
    else:
        q = _lin(_rms(_lin(x, attn.q_a_proj), attn.q_a_layernorm.weight, 1e-6), attn.q_b_proj)
    q = q.view(B, T, h, dn + dr)
    kv_a = _lin(x, attn.kv_a_proj_with_mqa)
    c, k_shared = _rms(kv_a[..., :r], attn.kv_a_layernorm.weight, 1e-6), kv_a[..., r:]
    kv = _lin(c, attn.kv_b_proj).view(B, T, h, dn + dv)
    k_nope, v = kv[..., :dn], kv[..., dn:]
    rows = []
    for b in range(B):
        for t in range(T):
            heads = []
            for i in range(h):
                qt = torch.cat([q[b, t, i, :dn], _rotate_complex(q[b, t, i, dn:], t, inv_freq, interleave, rope_scale)])
                keys = torch.stack([torch.cat([k_nope[b, s, i], _rotate_complex(k_shared[b, s], s, inv_freq,
                                                                                   interleave, rope_scale)])
                                    for s in range(t + 1)])
                p = torch.softmax(keys @ qt * softmax_scale, dim=0)
                heads.append(p @ v[b, : t + 1, i])
            rows.append(torch.cat(heads))
    out = torch.stack(rows).view(B, T, h * dv)
    return _lin(out, attn.o_proj)


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return list(torch.autograd.grad((out * g).sum(), inputs))


@pytest.mark.parametrize("kw", [
    dict(),
    dict(q_lora_rank=12, rope_interleave=False, attention_bias=True),
    dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "mscale": 1.0,
                       "mscale_all_dim": 0.7}, v_head_dim=24),
], ids=["plain", "qlora-rotatehalf-bias", "yarn-wide-v"])
def test_mla_matches_naive_attention(kw):
    cfg = _cfg(**kw)
    torch.manual_seed(0)
    attn = MLA(cfg)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    rope = RotaryEmbedding(cfg)
    x = torch.randn(2, 10, cfg.hidden_size, requires_grad=True)
    cos, sin = rope(torch.arange(10))
    got = attn(x, cos, sin)

    if cfg.rope_scaling is None:
        inv_freq = cfg.rope_theta ** (-torch.arange(0, 8, 2, dtype=torch.float32) / 8)  # θ^(-2j/d)
        rope_scale, softmax_scale = 1.0, cfg.qk_head_dim**-0.5
    else:
        s, m_all = cfg.rope_scaling["factor"], cfg.rope_scaling["mscale_all_dim"]
        inv_freq = rope.inv_freq
        mscale = lambda m: 0.1 * m * math.log(s) + 1  # YaRN temperature, DeepSeek-V2 appendix
        rope_scale = mscale(1.0) / mscale(m_all)
        softmax_scale = cfg.qk_head_dim**-0.5 * mscale(m_all) ** 2
    ref = naive_mla(attn, x, inv_freq, rope_scale, softmax_scale, cfg.rope_interleave)
    assert (got - ref).abs().max().item() < 1e-5

    params = [x, *attn.parameters()]
    for a, b in zip(_grads(got, params), _grads(ref, params)):
        assert (a - b).abs().max().item() < 1e-4


def naive_moe(moe: MoE, x: torch.Tensor, cfg: nanoseek.ModelConfig) -> torch.Tensor:
    """Per-token routing loop, written from V3 §2.1.2 (eq. 12-16, sigmoid, bias for choice only)."""
    E, K, G, inter = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.moe_intermediate_size
    per_group = E // G
    gate = moe.gate
    outs = []
    for t in range(x.shape[0]):
        s = torch.sigmoid(gate.weight @ x[t])
        choice = (s + gate.e_score_correction_bias).tolist()
        group_score = [sum(sorted(choice[g * per_group:(g + 1) * per_group], reverse=True)[:2]) for g in range(G)]
        groups = sorted(range(G), key=lambda g: -group_score[g])[: cfg.topk_group]
        candidates = [e for e in range(E) if e // per_group in groups]
        experts = sorted(candidates, key=lambda e: -choice[e])[:K]
        w = s[experts]
        if cfg.norm_topk_prob:
            w = w / w.sum()
        w = w * cfg.routed_scaling_factor
        y = torch.zeros_like(x[t])
        for wk, e in zip(w, experts):
            gu = moe.experts.gate_up_proj[e]
            y = y + wk * (moe.experts.down_proj[e] @ (F.silu(gu[:inter] @ x[t]) * (gu[inter:] @ x[t])))
        sh = moe.shared_experts
        y = y + sh.down_proj.weight @ (F.silu(sh.gate_proj.weight @ x[t]) * (sh.up_proj.weight @ x[t]))
        outs.append(y)
    return torch.stack(outs)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "per-expert-loop"])
@pytest.mark.parametrize("kw", [dict(), dict(n_group=1, topk_group=1, norm_topk_prob=False, n_shared_experts=2),
                                dict(n_group=8, topk_group=8, num_experts_per_tok=8, n_routed_experts=16)],
                         ids=["groups4", "nogroups-nonorm", "8groups"])
def test_moe_matches_naive_routing_loop(kw, grouped, monkeypatch):
    if not grouped:
        monkeypatch.setattr(moe_mod, "_grouped_mm_ok", lambda *a: False)
    cfg = _cfg(**kw)
    torch.manual_seed(1)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    moe.gate.e_score_correction_bias.normal_(0, 0.2)  # the bias must change choices, not weights
    x = torch.randn(3, 9, cfg.hidden_size, requires_grad=True)
    got, _ = moe(x)
    ref = naive_moe(moe, x.view(-1, cfg.hidden_size), cfg).view_as(got)
    # fp32 rounding grows with the outputs (|y| up to ~17 without weight normalisation); a wrong route is off by O(1)
    assert (got - ref).abs().max().item() < max(1e-5, 2e-6 * ref.abs().max().item())
    params = [x, moe.gate.weight, moe.experts.gate_up_proj, moe.experts.down_proj, *moe.shared_experts.parameters()]
    for a, b in zip(_grads(got, params), _grads(ref, params)):
        assert (a - b).abs().max().item() < 1e-4


def test_bias_changes_choice_not_weights():
    """A huge bias on one expert makes every token choose it, yet the gate value stays σ(score)."""
    cfg = _cfg(norm_topk_prob=False, n_group=1, topk_group=1, routed_scaling_factor=1.0)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=0.3)
    moe.gate.e_score_correction_bias[5] = 100.0
    x = torch.randn(20, cfg.hidden_size)
    weights, idx, scores = moe.gate(x)
    assert (idx == 5).any(dim=1).all()
    w5 = weights[idx == 5]
    assert torch.allclose(w5, scores[:, 5])
    assert (w5 < 1).all()


def test_experts_without_tokens_cost_no_matmul(monkeypatch):
    """The per-expert fallback runs two GEMMs per expert that received tokens, none for the others."""
    monkeypatch.setattr(moe_mod, "_grouped_mm_ok", lambda *a: False)
    cfg = _cfg(n_group=1, topk_group=1, num_experts_per_tok=2, n_shared_experts=0)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=0.3)
    moe.gate.e_score_correction_bias[[1, 6]] = 50.0  # only experts 1 and 6 get tokens
    calls = []
    real = torch.mm
    monkeypatch.setattr(moe_mod.torch, "mm", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    x = torch.randn(1, 16, cfg.hidden_size)
    with torch.no_grad():
        moe(x)
    assert len(calls) == 4 and all(rows == 16 for rows, _ in calls)  # 16 tokens each for experts 1 and 6


def test_rope_default_is_closed_form():
    cfg = _cfg()
    cos, sin = RotaryEmbedding(cfg)(torch.arange(5))
    j = torch.arange(4)
    angles = torch.arange(5)[:, None] * 10000.0 ** (-2 * j / 8)
    assert torch.allclose(cos[0, :, 0], angles.cos(), atol=1e-6)
    assert torch.allclose(sin[0, :, 0], angles.sin(), atol=1e-6)


def test_yarn_frequency_bands():
    """YaRN keeps high frequencies, divides low ones by the factor, blends in between; factor 1 is plain RoPE."""
    d, base, orig, factor = 64, 10000.0, 4096, 40.0
    cfg = _cfg(qk_rope_head_dim=d, rope_scaling={"type": "yarn", "factor": factor,
                                                  "original_max_position_embeddings": orig})
    yarn = RotaryEmbedding(cfg).inv_freq
    plain = base ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    # dimension whose wavelength fits r times into the original context: d·ln(orig/(2πr)) / (2 ln base)
    low = math.floor(d * math.log(orig / (2 * math.pi * 32)) / (2 * math.log(base)))
    high = math.ceil(d * math.log(orig / (2 * math.pi * 1)) / (2 * math.log(base)))
    assert torch.allclose(yarn[:low], plain[:low])
    assert torch.allclose(yarn[high:], plain[high:] / factor)
    mid = yarn[low + 1:high]
    assert ((mid < plain[low + 1:high]) & (mid > plain[low + 1:high] / factor)).all()
    one = RotaryEmbedding(_cfg(qk_rope_head_dim=d, rope_scaling={"type": "yarn", "factor": 1.0,
                                                                 "original_max_position_embeddings": orig}))
    assert torch.allclose(one.inv_freq, plain) and one.attention_scaling == 1.0


def test_softmax_scale_yarn_mscale():
    """DeepSeek-V3's released values: factor 40, mscale_all_dim 1 -> scale = (0.1 ln 40 + 1)^2 / sqrt(192)."""
    cfg = nanoseek.ModelConfig(rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                             "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    assert cfg.softmax_scale == pytest.approx((0.1 * math.log(40) + 1) ** 2 / math.sqrt(192))


def test_padded_slots_layout():
    slot, padded = moe_mod._padded_slots(torch.tensor([3, 0, 5, 1]), 4)
    assert padded.tolist() == [4, 0, 8, 4]
    assert slot.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 12]


def test_moe_bf16_autocast_with_padded_groups_matches_fp32():
    """bf16 on CPU pads each expert's rows (oneDNN kernel cache): results stay those of the fp32 reference."""
    cfg = _cfg(hidden_size=64, moe_intermediate_size=32)
    torch.manual_seed(2)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 37, cfg.hidden_size, requires_grad=True)
    ref = naive_moe(moe, x.view(-1, cfg.hidden_size), cfg).view(2, 37, -1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = moe(x)
    assert ((got.float() - ref).abs().max() / ref.abs().max()).item() < 2e-2
    g_got = _grads(got.float(), [x, moe.experts.gate_up_proj])
    g_ref = _grads(ref, [x, moe.experts.gate_up_proj])
    for a, b in zip(g_got, g_ref):
        assert ((a - b).abs().max() / b.abs().max()).item() < 3e-2
