"""`nanoseek <command>`: the command-line entry point."""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from nanoseek.config import PRESETS, ConfigError, preset
from nanoseek.cost.commands import add_commands as add_plan
from nanoseek.data.commands import add_commands as add_data
from nanoseek.demo import add_command as add_demo
from nanoseek.device import fit_threads_to_quota
from nanoseek.model import NanoSeek, load_pretrained
from nanoseek.model.summary import parameter_counts
from nanoseek.report import add_commands as add_report
from nanoseek.serve.commands import add_commands as add_serve
from nanoseek.train.commands import add_commands as add_train
from nanoseek.train.commands import resolve_model_dir
from nanoseek.train.loop import NonFiniteLossError
from nanoseek.train.parallel import DistributedError

console = Console()


def _fmt(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def parameter_table(model: NanoSeek, title: str) -> Table:
    rows = parameter_counts(model)
    main = [r for r in rows if r.component != "MTP modules"]
    total = sum(r.total for r in main)
    table = Table(title=title)
    table.add_column("component")
    table.add_column("parameters", justify="right")
    table.add_column("active / token", justify="right")
    table.add_column("share", justify="right")
    for r in main:
        table.add_row(r.component, _fmt(r.total), _fmt(r.active), f"{100 * r.total / total:.1f}%")
    table.add_section()
    table.add_row("[bold]model[/bold]", f"[bold]{_fmt(total)}[/bold]",
                  f"[bold]{_fmt(sum(r.active for r in main))}[/bold]", "100%")
    for r in rows:
        if r.component == "MTP modules":
            table.add_row("+ MTP modules (training)", _fmt(r.total), _fmt(r.active), "")
    return table


def describe(model: NanoSeek) -> str:
    c = model.config
    q = f"q_lora_rank {c.q_lora_rank}" if c.q_lora_rank else "plain q_proj"
    return (f"{c.num_hidden_layers} layers ({c.num_dense_layers} dense), hidden {c.hidden_size}, "
            f"{c.num_attention_heads} heads, MLA kv_lora_rank {c.kv_lora_rank}, {q}; MoE {c.n_routed_experts} "
            f"routed (top-{c.num_experts_per_tok}, {c.n_group} groups) + {c.n_shared_experts} shared; "
            f"MTP depth {c.num_nextn_predict_layers}; vocab {c.vocab_size}")


def _load(spec: str) -> NanoSeek:
    """The model's structure without its weights (meta tensors): counting a 671B model needs no 2.7 TB of memory."""
    if spec in PRESETS:
        with torch.device("meta"):
            return NanoSeek(preset(spec))
    if not Path(spec).exists():
        raise ConfigError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor a folder")
    return load_pretrained(resolve_model_dir(Path(spec)), device="meta")  # a run folder: its latest checkpoint


def cmd_info(args: argparse.Namespace) -> int:
    model = _load(args.model)
    console.print(describe(model))
    console.print(parameter_table(model, f"nanoseek model: {args.model}"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek-V3 models on modest hardware")
    sub = p.add_subparsers(dest="command", required=True)

    add_demo(sub)
    add_plan(sub)
    add_train(sub)
    add_serve(sub)
    add_data(sub)
    add_report(sub)

    i = sub.add_parser("info", help="parameter table of a preset or a checkpoint folder")
    i.add_argument("model", help=f"a preset ({', '.join(PRESETS)}), a model folder or a run folder")
    i.set_defaults(func=cmd_info)
    return p


PATH_ERRORS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EROFS, errno.EEXIST}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `train CONFIG --dry-run key=value`: argparse ends a list of positionals at the first flag; take the rest too
    positional = {"train": "items", "demo": "overrides"}.get(args.command)
    if extra and positional and not any(e.startswith("-") for e in extra):
        setattr(args, positional, [*getattr(args, positional), *extra])
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    fit_threads_to_quota()  # before any parallel work: in a container, its CPU quota, not the host's cores
    try:
        return args.func(args)
    except (ValueError, DistributedError, NonFiniteLossError) as e:  # ConfigError, DataError, ...
        console.print("[red]error:[/red]", escape(str(e)), highlight=False, soft_wrap=True)
        return 2
    except OSError as e:  # a path that is missing, not writable, a file where a folder should be, a full disk...
        hint = " (check the path and its permissions)" if e.errno in PATH_ERRORS else ""
        console.print("[red]error:[/red]", escape(str(e)) + hint, highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside training (which saves a checkpoint and stops cleanly itself)
        console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
