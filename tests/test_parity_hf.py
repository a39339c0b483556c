"""nanoseek and transformers' DeepseekV3ForCausalLM are the same model: checkpoints cross both ways and give
the same logits (fp32, max abs 1e-4), and nanoseek's MTP module matches transformers' MtpModel."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import nanoseek
from nanoseek.model.hf import SINGLE_FILE

# transformers initialises the 0-wide shared experts of n_shared_experts=0 and torch warns that this does nothing
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402
from transformers.modeling_layers import MtpModel  # noqa: E402

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}

BASE = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
    first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, max_position_embeddings=128, num_nextn_predict_layers=0, routed_scaling_factor=2.5,
)

# Each config flips several of: q_lora, rope (default / yarn variants), interleave, tied embeddings, n_group,
# norm_topk_prob, first_k_dense_replace, shared experts, head sizes, attention bias, MTP.
CONFIGS = {
    "plain-q_default-rope_interleave_untied_1group_dense1": dict(),
    "qlora_yarn_rotate-half_untied_4groups_no-norm_dense0": dict(
        q_lora_rank=24, rope_scaling=YARN, rope_interleave=False, n_group=4, topk_group=2, norm_topk_prob=False,
        first_k_dense_replace=0),
    "plain-q_yarn-mscale_interleave_tied_2groups_dense2_bias": dict(
        rope_scaling={**YARN, "mscale": 0.8, "mscale_all_dim": 0.5, "factor": 8.0}, tie_word_embeddings=True,
        n_group=2, topk_group=1, first_k_dense_replace=2, attention_bias=True),
    "qlora_default_rotate-half_tied_4groups_no-norm_2shared": dict(
        q_lora_rank=16, rope_interleave=False, tie_word_embeddings=True, n_group=4, topk_group=1,
        norm_topk_prob=False, n_shared_experts=2, routed_scaling_factor=1.0, num_experts_per_tok=1),
    "qlora_yarn-no-alldim_interleave_8groups_v-wider-than-qk_dense3of4": dict(
        q_lora_rank=32, rope_scaling={**YARN, "mscale_all_dim": 0.0, "factor": 2.0}, n_routed_experts=16,
        n_group=8, topk_group=3, num_experts_per_tok=3, num_hidden_layers=4, first_k_dense_replace=3,
        v_head_dim=32, qk_nope_head_dim=8, rope_theta=500.0),
    # transformers' own defaults let first_k_dense_replace (3) exceed a tiny model's layers: all dense
    "plain-q_default-rope_all-dense_first-k-past-the-layers": dict(num_hidden_layers=2, first_k_dense_replace=3),
    # transformers builds (and saves) zero-width shared experts
    "plain-q_default-rope_no-shared-experts": dict(n_shared_experts=0),
    "mtp1_qlora_yarn_4groups": dict(
        q_lora_rank=24, rope_scaling=YARN, n_group=4, topk_group=2, num_nextn_predict_layers=1),
    "mtp2_plain-q_rotate-half_tied": dict(
        rope_interleave=False, tie_word_embeddings=True, n_group=2, topk_group=2, num_nextn_predict_layers=2,
        first_k_dense_replace=3),
    # every main layer dense, the MTP block still MoE (transformers' MtpModel: "MTP layers always use MoE")
    "mtp1_plain-q_all-dense-main": dict(num_nextn_predict_layers=1, first_k_dense_replace=5),
    "mtp1_plain-q_no-shared-experts": dict(num_nextn_predict_layers=1, n_shared_experts=0),
}


def _config(overrides: dict) -> nanoseek.ModelConfig:
    return nanoseek.ModelConfig(**{**BASE, **overrides})


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Perturb every weight, norm and routing bias so that nothing sits at an init value (ones, zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.2 if "norm" in name else 0.05))
        for name, b in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)


def _hf_load(path, **kw):
    return DeepseekV3ForCausalLM.from_pretrained(path, attn_implementation="eager", experts_implementation="eager",
                                                 output_loading_info=True, **kw)


def _inputs(vocab: int, seed: int = 0) -> torch.Tensor:
    # longer than original_max_position_embeddings, so YaRN's interpolated band is exercised
    return torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", [k for k in CONFIGS if not k.startswith("mtp")])
def test_transformers_checkpoint_loads_in_nanoseek(name, tmp_path):
    cfg = _config(CONFIGS[name])
    hf_cfg = DeepseekV3Config(**{k: v for k, v in cfg.to_hf_dict().items() if k != "num_nextn_predict_layers"},
                              num_nextn_predict_layers=0)
    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(hf_cfg).eval()
    _randomise(hf, 1)
    hf.save_pretrained(tmp_path)

    ours = nanoseek.from_pretrained(tmp_path).eval()
    x = _inputs(cfg.vocab_size)
    with torch.no_grad():
        ref = hf(x).logits
        got = ours(x)
    assert got.shape == (2, 48, cfg.vocab_size)
    assert (got - ref).abs().max().item() < 1e-4
    assert ref.std() > 0.1  # the comparison is not between two near-constant outputs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_nanoseek_checkpoint_loads_in_transformers(name, tmp_path):
    cfg = _config(CONFIGS[name])
    torch.manual_seed(0)
    ours = nanoseek.NanoSeek(cfg).eval()
    _randomise(ours, 2)
    ours.save_pretrained(tmp_path)

    hf, info = _hf_load(tmp_path)
    hf.eval()
    n, depth = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    mtp_prefixes = tuple(f"model.layers.{n + k}." for k in range(depth))
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    # transformers' main model leaves the MTP layers to MtpModel; nothing else may be unexpected
    assert all(k.startswith(mtp_prefixes) for k in info["unexpected_keys"]), info["unexpected_keys"]
    assert bool(info["unexpected_keys"]) == (depth > 0)
    assert hf.config.rope_parameters.get("rope_type", "default") == (
        "yarn" if cfg.rope_scaling else "default")

    x = _inputs(cfg.vocab_size, seed=3)
    with torch.no_grad():
        ref = hf(x).logits
        got = ours(x)
    assert (got - ref).abs().max().item() < 1e-4
    assert ref.std() > 0.1


@pytest.mark.parametrize("name", [k for k in CONFIGS if k.startswith("mtp")])
def test_mtp_matches_transformers_mtp_model(name, tmp_path):
    """transformers' MtpModel (its generic MTP, loaded from our checkpoint) computes the same draft logits."""
    cfg = _config(CONFIGS[name])
    torch.manual_seed(0)
    ours = nanoseek.NanoSeek(cfg).eval()
    _randomise(ours, 4)
    ours.save_pretrained(tmp_path)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf, _ = _hf_load(tmp_path)
    hf.eval()
    n = cfg.num_hidden_layers
    # transformers only knows the released model's MTP index (61); point it at this model's
    depth = cfg.num_nextn_predict_layers
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{n + k}\..*" for k in range(depth)]
    mtp = MtpModel.from_pretrained(hf).eval()

    x = _inputs(cfg.vocab_size, seed=5)
    T = x.shape[1]
    with torch.no_grad():
        out = ours(x, labels=x.roll(-1, dims=1))
        h = hf(x, output_hidden_states=True).hidden_states[-1]  # normalised final hidden state
        pos = torch.arange(T)[None]
        for k in range(cfg.num_nextn_predict_layers):
            # depth k+1 at position i reads token i+k+1; transformers runs it on the sequence shifted by k+1
            h = mtp.forward_layer(k, h[:, : T - k - 1], pos[:, k + 1:], None, input_ids=x[:, k + 1:])
            ref = mtp._project_to_logits(h)
            got = out.mtp_logits[k][:, : T - k - 1]
            assert (got - ref).abs().max().item() < 1e-4, f"depth {k + 1}"
            assert ref.std() > 0.1


def test_config_round_trip_both_layouts(tmp_path):
    """config.json as transformers 5.x writes it (rope_parameters) and as DeepSeek/4.x wrote it
    (rope_theta + rope_scaling) give the same ModelConfig."""
    cfg = _config(CONFIGS["qlora_yarn_rotate-half_untied_4groups_no-norm_dense0"])
    hf_cfg = DeepseekV3Config(**cfg.to_hf_dict())
    hf_cfg.save_pretrained(tmp_path)
    v5 = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in v5 and "rope_scaling" not in v5
    assert nanoseek.ModelConfig.from_hf_dict(v5) == cfg
    assert nanoseek.ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_checkpoint_files_are_plain_safetensors(tmp_path):
    ours = nanoseek.NanoSeek(_config(CONFIGS["mtp1_qlora_yarn_4groups"]))
    ours.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / SINGLE_FILE, "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    n = 3
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in keys
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys
    assert {f"model.layers.{n}.{k}" for k in ("enorm.weight", "hnorm.weight", "eh_proj.weight",
                                               "shared_head.norm.weight", "shared_head.head.weight",
                                               "embed_tokens.weight")} <= keys
    assert not any("gate_up_proj" in k for k in keys)
