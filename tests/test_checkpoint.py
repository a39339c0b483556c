"""Checkpoint files: round trip, sharding, dtypes, clear errors for mismatches, atomic writes."""

from __future__ import annotations

import json
import os
import shutil
import stat
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek import CheckpointError, ConfigError
from nanoseek.io import write_atomic
from nanoseek.model import hf
from nanoseek.model.hf import INDEX_FILE, SINGLE_FILE


@pytest.fixture
def model() -> nanoseek.NanoSeek:
    torch.manual_seed(0)
    m = nanoseek.NanoSeek(nanoseek.preset("tiny", initializer_range=0.05))
    for layer in m.modules():
        if hasattr(layer, "e_score_correction_bias"):
            layer.e_score_correction_bias.normal_(0, 0.1)
    return m


def _same(a: nanoseek.NanoSeek, b: nanoseek.NanoSeek) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_is_exact(model, tmp_path):
    model.save_pretrained(tmp_path / "ck")
    loaded = nanoseek.from_pretrained(tmp_path / "ck")
    assert _same(model, loaded)
    x = torch.randint(0, 256, (2, 20))
    out_a, out_b = model(x, labels=x), loaded(x, labels=x)
    assert torch.equal(out_a.logits, out_b.logits) and torch.equal(out_a.mtp_ce_sums[0], out_b.mtp_ce_sums[0])
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["architectures"] == ["DeepseekV3ForCausalLM"]


def test_sharded_checkpoint_with_index(model, tmp_path):
    model.save_pretrained(tmp_path / "ck", max_shard_size="100KB")
    files = sorted(p.name for p in (tmp_path / "ck").glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (tmp_path / "ck" / SINGLE_FILE).exists()
    index = json.loads((tmp_path / "ck" / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == set(files)
    stored = sum(t.numel() * t.element_size() for f in files for t in load_file(tmp_path / "ck" / f).values())
    assert index["metadata"]["total_size"] == stored
    assert _same(model, nanoseek.from_pretrained(tmp_path / "ck"))
    # no shard holds more than the limit unless one tensor alone is larger
    for f in files:
        tensors = load_file(tmp_path / "ck" / f)
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 100_000


def test_sharded_save_holds_one_shard_at_a_time(model, tmp_path, monkeypatch):
    """The copies written to one shard are freed before the next shard's are made: saving a large model needs
    one shard's memory beyond the model, not a second model."""
    import weakref
    earlier: list[weakref.ref] = []
    calls = 0

    def save_and_watch(tensors, filename, metadata=None):
        nonlocal calls
        calls += 1
        assert all(r() is None for r in earlier), "an earlier shard's tensors are still alive"
        save_file(tensors, filename, metadata=metadata)
        earlier.extend(weakref.ref(t) for t in tensors.values())

    monkeypatch.setattr(hf, "save_file", save_and_watch)
    model.save_pretrained(tmp_path / "ck", max_shard_size="100KB")
    assert calls > 2
    assert _same(model, nanoseek.from_pretrained(tmp_path / "ck"))


def test_bf16_checkpoint_keeps_router_fp32(model, tmp_path):
    model.save_pretrained(tmp_path / "ck", dtype="bfloat16")
    with safe_open(tmp_path / "ck" / SINGLE_FILE, "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = nanoseek.from_pretrained(tmp_path / "ck", dtype="bfloat16")
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert loaded.layers[1].mlp.gate.weight.dtype == torch.float32
    assert torch.equal(loaded.layers[1].mlp.gate.e_score_correction_bias,
                       model.layers[1].mlp.gate.e_score_correction_bias)


def test_loading_in_bf16_allocates_each_weight_once_in_bf16(model, tmp_path, monkeypatch):
    """Weights are cast on the meta device, before the real allocation: a model that fits a GPU in bf16 must not
    need its fp32 size while loading."""
    model.save_pretrained(tmp_path / "ck")
    allocated: list[dict[torch.dtype, int]] = []
    to_empty = torch.nn.Module.to_empty

    def spy(self, *args, **kwargs):
        sizes: dict[torch.dtype, int] = {}
        for p in self.parameters():
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
        allocated.append(sizes)
        return to_empty(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to_empty", spy)
    loaded = nanoseek.from_pretrained(tmp_path / "ck", dtype="bf16")
    routers = sum(m.mlp.gate.weight.numel() for m in [*loaded.layers, *loaded.mtp] if hasattr(m.mlp, "gate"))
    assert allocated == [{torch.bfloat16: sum(p.numel() for p in loaded.parameters()) - routers,
                          torch.float32: routers}]


def test_tied_embeddings_stay_tied(tmp_path):
    m = nanoseek.NanoSeek(nanoseek.preset("tiny", tie_word_embeddings=True))
    m.save_pretrained(tmp_path / "ck")
    with safe_open(tmp_path / "ck" / SINGLE_FILE, "pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118
    loaded = nanoseek.from_pretrained(tmp_path / "ck")
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, m.lm_head.weight)
    # a tied checkpoint that stores lm_head anyway (transformers loads those): read, checked against the embedding
    _edit(tmp_path / "ck", lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(nanoseek.from_pretrained(tmp_path / "ck").lm_head.weight, m.lm_head.weight)
    _edit(tmp_path / "ck", lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1}))
    with pytest.warns(UserWarning, match=r"lm_head\.weight differs .*config\.json ties them"):
        nanoseek.from_pretrained(tmp_path / "ck")
    _edit(tmp_path / "ck", lambda t: t.update({"lm_head.weight": t["lm_head.weight"][:5]}))
    with pytest.raises(CheckpointError, match=r"wrong shapes: lm_head.weight \(5, 64\)"):
        nanoseek.from_pretrained(tmp_path / "ck")


def _edit(path, fn) -> None:
    f = path / SINGLE_FILE
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_missing_tensor_is_named(model, tmp_path):
    model.save_pretrained(tmp_path)
    _edit(tmp_path, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.experts\.3\.up_proj"):
        nanoseek.from_pretrained(tmp_path)


def test_unexpected_tensor_is_named(model, tmp_path):
    model.save_pretrained(tmp_path)
    _edit(tmp_path, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.0\.mlp\.extra\.weight"):
        nanoseek.from_pretrained(tmp_path)


def test_wrong_shape_is_named(model, tmp_path):
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["kv_lora_rank"] = 16
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"wrong shapes: .*kv_a_proj_with_mqa\.weight \(40, 64\) "
                                              r"\(config\.json implies \(24, 64\)\)"):
        nanoseek.from_pretrained(tmp_path)


@pytest.mark.parametrize("field,value,match", [
    ("scoring_func", "softmax", "scoring_func='softmax' is not supported"),
    ("hidden_act", "gelu", "hidden_act='gelu' is not supported"),
    ("topk_method", "greedy", "topk_method='greedy'"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, r"rope_scaling type 'linear' is not supported"),
    ("num_key_value_heads", 2, "num_key_value_heads=2 differs"),
    ("quantization_config", {"quant_method": "fp8"}, "quant_method='fp8'"),
    ("n_group", 3, "n_routed_experts=8 must be divisible by n_group=3"),
    # a hand-edited config.json: the file, the field and the type it needs
    ("hidden_size", "abc", r"config.json: hidden_size='abc': expected an integer"),
    ("rope_theta", None, r"config.json: rope_theta=None: expected a number"),
    ("rope_scaling", "yarn", r"config.json: rope_scaling='yarn': expected a table"),
    ("quantization_config", "fp8", "quant_method='fp8'"),
])
def test_unsupported_config_values_are_clear_errors(model, tmp_path, field, value, match):
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[field] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=match):
        nanoseek.from_pretrained(tmp_path)


def test_missing_mtp_layers_load_without_mtp(model, tmp_path):
    """transformers saves no MTP layers; such a checkpoint loads as a model without MTP, with a warning."""
    model.save_pretrained(tmp_path)
    _edit(tmp_path, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.2.")])
    with pytest.warns(UserWarning, match="MTP"):
        loaded = nanoseek.from_pretrained(tmp_path)
    assert len(loaded.mtp) == 0
    x = torch.randint(0, 256, (1, 12))
    assert torch.equal(loaded(x), model(x))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint folder .*nope does not exist"):
        nanoseek.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        nanoseek.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(nanoseek.preset("tiny").to_hf_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(CheckpointError, match="never unpickles"):
        nanoseek.from_pretrained(tmp_path)


def test_training_checkpoint_of_tied_embeddings_saves_resumes_and_exports(tmp_path):
    """tie_word_embeddings: lm_head.weight is the embedding, one tensor under two names, which safetensors will not
    store twice (every save of such a run failed). Stored once; resume restores both names, still tied."""
    from nanoseek.train.checkpoint import TrainState, export_checkpoint, load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    m = nanoseek.NanoSeek(nanoseek.preset("tiny", tie_word_embeddings=True))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    ids = torch.randint(0, 256, (2, 16))
    out = m(ids, ids)
    (out.ce_sum + out.mtp_ce_sums[0]).backward()  # every parameter gets a gradient, and AdamW state
    opt.step()
    ckpt = save_checkpoint(tmp_path, m, m, opt, TrainState(step=1), keep=2)
    torch.manual_seed(1)
    back = nanoseek.NanoSeek(nanoseek.preset("tiny", tie_word_embeddings=True))
    opt2 = torch.optim.AdamW(back.parameters(), lr=1e-2)
    assert load_checkpoint(ckpt, back, back, opt2).step == 1
    assert back.lm_head.weight is back.embed_tokens.weight and _same(back, m)
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    export_checkpoint(ckpt, tmp_path / "hf")
    assert _same(nanoseek.from_pretrained(tmp_path / "hf"), m)


def test_a_checkpoint_from_before_per_token_plans_still_resumes(model, tmp_path):
    """trainer_state.json written before time budgets were planned per token holds `seconds_per_step` instead of
    `seconds_per_token`: it loads, without a time per token (such a run keeps its plan)."""
    from nanoseek.train.checkpoint import STATE_FILE, TrainState, load_checkpoint, save_checkpoint

    opt = torch.optim.AdamW(model.parameters())
    ckpt = save_checkpoint(tmp_path, model, model, opt, TrainState(step=3, planned_max_time=60.0), keep=1)
    meta = json.loads((ckpt / STATE_FILE).read_text())
    meta["state"]["seconds_per_step"] = meta["state"].pop("seconds_per_token") + 0.25
    (ckpt / STATE_FILE).write_text(json.dumps(meta))
    state = load_checkpoint(ckpt, model, model, opt)
    assert (state.step, state.planned_max_time, state.seconds_per_token) == (3, 60.0, 0.0)


def test_pruning_keeps_the_checkpoint_just_saved(model, tmp_path):
    """A run resumed from LATEST's step 500 while a complete step_000600 of the run that died before naming it
    remains: the next save (step 550) is the one LATEST names, and pruning to one must not delete it."""
    from nanoseek.train.checkpoint import TrainState, checkpoint_steps, latest_checkpoint, save_checkpoint

    opt = torch.optim.AdamW(model.parameters())
    for step in (500, 600, 550):
        save_checkpoint(tmp_path, model, model, opt, TrainState(step=step), keep=2)
    assert checkpoint_steps(tmp_path) == [550, 600] and latest_checkpoint(tmp_path).name == "step_000550"
    for step in (560, 565):  # fewer than `keep`: none go
        save_checkpoint(tmp_path, model, model, opt, TrainState(step=step), keep=5)
    assert checkpoint_steps(tmp_path) == [550, 560, 565, 600]
    save_checkpoint(tmp_path, model, model, opt, TrainState(step=570), keep=1)
    assert checkpoint_steps(tmp_path) == [570] and latest_checkpoint(tmp_path).name == "step_000570"


def test_info_counts_a_checkpoint_without_reading_its_weights(model, tmp_path, monkeypatch, capsys):
    """`nanoseek info` needs shapes only: a checkpoint of any size is described without its weights in memory."""
    from nanoseek.cli import _fmt, main
    from nanoseek.model.summary import parameter_counts

    model.save_pretrained(tmp_path / "ck")
    assert main(["info", str(tmp_path / "ck")]) == 0
    read = capsys.readouterr().out
    monkeypatch.setattr(hf, "_load_tensors", lambda *a: pytest.fail("info read the weights"))
    assert main(["info", str(tmp_path / "ck")]) == 0 and main(["info", "small"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(read) and "routed experts" in out
    total = sum(r.total for r in parameter_counts(model) if r.component != "MTP modules")  # of the real weights
    assert f" {_fmt(total)} " in read


def test_crash_mid_save_keeps_previous_checkpoint(model, tmp_path, monkeypatch):
    model.save_pretrained(tmp_path / "ck")
    before = nanoseek.from_pretrained(tmp_path / "ck")
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)

    calls = {"n": 0}
    real = hf.save_file

    def dying_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(hf, "save_file", dying_save)
    with pytest.raises(OSError, match="simulated"):
        model.save_pretrained(tmp_path / "ck", max_shard_size="100KB")
    assert _same(before, nanoseek.from_pretrained(tmp_path / "ck"))
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary folder left behind
    monkeypatch.setattr(hf, "save_file", real)
    model.save_pretrained(tmp_path / "ck")
    assert torch.equal(nanoseek.from_pretrained(tmp_path / "ck").lm_head.weight, model.lm_head.weight)


def test_saving_over_a_folder_keeps_tokenizer_files_and_refuses_other_contents(model, tmp_path, monkeypatch):
    model.save_pretrained(tmp_path / "ck", max_shard_size="100KB")  # sharded: its files must all go
    (tmp_path / "ck" / "tokenizer.json").write_text("{}")
    model.save_pretrained(tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors",
                                                                    "tokenizer.json"]
    # a folder holding anything else (a run, notes, a repository) is not swapped away
    (tmp_path / "ck" / "notes.txt").write_text("mine")
    (tmp_path / "ck" / "checkpoints").mkdir()
    (tmp_path / "ck" / "adapter_model.safetensors").write_bytes(b"mine too")  # weights, but not the model's
    with pytest.raises(CheckpointError, match=r"holds more than a model \(adapter_model.safetensors, checkpoints/, "
                                              r"notes.txt\)"):
        model.save_pretrained(tmp_path / "ck")
    assert (tmp_path / "ck" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "ck" / "adapter_model.safetensors").read_bytes() == b"mine too"
    os.remove(tmp_path / "ck" / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="is a file"):
        model.save_pretrained(tmp_path / "ck" / "notes.txt")
    shutil.rmtree(tmp_path / "ck" / "checkpoints")
    os.remove(tmp_path / "ck" / "notes.txt")
    monkeypatch.chdir(tmp_path / "ck")  # the folder a shell is in cannot be swapped away under it
    with pytest.raises(CheckpointError, match="the folder you are in"):
        model.save_pretrained(".")
    monkeypatch.chdir(tmp_path)
    model.save_pretrained("ck")  # a relative name
    assert _same(model, nanoseek.from_pretrained(tmp_path / "ck"))


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    for umask, mode in ((0o022, 0o644), (0o077, 0o600)):  # mkstemp's 0600 whatever the umask hid exports
        old = os.umask(umask)
        try:
            write_atomic(tmp_path / "a.json", "{}")
        finally:
            os.umask(old)
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == mode
        assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary file left


def test_saved_weights_get_the_usual_file_mode(model, tmp_path):
    """safetensors' save_file creates its files 0600; an exported model (and a training checkpoint's files) must be
    readable by the other accounts the umask allows, e.g. a server run by another user."""
    from nanoseek.train.checkpoint import TrainState, save_checkpoint

    old = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path / "ck")
        ckpt = save_checkpoint(tmp_path / "run", model, model, torch.optim.AdamW(model.parameters()), TrainState(),
                               keep=1)
    finally:
        os.umask(old)
    files = [*(tmp_path / "ck").glob("*.safetensors"), *ckpt.rglob("*.safetensors")]
    assert len(files) >= 4 and {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o644}, files


def test_damaged_files_are_named(model, tmp_path):
    model.save_pretrained(tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    whole = weights.read_bytes()
    for cut in (5000, len(whole) - 1000):  # inside the header; inside the tensor data
        weights.write_bytes(whole[:cut])
        with pytest.raises(CheckpointError, match=r"model.safetensors.*(not a readable safetensors file|damaged)"):
            nanoseek.from_pretrained(tmp_path / "ck")
    model.save_pretrained(tmp_path / "sh", max_shard_size="100KB")
    for index in ("{}", '{"weight_map": 5}', "[]", "{not json"):
        (tmp_path / "sh" / INDEX_FILE).write_text(index)
        with pytest.raises(CheckpointError, match=r"index.json is not a safetensors index"):
            nanoseek.from_pretrained(tmp_path / "sh")
