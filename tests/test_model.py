"""Model behaviour: it learns, MTP is separate from the main head, initialisation, balance statistics, dtypes,
torch.compile."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek.config import PRESETS
from nanoseek.model import IGNORE_INDEX
from nanoseek.model.moe import MoE


def _batch(vocab: int, B: int = 4, T: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (B, T + 1), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1], ids[:, 1:]


def test_forward_shapes_and_public_api():
    model = nanoseek.NanoSeek(nanoseek.preset("tiny"))
    x, y = _batch(256, B=3, T=17)
    logits = model(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (3, 17, 256)
    out = model(x, labels=y)
    assert out.logits.shape == (3, 17, 256)
    assert out.n_tokens.item() == 3 * 17
    assert out.mtp_n_tokens[0].item() == 3 * 16  # depth 1 has no target for the last position
    # an untrained model is close to uniform: CE ≈ ln(vocab)
    assert abs(out.loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.1


def test_loss_decreases_on_fixed_batch():
    torch.manual_seed(0)
    model = nanoseek.NanoSeek(nanoseek.preset("tiny"))
    x, y = _batch(256)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, mtp = [], []
    for _ in range(40):
        out = model(x, labels=y)
        (out.loss + 0.3 * out.mtp_loss).backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
        mtp.append(out.mtp_loss.item())
    assert losses[-1] < 0.3 * losses[0]
    assert mtp[-1] < 0.6 * mtp[0]  # the MTP head learns too, and is reported on its own


def test_main_logits_do_not_depend_on_mtp():
    torch.manual_seed(0)
    model = nanoseek.NanoSeek(nanoseek.preset("tiny", num_nextn_predict_layers=2))
    x, y = _batch(256)
    before = model(x, labels=y)
    with torch.no_grad():
        for p in model.mtp.parameters():
            p.add_(torch.randn_like(p))
    after = model(x, labels=y)
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.ce_sum, after.ce_sum)
    assert not torch.equal(before.mtp_ce_sums[0], after.mtp_ce_sums[0])
    # and the gradient of the main loss never reaches MTP weights
    model.zero_grad()
    model(x, labels=y).loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.mtp.parameters())


def test_mtp_targets_are_shifted_labels():
    """Depth k at position i predicts labels[i+k]: with one label kept (position 6), depth 1 is scored at
    position 5 only and depth 2 at position 4 only."""
    model = nanoseek.NanoSeek(nanoseek.preset("tiny", num_nextn_predict_layers=2))
    x, y = _batch(256, B=1, T=10)
    labels = torch.full_like(y, IGNORE_INDEX)
    labels[0, 6] = y[0, 6]
    out = model(x, labels=labels)
    assert out.n_tokens.item() == 1
    assert [n.item() for n in out.mtp_n_tokens] == [1, 1]
    target = y[0, 6]
    expected1 = torch.nn.functional.cross_entropy(out.mtp_logits[0][0, 5], target, reduction="sum")
    expected2 = torch.nn.functional.cross_entropy(out.mtp_logits[1][0, 4], target, reduction="sum")
    assert torch.allclose(out.mtp_ce_sums[0], expected1)
    assert torch.allclose(out.mtp_ce_sums[1], expected2)


def test_init_std_and_buffers():
    torch.manual_seed(0)
    assert nanoseek.ModelConfig().initializer_range == 0.006  # DeepSeek-V3's init std is the default
    model = nanoseek.NanoSeek(nanoseek.preset("demo", initializer_range=0.006))
    for w in (model.embed_tokens.weight, model.layers[1].mlp.experts.gate_up_proj,
              model.layers[0].self_attn.o_proj.weight):
        assert abs(w.std().item() - 0.006) < 0.0003 and abs(w.mean().item()) < 1e-4
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))
    assert model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() == 0
    custom = nanoseek.NanoSeek(nanoseek.preset("tiny", initializer_range=0.02))
    assert abs(custom.lm_head.weight.std().item() - 0.02) < 0.002


def test_expert_load_counts_routed_tokens_in_training_only():
    model = nanoseek.NanoSeek(nanoseek.preset("tiny"))
    x, y = _batch(256, B=2, T=16)
    model.eval()
    model(x)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert all(m.gate.expert_load.sum() == 0 for m in moes)
    model.train()
    model(x, labels=y)
    k = model.config.num_experts_per_tok
    for m in moes:  # main MoE layers and the MTP block all count B*T*k routed copies
        assert m.gate.expert_load.sum().item() == 2 * 16 * k


def test_balance_loss_closed_form_and_naive():
    cfg = nanoseek.preset("tiny")
    moe = MoE(cfg)
    x = torch.randn(3, 8, cfg.hidden_size)
    # uniform affinities (zero router): P_i = 1/E, and Σ_i f_i = E, so Σ f_i P_i = 1 whatever the choice
    torch.nn.init.zeros_(moe.gate.weight)
    _, aux = moe(x, balance_loss=True)
    assert aux.item() == pytest.approx(1.0, abs=1e-6)
    # random router: against a per-sequence loop of V3 eq. 17-20
    torch.nn.init.normal_(moe.gate.weight, std=0.5)
    _, aux = moe(x, balance_loss=True)
    E, K, T = cfg.n_routed_experts, cfg.num_experts_per_tok, 8
    expected = 0.0
    for b in range(3):
        _, idx, s = moe.gate(x[b])
        f = torch.stack([(idx == i).sum() for i in range(E)]).float() * E / (K * T)
        P = (s / s.sum(-1, keepdim=True)).mean(0)
        expected += (f * P).sum().item() / 3
    assert aux.item() == pytest.approx(expected, rel=1e-5)
    aux.backward()
    assert moe.gate.weight.grad.abs().sum() > 0


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    model = nanoseek.NanoSeek(nanoseek.preset("tiny", initializer_range=0.05))
    x, y = _batch(256)
    ref = model(x, labels=y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=y)
    assert abs(out.loss.item() - ref.loss.item()) < 0.05
    (out.loss + out.mtp_loss).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.layers[1].mlp.gate.weight.dtype == torch.float32


def test_bf16_weights_forward():
    model = nanoseek.NanoSeek(nanoseek.preset("tiny"))
    from nanoseek.model.hf import cast_model

    cast_model(model, torch.bfloat16)
    assert model.layers[1].mlp.gate.weight.dtype == torch.float32  # the router stays fp32
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    x, _ = _batch(256)
    logits = model(x)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_a_cast_keeps_the_router_and_the_rotary_frequencies_exact():
    """model.to(bf16) rounds neither the router (its bias moves in steps bf16 cannot hold) nor the rotary
    frequencies (bf16 ones would turn a position-500 angle by ~0.05 rad)."""
    model = nanoseek.NanoSeek(nanoseek.preset("tiny"))
    gate = model.layers[1].mlp.gate
    gate.e_score_correction_bias.copy_(0.5 + 1e-3 * torch.arange(gate.n_experts))
    keep = [gate.weight.detach().clone(), gate.e_score_correction_bias.clone(), model.rotary_emb.inv_freq.clone()]
    cos = model.rotary_emb(torch.arange(512))[0]
    assert (keep[1].bfloat16().float() != keep[1]).any() and (keep[2].bfloat16().float() != keep[2]).any()
    model.to(torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    for before, now in zip(keep, [gate.weight, gate.e_score_correction_bias, model.rotary_emb.inv_freq]):
        assert now.dtype == torch.float32 and torch.equal(before, now)
    assert torch.equal(model.rotary_emb(torch.arange(512))[0], cos)
    default = torch.get_default_dtype()
    try:  # built under a bf16 default dtype, they are fp32 all the same
        torch.set_default_dtype(torch.bfloat16)
        other = nanoseek.NanoSeek(nanoseek.preset("tiny"))
    finally:
        torch.set_default_dtype(default)
    assert other.embed_tokens.weight.dtype == torch.bfloat16
    assert other.rotary_emb.inv_freq.dtype == other.layers[1].mlp.gate.weight.dtype == torch.float32
    assert torch.equal(other.rotary_emb.inv_freq, keep[2])


def test_rejects_too_long_sequences_and_bad_shapes():
    model = nanoseek.NanoSeek(nanoseek.preset("tiny", max_position_embeddings=16))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model(torch.zeros(17, dtype=torch.long))


def test_parameter_counts_match_closed_form():
    cfg = nanoseek.preset("demo")
    model = nanoseek.NanoSeek(cfg)
    H, E, inter, V = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.vocab_size
    routed_total = cfg.num_moe_layers * E * 3 * H * inter
    total = model.num_parameters()
    assert total == sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    active = model.num_parameters(active=True)
    assert total - active == routed_total - cfg.num_moe_layers * cfg.num_experts_per_tok * 3 * H * inter
    assert model.num_parameters(mtp=True) == sum(p.numel() for p in model.parameters())
    tied = nanoseek.NanoSeek(nanoseek.preset("tiny", tie_word_embeddings=True))
    assert tied.num_parameters() == nanoseek.NanoSeek(nanoseek.preset("tiny")).num_parameters() - 256 * 64
    assert V == 8192


def _readme_count(text: str) -> tuple[float, float]:
    """'22.4M' -> (22.4e6, 0.05e6): the value and half its last printed digit."""
    digits, unit = text[:-1], {"M": 1e6, "B": 1e9}[text[-1]]
    decimals = len(digits.partition(".")[2])
    return float(digits) * unit, 0.5 * 10.0 ** -decimals * unit


def test_readme_preset_table_matches_the_presets():
    """The README's preset table is what people pick a model from: its counts and shapes must be the presets'."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| [^|]+ \| ([\d.]+[MB]) \| ([\d.]+[MB]) \| ([^|]+) \|$", readme, re.M)
    assert [r[0] for r in rows] == list(PRESETS)
    for name, total_text, active_text, shape in rows:
        cfg = nanoseek.preset(name)
        with torch.device("meta"):
            model = nanoseek.NanoSeek(cfg)
        for text, count in ((total_text, model.num_parameters()), (active_text, model.num_parameters(active=True))):
            value, half_digit = _readme_count(text)
            assert abs(count - value) <= half_digit, (name, text, count)
        m = re.fullmatch(r"(\d+) layers, (\d+) experts \(top-(\d+)\)(?: \+ (\d+) shared)?(, q-LoRA)?(?:, MTP (\d+))?",
                         shape.strip())
        assert m, shape
        layers, experts, top, shared, q_lora, mtp = m.groups()
        assert (cfg.num_hidden_layers, cfg.n_routed_experts, cfg.num_experts_per_tok) == \
            (int(layers), int(experts), int(top)), name
        assert cfg.n_shared_experts == int(shared or 0), name
        assert (cfg.q_lora_rank is not None) == bool(q_lora), name
        assert cfg.num_nextn_predict_layers == int(mtp or 0), name


def test_torch_compile_cpu_matches_eager():
    torch.manual_seed(0)
    model = nanoseek.NanoSeek(nanoseek.preset("tiny"))
    x, y = _batch(256, B=2, T=16)
    ref = model(x, labels=y)
    (ref.loss + ref.mtp_loss).backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = torch.compile(model)(x, labels=y)
    (out.loss + out.mtp_loss).backward()
    assert (out.logits - ref.logits).abs().max() < 1e-5
    assert max((p.grad - g).abs().max().item() for p, g in zip(model.parameters(), ref_grads)) < 1e-5
