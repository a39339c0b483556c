"""`nanoseek demo` (what `make demo` runs): a DeepSeek-style model learns Python on a laptop CPU in minutes.

1. train a byte-level BPE tokenizer on the Python standard library (the running Python's own sources, offline),
2. tokenize the corpus into shards with a held-out validation split,
3. train configs/demo.toml (the `demo` preset: MLA, 32 fine-grained experts, MTP) for a fixed wall-clock budget,
4. print sampled continuations and the run's summary, then write its report card (report.md, plots, model card
   with energy, cost and CO2) and print the card's summary.
Steps 1-2 are cached under the output folder, so a second demo goes straight to training.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console

from nanoseek.config import ConfigError

console = Console()
REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def run_demo(args: argparse.Namespace) -> int:
    from nanoseek.data.corpora import iter_documents
    from nanoseek.data.shards import prepare
    from nanoseek.data.tokenizer import Tokenizer, train_tokenizer
    from nanoseek.infer.text import terminal_safe
    from nanoseek.report import print_report, write_report
    from nanoseek.train.config import load_run_config
    from nanoseek.train.run import MetricsLog, summary_table, train

    if not args.minutes > 0:
        raise ConfigError(f"--minutes {args.minutes:g}: give the training time in minutes, more than 0")
    out = Path(args.out)
    config = Path(args.config) if args.config else REPO_CONFIGS / "demo.toml"
    if not config.is_file():
        raise ConfigError(f"demo config {config} not found: pass --config PATH (the repository has configs/demo.toml)")
    tok_dir, data_dir = out / "tokenizer", out / "data-python-stdlib"
    t0 = time.perf_counter()
    if not (tok_dir / "tokenizer.json").is_file():
        console.rule("1/4 tokenizer: byte-level BPE on the Python standard library")
        train_tokenizer((d.text for d in iter_documents(["python-stdlib"])), args.vocab_size, tok_dir)
    else:
        cached = Tokenizer.load(tok_dir).vocab_size
        if cached != args.vocab_size:
            raise ConfigError(f"{tok_dir} holds a {cached}-token tokenizer from an earlier demo and --vocab-size is "
                              f"{args.vocab_size}: give another --out folder, or delete {tok_dir} and {data_dir}")
        console.print(f"1/4 tokenizer: reusing {tok_dir}")
    if not (data_dir / "index.json").is_file():
        console.rule("2/4 data: token shards and a validation split")
        prepare(["python-stdlib"], tok_dir, data_dir, val_fraction=0.01, seed=0, progress=not args.no_progress)
    else:
        console.print(f"2/4 data: reusing {data_dir}")
    setup = time.perf_counter() - t0

    run_dir = out / time.strftime("run-%Y%m%d-%H%M%S")
    overrides = [f"data.path={data_dir}", f"train.out_dir={run_dir}", f"train.max_time={args.minutes * 60:g}",
                 f"model.vocab_size={args.vocab_size}", f"train.device={args.device}", *args.overrides]
    cfg = load_run_config(config, overrides)
    console.rule(f"3/4 training the demo model for {args.minutes:g} minute{'' if args.minutes == 1 else 's'}")
    result = train(cfg, progress=not args.no_progress)

    console.rule("4/4 samples and summary")
    evals = MetricsLog(run_dir / "metrics.jsonl").records("eval")
    if evals and evals[-1].get("samples"):
        for s in evals[-1]["samples"]:
            console.print(f"[bold]{s['prompt']!r}[/bold] ->")
            console.print(terminal_safe(s["prompt"] + s["completion"]), markup=False, highlight=False, soft_wrap=True)
            console.rule(style="dim")
    if len(evals) > 1 and "val_loss" in evals[0]:
        console.print(f"validation loss {evals[0]['val_loss']:.3f} -> {evals[-1]['val_loss']:.3f} "
                      f"(bits per byte {evals[0].get('val_bpb', float('nan')):.3f} -> "
                      f"{evals[-1].get('val_bpb', float('nan')):.3f})")
    console.print(summary_table({**result.summary, "setup_seconds": setup}))
    console.print(f"run folder: {run_dir}\nsample more: nanoseek generate {run_dir} --prompt 'def'")
    report = write_report(run_dir)
    console.rule("report card")
    print_report(report)
    return 0


def add_command(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="train the demo model on the Python standard library (make demo)")
    d.add_argument("--minutes", type=float, default=10.0, help="training time budget (default 10)")
    d.add_argument("--out", default="runs/demo", help="where tokenizer, data and runs go (default runs/demo)")
    d.add_argument("--config", help="run config (default: configs/demo.toml of this repository)")
    d.add_argument("--vocab-size", type=int, default=8192)
    d.add_argument("--device", default="auto")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-3")
    d.set_defaults(func=run_demo)
