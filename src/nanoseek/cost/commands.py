"""`nanoseek plan`: a compute-optimal run for a budget, printed as a table and written as a TOML run config."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nanoseek.cost.hardware import ACCELERATORS
from nanoseek.cost.model import fmt_bytes, fmt_figure
from nanoseek.cost.plan import (
    GPU_MFU,
    GPUS_PER_MACHINE,
    Budget,
    Plan,
    PlanError,
    check_plan_args,
    cpu_hardware,
    gpu_hardware,
    make_cpu_plan,
    make_plan,
    run_config,
)
from nanoseek.data.shards import read_index
from nanoseek.io import write_atomic
from nanoseek.train.config import to_toml

console = Console()


def _n(x: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def plan_table(plan: Plan) -> Table:
    hw, lay, est, c = plan.hardware, plan.layout, plan.estimate, plan.config
    p = est.params
    t = Table(title=f"nanoseek plan: {plan.budget.why} on {hw.count} x {hw.name}")
    t.add_column("item")
    t.add_column("value", justify="right")
    t.add_column("basis", style="dim")
    t.add_row("compute the hardware delivers", f"{plan.available:.3g} FLOPs",
              f"{hw.peak / 1e12:.3g} TFLOP/s ({hw.peak_source}) x {hw.count} x MFU {hw.mfu:.0%} ({hw.mfu_source})")
    t.add_row("scaling-law budget C", f"{plan.compute:.3g} FLOPs", f"{plan.law.name} ({plan.law.source})")
    t.add_section()
    t.add_row("model scale M (non-embedding FLOPs/token)", f"{plan.m:.3g}",
              f"M_opt = {plan.law.m_opt(plan.compute):.3g}")
    t.add_row("parameters: total / active", f"{_n(p.total)} / {_n(p.active)}",
              f"non-embedding {_n(p.non_embedding)} / {_n(p.active_non_embedding)}; MTP {_n(p.mtp)}")
    t.add_row("shape", f"hidden {c.hidden_size} x {c.num_hidden_layers} layers",
              f"{c.num_attention_heads} heads, kv_lora {c.kv_lora_rank}, q_lora {c.q_lora_rank}, "
              f"{c.n_routed_experts} experts top-{c.num_experts_per_tok} + {c.n_shared_experts} shared")
    t.add_row("training tokens", _n(plan.tokens), f"D_opt = {_n(plan.d_opt)}")
    t.add_row("sequence length", str(plan.seq_len), f"vocab {c.vocab_size}")
    t.add_row("global batch", f"{lay.global_batch} sequences = {_n(lay.global_batch * plan.seq_len)} tokens",
              f"B_opt = {_n(plan.law.b_opt(plan.compute))} tokens")
    t.add_row("optimizer steps", f"{plan.steps:,}", "")
    t.add_row("peak learning rate", f"{plan.lr:.3g}", f"η_opt; multistep schedule, warmup {plan.warmup} steps")
    t.add_section()
    ckpt = " + activation checkpointing" if lay.activation_checkpointing else ""
    t.add_row("parallelism", f"{lay.strategy}{ckpt}", f"{hw.dtype} on {hw.count} device(s)")
    t.add_row("micro-batch x accumulation x devices", f"{lay.micro_batch} x {lay.accumulation} x {hw.count}", "")
    m = est.memory
    t.add_row("memory per device (peak)", fmt_bytes(m.peak), f"of {fmt_bytes(hw.memory)} ({hw.memory_source})")
    t.add_row("  weights + grads + AdamW / activations", f"{fmt_bytes(m.weights + m.grads + m.optimizer)} / "
              f"{fmt_bytes(m.saved_activations)}", "per device; activations of one micro-batch")
    t.add_section()
    t.add_row("step time (predicted)", f"{fmt_figure(plan.step_seconds)} s", "")
    t.add_row("training time", f"{fmt_figure(plan.hours)} h", "evaluations and checkpoints not included; the config "
              "stops training at the budget's hours (train.max_time)")
    t.add_row("energy (estimated)", f"{fmt_figure(plan.kwh)} kWh", f"{hw.watts:g} W x {hw.count} ({hw.watts_source})")
    t.add_row("cost", f"${plan.cost_usd:,.2f}" if plan.budget.price_per_hour else "-",
              f"${plan.budget.price_per_hour:g} per device-hour" if plan.budget.price_per_hour else "no price given")
    t.add_row("CO2 (estimated)", f"{fmt_figure(plan.co2_kg)} kg", f"grid: {plan.country}")
    return t


def cmd_plan(args: argparse.Namespace) -> int:
    if args.cpu == bool(args.accelerator):
        raise PlanError("choose the hardware: --accelerator NAME [--count N], or --cpu for this machine")
    seq_len = args.seq_len if args.seq_len is not None else 256 if args.cpu else 2048  # 0 reaches the checks
    index = read_index(args.data) if args.data else None  # the model's vocabulary is the data's tokenizer's
    if index is not None and args.vocab_size is not None and args.vocab_size != index["vocab_size"]:
        raise PlanError(f"--vocab-size {args.vocab_size} but the tokenizer of {args.data} has {index['vocab_size']} "
                        "tokens: leave --vocab-size out (the data's is taken)")
    vocab = index["vocab_size"] if index is not None else args.vocab_size if args.vocab_size is not None else \
        8192 if args.cpu else 32768
    check_plan_args(seq_len, vocab, args.country)  # before a CPU plan's minutes of measuring
    if args.cpu and (args.count != 1 or args.mfu != GPU_MFU):
        raise PlanError("--count and --mfu are for --accelerator: a --cpu plan is this one machine, at the "
                        "utilisation it measures")
    if args.cpu:
        budget = Budget.make(1, usd=args.budget_usd, price_per_hour=args.price_per_hour, hours=args.hours)
        console.print("measuring this CPU (matmul probe, a few training steps of the demo and the planned model) ...")
        hw = cpu_hardware(args.dtype, args.watts, seq_len)
        plan = make_cpu_plan(budget, hw, seq_len, vocab, country=args.country)
    else:
        hw = gpu_hardware(args.accelerator, args.count, mfu=args.mfu, dtype=args.dtype, watts=args.watts)
        budget = Budget.make(hw.count, usd=args.budget_usd, price_per_hour=args.price_per_hour, hours=args.hours)
        plan = make_plan(budget, hw, seq_len, vocab, country=args.country)
    console.print(plan_table(plan))
    notes = list(plan.notes)
    if index is not None and plan.tokens > 4 * index["splits"]["train"]["tokens"]:
        have = index["splits"]["train"]["tokens"]
        notes.append(f"the plan trains on {plan.tokens:,} tokens and {args.data} holds {have:,}: "
                     f"{plan.tokens / have:.0f} passes over the same text, past the ~4 that still help (Muennighoff "
                     "et al. 2023): more data, or a smaller budget")
    for note in notes:
        console.print(f"note: {note}", soft_wrap=True)
    cfg = run_config(plan, data_path=args.data, out_dir=args.run_dir)
    header = (f"# written by `nanoseek plan`: {plan.budget.why} on {hw.count} x {hw.name}\n"
              f"# {plan.law.name} scaling laws ({plan.law.source}): C = {plan.compute:.3g} FLOPs, "
              f"{plan.tokens:,} tokens, predicted {plan.hours:.3g} h at MFU {plan.hardware.mfu:.1%} "
              f"({plan.hardware.mfu_source})\n"
              + ("" if index is not None else
                 f"# set data.path to a prepared folder whose tokenizer has {plan.config.vocab_size} tokens\n"))
    if hw.device != "cpu" and plan.budget.price_per_hour:
        machines = -(-hw.count // GPUS_PER_MACHINE)
        header += f"# cost.price_per_hour is per machine: {machines} machine(s) of {hw.count / machines:g} devices\n"
    write_atomic(Path(args.out), header + to_toml(cfg.to_dict()))
    console.print(f"run config: {args.out}  (nanoseek train {args.out} --dry-run)")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="a compute-optimal model, tokens and run config for a budget",
                       description="Size a run by DeepSeek LLM's scaling laws: model, tokens, batch, parallelism, "
                                   "time, kWh, $ and CO2; writes a TOML run config.")
    p.add_argument("--budget-usd", type=float, help="money to spend (needs --price-per-hour)")
    p.add_argument("--price-per-hour", type=float, help="USD per device-hour")
    p.add_argument("--hours", type=float, help="wall-clock hours (with --budget-usd, the tighter one binds)")
    p.add_argument("--accelerator", help=f"one of {', '.join(ACCELERATORS)}")
    p.add_argument("--count", type=int, default=1, help="number of accelerators (default 1)")
    p.add_argument("--cpu", action="store_true", help="this machine's CPU (measured: matmul probe + demo steps)")
    p.add_argument("--mfu", type=float, default=GPU_MFU,
                   help=f"assumed model FLOPs utilisation on GPUs (default {GPU_MFU})")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--seq-len", type=int, help="sequence length (default 2048 on GPUs, 256 on a CPU)")
    p.add_argument("--vocab-size", type=int, help="the tokenizer's size (default 32768 on GPUs, 8192 on a CPU)")
    p.add_argument("--country", default="world", help="ISO 3166-1 alpha-3 code of the grid for CO2 (default world)")
    p.add_argument("--watts", type=float, help="power per device for the energy estimate (default: board power)")
    p.add_argument("--data", default="", help="prepared data folder to put in the config")
    p.add_argument("--run-dir", default="runs/planned", help="train.out_dir of the config")
    p.add_argument("--out", default="plan.toml", help="where to write the run config (default plan.toml)")
    p.set_defaults(func=cmd_plan)
