"""`nanoseek report RUN_DIR`: a training run's report card, from what the run wrote (run.toml, metrics.jsonl,
summary.json, the data's index.json).

    RUN_DIR/report/report.md          the figures, the plots and a model card: architecture, data, tokens, compute,
                                      cost, energy, CO2 (each with how it was obtained), evaluation, how to reproduce
    RUN_DIR/report/loss.png           training and validation loss, validation bits per byte
    RUN_DIR/report/schedule.png       learning rate and batch size
    RUN_DIR/report/throughput.png     tokens/s and MFU
    RUN_DIR/report/expert_load.png    max/mean expert load of every MoE layer (1 = balanced)
    RUN_DIR/report/energy.png         cumulative energy, cost and CO2
"""

from __future__ import annotations

import argparse
import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from nanoseek.config import ConfigError, load_toml
from nanoseek.cost.energy import Tariff, energy_scope
from nanoseek.cost.model import fmt_figure
from nanoseek.data.shards import read_index
from nanoseek.data.tokenizer import DataError
from nanoseek.io import write_atomic
from nanoseek.model import NanoSeek
from nanoseek.model.summary import parameter_counts
from nanoseek.train.config import RunConfig, run_config_from_dict
from nanoseek.train.run import METERED_BESIDE, MetricsLog, data_folder, interval_total, mean_mfu, runs_inside

console = Console()


@dataclass
class RunRecords:
    """What a run folder holds, read once."""

    dir: Path
    cfg: RunConfig
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    final: list[dict[str, Any]]  # metered outside the train records: the tail of a session, steps redone on resume
    plans: list[dict[str, Any]]
    summary: dict[str, Any]
    resumes: list[dict[str, Any]]  # resumes that changed settings

    @classmethod
    def load(cls, run_dir: str | Path) -> RunRecords:
        run_dir = Path(run_dir)
        if not (run_dir / "run.toml").is_file() or not (run_dir / "metrics.jsonl").is_file():
            raise ConfigError(f"{run_dir} is not a training run folder (it needs run.toml and metrics.jsonl): pass "
                              f"the train.out_dir of a `nanoseek train` run{runs_inside(run_dir)}")
        records = MetricsLog(run_dir / "metrics.jsonl").records()  # a line cut by a crash is skipped, with a warning
        kind = lambda k: [r for r in records if r.get("kind") == k]
        if not kind("train"):
            raise ConfigError(f"{run_dir}/metrics.jsonl has no training records yet: report once a log interval "
                              "(train.log_every steps) has passed")
        summary_path = run_dir / "summary.json"
        summary = _json_object(summary_path) if summary_path.is_file() else {}
        last_step = max(r.get("step", 0) for r in kind("train") + kind("final"))
        if summary and summary.get("steps") != last_step:  # an earlier session's, and a later one was cut short
            warnings.warn(f"{summary_path} is from step {summary.get('steps')} but the records go to step "
                          f"{last_step}: the report is made from the records", stacklevel=2)
            summary = {}
        return cls(run_dir, run_config_from_dict(load_toml(run_dir / "run.toml")), kind("train"),
                   [r for r in kind("eval") if "val_loss" in r], [r for k in METERED_BESIDE for r in kind(k)],
                   kind("plan"), summary, kind("resume"))


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON object the run wrote, or {} with a warning if it was damaged (the report is made from the rest)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        data = e
    if not isinstance(data, dict):
        warnings.warn(f"{path} is not a JSON object ({data}): the report leaves it out", stacklevel=2)
        return {}
    return data


@dataclass
class Report:
    path: Path  # report.md
    plots: list[Path]
    lines: list[str]  # the few lines the CLI and the demo print


# ---- numbers as text -----------------------------------------------------------------------------------------
def _count(n: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _energy(kwh: float | None) -> str:
    if kwh is None:
        return "not measured"
    return f"{fmt_figure(kwh)} kWh" if kwh >= 1 else f"{fmt_figure(kwh * 1000)} Wh"


def _co2(kg: float | None) -> str:
    if kg is None:
        return "not computed (no energy)"
    return f"{fmt_figure(kg)} kg CO2e" if kg >= 1 else f"{fmt_figure(kg * 1000)} g CO2e"


def _usd(x: float | None) -> str:
    if x is None:
        return "not computed"
    return f"{x:,.2f} USD" if x >= 1 else f"{x:.2g} USD"


def _seconds(s: float) -> str:
    return f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"


def _val(r: dict[str, Any], key: str, fmt: str = ".4g") -> str:
    return "n/a" if r.get(key) is None else format(r[key], fmt)


# ---- plots -------------------------------------------------------------------------------------------------------
def _plots(run: RunRecords, out: Path) -> list[Path]:
    """One PNG per topic; every axis says what it shows and in which unit."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    tr = run.train
    x = [r["tokens"] for r in tr]
    dots = {"marker": "o"} if len(tr) < 2 else {}  # a line through one point draws nothing
    figures = _figures(run)  # summary.json's, or the records' so far
    paths = []

    def panels(n: int, width: float = 6.0) -> tuple[Any, list[Any]]:
        fig, axes = plt.subplots(1, n, figsize=(width * n, 4.2), dpi=110, squeeze=False)
        for ax in axes[0]:
            ax.xaxis.set_major_formatter(EngFormatter())
            ax.set_xlabel("tokens trained")
            ax.grid(alpha=0.3)
        return fig, list(axes[0])

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        paths.append(out / f"{name}.png")
        png = io.BytesIO()
        fig.savefig(png, format="png")
        write_atomic(paths[-1], png.getvalue())
        plt.close(fig)

    def empty(ax: Any, text: str) -> None:
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray", wrap=True)

    fig, (loss, bpb) = panels(2)
    loss.plot(x, [r["loss"] for r in tr], label="train (next token)", color="tab:blue", **dots)
    mtp = [(r["tokens"], r["mtp_loss"]) for r in tr if r.get("mtp_loss") is not None]
    if mtp:
        loss.plot(*zip(*mtp), label="train (MTP, token after next)", color="tab:cyan", alpha=0.8, **dots)
    if run.evals:
        loss.plot([e["tokens"] for e in run.evals], [e["val_loss"] for e in run.evals], "o-", color="tab:red",
                  label="validation (next token)")
    loss.set(title="Loss", ylabel="cross-entropy (nats per token)")
    loss.legend()
    bpb_points = [(e["tokens"], e["val_bpb"]) for e in run.evals if e.get("val_bpb") is not None]
    if bpb_points:
        bpb.plot(*zip(*bpb_points), "o-", color="tab:red")
    else:
        empty(bpb, "no validation bits per byte\n(needs validation data with a tokenizer)")
    bpb.set(title="Validation bits per byte (lower is better)", ylabel="bits per byte of text")
    save(fig, "loss")

    fig, (lr, bs) = panels(2)
    lr.plot(x, [r["lr"] for r in tr], color="tab:blue", **dots)
    lr.set(title=f"Learning rate ({run.cfg.optim.schedule} schedule)", ylabel="learning rate")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    bs.step(x, [r["batch_size"] for r in tr], where="post", color="tab:orange")
    bs.set(title="Global batch size", ylabel="sequences per optimizer step", ylim=(0, None))
    save(fig, "schedule")

    fig, (tps, mfu) = panels(2)
    tps.plot(x, [r["tokens_per_s"] for r in tr], color="tab:green", **dots)
    ranks = tr[-1].get("ranks", 1)
    tps.set(title="Throughput" + (f", {ranks} ranks together" if ranks > 1 else ""), ylabel="tokens per second",
            ylim=(0, None))
    mfu_points = [(r["tokens"], 100 * r["mfu"]) for r in tr if r.get("mfu") is not None]
    if mfu_points:
        mfu.plot(*zip(*mfu_points), color="tab:purple", **dots)
        mfu.set(ylim=(0, None))
    else:
        empty(mfu, "MFU not recorded by this run")
    mfu.set(title=f"Model FLOPs utilisation vs {tr[-1].get('peak_source', 'peak')}", ylabel="MFU (% of peak)")
    save(fig, "throughput")

    fig, (ax,) = panels(1, width=9.0)
    loads = [(r["tokens"], r["expert_load_max_over_mean"]) for r in tr if r.get("expert_load_max_over_mean")]
    if loads:
        c = run.cfg.model
        n = len(loads[0][1])
        names = [f"layer {c.num_dense_layers + i}" if i < c.num_moe_layers else f"MTP {i - c.num_moe_layers + 1}"
                 for i in range(n)]
        colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, n))
        for i in range(n):
            ax.plot([t for t, _ in loads], [v[i] for _, v in loads], color=colors[i], label=names[i], **dots)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="perfect balance")
        ax.legend(ncol=max(1, math.ceil((n + 1) / 8)), fontsize="small", loc="upper right")
        ax.set(ylim=(0, None))
    else:
        empty(ax, "no MoE layers")
    ax.set(title="Expert load balance per MoE layer", ylabel="busiest expert's load / mean load")
    save(fig, "expert_load")

    fig, (en, money, co2) = panels(3, width=5.0)
    metered = sorted(tr + run.final, key=lambda r: (r["tokens"], r.get("kind") == "final"))
    points = [(0, 0.0, 0.0, 0.0)] + [(r["tokens"], r["energy_kwh"], r.get("cost_usd") or 0.0, r.get("co2_kg") or 0.0)
                                     for r in metered if r.get("energy_kwh") is not None]
    if len(points) > 1:
        source = figures.get("energy_source") or metered[-1].get("energy_source", "")
        xs = [p[0] for p in points]
        cum = lambda i, scale: np.cumsum([p[i] for p in points]) * scale
        kwh = sum(p[1] for p in points) >= 1
        en.plot(xs, cum(1, 1 if kwh else 1000), color="tab:olive")
        en.set(title=f"Cumulative energy ({source})", ylabel="energy (kWh)" if kwh else "energy (Wh)")
        money.plot(xs, cum(2, 1), color="tab:green")
        kg = sum(p[3] for p in points) >= 1
        co2.plot(xs, cum(3, 1 if kg else 1000), color="tab:gray")
        co2.set(ylabel="CO2 (kg CO2e)" if kg else "CO2 (g CO2e)")
        for ax in (en, money, co2):
            ax.set(ylim=(0, None))
    else:
        for ax in (en, money, co2):
            empty(ax, "energy not measured\n(cost.energy = false)")
    money.set(title=f"Cumulative cost at {figures.get('cost_basis') or 'n/a'}", ylabel="cost (USD)")
    co2.set(title=f"Cumulative CO2 at {figures.get('carbon_intensity_g_per_kwh') or 0:.4g} gCO2e/kWh")
    save(fig, "energy")
    return paths


# ---- the card ----------------------------------------------------------------------------------------------------
def _data_section(cfg: RunConfig, run_dir: Path) -> list[str]:
    index_path = data_folder(cfg, run_dir) / "index.json"
    lines = [f"- prepared data: `{cfg.data.path}`, windows of {cfg.data.seq_len} tokens"]
    if not index_path.is_file():
        return [*lines, f"- (no `{cfg.data.path}` from the working directory or a folder above the run: no document "
                        "or token counts)"]
    try:
        index = read_index(index_path.parent)
    except DataError as e:
        return [*lines, f"- (the data's index cannot be read: {e})"]
    lines.append(f"- sources: {', '.join(f'`{s}`' for s in index.get('sources', []))}")
    for split, s in index.get("splits", {}).items():
        lines.append(f"- {split}: {s['documents']:,} documents, {s['tokens']:,} tokens, {s['bytes']:,} bytes of text")
    lines.append(f"- tokenizer: byte-level BPE, {index.get('vocab_size', '?')} tokens "
                 f"(sha256 `{index.get('tokenizer_sha256', '?')[:16]}…`)")
    return lines


def _reproduce(run: RunRecords) -> list[str]:
    """The exact command; a time-budgeted run is pinned to the step count it reached on its machine."""
    args = [f"{run.dir}/run.toml", "train.out_dir=NEW_RUN_DIR"]
    t = run.cfg.train
    if t.max_time and not (t.steps or t.tokens) and run.plans:
        args += [f"train.steps={run.plans[-1]['total_steps']}", "train.max_time=0"]
    lines = ["```bash", "nanoseek train " + " ".join(args), "```",
             f"with the prepared data at `{run.cfg.data.path}` (run.toml holds every setting, the seed included)."]
    if len(args) > 2:
        planned = run.plans[-1]["total_steps"]
        lines.append(f"The run was budgeted to {t.max_time:g} s; its plan fixed {planned} steps on the machine it ran "
                     "on, which the command pins so that the schedule is the same"
                     + (f" (the run itself stopped at step {run.summary['steps']} when its time ran out)."
                        if run.summary.get("stop_reason") == "time" else "."))
    if run.resumes:
        changes = "; ".join(f"at step {r['step']:,}: {', '.join(r['changed'])}" for r in run.resumes)
        lines.append(f"The run was resumed with changed settings ({changes}). run.toml holds the last of them, so "
                     "the command above trains with those from the start: to repeat this run, train with the first "
                     "settings and resume with the same changes at the same steps.")
    if run.summary.get("software"):
        lines.append(f"Software: {run.summary['software']}.")
    return lines


def _figures(run: RunRecords) -> dict[str, Any]:
    """summary.json's figures; for a run still going (or killed), the same figures from its records so far."""
    last, metered = run.train[-1], run.train + run.final
    machines = last.get("machines")  # absent from records written before it was logged: then ranks are all we know
    prices = Tariff.of(run.cfg.cost, machines or 1)
    seconds = last.get("elapsed", 0.0)
    so_far = {"cost_basis": prices.basis, "carbon_intensity_g_per_kwh": prices.grid.g_per_kwh,
              "carbon_intensity_source": prices.grid.source, "stop_reason": "none yet: still running, or killed",
              "steps": last["step"], "tokens": last["tokens"], "train_seconds": seconds,
              "tokens_per_s": last["tokens"] / seconds if seconds else last["tokens_per_s"],  # the run's, not the
              "final_train_loss": last["loss"], "mfu_mean": mean_mfu(run.train),               # last interval's
              "energy_scope": energy_scope(machines) if machines else
                              "this machine" if last.get("ranks", 1) == 1 else "rank 0's machine only",
              **{k: interval_total(metered, k) for k in ("energy_kwh", "cost_usd", "co2_kg")},
              **{k: last.get(k) for k in ("peak_flops", "peak_source", "energy_source", "energy_method")}}
    if last.get("flops_per_token"):
        so_far.update(flops_per_token=last["flops_per_token"], total_flops=last["tokens"] * last["flops_per_token"])
    return {**so_far, **{k: v for k, v in run.summary.items() if v is not None}}


def _card(run: RunRecords, plots: list[Path]) -> tuple[str, list[str]]:
    from nanoseek.cli import describe  # lazily: the CLI imports this module

    cfg, s = run.cfg, _figures(run)
    with torch.device("meta"):  # counts without allocating the weights
        model = NanoSeek(cfg.model)
    rows = parameter_counts(model)
    main = [r for r in rows if r.component != "MTP modules"]
    total, active = sum(r.total for r in main), sum(r.active for r in main)
    tokens, seconds = s["tokens"], s["train_seconds"]
    final_eval = run.evals[-1] if run.evals else {}
    energy = f"{_energy(s.get('energy_kwh'))} ({s.get('energy_source') or 'not recorded'})"
    mfu = f"{100 * s['mfu_mean']:.2f}%" if s.get("mfu_mean") is not None else "n/a"
    bpb = final_eval.get("val_bpb")

    summary_lines = [
        f"{_count(tokens)} tokens in {_seconds(seconds)} ({s['tokens_per_s']:,.0f} tokens/s, MFU {mfu})",
        f"energy {energy}, cost {_usd(s.get('cost_usd'))}, CO2 {_co2(s.get('co2_kg'))}",
        f"final validation: loss {_val(final_eval, 'val_loss', '.3f')}, bits per byte "
        f"{'n/a' if bpb is None else f'{bpb:.3f}'}",
    ]
    c = cfg.model
    md = [f"# Report card: `{run.dir.name}`", "",
          f"A DeepSeek-V3-architecture model ({c.num_hidden_layers} layers, {c.n_routed_experts} routed experts, "
          f"MTP depth {c.num_nextn_predict_layers}) with {_count(total)} parameters ({_count(active)} active per "
          "token): " + "; ".join(summary_lines) + "."
          + ("" if run.summary else " The run has not finished (no summary.json): these are the figures so far."),
          "", "| figure | value |", "|---|---|"]
    table = [
        ("stop reason", s["stop_reason"]), ("optimizer steps", f"{s['steps']:,}"), ("tokens", f"{tokens:,}"),
        ("training time", _seconds(seconds)), ("tokens / s", f"{s['tokens_per_s']:,.0f}"),
        ("total training FLOPs", f"{s['total_flops']:.3g}" if s.get("total_flops") else "n/a"),
        ("mean MFU", f"{mfu} of {s.get('peak_flops') or 0:.3g} FLOP/s per rank ({s.get('peak_source') or 'n/a'})"),
        ("energy", f"{energy}: {s.get('energy_method') or 'n/a'}; scope: {s.get('energy_scope') or 'n/a'}"),
        ("cost", f"{_usd(s.get('cost_usd'))} at {s.get('cost_basis') or 'n/a'}"),
        ("CO2", f"{_co2(s.get('co2_kg'))} at {s.get('carbon_intensity_g_per_kwh') or 0:.4g} gCO2e/kWh "
                f"({s.get('carbon_intensity_source') or 'n/a'})"),
        ("final train loss", _val(s, "final_train_loss")),
        ("validation loss", _val(final_eval, "val_loss")), ("validation bits per byte", _val(final_eval, "val_bpb")),
    ]
    md += [f"| {k} | {v} |" for k, v in table]
    captions = {"loss": "Training and validation loss; validation bits per byte",
                "schedule": "Learning rate and batch size", "throughput": "Throughput and MFU",
                "expert_load": "Expert load balance per MoE layer (auxiliary-loss-free bias; 1 = perfectly balanced)",
                "energy": "Cumulative energy, cost and CO2"}
    md += ["", "## Training curves", ""]
    for p in plots:
        md += [f"### {captions[p.stem]}", "", f"![{captions[p.stem]}]({p.name})", ""]

    o, t = cfg.optim, cfg.train
    md += ["## Model card", "", "### Model", "", f"- architecture: {describe(model)}",
           f"- parameters: {_count(total)} total, {_count(active)} active per token "
           f"(routed experts count {cfg.model.num_experts_per_tok} of {cfg.model.n_routed_experts})", "",
           "| component | parameters | active / token |", "|---|---:|---:|"]
    md += [f"| {r.component} | {_count(r.total)} | {_count(r.active)} |" for r in rows]
    md += ["", f"- weights: `{run.dir}/checkpoints/` (HF `deepseek_v3` layout; `nanoseek.from_pretrained`, "
           "transformers' `DeepseekV3ForCausalLM`)", "", "### Data", "", *_data_section(cfg, run.dir), "",
           "### Training", "",
           f"- {s['steps']:,} optimizer steps, {tokens:,} tokens, global batch "
           + (f"{t.batch_size_start} -> {t.batch_size}" if t.batch_size_start else str(t.batch_size))
           + f" sequences of {cfg.data.seq_len} tokens, {t.dtype}, {run.train[-1].get('ranks', 1)} rank(s)",
           f"- AdamW β {tuple(o.betas)}, weight decay {o.weight_decay}, {o.schedule} schedule, peak lr {o.lr:g}, "
           f"warmup {o.warmup:g} {o.unit}; routing-bias speed γ {cfg.balance.bias_update_speed:g}, "
           f"balance loss α {cfg.balance.seq_aux_alpha:g}, MTP weight λ {cfg.mtp.weight:g} -> {cfg.mtp.weight_after:g}",
           "", "### Compute, energy, cost, CO2", "",
           f"- compute: {s['total_flops']:.3g} FLOPs ({s['flops_per_token']:.3g} per token, forward + backward), mean "
           f"MFU {mfu} against {s.get('peak_source', 'n/a')}" if s.get("total_flops") else "- compute: not recorded",
           f"- energy: {energy}; {s.get('energy_method', 'n/a')}; scope: {s.get('energy_scope', 'n/a')}",
           f"- cost: {_usd(s.get('cost_usd'))} at {s.get('cost_basis', 'n/a')} (the `[cost]` prices of run.toml)",
           f"- CO2: {_co2(s.get('co2_kg'))}; grid intensity {s.get('carbon_intensity_g_per_kwh', 0):.4g} gCO2e/kWh, "
           f"{s.get('carbon_intensity_source', 'n/a')}",
           "", "### Evaluation", "",
           f"- held-out validation split: loss {_val(final_eval, 'val_loss')} nats/token, "
           f"{_val(final_eval, 'val_bpb')} bits per byte (step {final_eval.get('step', 'n/a')})"]
    for sample in final_eval.get("samples", []):
        md += ["", f"Sample for the prompt `{sample['prompt']}`:", "", "```text",
               (sample["prompt"] + sample["completion"]).replace("```", "'''"), "```"]
    md += ["", "### How to reproduce", "", *_reproduce(run), ""]
    return "\n".join(md), summary_lines


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Report:
    """Write report.md and its PNGs into `out` (default RUN_DIR/report)."""
    run = RunRecords.load(run_dir)
    out = Path(out) if out is not None else run.dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(run, out)
    text, lines = _card(run, plots)
    write_atomic(out / "report.md", text)
    return Report(out / "report.md", plots, lines)


def print_report(report: Report) -> None:
    """The card's summary lines and where the report is."""
    for line in report.lines:
        console.print(line, highlight=False)
    console.print(f"report: {report.path}")


def cmd_report(args: argparse.Namespace) -> int:
    print_report(write_report(args.run, args.out))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("report", help="a run's report card: report.md, plots, model card (energy, cost, CO2)")
    r.add_argument("run", metavar="RUN_DIR", help="a training run folder (train.out_dir)")
    r.add_argument("--out", help="where to write report.md and the PNGs (default RUN_DIR/report)")
    r.set_defaults(func=cmd_report)
