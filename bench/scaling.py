"""Data-parallel scaling on this machine: training tokens/s of 1 process against 2 torchrun processes.

The cores are split evenly (1 process × N threads vs 2 processes × N/2 threads), so perfect scaling is a ratio of
1.0: the question is what DDP's all-reduce, FSDP2's all-gather/reduce-scatter and expert parallelism's all_to_all
cost over gloo. Same model (the demo preset), data, global batch and steps; tokens/s is the median over the
second half of the steps (after warm-up). `--repeats N` runs every setup once a round for N rounds and prints the
medians and each round's efficiency (this machine drifts by 10-30% from minute to minute).

Expert parallelism removes the routed experts from DDP's gradient all-reduce but exchanges token rows in every MoE
layer, forward and backward; which costs less depends on how much of the model the experts are. `--ep-sweep` runs
DDP and DDP + EP 2 (alternating, `--repeats` times each) for the demo preset with several routed-expert counts
(same top-k, so the same compute per token) and prints EP's tokens/s over DDP's.

Routing matters to EP as it does not to DDP: a rank waits at every exchange for the one whose experts got more
tokens. A freshly initialised model routes most tokens to the same few experts (up to all of a layer's copies on
one rank), until the bias update has balanced the load, within a few hundred steps. `--warm-steps N` first trains
one process for N steps (kept in --cache for later runs) and times every setup from that checkpoint, which is how
most of a real run looks. The "expert load max/mean" column is the busiest routed expert's share of the copies over
the average's, at the timed steps (1.0: all equal).

    python bench/scaling.py --steps 30
    python bench/scaling.py --steps 12 --ep-sweep 32,64,128 --repeats 2 [--warm-steps 240]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
console = Console(width=120)


def prepare_data(out: Path, vocab: int) -> Path:
    from nanoseek.data.corpora import iter_documents
    from nanoseek.data.shards import prepare
    from nanoseek.data.tokenizer import train_tokenizer

    data = out / "data"
    if not (data / "index.json").is_file():
        train_tokenizer((d.text for d in iter_documents(["python-stdlib"])), vocab, out / "tok")
        prepare(["python-stdlib"], out / "tok", data, progress=False)
    return data


QUIET = ["eval.every=0", "eval.samples=0", "eval.batches=1", "checkpoint.every=0"]  # only the final checkpoint
# every timed run: fp32 on the CPU (the question is how cores split between processes; on a GPU machine only the
# warm-up uses the GPU), a log line per step
TIMED = ["train.dtype=fp32", "train.device=cpu", "train.log_every=1", *QUIET]


def fresh(data: Path, out: Path, args: argparse.Namespace, steps: int, extra: list[str]) -> list[str]:
    """`nanoseek train` arguments for a new run of the demo preset on the bench data."""
    return [str(ROOT / "configs" / "demo.toml"), f"data.path={data}", f"train.out_dir={out}", f"train.steps={steps}",
            "train.max_time=0", f"train.batch_size={args.batch}", f"train.micro_batch_size={args.batch // 2}",
            f"model.vocab_size={args.vocab}", *extra]


def warm_run(n_experts: int, data: Path, args: argparse.Namespace) -> Path:
    """One process trained for --warm-steps (on a GPU if there is one, bf16 where it helps), cached: the routing
    bias has balanced the experts' load by then, as it is for most of a real run."""
    out = Path(args.cache).resolve() / f"warm-e{n_experts}-s{args.warm_steps}-b{args.batch}-v{args.vocab}"
    summary = out / "summary.json"
    done = summary.is_file() and json.loads(summary.read_text()).get("steps") == args.warm_steps
    if not done:  # absent, or stopped early (an interrupted run writes its summary too)
        shutil.rmtree(out, ignore_errors=True)
        console.print(f"training {n_experts} experts for {args.warm_steps} steps (one process) to balance routing")
        extra = [f"model.n_routed_experts={n_experts}", "train.dtype=auto", *QUIET]
        r = subprocess.run([sys.executable, "-m", "nanoseek", "train", *fresh(data, out, args, args.warm_steps, extra),
                            "--no-progress"], capture_output=True, text=True, cwd=ROOT)
        if r.returncode:
            raise RuntimeError(r.stdout[-2000:] + r.stderr[-2000:])
    return out


def run(ranks: int, threads: int, extra: list[str], data: Path, out: Path, args: argparse.Namespace,
        warm: Path | None = None) -> tuple[float, float]:
    """Median tokens/s over the second half of the steps, and the median load max/mean of the routed experts
    (over all ranks' tokens: how unevenly the experts are used, which EP turns into ranks waiting for each other)."""
    if warm is None:
        cmd = fresh(data, out, args, args.steps, [*TIMED, *extra])
    else:  # a copy of the warm run's last checkpoint (and config), resumed for --steps more
        (out / "checkpoints").mkdir(parents=True)
        shutil.copy(warm / "run.toml", out / "run.toml")
        shutil.copytree(warm / "tokenizer", out / "tokenizer")
        ckpt = (warm / "checkpoints" / "LATEST").read_text().strip()
        shutil.copytree(warm / "checkpoints" / ckpt, out / "checkpoints" / ckpt)
        (out / "checkpoints" / "LATEST").write_text(ckpt)
        cmd = ["--resume", str(out), f"train.steps={args.warm_steps + args.steps}", *TIMED, *extra]
    prefix = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   "--nproc-per-node", str(ranks)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "NANOSEEK_THREADS": str(threads)}
    r = subprocess.run([*prefix, "-m", "nanoseek", "train", *cmd, "--no-progress"], capture_output=True, text=True,
                       env=env, cwd=ROOT)
    if r.returncode:
        raise RuntimeError(r.stdout[-2000:] + r.stderr[-2000:])
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # this run's steps only
    timed = [x for x in recs if x["kind"] == "train"]
    timed = timed[len(timed) // 2:]
    load = [statistics.mean(x["expert_load_max_over_mean"]) for x in timed if x.get("expert_load_max_over_mean")]
    return statistics.median(x["tokens_per_s"] for x in timed), statistics.median(load) if load else float("nan")


def timed_from(args: argparse.Namespace) -> str:
    return f"after {args.warm_steps} steps of training" if args.warm_steps else "from initialisation"


def ep_sweep(counts: list[int], threads: int, data: Path, args: argparse.Namespace) -> None:
    from nanoseek import NanoSeek, preset

    table = Table(title=f"DDP vs DDP + EP 2: 2 processes × {threads} thread(s), demo preset with n routed experts, "
                        f"batch {args.batch} x 256, gloo, timed {timed_from(args)}")
    for col in ("routed experts", "expert share of parameters", "expert load max/mean", "DDP tokens/s",
                "DDP + EP 2 tokens/s", "EP / DDP"):
        table.add_column(col, justify="right")
    for n in counts:
        model = NanoSeek(preset("demo", vocab_size=args.vocab, n_routed_experts=n))
        experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
        share = experts / sum(p.numel() for p in model.parameters())
        warm = warm_run(n, data, args) if args.warm_steps else None
        # a resumed run keeps its checkpoint's model: no model.* override then
        base = [f"model.n_routed_experts={n}", "parallel.dp=ddp"] if warm is None else ["parallel.dp=ddp"]
        tps: dict[str, list[float]] = {"ddp": [], "ep": []}
        loads = []
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.repeats):  # alternate, so that drift of a noisy machine hits both alike
                for name, extra in (("ddp", base), ("ep", [*base, "parallel.ep=2"])):
                    t, load = run(2, threads, extra, data, Path(tmp) / f"{name}{i}", args, warm)
                    tps[name].append(t)
                    loads.append(load)
                    console.print(f"{n} experts, {name}: {t:,.0f} tokens/s, load max/mean {load:.2f}")
        ddp, ep = statistics.median(tps["ddp"]), statistics.median(tps["ep"])
        table.add_row(str(n), f"{share:.0%}", f"{statistics.median(loads):.2f}", f"{ddp:,.0f}", f"{ep:,.0f}",
                      f"{ep / ddp:.2f}")
    console.print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences of 256 tokens)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--cache", default=str(ROOT / "runs" / "bench-data"), help="tokenizer and data go here")
    p.add_argument("--ep-sweep", default="", help="routed-expert counts for DDP vs DDP + EP 2, e.g. 32,64,128 "
                                                 "(skips the main table)")
    p.add_argument("--repeats", type=int, default=1, help="rounds over the setups, alternated (median)")
    p.add_argument("--warm-steps", type=int, default=0, help="time every setup after this many steps of one-process "
                                                             "training (routing balanced); 0: from initialisation")
    args = p.parse_args()
    from nanoseek import preset

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    data = prepare_data(Path(args.cache), args.vocab)
    if args.ep_sweep:
        ep_sweep([int(e) for e in args.ep_sweep.split(",")], max(1, cores // 2), data, args)
        return
    setups = [("1 process", 1, cores, [])] + [
        (f"2 processes, {name}", 2, max(1, cores // 2), extra)
        for name, extra in (("DDP", ["parallel.dp=ddp"]), ("FSDP2", ["parallel.dp=fsdp"]),
                            ("DDP + EP 2 (experts split)", ["parallel.dp=ddp", "parallel.ep=2"]),
                            ("FSDP2 + EP 2", ["parallel.dp=fsdp", "parallel.ep=2"]))]
    tps: dict[str, list[float]] = {name: [] for name, *_ in setups}
    with tempfile.TemporaryDirectory() as tmp:
        warm = warm_run(preset("demo").n_routed_experts, data, args) if args.warm_steps else None
        for i in range(args.repeats):  # every setup once a round: drift of a noisy machine hits all alike
            for name, ranks, threads, extra in setups:
                t, _ = run(ranks, threads, extra, data, Path(tmp) / f"{name.replace(' ', '_')}{i}", args, warm)
                tps[name].append(t)
                console.print(f"round {i + 1}, {name}: {t:,.0f} tokens/s")
    table = Table(title=f"training tokens/s, demo preset, batch {args.batch} x 256, {cores} cores, gloo, timed "
                        f"{timed_from(args)}, median of {args.repeats} round(s)")
    for col in ("setup", "threads", "tokens/s", "scaling efficiency", "efficiency per round"):
        table.add_column(col, justify="left" if col == "setup" else "right")
    one = tps["1 process"]
    for name, ranks, threads, _ in setups:
        per_round = [t / b for t, b in zip(tps[name], one)]
        median = statistics.median(tps[name])
        table.add_row(name, f"{threads} thread(s)" + (" each" if ranks > 1 else ""), f"{median:,.0f}",
                      f"{median / statistics.median(one):.2f}", " / ".join(f"{r:.2f}" for r in per_round))
    console.print(table)

if __name__ == "__main__":
    main()
