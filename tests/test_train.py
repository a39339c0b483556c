"""The training loop: it learns, accumulation is exact, schedules, balancing, resume, checkpoints, NaN handling."""

from __future__ import annotations

import json
import math
import os
import types
import warnings

import pytest
import torch

import nanoseek
from nanoseek.model.hf import CheckpointError
from nanoseek.model.moe import Router
from nanoseek.train import checkpoint as ckpt_mod
from nanoseek.train.checkpoint import (
    TrainState,
    export_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
)
from nanoseek.train.config import load_run_config, run_config_from_dict
from nanoseek.train.loop import NonFiniteLossError, Trainer, World, batch_ramp, make_optimizer, update_routing_bias
from nanoseek.train.run import MetricsLog, RunResult, describe_plan, train
from nanoseek.train.schedule import BatchRamp, LRSchedule, piecewise, plan_length
from tests.tasks import ReverseTask


def _cfg(tmp_path, task: ReverseTask, **sections):
    base = {
        "model": {"preset": "tiny", "vocab_size": task.vocab_size, "max_position_embeddings": 64},
        "data": {"seq_len": task.seq_len},
        "train": {"out_dir": str(tmp_path / "run"), "steps": 400, "batch_size": 32, "micro_batch_size": 32,
                  "log_every": 1},
        "optim": {"lr": 3e-3, "warmup": 20},
        "eval": {"every": 0, "samples": 0},
        "checkpoint": {"every": 0, "keep": 2},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return run_config_from_dict(base)


def test_tiny_model_learns_to_reverse_sequences(tmp_path):
    """The whole stack trains: ≥ 99% of held-out sequences reversed exactly (greedy)."""
    task = ReverseTask()
    result = train(_cfg(tmp_path, task), batches=task, val=[], progress=False)
    assert result.stop_reason == "done" and result.summary["steps"] == 400
    model = nanoseek.from_pretrained(latest_checkpoint(tmp_path / "run"))
    assert task.exact_match(model) >= 0.99
    records = MetricsLog(tmp_path / "run" / "metrics.jsonl").records("train")
    assert records[0]["loss"] > 2.0 and records[-1]["loss"] < 0.05
    assert all(r["mtp_loss"] is not None and r["expert_load_max_over_mean"] for r in records)


def _one_step_grads(tmp_path, task, micro: int, batch: int, mask_extra: bool):
    torch.manual_seed(0)
    cfg = _cfg(tmp_path, task, train={"batch_size": batch, "micro_batch_size": micro, "steps": 1})
    model = nanoseek.NanoSeek(cfg.model)
    opt = make_optimizer(model, cfg, torch.device("cpu"))

    seqs = ReverseTask().sequences(batch, 7)
    x_all, y_all = ReverseTask().batch(seqs)
    if mask_extra:  # unequal target counts per micro-batch: a per-micro-batch mean would be wrong
        y_all[:3, -4:] = -100

    class Source(ReverseTask):
        def next(self, n):
            sl = slice(self.cursor * n, (self.cursor + 1) * n)
            self.cursor += 1
            return x_all[sl], y_all[sl]

    trainer = Trainer(cfg, model, Source(), tmp_path, torch.device("cpu"), TrainState(total_steps=1), opt)
    trainer._make_schedule()
    grads = {}
    real_step = opt.step
    opt.step = lambda: grads.update({id(p): p.grad.clone() for g in opt.param_groups for p in g["params"]})
    trainer.step()
    opt.step = real_step
    return [grads[id(p)] for p in model.parameters()]


@pytest.mark.parametrize("mask_extra", [False, True])
def test_accumulation_equals_one_big_batch(tmp_path, mask_extra):
    task = ReverseTask()
    big = _one_step_grads(tmp_path, task, micro=8, batch=8, mask_extra=mask_extra)
    acc = _one_step_grads(tmp_path, task, micro=2, batch=8, mask_extra=mask_extra)
    worst = max((a - b).abs().max().item() / (b.abs().max().item() + 1e-12) for a, b in zip(acc, big))
    assert worst < 1e-5


def test_lr_schedules_at_known_points():
    cos = LRSchedule(peak=1.0, total=100, warmup=10, kind="cosine", min_lr_ratio=0.1)
    assert cos(0) == pytest.approx(1 / 11) and cos(9) == pytest.approx(10 / 11)
    assert cos(10) == pytest.approx(1.0) and cos(55) == pytest.approx(0.55) and cos(100) == pytest.approx(0.1)
    wsd = LRSchedule(peak=2.0, total=100, warmup=10, kind="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert wsd(50) == 2.0 and wsd(80) == 2.0 and wsd(90) == pytest.approx(1.0) and wsd(100) == pytest.approx(0.0)
    # a decay reaching back into the warmup starts where the warmup ends: the peak is reached, then a linear decay
    long = LRSchedule(peak=2.0, total=100, warmup=20, kind="wsd", decay_fraction=0.9, min_lr_ratio=0.0)
    assert long(20) == 2.0 and long(60) == pytest.approx(1.0) and long(100) == pytest.approx(0.0)
    ms = LRSchedule(peak=4.2e-4, total=1000, warmup=20, kind="multistep")  # DeepSeek LLM: ×0.316 at 80%, ×0.1 at 90%
    assert ms(500) == 4.2e-4 and ms(799) == 4.2e-4
    assert ms(800) == pytest.approx(4.2e-4 * 0.316) and ms(950) == pytest.approx(4.2e-5)
    assert LRSchedule(peak=1.0, total=10, kind="constant")(7) == 1.0
    with pytest.raises(ValueError, match="unknown lr schedule"):
        LRSchedule(peak=1.0, total=10, kind="linear")


def test_batch_ramp_and_piecewise():
    ramp = BatchRamp(end=64, start=16, ramp_tokens=1000, multiple=8)
    assert ramp(0) == 16 and ramp(500) == 40 and ramp(999) == 64 - 8 and ramp(1000) == 64 and ramp(10**9) == 64
    assert all(ramp(t) % 8 == 0 for t in range(0, 1200, 37))
    with pytest.raises(ValueError, match="multiple"):
        BatchRamp(end=60, multiple=8)
    assert piecewise(69, 100, [0.3, 0.1], [0.7]) == 0.3 and piecewise(70, 100, [0.3, 0.1], [0.7]) == 0.1


def test_plan_follows_batch_ramp(tmp_path):
    task = ReverseTask()
    cfg = _cfg(tmp_path, task, train={"steps": 0, "tokens": 10_000, "batch_size": 32, "micro_batch_size": 8,
                                      "batch_size_start": 8, "batch_ramp_tokens": 4000})
    steps, tokens = plan_length(batch_ramp(cfg), task.seq_len, tokens=10_000)
    assert tokens >= 10_000 and tokens - 32 * task.seq_len < 10_000
    assert steps > 10_000 // (32 * task.seq_len)  # small batches first: more steps than at the full batch


def test_bias_update_direction():
    cfg = nanoseek.preset("tiny")
    model = nanoseek.NanoSeek(cfg)
    r = next(m for m in model.modules() if isinstance(m, Router))
    r.expert_load.copy_(torch.tensor([10.0, 0, 4, 4, 4, 4, 4, 2]))  # mean 4
    stats = update_routing_bias(model, 0.01, World())
    assert r.e_score_correction_bias.tolist() == pytest.approx([-0.01, 0.01, 0, 0, 0, 0, 0, 0.01])
    assert stats[0] == pytest.approx(10 / 4.0)
    assert r.expert_load.sum() == 0


def test_bias_update_balances_experts(tmp_path):
    """With γ > 0 the routing evens out over a short run; with γ = 0 it stays skewed."""
    task = ReverseTask()

    def run(gamma: float, name: str) -> list[float]:
        cfg = _cfg(tmp_path / name, task, train={"steps": 150, "seed": 1},
                   balance={"bias_update_speed": gamma}, optim={"lr": 2e-3})
        train(cfg, batches=ReverseTask(), val=[], progress=False)
        recs = MetricsLog(tmp_path / name / "run" / "metrics.jsonl").records("train")
        return [max(r["expert_load_max_over_mean"]) for r in recs]

    balanced, free = run(0.01, "g"), run(0.0, "z")
    late = lambda xs: sum(xs[-30:]) / 30
    assert late(balanced) < late(free)
    assert late(balanced) < balanced[0]


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in MetricsLog(run_dir / "metrics.jsonl").records("train")]


def test_resume_is_bit_exact(tmp_path, monkeypatch):
    """A run stopped by SIGTERM at step 7 and resumed produces the uninterrupted run's losses, bit for bit."""
    task = ReverseTask()
    sections = dict(train={"steps": 16}, checkpoint={"every": 5, "keep": 2})
    full = train(_cfg(tmp_path / "a", task, **sections), batches=ReverseTask(), val=[], progress=False)
    assert full.stop_reason == "done"

    import os
    import signal

    class Interrupting(ReverseTask):
        def next(self, n):
            if self.cursor == 6:  # during step 7: the handler finishes the step, saves, stops
                os.kill(os.getpid(), signal.SIGTERM)
            return super().next(n)

    cfg = _cfg(tmp_path / "b", task, **sections)
    first = train(cfg, batches=Interrupting(), val=[], progress=False)
    assert first.stop_reason == "signal" and first.summary["steps"] == 7
    run_b = tmp_path / "b" / "run"
    assert latest_checkpoint(run_b).name == "step_000007"
    resumed = train(resume=run_b, batches=ReverseTask(), val=[], progress=False)
    assert resumed.stop_reason == "done" and resumed.summary["steps"] == 16
    assert _losses(run_b) == _losses(tmp_path / "a" / "run")  # exact float equality
    a = nanoseek.from_pretrained(latest_checkpoint(tmp_path / "a" / "run"))
    b = nanoseek.from_pretrained(latest_checkpoint(run_b))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_signal_at_an_evaluation_step_evaluates_on_resume(tmp_path):
    """SIGTERM during step 8 with eval.every=4: the run saves step 8 and stops before that step's evaluation, which
    the resumed run makes first: the evaluations are the uninterrupted run's. A finished run resumed as it is adds
    none."""
    import signal

    task, val = ReverseTask(), [ReverseTask(seed=1).next(8)]
    sections = dict(train={"steps": 12}, eval={"every": 4})
    train(_cfg(tmp_path / "a", task, **sections), batches=ReverseTask(), val=val, progress=False)

    class Interrupting(ReverseTask):
        def next(self, n):
            if self.cursor == 7:  # during step 8
                os.kill(os.getpid(), signal.SIGTERM)
            return super().next(n)

    run_b = tmp_path / "b" / "run"
    first = train(_cfg(tmp_path / "b", task, **sections), batches=Interrupting(), val=val, progress=False)
    assert first.stop_reason == "signal" and latest_checkpoint(run_b).name == "step_000008"

    def evals(run):
        return [(r["step"], r["val_loss"]) for r in MetricsLog(run / "metrics.jsonl").records("eval")]

    assert [step for step, _ in evals(run_b)] == [4]
    train(resume=run_b, batches=ReverseTask(), val=val, progress=False)
    assert evals(run_b) == evals(tmp_path / "a" / "run") and [step for step, _ in evals(run_b)] == [4, 8, 12]
    train(resume=run_b, batches=ReverseTask(), val=val, progress=False)
    assert len(evals(run_b)) == 3


def test_resume_after_hard_kill_uses_last_checkpoint(tmp_path):
    """kill -9 leaves metrics past the last checkpoint; resume rewinds to it and still matches exactly."""
    task = ReverseTask()
    sections = dict(train={"steps": 12}, checkpoint={"every": 4, "keep": 3})
    train(_cfg(tmp_path / "a", task, **sections), batches=ReverseTask(), val=[], progress=False)

    class HardKill(Exception):
        pass

    class Dying(ReverseTask):
        def next(self, n):
            if self.cursor == 10:
                raise HardKill("simulated kill -9: no handler runs, no final checkpoint")
            return super().next(n)

    cfg = _cfg(tmp_path / "b", task, **sections)
    run_b = tmp_path / "b" / "run"
    with pytest.raises(HardKill):
        train(cfg, batches=Dying(), val=[], progress=False)
    assert latest_checkpoint(run_b).name == "step_000008"
    assert len(_losses(run_b)) == 10  # logged past the checkpoint
    train(resume=run_b, batches=ReverseTask(), val=[], progress=False)
    assert _losses(run_b) == _losses(tmp_path / "a" / "run")


def test_interrupted_checkpoint_leaves_previous_loadable(tmp_path, monkeypatch):
    task = ReverseTask()
    cfg = _cfg(tmp_path, task)
    model = nanoseek.NanoSeek(cfg.model)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    run = tmp_path / "r"
    save_checkpoint(run, model, model, opt, TrainState(step=5), keep=3)

    def broken(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt_mod, "write_checkpoint", broken)  # dies after the sharded state, before the end
    with pytest.raises(OSError):
        save_checkpoint(run, model, model, opt, TrainState(step=10), keep=3)
    monkeypatch.undo()
    assert latest_checkpoint(run).name == "step_000005"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["LATEST", "step_000005"]
    fresh = nanoseek.NanoSeek(cfg.model)
    state = load_checkpoint(latest_checkpoint(run), fresh, fresh, make_optimizer(fresh, cfg, torch.device("cpu")))
    assert state.step == 5
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    # a LATEST that names a folder which never completed falls back to the newest complete one
    (run / "checkpoints" / "LATEST").write_text("step_000010\n")
    assert latest_checkpoint(run).name == "step_000005"
    # a damaged one (a disk that lost data after the save) is named, with what to do, for resume and export alike
    shard = next((latest_checkpoint(run) / "state").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match=r"checkpoint .*step_000005 cannot be read .*Move it out of"):
        load_checkpoint(latest_checkpoint(run), fresh, fresh, make_optimizer(fresh, cfg, torch.device("cpu")))
    with pytest.raises(CheckpointError, match="its files are damaged or incomplete"):
        export_checkpoint(latest_checkpoint(run), tmp_path / "exported")


def test_checkpoints_are_ordered_by_step_number_past_six_digits(tmp_path):
    """step_1000000 sorts before step_999500 as text: pruning and the LATEST fallback must count, not spell."""
    cfg = _cfg(tmp_path, ReverseTask())
    model = nanoseek.NanoSeek(cfg.model)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    run = tmp_path / "r"
    for step in (999_000, 999_500, 1_000_000, 1_000_500):
        save_checkpoint(run, model, model, opt, TrainState(step=step), keep=2)
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_1000000", "step_1000500"]
    (run / "checkpoints" / "LATEST").unlink()
    assert latest_checkpoint(run).name == "step_1000500"


def test_saving_a_step_again_never_leaves_it_missing(tmp_path, monkeypatch):
    """The same step saved twice (a signal right after a periodic save): the first copy is set aside, not deleted,
    until the second is in place; a crash in between leaves it loadable even with keep=1."""
    cfg = _cfg(tmp_path, ReverseTask())
    model = nanoseek.NanoSeek(cfg.model)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    run = tmp_path / "r"
    save_checkpoint(run, model, model, opt, TrainState(step=5), keep=1)
    real = os.replace

    def dies_after_setting_aside(src, dst):
        real(src, dst)
        if str(dst).endswith(".old"):
            raise OSError("killed (simulated)")

    monkeypatch.setattr(os, "replace", dies_after_setting_aside)
    with pytest.raises(OSError):
        save_checkpoint(run, model, model, opt, TrainState(step=5), keep=1)
    monkeypatch.undo()
    assert latest_checkpoint(run).name == ".step_000005.old"
    fresh = nanoseek.NanoSeek(cfg.model)
    state = load_checkpoint(latest_checkpoint(run), fresh, fresh, make_optimizer(fresh, cfg, torch.device("cpu")))
    assert state.step == 5
    save_checkpoint(run, model, model, opt, TrainState(step=5), keep=1)  # a later save in place: the copy goes
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["LATEST", "step_000005"]
    save_checkpoint(run, model, model, opt, TrainState(step=5), keep=1)  # and a plain re-save leaves nothing aside
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["LATEST", "step_000005"]


def test_schedule_edges():
    """A one-step run takes its step at the peak rate; a ramp must start on a multiple of micro-batch × ranks;
    the MTP and bias-freeze switches count in optim.unit (tokens: DeepSeek-V3 states them in tokens)."""
    from types import SimpleNamespace

    from nanoseek.train.config import OptimConfig
    from nanoseek.train.schedule import lr_schedule

    assert lr_schedule(OptimConfig(lr=1.0, warmup=100), total_steps=1, total_tokens=512)(0) == 1.0
    assert lr_schedule(OptimConfig(lr=1.0, warmup=100), total_steps=5, total_tokens=512)(2) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"train.batch_size_start=12 must be a multiple of train.micro_batch_size"):
        BatchRamp(end=64, start=12, ramp_tokens=1000, multiple=8)
    # a batch ramp makes the first half of the steps hold far less than half of the tokens
    state = TrainState(step=50, tokens=2_000, total_steps=100, total_tokens=10_000)
    by = {unit: Trainer.fraction(SimpleNamespace(state=state, cfg=SimpleNamespace(optim=SimpleNamespace(unit=unit))))
          for unit in ("steps", "tokens")}
    assert by == {"steps": 0.5, "tokens": 0.2}


def test_metrics_log_survives_a_record_cut_short(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        log({"kind": "train", "step": step, "loss": 1.0 / step})
    with open(log.path, "a") as f:
        f.write('{"kind": "train", "step": 4, "lo')  # a crash mid-write
    with pytest.warns(UserWarning, match="metrics.jsonl:4: not a JSON record"):
        assert [r["step"] for r in log.records("train")] == [1, 2, 3]
    with pytest.warns(UserWarning):
        log.truncate_after(2, 200)  # what resume from step 2 does: the cut record goes too
    assert log.path.read_text().count("\n") == 2 and [r["step"] for r in log.records()] == [1, 2]


def test_steps_redone_on_resume_keep_what_they_spent(tmp_path):
    """A run killed at step 6 resumes from step 4's checkpoint: steps 5 and 6 are redone and their records go, but
    their energy, cost and CO2 were spent. They stay in a "redone" record, which the totals and the report count."""
    from nanoseek.train.run import interval_total

    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 7):
        log({"kind": "train", "step": step, "tokens": 100 * step, "energy_kwh": 0.5, "cost_usd": 0.25, "co2_kg": 0.125,
             "energy_source": "estimated" if step == 6 else "measured"})
    total = {k: interval_total(log.records(), k) for k in ("energy_kwh", "cost_usd", "co2_kg")}
    log.truncate_after(4, 400)
    (redone,) = log.records("redone")
    assert [r["step"] for r in log.records("train")] == [1, 2, 3, 4]
    assert redone == {"kind": "redone", "step": 4, "tokens": 400, "energy_kwh": 1.0, "cost_usd": 0.5, "co2_kg": 0.25,
                      "energy_source": "estimated"}
    log.truncate_after(2, 200)  # killed again before the next checkpoint: everything after step 2 is redone
    assert [r["kind"] for r in log.records()] == ["train", "train", "redone"]
    assert {k: interval_total(log.records(), k) for k in total} == total


def test_keep_last_k_checkpoints(tmp_path):
    task = ReverseTask()
    cfg = _cfg(tmp_path, task, train={"steps": 10}, checkpoint={"every": 2, "keep": 2})
    train(cfg, batches=task, val=[], progress=False)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert names == ["step_000008", "step_000010"]
    folder = tmp_path / "run" / "checkpoints" / "step_000010"
    assert {"config.json", "model.safetensors", "state", "rng-0.safetensors", "trainer_state.json"} <= {
        p.name for p in folder.iterdir()}
    assert load_run_config(tmp_path / "run" / "run.toml") == cfg  # the resolved config, read back
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["stop_reason"] == "done"


def test_nonfinite_loss_skips_then_stops(tmp_path, monkeypatch):
    task = ReverseTask()
    cfg = _cfg(tmp_path, task, train={"steps": 20, "max_nonfinite": 3})
    calls = {"n": 0}
    real = Trainer.micro_loss

    def poisoned(self, *a, **k):
        loss, out = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 4 or calls["n"] >= 10:
            out.ce_sum = out.ce_sum * float("nan")
            return loss * float("nan"), out
        return loss, out

    monkeypatch.setattr(Trainer, "micro_loss", poisoned)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(NonFiniteLossError, match="3 non-finite"):
        warnings.simplefilter("always")
        train(cfg, batches=task, val=[], progress=False)
    assert sum("step skipped" in str(w.message) for w in caught) == 4  # step 4 alone, then steps 10-12
    recs = MetricsLog(tmp_path / "run" / "metrics.jsonl").records("train")
    assert [r["step"] for r in recs if r["skipped"]] == [4, 10, 11, 12]
    assert all(math.isfinite(r["loss"]) for r in recs if not r["skipped"])


def test_length_in_steps_with_a_time_limit(tmp_path):
    """train.steps (or tokens) sets the plan; train.max_time is then only a hard stop."""
    task = ReverseTask()
    result = train(_cfg(tmp_path, task, train={"steps": 10, "max_time": 1000.0}), batches=task, val=[],
                   progress=False)
    assert result.stop_reason == "done" and result.summary["steps"] == 10


def test_resume_with_a_larger_batch_keeps_the_token_budget(tmp_path):
    """A run set by train.tokens, resumed with twice the batch: it trains what is left of the budget at the new
    size (the steps done at the old size count), and the lr schedule ends where the run ends."""
    task = ReverseTask()
    per_step = 32 * task.seq_len
    cfg = _cfg(tmp_path, task, train={"steps": 0, "tokens": 4 * per_step}, optim={"unit": "tokens", "warmup": 0})
    first = train(cfg, batches=task, val=[], progress=False)
    assert first.summary["steps"] == 4
    run = tmp_path / "run"
    resumed = train(resume=run, overrides=["train.tokens=" + str(8 * per_step), "train.batch_size=64"],
                    batches=ReverseTask(), val=[], progress=False)
    assert resumed.stop_reason == "done" and resumed.summary["steps"] == 6  # 4 at 32 sequences, then 2 at 64
    state = read_state(latest_checkpoint(run))["state"]
    assert state["tokens"] == state["total_tokens"] == 8 * per_step
    assert [r["batch_size"] for r in MetricsLog(run / "metrics.jsonl").records("train")] == [32] * 4 + [64] * 2
    # the change is on record, and the report says that run.toml alone no longer reproduces the run
    (resume,) = MetricsLog(run / "metrics.jsonl").records("resume")
    assert resume["step"] == 4 and "train.batch_size=64" in resume["changed"]
    from nanoseek.report import RunRecords, _reproduce

    said = " ".join(_reproduce(RunRecords.load(run)))
    assert "resumed with changed settings (at step 4: " in said and "train.batch_size=64" in said
    # the plan from where a run is: 2 more steps of 64 (not 4 from scratch), as --dry-run on a resume shows it
    assert plan_length(BatchRamp(end=64), task.seq_len, tokens=8 * per_step, start=(4, 4 * per_step)) == (
        6, 8 * per_step)
    cfg64 = _cfg(tmp_path, task, train={"steps": 0, "tokens": 8 * per_step, "batch_size": 64})
    rows = dict(zip(*(c.cells for c in describe_plan(cfg64, start=(4, 4 * per_step)).columns)))
    assert rows["optimizer steps"] == "6" and rows["resumed from"] == f"step 4, {4 * per_step:,} tokens"


def test_resume_with_a_longer_time_budget_trains_longer(tmp_path):
    """A time-budgeted run's plan is fixed by calibration; resumed with a larger train.max_time it re-plans at
    once from the step time it measured, instead of stopping at the old plan's end."""
    task = ReverseTask()
    cfg = _cfg(tmp_path, task, train={"steps": 0, "max_time": 1.0, "batch_size": 8, "micro_batch_size": 8})
    first = train(cfg, batches=task, val=[], progress=False)
    run = tmp_path / "run"
    state = read_state(latest_checkpoint(run))["state"]
    assert first.stop_reason in ("done", "time") and state["planned_max_time"] == 1.0
    assert state["seconds_per_token"] > 0
    resumed = train(resume=run, overrides=["train.max_time=2.0"], batches=ReverseTask(), val=[], progress=False)
    plans = [p for p in MetricsLog(run / "metrics.jsonl").records("plan") if p["step"] >= state["step"]]
    assert plans[0]["step"] == state["step"] and plans[0]["total_steps"] > state["step"]  # re-planned at once ...
    assert plans[0]["seconds_per_token"] == state["seconds_per_token"]  # ... from the time it had measured
    assert resumed.summary["steps"] > state["step"]
    again = read_state(latest_checkpoint(run))["state"]
    # (later, slower steps re-plan the rest at their speed: the last plan's)
    assert again["planned_max_time"] == 2.0 and again["seconds_per_token"] == plans[-1]["seconds_per_token"]


def test_a_time_budget_with_a_batch_ramp_is_planned_per_token(tmp_path, monkeypatch):
    """The steps a time-budgeted run times for its plan are the batch ramp's smallest; planned per step, the run
    took its budget's time at a fraction of its steps, its schedule far from the end. On a clock where a step costs
    10 ms a sequence, the plan fits the budget and the run ends with its schedule ("done"); a budget spent before
    the steps were timed (no plan) says "time"."""
    from nanoseek.train import loop

    clock = [0.0]
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    real = loop.Trainer.step

    def step(self):
        result = real(self)
        clock[0] += 0.01 * result.batch_size
        return result

    monkeypatch.setattr(loop.Trainer, "step", step)
    task = ReverseTask()
    ramp = {"steps": 0, "batch_size": 16, "micro_batch_size": 4, "batch_size_start": 4,
            "batch_ramp_tokens": 16 * task.seq_len * 10}
    for budget, why in ((3.0, "done"), (0.15, "time")):
        run = tmp_path / why
        result = train(_cfg(tmp_path, task, train={**ramp, "max_time": budget, "out_dir": str(run)}),
                       batches=ReverseTask(), val=[], progress=False)
        log = MetricsLog(run / "metrics.jsonl")
        steps, plans = log.records("train"), log.records("plan")
        assert result.stop_reason == why, (budget, len(steps), plans)
        if why == "done":
            (plan,) = plans
            assert len(steps) == plan["total_steps"] > 20 and {4, 16} <= {r["batch_size"] for r in steps}
            assert 0.9 * budget <= sum(0.01 * r["batch_size"] for r in steps) <= budget
            assert steps[-1]["lr"] < 0.15 * 3e-3  # the cosine's end: 0.1 of the peak
        else:
            assert plans == [] and len(steps) < 6


def test_a_time_budget_re_plans_when_the_steps_slow_down(tmp_path, monkeypatch):
    """The first steps time the plan; when the steps after them are slower (here 10 ms a sequence while timed, then
    13 ms), the plan is checked halfway through what is left of it and made again at the measured speed: the run
    ends with its schedule ("done", the cosine at its end) within the budget, where the first plan alone stopped on
    time short of its end. At a steady speed the first plan stands (one plan record)."""
    from nanoseek.train import loop

    def run(name: str, slower: float, recheck: bool) -> tuple[RunResult, list[dict], list[dict]]:
        clock = [0.0]
        monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
        real = loop.Trainer.step

        def step(self):
            result = real(self)
            clock[0] += (0.01 if self.state.step <= 6 else slower) * result.batch_size
            return result

        monkeypatch.setattr(loop.Trainer, "step", step)
        if not recheck:
            monkeypatch.setattr(loop.Trainer, "recheck_plan", lambda self, *args: None)
        task = ReverseTask()
        cfg = _cfg(tmp_path, task, train={"steps": 0, "batch_size": 8, "micro_batch_size": 8, "max_time": 4.0,
                                          "out_dir": str(tmp_path / name)})
        result = train(cfg, batches=task, val=[], progress=False)
        monkeypatch.undo()
        log = MetricsLog(tmp_path / name / "metrics.jsonl")
        return result, log.records("train"), log.records("plan")

    result, steps, plans = run("fixed", 0.013, recheck=False)  # the first plan only: short of its end
    assert result.stop_reason == "time" and len(plans) == 1 and len(steps) < plans[0]["total_steps"]
    assert steps[-1]["lr"] > 0.15 * 3e-3
    result, steps, plans = run("rechecked", 0.013, recheck=True)
    assert result.stop_reason == "done", plans
    assert len(plans) >= 2 and plans[-1]["total_steps"] == len(steps) < plans[0]["total_steps"]
    assert plans[-1]["seconds_per_token"] > plans[0]["seconds_per_token"]
    spent = sum((0.01 if r["step"] <= 6 else 0.013) * r["batch_size"] for r in steps)
    assert 0.85 * 4.0 <= spent <= 4.0 and steps[-1]["lr"] < 0.15 * 3e-3  # the budget used; the cosine's end
    result, steps, plans = run("steady", 0.01, recheck=True)
    assert result.stop_reason == "done" and len(plans) == 1 and len(steps) == plans[0]["total_steps"]


def test_refuses_to_overwrite_a_run(tmp_path):
    task = ReverseTask()
    cfg = _cfg(tmp_path, task, train={"steps": 2})
    train(cfg, batches=task, val=[], progress=False)
    with pytest.raises(nanoseek.ConfigError, match="--resume"):
        train(_cfg(tmp_path, task, train={"steps": 2}), batches=ReverseTask(), val=[], progress=False)


def test_activation_checkpointing_in_one_process_recomputes_blocks_with_the_same_results(tmp_path, monkeypatch):
    import torch.utils.checkpoint as tuc

    task = ReverseTask()
    runs, calls, real = {}, [0], tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **k: calls.__setitem__(0, calls[0] + 1) or real(*a, **k))
    for ac in (False, True):
        cfg = _cfg(tmp_path / str(ac), task, train={"steps": 3}, parallel={"activation_checkpointing": ac})
        result = train(cfg, batches=ReverseTask(), progress=False)
        runs[ac] = nanoseek.from_pretrained(latest_checkpoint(result.run_dir)).state_dict()
    assert max((runs[True][k] - runs[False][k]).abs().max().item() for k in runs[False]) < 1e-6
    assert calls[0] >= 3 * 3  # every block (2 layers + MTP) of every step went through checkpoint


def test_a_run_that_reads_its_data_many_times_says_so(capsys):
    from nanoseek.train.run import note_data_use

    cfg = run_config_from_dict({"model": {"preset": "tiny", "vocab_size": 4096}, "data": {"seq_len": 64},
                                "train": {"steps": 100, "batch_size": 8, "micro_batch_size": 8}})
    note_data_use(cfg, World(), data_tokens=10_000, vocab=512)  # 100 x 8 x 64 = 51,200 tokens planned
    said = capsys.readouterr().out.replace("\n", " ")
    assert "51,200 tokens of training on 10,000 of data: 5 passes" in said
    assert "model.vocab_size=4096 for a 512-token tokenizer: set model.vocab_size=512" in said
    note_data_use(cfg, World(), data_tokens=100_000, vocab=4096)
    assert "note" not in capsys.readouterr().out
