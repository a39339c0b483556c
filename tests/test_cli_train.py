"""The command line end to end on real data: tokenizer, data, train, dry run, kill -9 and resume, generate."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanoseek.cli import main
from nanoseek.data.tokenizer import SPECIAL_TOKENS
from nanoseek.train.checkpoint import latest_checkpoint
from nanoseek.train.run import MetricsLog
from tests.conftest import ROOT, nanoseek


def _args(data: Path, out: Path, steps: int = 24) -> list[str]:
    return [str(ROOT / "configs" / "tiny.toml"), f"data.path={data}", f"train.out_dir={out}", "model.vocab_size=512",
            f"train.steps={steps}", "data.seq_len=64", "train.log_every=1", "checkpoint.every=6", "eval.every=12",
            "eval.batches=2", "eval.sample_tokens=8"]


def test_dry_run_prints_plan_and_plot(data_dir, tmp_path, capsys):
    png = tmp_path / "schedule.png"
    assert main(["train", *_args(data_dir, tmp_path / "r"), "--dry-run", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "optimizer steps" in out and "24" in out and "cosine" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not (tmp_path / "r").exists()  # a dry run writes nothing
    # it checks what the run would check first: the data, the vocabulary, the run folder
    args = _args(data_dir, tmp_path / "r")
    assert main(["train", *args, f"data.path={tmp_path / 'nodata'}", "--dry-run"]) == 2
    assert "is not a prepared data folder" in capsys.readouterr().out
    assert main(["train", *args, "model.vocab_size=256", "--dry-run"]) == 2
    assert "set model.vocab_size=512" in capsys.readouterr().out
    (tmp_path / "r" / "checkpoints" / "step_000001").mkdir(parents=True)
    (tmp_path / "r" / "checkpoints" / "step_000001" / "trainer_state.json").write_text("{}")
    assert main(["train", *args, "--dry-run"]) == 2
    assert "already holds a run" in capsys.readouterr().out


def test_kill9_then_resume_matches_uninterrupted(data_dir, tmp_path):
    full = tmp_path / "full"
    r = nanoseek("train", *_args(data_dir, full), "--no-progress")
    assert r.returncode == 0, r.stderr + r.stdout
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "train", *_args(data_dir, killed), "--no-progress"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait for the second periodic checkpoint, then kill without warning
        ck = latest_checkpoint(killed) if (killed / "checkpoints").exists() else None
        if ck is not None and ck.name >= "step_000012":
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(killed).name < "step_000024"
    r = nanoseek("train", "--resume", str(killed), "--no-progress")
    assert r.returncode == 0, r.stderr + r.stdout
    losses = lambda d: [x["loss"] for x in MetricsLog(d / "metrics.jsonl").records("train")]
    assert losses(killed) == losses(full) and len(losses(full)) == 24
    evals = MetricsLog(full / "metrics.jsonl").records("eval")
    assert [e["step"] for e in evals] == [12, 24] and all(e["val_bpb"] > 0 for e in evals)
    assert all(e["samples"] for e in evals)


def test_sigterm_saves_then_resume(data_dir, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "train", *_args(data_dir, run, steps=400),
                             "checkpoint.every=0", "--no-progress"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped: signal" in out
    step = json.loads((latest_checkpoint(run) / "trainer_state.json").read_text())["state"]["step"]
    assert 0 < step < 400
    # a setting changed on resume is kept in run.toml: the next plain resume (a requeued job) goes on with it
    r = nanoseek("train", "--resume", str(run), f"train.steps={step + 2}", "--no-progress")
    assert r.returncode == 0 and f"run.toml now records train.steps={step + 2}" in r.stdout, r.stdout + r.stderr
    r = nanoseek("train", "--resume", str(run), "--no-progress")
    assert r.returncode == 0 and f"nothing left to train: the run had reached its end at step {step + 2}" in r.stdout
    r = nanoseek("train", "--resume", str(run), "model.hidden_size=128")
    assert r.returncode == 2 and "model.hidden_size=128: the model cannot change when a run resumes" in r.stdout
    assert "run.toml now records" not in r.stdout
    # another shuffle would make the saved place in the data other windows: refused, run.toml unchanged
    r = nanoseek("train", "--resume", str(run), "train.seed=12345", f"train.steps={step + 4}")
    assert r.returncode == 2 and "train.seed=12345" in r.stdout and "repeated" in r.stdout, r.stdout + r.stderr
    assert "12345" not in (run / "run.toml").read_text()


def test_generate_from_run(data_dir, tmp_path, capsys, monkeypatch):
    run = tmp_path / "g"
    assert main(["train", *_args(data_dir, run, steps=4), "--no-progress"]) == 0
    # the folder above a run (what `nanoseek demo --out` makes): every command names the run inside it
    for argv in (["generate", str(tmp_path)], ["export", str(tmp_path), "--out", str(tmp_path / "x")],
                 ["train", "--resume", str(tmp_path)], ["report", str(tmp_path)], ["info", str(tmp_path)]):
        capsys.readouterr()
        assert main(argv) == 2
        assert f"it holds run folders: pass one of them (newest first: {run})" in capsys.readouterr().out, argv
    assert main(["info", str(run)]) == 0 and "routed experts" in capsys.readouterr().out  # its latest checkpoint
    # natural slips get an answer that names the fix
    ckpt = latest_checkpoint(run)
    for argv, said in [(["info", "tny"], "'tny' is neither a preset (tiny, demo, small) nor a folder"),
                       (["generate", str(run / "checkpoints")], f"give the run {run} (its latest checkpoint)"),
                       (["generate", str(tmp_path / "nope")], "is not a folder: give a run folder")]:
        assert main(argv) == 2 and said in capsys.readouterr().out, argv
    monkeypatch.chdir(ckpt.parent)  # a checkpoint folder exports too, by a relative name
    assert main(["export", ckpt.name, "--out", str(tmp_path / "from-step")]) == 0
    monkeypatch.undo()
    (tmp_path / "from-step" / "tokenizer.json").unlink()
    assert main(["generate", str(tmp_path / "from-step")]) == 2
    assert "has a model but no tokenizer.json: copy in the tokenizer files it was trained" in capsys.readouterr().out
    # samples start from the text of validation windows, without the special tokens between documents
    prompts = [s["prompt"] for e in MetricsLog(run / "metrics.jsonl").records("eval") for s in e["samples"]]
    assert prompts and all(p and not any(t in p for t in [*SPECIAL_TOKENS, "\ufffd"]) for p in prompts), prompts
    # --dry-run of a resumed run prints the extended plan and trains nothing; --plot alone is refused
    assert main(["train", "--resume", str(run), "train.steps=9", "--dry-run"]) == 0
    assert "optimizer steps" in capsys.readouterr().out and latest_checkpoint(run).name == "step_000004"
    assert main(["train", "--resume", str(run), "--plot", str(tmp_path / "p.png")]) == 2
    assert "add --dry-run" in capsys.readouterr().out and not (tmp_path / "p.png").exists()
    r = nanoseek("generate", str(run), "--prompt", "Hello", "--max-tokens", "5", "--samples", "2", "--expert-dtype",
                 "bf16")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Hello") == 2
    r = nanoseek("generate", str(run), "--prompt", "Hello", "--max-tokens", "8", "--temperature", "0",
                 "--speculative", "mtp")
    assert r.returncode == 0, r.stderr
    assert "MTP drafts accepted:" in r.stdout and "%" in r.stdout
    long = "Hello " * 30  # longer than a line: piped output is the text itself, not wrapped at 80 columns
    r = nanoseek("generate", str(run), "--prompt", long, "--max-tokens", "4", "--temperature", "0")
    assert r.returncode == 0 and r.stdout.startswith(long), r.stdout


def test_exported_model_metadata_is_what_transformers_reads(data_dir, tmp_path):
    run, out = tmp_path / "run", tmp_path / "exported"
    assert main(["train", *_args(data_dir, run, steps=2), "checkpoint.every=2", "--no-progress"]) == 0
    assert main(["export", str(run), "--out", str(out)]) == 0
    context = json.loads((out / "config.json").read_text())["max_position_embeddings"]
    for folder in (out, latest_checkpoint(run), run / "tokenizer"):  # transformers truncates prompts to this
        assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == context, folder

    # generation_config.json's end ids (HF checkpoints often list several) end generation, as in transformers
    from nanoseek.infer import Engine, SamplingParams, load_for_inference

    def greedy(folder: Path) -> list:
        model, tok = load_for_inference(folder, device="cpu")
        params = SamplingParams(max_tokens=8, temperature=0)
        return Engine(model, tok).generate([[tok.bos_id, *tok.encode("Hello")]], params)[0]

    free = greedy(out)
    assert len(free) == 8 and free[-1].finish_reason == "length"
    end = free[3].token_id
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, end]}))
    stopped = greedy(out)
    assert [e.token_id for e in stopped] == [e.token_id for e in free][: [e.token_id for e in free].index(end) + 1]
    assert stopped[-1].finish_reason == "stop"
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    r = nanoseek("generate", str(out), "--prompt", "Hello")
    assert r.returncode == 2 and "eos_token_id must be a token id or a list of them" in r.stdout + r.stderr
    # a tokenizer from elsewhere (more tokens than the model has rows) is refused, not fed as out-of-range ids
    from nanoseek import NanoSeek, preset

    small = tmp_path / "small"
    NanoSeek(preset("tiny", vocab_size=300)).save_pretrained(small)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (small / f).write_bytes((out / f).read_bytes())
    with pytest.raises(ValueError, match="the tokenizer has 512 tokens but the model's vocab_size is 300"):
        load_for_inference(small, device="cpu")


def test_data_whose_tokenizer_was_swapped_is_refused(data_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    (data / "tokenizer.json").write_text((data / "tokenizer.json").read_text() + "\n")  # any other tokenizer
    assert main(["train", *_args(data, tmp_path / "run", steps=1), "--no-progress"]) == 2
    assert "is not the tokenizer the shards of" in capsys.readouterr().out


def test_a_damaged_validation_shard_stops_the_run(data_dir, tmp_path, capsys):
    """A corrupted val shard is damage, as a corrupted train shard is: a clear error, not a run that goes on
    without validation (under torchrun only the rank that checks the sha256 would, and the ranks' collectives
    would no longer match)."""
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    shard = sorted(data.glob("val_*.bin"))[0]
    raw = bytearray(shard.read_bytes())
    raw[7] ^= 0xFF  # same size: only the checksum tells
    shard.write_bytes(bytes(raw))
    assert main(["train", *_args(data, tmp_path / "run", steps=1), "--no-progress"]) == 2
    out = capsys.readouterr().out
    assert shard.name in out and "sha256" in out and "nanoseek data prepare" in out


def test_data_without_a_validation_split_trains_without_validation(data_dir, tmp_path):
    """`data prepare --val-fraction 0` is allowed, so training on it must work (with a warning, no val loss)."""
    data0 = tmp_path / "data0"
    r = nanoseek("data", "prepare", "--input", "chatterbot:english", "--tokenizer", str(data_dir.parent / "tok"),
                 "--out", str(data0), "--val-fraction", "0", "--no-progress")
    assert r.returncode == 0, r.stderr + r.stdout
    run = tmp_path / "run"
    r = nanoseek("train", *_args(data0, run, steps=2), "eval.samples=0", "--no-progress")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "no validation loss in this run" in r.stderr and "--val-fraction" in r.stderr
    assert not any("val_loss" in rec for rec in MetricsLog(run / "metrics.jsonl").records())


def test_train_errors_are_clear(tmp_path, capsys):
    assert main(["train", str(ROOT / "configs" / "tiny.toml"), f"train.out_dir={tmp_path}/x"]) == 2
    assert "not a prepared data folder" in capsys.readouterr().out
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().out
    assert main(["train"]) == 2


def test_sample_prompts_are_whole_characters_of_one_document():
    from nanoseek.train.run import _plain_text

    class Pieces:  # a byte-level vocabulary made up for the test: ids 0-4 special, as nanoseek's tokenizers
        bos_id, eos_id, pad_id, user_id, assistant_id = range(5)

        def __init__(self):
            self.pieces = {5: b"\xa4", 6: "पके".encode(), 7: " सु".encode(), 8: b"\xe0\xa4"}

        def decode(self, ids: list[int]) -> str:
            return b"".join(self.pieces.get(i, b"<s>") for i in ids).decode("utf-8", errors="replace")

    # a window that starts inside a character, holds one cut at its end and then the next document
    assert _plain_text(Pieces(), [5, 6, 7, 8, 1, 0, 6]) == "पके सु"
    assert _plain_text(Pieces(), [0, 6, 7]) == "पके सु" and _plain_text(Pieces(), [5, 8]) == ""


def test_small_slips_get_answers(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *_args(data_dir, run, steps=2), "checkpoint.every=2", "parallel.dp=fsdp", "parallel.ep=2",
                 "--no-progress"]) == 0
    assert "note: parallel.dp=fsdp and parallel.ep=2 apply to torchrun jobs" in capsys.readouterr().out
    (tmp_path / "folder").mkdir()
    assert main(["train", str(tmp_path / "folder")]) == 2
    assert "is a folder: give a config file" in capsys.readouterr().out
    plot = ["--dry-run", "--plot", str(tmp_path / "plan")]  # no suffix: matplotlib writes plan.png
    assert main(["train", *_args(data_dir, tmp_path / "x", steps=2), *plot]) == 0
    assert f"schedule plot: {tmp_path / 'plan.png'}" in capsys.readouterr().out and (tmp_path / "plan.png").is_file()
    state = latest_checkpoint(run) / "trainer_state.json"
    state.write_text(state.read_text()[:40])  # a disk that lost the end of the file
    for argv in (["train", "--resume", str(run)], ["export", str(run), "--out", str(tmp_path / "e")]):
        assert main(argv) == 2, argv
        assert "trainer_state.json is damaged" in capsys.readouterr().out, argv


def test_demo_refuses_a_cached_tokenizer_of_another_size(data_dir, tmp_path, capsys):
    """`nanoseek demo --vocab-size N` over a folder whose tokenizer has another size: a clear error, not a model
    whose vocabulary contradicts its tokenizer."""
    shutil.copytree(data_dir, tmp_path / "tokenizer")  # holds tokenizer.json (512 tokens)
    assert main(["demo", "--out", str(tmp_path), "--vocab-size", "1024", "--minutes", "1"]) == 2
    err = capsys.readouterr()
    assert "holds a 512-token tokenizer from an earlier demo and --vocab-size is 1024" in err.out + err.err
