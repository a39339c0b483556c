"""A training run on disk: `nanoseek train CONFIG.toml [key=value ...]` and `nanoseek train --resume RUN_DIR`.

    RUN_DIR/run.toml        the resolved configuration (what --resume reads)
    RUN_DIR/metrics.jsonl   one JSON record per log interval ("train"), evaluation ("eval") and plan ("plan"), and
                            a "final" one with the energy spent after the last "train" record, and a "redone"
                            one with what steps redone after a resume had spent
    RUN_DIR/tokenizer/      a copy of the data's tokenizer
    RUN_DIR/checkpoints/    see train/checkpoint.py
    RUN_DIR/summary.json    the run's figures at the end
"""

from __future__ import annotations

import json
import os
import platform
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from torch.distributed import DistError

from nanoseek import __version__
from nanoseek.config import ConfigError
from nanoseek.cost.energy import EnergyMeter, Tariff, energy_scope
from nanoseek.cost.flops import train_flops_per_token
from nanoseek.cost.hardware import peak_flops
from nanoseek.device import pick_device, pick_dtype
from nanoseek.infer import Engine, SamplingParams
from nanoseek.io import fsync_dir, write_atomic
from nanoseek.model import NanoSeek
from nanoseek.train.checkpoint import TrainState, latest_checkpoint, load_checkpoint
from nanoseek.train.config import RunConfig, load_run_config, to_toml
from nanoseek.train.loop import StepResult, Trainer, World, batch_ramp, evaluate_loss, make_optimizer
from nanoseek.train.parallel import DistributedError, DistWorld, gathered, init_world, parallelize, shutdown
from nanoseek.train.schedule import lr_schedule, plan_length

console = Console()


class MetricsLog:
    """Append-only JSON lines, flushed per record (a crash loses at most the record being written)."""

    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, step: int, tokens: int) -> None:
        """On resume: drop records from steps after the checkpoint (step, tokens), which the resumed run will redo
        (and a record cut short by a crash). What those steps spent was spent: their energy, cost and CO2 stay,
        summed in one "redone" record that the run's totals count."""
        if not self.path.exists():
            return
        records = self.records()
        kept = [r for r in records if r.get("step", 0) <= step]
        dropped = [r for r in records if r.get("step", 0) > step]
        spent = {k: interval_total(dropped, k) for k in ("energy_kwh", "cost_usd", "co2_kg")}
        if any(v is not None for v in spent.values()):
            kept.append({"kind": "redone", "step": step, "tokens": tokens, **spent,
                         "energy_source": energy_source(dropped)})
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def __call__(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self, kind: str | None = None) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for i, line in enumerate(self.path.read_text().splitlines(), 1):
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:  # a record cut short by a crash (or an edit): the rest still counts
                warnings.warn(f"{self.path}:{i}: not a JSON record, skipped: {line[:60]!r}", stacklevel=2)
                continue
            if isinstance(record, dict) and (kind is None or record.get("kind") == kind):
                out.append(record)
        return out


def describe_plan(cfg: RunConfig, world_size: int = 1, start: tuple[int, int] = (0, 0)) -> Table:
    """The dry-run table: length, batch, accumulation, and the schedules at a few points. `start`: the (steps,
    tokens) a resumed run has done."""
    t = cfg.train
    ramp = batch_ramp(cfg, world_size)
    steps, tokens = plan_length(ramp, cfg.data.seq_len, t.steps, t.tokens, start) if t.steps or t.tokens else (0, 0)
    table = Table(title="training plan")
    table.add_column("item")
    table.add_column("value", justify="right")
    if start[0]:
        table.add_row("resumed from", f"step {start[0]:,}, {start[1]:,} tokens")
    if steps:
        table.add_row("optimizer steps", f"{steps:,}")
        table.add_row("tokens", f"{tokens:,}")
    else:
        table.add_row("length", f"{t.max_time:.0f} s of training (steps fixed after measuring the first ones)")
    table.add_row("sequence length", str(cfg.data.seq_len))
    table.add_row("global batch (sequences)", f"{ramp(0)} -> {t.batch_size}" if t.batch_size_start else
                  str(t.batch_size))
    table.add_row("tokens per step", f"{t.batch_size * cfg.data.seq_len:,}")
    table.add_row("micro-batch x accumulation x ranks",
                  f"{t.micro_batch_size} x {t.batch_size // (t.micro_batch_size * world_size)} x {world_size}")
    o = cfg.optim
    table.add_row("lr schedule", f"{o.schedule}, peak {o.lr:g}, warmup {o.warmup:g} {o.unit}, "
                                 f"min {o.min_lr_ratio:g}x")
    if steps:
        schedule = lr_schedule(o, steps, tokens)
        for frac in (0.0, 0.01, 0.1, 0.5, 0.8, 0.9, 0.99):
            table.add_row(f"  lr at {frac:.0%}", f"{schedule(frac * schedule.total):.3g}")
    table.add_row("MTP weight λ", f"{cfg.mtp.weight} -> {cfg.mtp.weight_after} at {cfg.mtp.switch_at:.0%}"
                  if cfg.model.num_nextn_predict_layers else "no MTP modules")
    table.add_row("bias update γ", f"{cfg.balance.bias_update_speed} until {cfg.balance.bias_freeze_at:.0%}")
    table.add_row("balance loss α", str(cfg.balance.seq_aux_alpha))
    try:
        device = pick_device(t.device)
        table.add_row("dtype / device", f"{pick_dtype(t.dtype, device)} / {device}")
    except ConfigError:  # a config for another machine (a GPU plan checked on a laptop)
        table.add_row("dtype / device", f"{t.dtype} / {t.device} (not on this machine)")
    return table


def _peak(cfg: RunConfig, device: torch.device) -> tuple[float, str]:
    """Peak FLOP/s per rank that MFU is relative to, and where the figure comes from."""
    if cfg.cost.peak_flops > 0:
        return cfg.cost.peak_flops, "given (cost.peak_flops)"
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # a probe must not move the RNG
        return peak_flops(device, cfg.train.dtype)


def _machines(world: World) -> int:
    """How many machines the ranks span (torchrun sets LOCAL_WORLD_SIZE): energy is metered on rank 0's only."""
    return max(world.size // int(os.environ.get("LOCAL_WORLD_SIZE", world.size)), 1)


@dataclass
class RunResult:
    run_dir: Path
    stop_reason: str
    summary: dict[str, Any]


def check_run(cfg: RunConfig, run_dir: Path, resuming: bool, data: bool = True) -> Path:
    """What a run checks before it builds anything, and `--dry-run` with it: a new run's folder holds no run; the
    data folder is prepared and its tokenizer fits model.vocab_size. Returns the data folder."""
    if not resuming and latest_checkpoint(run_dir) is not None:
        raise ConfigError(f"{run_dir} already holds a run: continue it with `nanoseek train --resume {run_dir}` "
                          "or choose another train.out_dir")
    path = data_folder(cfg, run_dir)
    if not data:
        return path
    if not cfg.data.path or not (path / "index.json").is_file():
        raise ConfigError(f"data.path={cfg.data.path!r} is not a prepared data folder (no index.json): run "
                          "`nanoseek data prepare --input ... --tokenizer ... --out DIR` and set data.path=DIR")
    from nanoseek.data.shards import read_index

    vocab = read_index(path).get("vocab_size") or 0
    if vocab > cfg.model.vocab_size:
        raise ConfigError(f"the data's tokenizer has {vocab} tokens but model.vocab_size={cfg.model.vocab_size}; "
                          f"set model.vocab_size={vocab}")
    return path


def data_folder(cfg: RunConfig, run_dir: Path) -> Path:
    """data.path as given (from the working directory), or else from a folder above the run, where `nanoseek demo`
    keeps it: a report or a resume started from another directory still finds the data."""
    path = Path(cfg.data.path)
    if cfg.data.path and not path.is_absolute() and not (path / "index.json").is_file():
        found = [base / path for base in Path(run_dir).resolve().parents if (base / path / "index.json").is_file()]
        return found[0] if found else path
    return path


def _data(cfg: RunConfig, world: World, run_dir: Path) -> tuple[Any, list[tuple[torch.Tensor, torch.Tensor]], Path]:
    from nanoseek.data.loader import Batches, eval_batches
    from nanoseek.data.tokenizer import DataError

    path = check_run(cfg, run_dir, resuming=True)  # (the run folder was checked before)
    from nanoseek.data.shards import DamagedShard, TokenStream, read_index
    from nanoseek.io import sha256_file

    made_with = read_index(path).get("tokenizer_sha256")
    if made_with and (path / "tokenizer.json").is_file() and sha256_file(path / "tokenizer.json") != made_with:
        raise DataError(f"{path / 'tokenizer.json'} is not the tokenizer the shards of {path} were made with (its "
                        "checksum differs from index.json's): put that one back, or prepare the data again with "
                        "this one")
    # one rank per machine checks the shards' sha256 (the others read the same files; sizes are checked by all)
    verify = os.environ.get("LOCAL_RANK", "0") == "0"
    train = Batches(TokenStream(path, "train", verify), split="train", seq_len=cfg.data.seq_len, seed=cfg.train.seed,
                    rank=world.rank, world_size=world.size)
    val: list[tuple[torch.Tensor, torch.Tensor]] = []
    if cfg.eval.batches:
        try:
            val = eval_batches(TokenStream(path, "val", verify), split="val", seq_len=cfg.data.seq_len,
                               batch_size=cfg.train.micro_batch_size, max_batches=cfg.eval.batches)
        except DamagedShard:  # damage stops the run, as a damaged train shard does
            raise
        except DataError as e:  # e.g. prepared with --val-fraction 0, or one short held-out document
            warnings.warn(f"no validation loss in this run: {e}. Prepare the data with a larger --val-fraction "
                          "for one, or set eval.batches=0 to silence this", stacklevel=2)
        # every rank evaluates or none does: evaluation runs collectives (FSDP2's gathers, EP's exchanges)
        if world.max_int(int(not val)):
            val = []
    return train, val, path


def note_data_use(cfg: RunConfig, world: World, data_tokens: int, vocab: int) -> None:
    """Say when a run will read its data many times over, or carries far more vocabulary than its tokenizer."""
    t = cfg.train
    if not world.is_main:
        return
    if t.steps or t.tokens:
        _, planned = plan_length(batch_ramp(cfg, world.size), cfg.data.seq_len, t.steps, t.tokens)
        if planned > 4 * data_tokens:
            console.print(f"note: {planned:,} tokens of training on {data_tokens:,} of data: "
                          f"{planned / data_tokens:.0f} passes over the same text (past ~4 the model memorises more "
                          "than it learns)",
                          highlight=False, soft_wrap=True)
    if cfg.model.vocab_size > 2 * vocab:
        console.print(f"note: model.vocab_size={cfg.model.vocab_size} for a {vocab}-token tokenizer: set "
                      f"model.vocab_size={vocab} (the extra rows are parameters that never see a token)",
                      highlight=False, soft_wrap=True)


def _sampler(cfg: RunConfig, tokenizer: Any, device: torch.device, val: list) -> Any:
    prompts = list(cfg.eval.prompts)
    if not prompts and val:  # the start of validation windows
        prompts = [_plain_text(tokenizer, val[0][0][i, :8].tolist())
                   for i in range(min(cfg.eval.samples, len(val[0][0])))]

    def sample(model: NanoSeek, step: int) -> list[dict[str, str]]:
        chosen = prompts[: cfg.eval.samples]
        params = [SamplingParams(max_tokens=cfg.eval.sample_tokens, temperature=cfg.eval.temperature,
                                 top_k=cfg.eval.top_k, seed=cfg.train.seed + step * 1000 + i)  # never the global RNG
                  for i in range(len(chosen))]
        with gathered(model):  # whole weights for the engine: FSDP's shards, the expert-parallel layers' experts
            outs = Engine(model, tokenizer, max_batch=max(1, len(chosen))).generate(
                [[tokenizer.bos_id, *tokenizer.encode(p)] for p in chosen], params)
        return [{"prompt": p, "completion": "".join(e.text for e in evs)} for p, evs in zip(chosen, outs)]

    return sample


def _plain_text(tokenizer: Any, ids: list[int]) -> str:
    """The text of a window's first stretch between special tokens (a window may start with a document's BOS,
    which the sampler adds anyway, or hold the end of one document and the start of the next)."""
    special = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.user_id, tokenizer.assistant_id}
    while ids and ids[0] in special:
        ids = ids[1:]
    stretch = next((ids[:i] for i, t in enumerate(ids) if t in special), ids)
    # a window starts, and the stretch ends, wherever the tokens fall: drop the pieces of a character at either end
    while stretch and tokenizer.decode(stretch).startswith("\ufffd"):
        stretch = stretch[1:]
    while stretch and tokenizer.decode(stretch).endswith("\ufffd"):
        stretch = stretch[:-1]
    return tokenizer.decode(stretch)


def resumed_config(run_dir: Path, overrides: list[str] | None = None) -> RunConfig:
    """The configuration a run folder was started with (its run.toml), with `key=value` overrides."""
    if not (run_dir / "run.toml").is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no run.toml){runs_inside(run_dir)}")
    fixed = [o for o in overrides or [] if o.split("=", 1)[0].strip().startswith("model.")]
    if fixed:
        raise ConfigError(f"{', '.join(fixed)}: the model cannot change when a run resumes (its checkpoints hold "
                          "this model's weights); start a new run for another model")
    return load_run_config(run_dir / "run.toml", overrides)


def _record_overrides(cfg: RunConfig, run_dir: Path) -> list[str]:
    """Settings changed on resume go into run.toml, so that the next resume (a requeued job) continues with them.
    Returns them ("section.key=value")."""
    old = load_run_config(run_dir / "run.toml").to_dict()
    new = cfg.to_dict()
    new["train"]["out_dir"] = old["train"]["out_dir"]  # where it was started from; the run is where run.toml is
    changed = [f"{section}.{key}={value!r}" for section, fields in new.items() for key, value in fields.items()
               if old.get(section, {}).get(key) != value]
    if changed:
        write_atomic(run_dir / "run.toml", to_toml(new))
        console.print(f"run.toml now records {', '.join(changed)}", highlight=False)
    return changed


def runs_inside(path: Path) -> str:
    """'': or, for a folder that holds run folders (`nanoseek demo --out`, a parent of train.out_dir), a hint
    naming them for an error message about `path`."""
    runs = sorted((r.parent for r in path.glob("*/run.toml")), key=lambda r: r.stat().st_mtime, reverse=True)
    if not runs:
        return ""
    names = ", ".join(str(r) for r in runs[:3]) + (", ..." if len(runs) > 3 else "")
    return f"; it holds run folders: pass one of them (newest first: {names})"


def train(cfg: RunConfig | None = None, resume: str | Path | None = None, overrides: list[str] | None = None,
          world: World | None = None, progress: bool = True, batches: Any = None,
          val: list | None = None) -> RunResult:
    """Run (or resume) a training run; under torchrun, this rank's part of it. To resume, `cfg` may be the run's
    config already read (`resumed_config`). `batches`/`val` replace the prepared data (tests, synthetic tasks)."""
    if resume is not None and cfg is None:
        cfg = resumed_config(Path(resume), overrides)
    elif cfg is None:
        raise ConfigError("train() needs a config or a run folder to resume")
    run_dir = Path(cfg.train.out_dir) if resume is None else Path(resume)
    check_run(cfg, run_dir, resuming=resume is not None, data=False)
    own_world = world is None
    world = world or init_world(cfg.parallel)
    try:
        return _train(cfg, run_dir, resume is not None, world, progress, batches, val)
    except DistError as e:
        raise DistributedError(f"rank {world.rank}: lost contact with another rank ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}). It failed, was killed or stalled "
                               f"past parallel.timeout={cfg.parallel.timeout:g}s; its own error is above.") from e
    finally:
        if own_world:
            shutdown(world)


def _train(cfg: RunConfig, run_dir: Path, resuming: bool, world: World, progress: bool, batches: Any,
           val: list | None) -> RunResult:
    cfg.train.out_dir = str(run_dir)
    device = world.device if isinstance(world, DistWorld) else pick_device(cfg.train.device)
    if device.type == "cuda" and device.index is not None:  # train.device=cuda:1: make it the current GPU too
        torch.cuda.set_device(device)
    cfg.train.dtype = pick_dtype(cfg.train.dtype, device)  # resolved, so that run.toml records what ran
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank

    tokenizer, tokenizer_dir, token_bytes = None, None, None
    if batches is None:
        batches, val, data_dir = _data(cfg, world, run_dir)
        from nanoseek.data.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(data_dir)
        tokenizer_dir = run_dir / "tokenizer"
        token_bytes = torch.as_tensor(tokenizer.token_byte_lengths(), dtype=torch.long)
        note_data_use(cfg, world, len(batches.stream), tokenizer.vocab_size)

    log = MetricsLog(run_dir / "metrics.jsonl")
    model = NanoSeek(cfg.model).to(device)
    wrapped = parallelize(model, world, bf16=cfg.train.dtype == "bf16", cfg=cfg.parallel)
    if world.rank:  # the weights are set: from here each rank draws its own random numbers (dropout masks), and
        torch.manual_seed(cfg.train.seed + world.rank)  # rank 0 those of one process (a resume restores each's)
    if isinstance(world, DistWorld) and world.is_main:
        console.print(world.describe())
    elif not isinstance(world, DistWorld) and (cfg.parallel.dp != "ddp" or cfg.parallel.ep > 1):
        console.print(f"note: parallel.dp={cfg.parallel.dp} and parallel.ep={cfg.parallel.ep} apply to torchrun jobs; "
                      "this single process holds the whole model (torchrun --standalone --nproc-per-node N -m "
                      "nanoseek train ... uses them)")
    opt = make_optimizer(wrapped, cfg, device)
    state = TrainState(world_size=world.size)
    if resuming:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise ConfigError(f"{run_dir} has no complete checkpoint to resume from")
        state = load_checkpoint(ckpt, model, wrapped, opt)
        if state.world_size != world.size:
            if world.is_main:
                console.print(f"resuming a {state.world_size}-rank run on {world.size} rank(s)")
            state.world_size = world.size
        batches.load_state_dict(state.data)
        if world.is_main:
            log.truncate_after(state.step, state.tokens)
            console.print(f"resuming {run_dir} from {ckpt.name} (step {state.step}, {state.tokens:,} tokens)")
            changed = _record_overrides(cfg, run_dir)
            if changed:  # the report says that run.toml alone no longer reproduces the run
                log({"kind": "resume", "step": state.step, "tokens": state.tokens, "changed": changed})
            (run_dir / "summary.json").unlink(missing_ok=True)  # an earlier session's: this one writes its own
    elif world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "run.toml", to_toml(cfg.to_dict()))
        if tokenizer is not None:
            tokenizer.model_max_length = cfg.model.max_position_embeddings  # what transformers truncates to
            tokenizer.save(tokenizer_dir)
            fsync_dir(tokenizer_dir)
        log.path.unlink(missing_ok=True)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.train.dtype == "bf16" else nullcontext()
    sample = _sampler(cfg, tokenizer, device, val) if tokenizer is not None and cfg.eval.samples else None
    if sample is not None and cfg.parallel.cpu_offload:  # offloaded because the model does not fit on the GPU
        sample = None
        if world.is_main:
            console.print("note: no samples under parallel.cpu_offload (the engine would need the whole model on "
                          "the GPU); eval.samples=0 silences this")

    def evaluate(m: NanoSeek, s: TrainState) -> dict[str, Any]:  # every rank runs it: sharded weights need all
        out: dict[str, Any] = evaluate_loss(m, val, device, token_bytes, autocast) if val else {}
        if sample is not None:
            out["samples"] = sample(m, s.step)
        return out

    class _Batches:  # keeps the loader's position in the train state, so checkpoints carry it
        def next(self, n: int):
            x = batches.next(n)
            state.data = batches.state_dict()
            return x

        def state_dict(self) -> dict[str, Any]:
            return batches.state_dict()

        def load_state_dict(self, d: dict[str, Any]) -> None:
            batches.load_state_dict(d)

    trainer = Trainer(cfg, model, _Batches(), run_dir, device, state, opt, world, evaluate if val or sample else None,
                      log if world.is_main else None, tokenizer_dir if tokenizer is not None else None,
                      wrapped=torch.compile(wrapped) if cfg.train.compile else wrapped)

    flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len, mtp=cfg.model.num_nextn_predict_layers > 0)
    peak, peak_source = _peak(cfg, device) if world.is_main else (0.0, "")
    meter = EnergyMeter(Tariff.of(cfg.cost, _machines(world)), device, measure=cfg.cost.energy,
                        whole_machine=world.size > 1) \
        if world.is_main else None
    # tokens/s and MFU over the steps' own time (state.elapsed): evaluations and checkpoints are not training
    window: dict[str, float] = {"elapsed": state.elapsed, "tokens": state.tokens}
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                   disable=not (progress and world.is_main), transient=False)
    task = bar.add_task("training", total=state.total_steps or None, completed=state.step)

    def on_step(r: StepResult, dt: float) -> None:
        s = trainer.state
        bar.update(task, completed=s.step, total=s.total_steps or None)
        if s.step % cfg.train.log_every and not r.skipped and not trainer.done():  # the last step is always logged
            return
        tps = (s.tokens - window["tokens"]) / max(s.elapsed - window["elapsed"], 1e-9)
        window.update(elapsed=s.elapsed, tokens=s.tokens)
        record = {"kind": "train", "step": s.step, "tokens": s.tokens, "loss": r.loss, "mtp_loss": r.mtp_loss,
                  "balance_loss": r.balance_loss, "lr": r.lr, "batch_size": r.batch_size, "grad_norm": r.grad_norm,
                  "tokens_per_s": tps, "expert_load_max_over_mean": r.expert_load, "skipped": r.skipped,
                  "elapsed": s.elapsed, "ranks": world.size, "machines": _machines(world)}
        if meter is not None:  # rank 0, once per log interval
            record.update(mfu=tps * flops_per_token / (peak * world.size), flops_per_token=flops_per_token,
                          peak_flops=peak, peak_source=peak_source, **meter.interval())
            log(record)
        mtp = f" mtp {r.mtp_loss:.3f}" if r.mtp_loss is not None else ""
        bar.update(task, description=f"step {s.step} loss {r.loss:.3f}{mtp} lr {r.lr:.2e} {tps:,.0f} tok/s")

    started = time.perf_counter()
    try:
        with bar:
            reason = trainer.fit(on_step)
        if meter is not None:  # what came after the last "train" record: its steps, the final evaluation, checkpoint
            log({"kind": "final", "step": trainer.state.step, "tokens": trainer.state.tokens, **meter.interval()})
    finally:
        if meter is not None:
            meter.close()
    wall = time.perf_counter() - started
    summary = _summary(cfg, trainer.state, log, model, wall, reason, flops_per_token, _machines(world))
    if world.is_main:
        write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    return RunResult(run_dir, reason, summary)


METERED_BESIDE = ("final", "redone")  # records whose energy, cost and CO2 count beside the "train" intervals


def energy_source(records: list[dict[str, Any]]) -> str:
    """measured if every metered record's energy was, estimated if any was, off if none was metered."""
    sources = {r["energy_source"] for r in records if "energy_source" in r}
    return "measured" if sources == {"measured"} else "estimated" if "estimated" in sources else "off"


def interval_total(records: list[dict[str, Any]], key: str) -> float | None:
    """The sum of a per-interval figure over the records that have it; None when none has."""
    values = [r[key] for r in records if r.get(key) is not None]
    return sum(values) if values else None


def mean_mfu(records: list[dict[str, Any]]) -> float | None:
    """MFU over the training time of the `train` records: each interval's MFU weighted by its duration (tokens in
    it / its tokens/s), so that it equals the FLOPs done over the FLOPs the peak allows in that time."""
    weighted, seconds, before = 0.0, 0.0, 0
    for r in records:
        if r.get("mfu") is not None and r.get("tokens_per_s"):
            dt = (r["tokens"] - before) / r["tokens_per_s"]
            weighted, seconds = weighted + r["mfu"] * dt, seconds + dt
        before = r["tokens"]
    return weighted / seconds if seconds else None


def _cost_summary(cfg: RunConfig, state: TrainState, log: MetricsLog, flops_per_token: float,
                  machines: int) -> dict[str, Any]:
    """The run's totals: sums over every interval of metrics.jsonl, this session's and earlier ones'."""
    train_records = log.records("train")
    metered = train_records + [r for k in METERED_BESIDE for r in log.records(k)]
    prices = Tariff.of(cfg.cost, machines)
    return {
        "flops_per_token": flops_per_token, "total_flops": state.tokens * flops_per_token,
        "mfu_mean": mean_mfu(train_records),
        "peak_flops": next((r["peak_flops"] for r in reversed(train_records) if "peak_flops" in r), None),
        "peak_source": next((r["peak_source"] for r in reversed(train_records) if "peak_source" in r), None),
        "energy_kwh": interval_total(metered, "energy_kwh"),
        "energy_source": energy_source(metered),
        "energy_method": " | ".join(dict.fromkeys(r["energy_method"] for r in metered if r.get("energy_method"))),
        "energy_scope": energy_scope(machines),
        "cost_usd": interval_total(metered, "cost_usd"), "cost_basis": prices.basis,
        "co2_kg": interval_total(metered, "co2_kg"), "carbon_intensity_g_per_kwh": prices.grid.g_per_kwh,
        "carbon_intensity_source": prices.grid.source,
    }


def _summary(cfg: RunConfig, state: TrainState, log: MetricsLog, model: NanoSeek, wall: float, reason: str,
             flops_per_token: float, machines: int) -> dict[str, Any]:
    train_records = log.records("train")
    evals = [r for r in log.records("eval") if "val_loss" in r]
    return {
        "stop_reason": reason, "steps": state.step, "tokens": state.tokens, "train_seconds": state.elapsed,
        "wall_seconds_this_session": wall, "tokens_per_s": state.tokens / state.elapsed if state.elapsed else 0.0,
        "final_train_loss": train_records[-1]["loss"] if train_records else None,
        "first_train_loss": train_records[0]["loss"] if train_records else None,
        "val_loss": evals[-1]["val_loss"] if evals else None, "val_bpb": evals[-1].get("val_bpb") if evals else None,
        "parameters": model.num_parameters(), "active_parameters": model.num_parameters(active=True),
        "model": cfg.model.to_hf_dict()["architectures"][0], "dtype": cfg.train.dtype,
        **_cost_summary(cfg, state, log, flops_per_token, machines),
        "software": f"nanoseek {__version__}, torch {torch.__version__}, Python {platform.python_version()}",
    }


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title="run summary")
    table.add_column("item")
    table.add_column("value", justify="right")

    def fmt(v: Any) -> str:
        return f"{v:,.4g}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)

    for k, v in summary.items():
        if v is not None:
            table.add_row(k.replace("_", " "), fmt(v))
    return table
