"""Analytic FLOPs against torch's FlopCounterMode on real forward and backward passes."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import nanoseek
from nanoseek.cost.flops import matmul_params_per_token, train_flops_per_token


@pytest.mark.parametrize("kw", [dict(), dict(q_lora_rank=24, first_k_dense_replace=0),
                                dict(first_k_dense_replace=2, num_hidden_layers=2, tie_word_embeddings=True),
                                dict(num_nextn_predict_layers=1, n_shared_experts=2)],
                         ids=["moe", "qlora-all-moe", "dense", "mtp-2shared"])
def test_matmul_flops_match_counter(kw):
    # the experts' grouped GEMM op registers its FLOP formula; SDPA's CPU kernel is not counted by torch
    cfg = nanoseek.preset("tiny", **{"num_nextn_predict_layers": 0, **kw})
    model = nanoseek.NanoSeek(cfg)
    B, T = 2, 16
    x = torch.randint(0, cfg.vocab_size, (B, T))
    mtp = cfg.num_nextn_predict_layers > 0
    with FlopCounterMode(display=False) as fwd:
        if mtp:
            out = model(x, labels=x)
        else:
            out = model(x)
    expected = 2 * matmul_params_per_token(cfg, mtp=mtp) * B * T
    assert fwd.get_total_flops() == expected
    loss = (out.loss + out.mtp_loss) if mtp else out.float().pow(2).mean()
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    assert bwd.get_total_flops() == 2 * expected  # d input and d weight: 2x the forward


def test_train_flops_includes_causal_attention():
    cfg = nanoseek.preset("demo")
    base = train_flops_per_token(cfg, 1)
    longer = train_flops_per_token(cfg, 1001)
    per_layer_head = cfg.qk_head_dim + cfg.v_head_dim
    assert longer - base == pytest.approx(3 * cfg.num_hidden_layers * cfg.num_attention_heads * per_layer_head * 1000)
