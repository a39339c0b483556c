"""Config: HF field names, both config.json layouts, presets, TOML files and key=value overrides, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import nanoseek
from nanoseek.cli import main
from nanoseek.config import (
    ConfigError,
    ModelConfig,
    apply_overrides,
    load_toml,
    model_config_from_section,
    parse_value,
)
from nanoseek.train.config import load_run_config, to_toml

ROOT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"

DEEPSEEK_V3_JSON = {  # the released config.json, as DeepSeek publishes it (fp8 quantization dropped)
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}


def test_reads_released_deepseek_v3_config():
    cfg = ModelConfig.from_hf_dict(DEEPSEEK_V3_JSON)
    assert cfg.hidden_size == 7168 and cfg.q_lora_rank == 1536 and cfg.rope_scaling["factor"] == 40
    assert cfg.rope_theta == 10000.0 and cfg.qk_head_dim == 192
    with __import__("torch").device("meta"):
        model = nanoseek.NanoSeek(cfg)
    # the published sizes: 671B parameters in the main model, 37B activated per token
    assert 670e9 < model.num_parameters() < 672e9
    assert 36.5e9 < model.num_parameters(active=True) < 37.8e9


def test_reads_transformers_5_layout():
    v5 = {k: v for k, v in DEEPSEEK_V3_JSON.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {**DEEPSEEK_V3_JSON["rope_scaling"], "rope_type": "yarn", "rope_theta": 10000.0}
    assert ModelConfig.from_hf_dict(v5) == ModelConfig.from_hf_dict(DEEPSEEK_V3_JSON)
    plain = dict(v5, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    cfg = ModelConfig.from_hf_dict(plain)
    assert cfg.rope_scaling is None and cfg.rope_theta == 5e5


def test_writes_deepseek_layout():
    d = ModelConfig.from_hf_dict(DEEPSEEK_V3_JSON).to_hf_dict("bfloat16")
    assert d["rope_scaling"]["type"] == "yarn" and d["rope_theta"] == 10000.0 and "rope_parameters" not in d
    assert ModelConfig.from_hf_dict(d) == ModelConfig.from_hf_dict(DEEPSEEK_V3_JSON)


def test_unknown_keys_warn_not_fail():
    with pytest.warns(UserWarning, match="something_new"):
        cfg = ModelConfig.from_hf_dict({**DEEPSEEK_V3_JSON, "something_new": 1})
    assert cfg == ModelConfig.from_hf_dict(DEEPSEEK_V3_JSON)  # read as if the key were absent


def test_presets_and_errors():
    assert nanoseek.preset("tiny", hidden_size=128).hidden_size == 128
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        nanoseek.preset("huge")
    with pytest.raises(ConfigError, match="topk_group=5 must lie"):
        nanoseek.preset("tiny", topk_group=5)


def test_toml_and_overrides(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text('[model]\npreset = "tiny"\nhidden_size = 96\n')
    data = load_toml(p, ["model.num_hidden_layers=3", "model.rope_interleave=false", "model.q_lora_rank=null"])
    cfg = model_config_from_section(data["model"])
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.rope_interleave, cfg.q_lora_rank) == (96, 3, False, None)
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) model\.hiden_size"):
        model_config_from_section({"preset": "tiny", "hiden_size": 3})
    with pytest.raises(ConfigError, match="not key=value"):
        apply_overrides({}, ["model.hidden_size"])
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("abc") == "abc"
    assert parse_value("[1, 2]") == [1, 2] and parse_value('"x"') == "x"
    with pytest.raises(ConfigError, match="not found"):
        load_toml(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=r"'model' is a section, not a setting: .*model.preset=tiny"):
        apply_overrides({"model": {"preset": "demo"}}, ["model=tiny"])
    with pytest.raises(ConfigError, match=r"settings are SECTION.NAME=value \(e.g. train.steps=100"):
        apply_overrides({"train": {}}, ["steps=10"])


def test_schedule_and_fraction_settings_are_checked_before_training(tmp_path):
    """A typo in the schedule fails when the config loads (a time-budgeted run would otherwise build its
    schedule only after its first steps); settings of another schedule are not checked."""
    p = tmp_path / "run.toml"
    p.write_text('[model]\npreset = "tiny"\n[train]\nsteps = 10\n')
    bad = {"optim.schedule=cosin": r"optim: unknown lr schedule 'cosin'",
           "optim.schedule=wsd optim.decay_fraction=0": r"wsd decay_fraction must be in \(0, 1\]",
           "optim.schedule=multistep optim.milestones=[0.9,0.8]": "milestones .* must be increasing",
           "optim.schedule=multistep optim.factors=[0.3]": "as many as factors",
           "balance.bias_freeze_at=nan": r"balance.bias_freeze_at=nan is a fraction of the run",
           "mtp.switch_at=70": r"mtp.switch_at=70.* \[0, 1\]"}
    for overrides, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_run_config(p, overrides.split())
    cfg = load_run_config(p, ["optim.decay_fraction=0", "optim.milestones=[0.9,0.8]"])  # cosine uses neither
    assert cfg.optim.schedule == "cosine"


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    names = {p.stem for p in root.glob("*.toml")}
    assert {"tiny", "demo", "small"} <= names
    for p in root.glob("*.toml"):
        load_run_config(p)


def test_cli_info(capsys, tmp_path):
    assert main(["info", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "routed experts" in out and "MTP modules" in out
    assert main(["info", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().out


def test_console_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "nanoseek", "info", "tiny"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "parameters" in r.stdout


def test_overrides_take_their_fields_type(tmp_path):
    tiny = ROOT_CONFIGS / "tiny.toml"
    cfg = load_run_config(tiny, ["train.compile=False", "parallel.activation_checkpointing=TRUE", "data.path=2024",
                                 "train.out_dir=2024-06-01", "train.tokens=1e9", "train.steps=0", "train.seed=007",
                                 "optim.milestones=[0.5, 1]", 'eval.prompts=["a b", "c"]', "model.q_lora_rank=none",
                                 "model.eos_token_id=[1, 2]", "optim.lr=1e-3"])
    assert cfg.train.compile is False and cfg.parallel.activation_checkpointing is True  # not the truthy 'False'
    assert (cfg.data.path, cfg.train.out_dir) == ("2024", "2024-06-01")  # folder names stay text
    assert cfg.train.tokens == 10**9 and isinstance(cfg.train.tokens, int) and cfg.train.seed == 7
    assert cfg.optim.milestones == [0.5, 1] and cfg.eval.prompts == ["a b", "c"] and cfg.optim.lr == 1e-3
    assert cfg.model.q_lora_rank is None and cfg.model.eos_token_id == [1, 2]
    for item, match in [("optim.lr=3e-3x", "optim.lr=3e-3x: expected a number"),
                        ("train.steps=none", "train.steps=none: expected an integer"),
                        ("train.steps=2.5", "train.steps=2.5: expected an integer"),
                        ("train.compile=yes", "train.compile=yes: expected true or false"),
                        ("optim.milestones=0.5", r"optim.milestones=0.5: expected a list"),
                        ("optim.milestones=[0.5, x]", r"optim.milestones"),
                        ("train.log_every=0", "train.log_every=0 must be >= 1"),
                        ("train.max_nonfinite=0", "train.max_nonfinite=0 must be >= 1"),
                        ("checkpoint.keep=-1", r"checkpoint.keep=-1 must be >= 0 \(0: all\)"),
                        ("train.batch_size_start=16", "needs both train.batch_size_start and train.batch_ramp_tokens"),
                        # caught with the config (--dry-run too), not only once torchrun has started the ranks
                        ("parallel.dp=zero", "parallel.dp='zero': use one of ddp, fsdp"),
                        ("parallel.ep=3", "parallel.ep=3 must be >= 1 and divide the 8 routed experts"),
                        ("parallel.timeout=0", r"parallel.timeout=0 must be > 0 \(seconds\)"),
                        ("parallel.cpu_offload=true", "parallel.cpu_offload is FSDP's: set parallel.dp=fsdp as well"),
                        ("train.max_time=-1", r"train.max_time=-1 must be >= 0 \(0: no limit\)"),
                        ("train.steps=-1", r"train.steps=-1 must be >= 0"),
                        ("mtp.weight=-1", r"mtp.weight=-1 must be >= 0"),
                        ("optim.lr=nan", r"optim.lr=nan and optim.eps=1e-08 must be positive numbers"),
                        ("optim.betas=[0.9]", r"optim.betas=\[0.9\] must be two numbers in \[0, 1\)"),
                        ("optim.betas=[0.9,1.0]", r"must be two numbers in \[0, 1\)"),
                        # numpy's seeds are >= 0: caught here, not at the first batch after run.toml is written
                        ("train.seed=-1", r"train.seed=-1 must be >= 0"),
                        ("train.batch_ramp_tokens=-1000", r"train.batch_ramp_tokens=-1000 must be >= 0 \(0: no ramp\)"),
                        ("optim.min_lr_ratio=2", r"optim.min_lr_ratio=2 must be at most 1"),
                        ("optim.weight_decay=inf", r"optim.weight_decay=inf and optim.grad_clip=1.0 finite")]:
        with pytest.raises(ConfigError, match=match):
            load_run_config(tiny, [item])
    bad = tmp_path / "bad.toml"
    bad.write_text(tiny.read_text() + '\n[parallel]\nactivation_checkpointing = "false"\n')
    with pytest.raises(ConfigError, match=r"parallel\.activation_checkpointing='false': expected true or false"):
        load_run_config(bad)


def test_run_toml_round_trips_any_text(tmp_path):
    """The resolved config is written as run.toml and read back on --resume: every string must survive."""
    texts = ['def f():\n    return', 'tab\t"quoted" \\ back\\slash', 'ctrl \x01 \x7f end', 'ünï 日本語 😀', ""]
    cfg = load_run_config(ROOT_CONFIGS / "tiny.toml")
    cfg.eval.prompts = texts
    (tmp_path / "run.toml").write_text(to_toml(cfg.to_dict()), encoding="utf-8")
    assert load_run_config(tmp_path / "run.toml") == cfg


def test_a_device_that_is_not_there_is_a_clear_error(capsys):
    import torch

    from nanoseek.device import pick_device

    assert pick_device("cpu") == torch.device("cpu") and pick_device(None).type in ("cuda", "mps", "cpu")
    with pytest.raises(ConfigError, match=r"'gpu' is not a device name \(auto, cpu, cuda, cuda:N, mps\)"):
        pick_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"torch sees no CUDA GPU: use auto .* or cpu"):
            pick_device("cuda")
        # small.toml asks for a GPU: on a CPU machine the run stops with that message, not a traceback
        assert main(["train", str(Path(__file__).parents[1] / "configs" / "small.toml")]) == 2
        assert "torch sees no CUDA GPU" in capsys.readouterr().out


@pytest.mark.parametrize("change, message", [
    ({"factor": None}, "needs factor"),
    ({"original_max_position_embeddings": None}, "needs original_max_position_embeddings"),
    ({"factor": [4]}, r"rope_scaling\.factor must be a number > 0.*\[4\]"),
    ({"original_max_position_embeddings": 0}, r"rope_scaling\.original_max_position_embeddings must be a number > 0"),
    ({"beta_fast": "32"}, r"rope_scaling\.beta_fast must be a number"),
    ({"mscale_all_dim": -1}, r"rope_scaling\.mscale_all_dim must be a number >= 0"),
    ({"mscale": True}, r"rope_scaling\.mscale must be a number"),
    ({"truncate": "no"}, r"rope_scaling\.truncate must be true or false"),
])
def test_a_malformed_yarn_config_names_the_field(change, message):
    rs = {k: v for k, v in {**DEEPSEEK_V3_JSON["rope_scaling"], **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dict({**DEEPSEEK_V3_JSON, "rope_scaling": rs})


def test_cpu_identity_reads_x86_and_arm_cpuinfo(monkeypatch):
    """What the kernel cache and the measured peak are keyed by. Linux on ARM (Graviton, a Raspberry Pi, Docker on
    an Apple-silicon Mac) has no "model name" or "flags" lines: that must not crash training."""
    import types

    from nanoseek import device

    texts = {"x86": "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2\n",
             "arm": "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n"
                    "CPU part\t: 0xd0c\n",
             "bare": "processor\t: 0\n"}
    seen = {}
    for name, text in texts.items():
        monkeypatch.setattr(device, "Path", lambda path, t=text: types.SimpleNamespace(read_text=lambda: t))
        seen[name] = device.cpu_identity()
    assert seen["x86"] == "model name\t: AMD EPYC\nflags\t\t: fpu avx2"
    assert seen["arm"] == "CPU implementer\t: 0x41\nCPU part\t: 0xd0c\nFeatures\t: fp asimd"
    assert seen["bare"].split()[0] == __import__("platform").machine()


def test_auto_dtype_is_bf16_only_where_the_gpu_has_it(monkeypatch):
    """T4 and V100 only emulate bf16 (torch counts emulation unless told not to): fp32 is faster there."""
    import torch

    from nanoseek.device import pick_dtype

    for native in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native:
                            n or including_emulation)
        assert pick_dtype("auto", torch.device("cuda")) == ("bf16" if native else "fp32")
    assert pick_dtype("fp32", torch.device("cuda")) == "fp32"


def test_threads_follow_a_containers_cpu_quota(tmp_path, monkeypatch):
    """In a container limited to N CPUs (`docker run --cpus N`), torch's default threads follow the host's cores:
    64 threads on 2 CPUs' worth of time. The quota, read from cgroup v2 or v1, caps them (rounded up), unless
    OMP_NUM_THREADS chose them."""
    import torch

    from nanoseek import device

    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    v2.mkdir()
    (v1 / "cpu").mkdir(parents=True)
    for text, want in (("200000 100000\n", 2), ("150000 100000\n", 2), ("50000 100000\n", 1), ("max 100000\n", None)):
        (v2 / "cpu.max").write_text(text)
        assert device.cpu_quota(v2) == want, text
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    for quota, want in (("300000", 3), ("-1", None)):
        (v1 / "cpu" / "cpu.cfs_quota_us").write_text(quota + "\n")
        assert device.cpu_quota(v1) == want, quota
    assert device.cpu_quota(tmp_path / "none") is None

    threads = torch.get_num_threads()
    try:
        monkeypatch.setattr(device, "cpu_quota", lambda: 1)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        device.fit_threads_to_quota()
        assert torch.get_num_threads() == 2  # the user's choice stands
        monkeypatch.delenv("OMP_NUM_THREADS")
        device.fit_threads_to_quota()
        assert device.usable_cores() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
