"""`nanoseek train` and `nanoseek generate`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.console import Console

from nanoseek.config import ConfigError
from nanoseek.serve.commands import dtype_args

console = Console()


def split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    """`CONFIG.toml key=value ...`: the first item without '=' is the config file."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def plot_schedule(cfg, path: Path) -> None:
    """Learning rate and batch size over the planned run, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nanoseek.train.loop import batch_ramp
    from nanoseek.train.schedule import lr_schedule, plan_length

    t = cfg.train
    if not (t.steps or t.tokens):
        raise ConfigError("a time-budgeted run has no plan before it starts: set train.steps or train.tokens")
    ramp = batch_ramp(cfg)
    steps, tokens = plan_length(ramp, cfg.data.seq_len, t.steps, t.tokens)
    schedule = lr_schedule(cfg.optim, steps, tokens)
    xs, lrs, bss, seen = [], [], [], 0
    for step in range(steps):
        xs.append(seen / 1e6)
        lrs.append(schedule(step if cfg.optim.unit == "steps" else seen))
        bss.append(ramp(seen))
        seen += bss[-1] * cfg.data.seq_len
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    ax.plot(xs, lrs, color="tab:blue")
    ax.set_xlabel("tokens (millions)")
    ax.set_ylabel("learning rate", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(xs, bss, color="tab:orange")
    ax2.set_ylabel("batch size (sequences)", color="tab:orange")
    ax.set_title(f"{cfg.optim.schedule} schedule, {steps:,} steps, {tokens / 1e6:.1f}M tokens")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def cmd_train(args: argparse.Namespace) -> int:
    from nanoseek.data.shards import read_index
    from nanoseek.train.config import load_run_config
    from nanoseek.train.loop import World
    from nanoseek.train.run import check_run, describe_plan, note_data_use, resumed_config, summary_table, train

    config, overrides = split_config_and_overrides(args.items)
    if args.plot and not args.dry_run:
        raise ConfigError("--plot draws the plan that --dry-run prints: add --dry-run")
    if args.resume and config is not None:
        raise ConfigError("with --resume, give only key=value overrides (the run folder has its config)")
    if not args.resume and config is None:
        raise ConfigError("give a config file: nanoseek train CONFIG.toml [key=value ...]")
    cfg = resumed_config(Path(args.resume), overrides) if args.resume else load_run_config(config, overrides)
    state = _resume_state(Path(args.resume)) if args.resume else None
    if args.dry_run:
        # the checks the run makes first (a config from `nanoseek plan` may not name its data yet)
        data_dir = check_run(cfg, Path(args.resume or cfg.train.out_dir), resuming=bool(args.resume),
                             data=bool(cfg.data.path))
        console.print(describe_plan(cfg, start=(state["step"], state["tokens"]) if state else (0, 0)))
        if cfg.data.path:
            index = read_index(data_dir)
            note_data_use(cfg, World(), index["splits"]["train"]["tokens"], index["vocab_size"])
        else:
            console.print("note: data.path is not set: the run itself needs a prepared data folder")
        if args.plot:
            plot = Path(args.plot)
            plot = plot if plot.suffix else plot.with_name(plot.name + ".png")  # what matplotlib writes
            plot_schedule(cfg, plot)
            console.print(f"schedule plot: {plot}", soft_wrap=True)
        return 0
    start = state["step"] if state else None
    result = train(cfg, resume=args.resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary for the job, not one per rank
        console.print(summary_table(result.summary))
        console.print(f"run folder: {result.run_dir} (stopped: {result.stop_reason})")
        if result.summary.get("steps") == start and result.stop_reason == "done":
            console.print(f"nothing left to train: the run had reached its end at step {start}. To go further, "
                          "resume with a larger train.steps, train.tokens or train.max_time (the one the run is "
                          "set by)", highlight=False)
    return 0 if result.stop_reason in ("done", "time", "signal") else 1


def _resume_state(run: Path) -> dict | None:
    from nanoseek.train.checkpoint import latest_checkpoint, read_state

    ckpt = latest_checkpoint(run) if (run / "checkpoints").is_dir() else None
    return None if ckpt is None else read_state(ckpt)["state"]


def resolve_model_dir(path: Path) -> Path:
    """A run folder means its latest checkpoint; any other folder is taken as a model folder."""
    from nanoseek.train.checkpoint import latest_checkpoint
    from nanoseek.train.run import runs_inside

    if not path.is_dir():
        raise ConfigError(f"{path} is not a folder: give a run folder (train.out_dir) or a model folder "
                          "(config.json + safetensors)")
    if (path / "run.toml").is_file():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise ConfigError(f"run {path} has no checkpoint yet")
        return ckpt
    hint = runs_inside(path)
    if hint and not (path / "config.json").is_file():
        raise ConfigError(f"{path} is not a model folder{hint}")
    if not (path / "config.json").is_file() and (path.parent / "run.toml").is_file():
        raise ConfigError(f"{path} is not a model folder: give the run {path.parent} (its latest checkpoint) or one "
                          f"of its checkpoints, {path}/step_N")
    return path


def cmd_generate(args: argparse.Namespace) -> int:
    from nanoseek.infer import Engine, SamplingParams, load_for_inference
    from nanoseek.infer.text import terminal_safe

    if args.samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {args.samples}")
    SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k).check()
    model, tok = load_for_inference(args.model, args.device, args.expert_dtype, args.dtype, args.matmul_dtype)
    engine = Engine(model, tok, max_batch=args.samples, speculative=args.speculative, kv_dtype=args.kv_dtype)
    prompt = [tok.bos_id, *tok.encode(args.prompt)]
    params = [SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                             seed=args.seed + i) for i in range(args.samples)]
    for i, events in enumerate(engine.generate([prompt] * args.samples, params)):
        console.print(terminal_safe(args.prompt + "".join(e.text for e in events)), markup=False, highlight=False,
                      soft_wrap=True)
        if i + 1 < args.samples:
            console.rule()
    if args.speculative:
        rate = engine.stats()["acceptance_rate"]
        shown = "none proposed (speculation is for greedy: --temperature 0)" if rate is None else f"{rate:.0%}"
        console.print(f"MTP drafts accepted: {shown}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from nanoseek.train.checkpoint import STATE_FILE, checkpoint_steps, export_checkpoint, latest_checkpoint
    from nanoseek.train.run import runs_inside

    run = Path(args.run)
    if (run / STATE_FILE).is_file() and not args.step:  # a checkpoint folder itself
        ckpt: Path | None = run
    else:
        ckpt = run / "checkpoints" / f"step_{args.step:06d}" if args.step else latest_checkpoint(run)
    if ckpt is None or not (ckpt / STATE_FILE).is_file():
        which = f"checkpoint step {args.step}" if args.step else "complete checkpoint"
        kept = checkpoint_steps(run)
        there = f" (it keeps steps {', '.join(map(str, kept))})" if kept else ""
        raise ConfigError(f"no {which} in {run}{there}{runs_inside(run)}")
    export_checkpoint(ckpt, Path(args.out))
    console.print(f"exported {ckpt} -> {args.out} (HF deepseek_v3 layout)")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a model: nanoseek train CONFIG.toml [key=value ...]")
    t.add_argument("items", nargs="*", metavar="CONFIG.toml | key=value",
                   help="a run config (see configs/) and overrides such as train.steps=100 optim.lr=1e-3")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    t.add_argument("--dry-run", action="store_true", help="print the plan (steps, tokens, schedule) and exit")
    t.add_argument("--plot", metavar="PNG", help="with --dry-run: draw the lr and batch-size schedule")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="sample text from a run folder or a model folder")
    g.add_argument("model", help="RUN_DIR (its latest checkpoint) or a model folder with a tokenizer")
    g.add_argument("--prompt", default="")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--samples", type=int, default=1)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    dtype_args(g)
    g.add_argument("--speculative", choices=["mtp"], help="self-speculative decoding with the MTP module (greedy only: "
                   "use --temperature 0)")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("export", help="a run's checkpoint (any number of ranks) as an HF deepseek_v3 model folder")
    e.add_argument("run", help="RUN_DIR")
    e.add_argument("--out", required=True, help="the model folder to write")
    e.add_argument("--step", type=int, default=0, help="which checkpoint (default: the latest)")
    e.set_defaults(func=cmd_export)
