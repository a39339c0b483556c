"""Data-parallel scaling on this machine: training tokens/s of 1 process against 2 torchrun processes.

The cores are split evenly (1 process × N threads vs 2 processes × N/2 threads), so perfect scaling is a ratio of
1.0: the question is what DDP's all-reduce, FSDP2's all-gather/reduce-scatter and expert parallelism's all_to_all
cost over gloo. Same model (the demo preset), data, global batch and steps; tokens/s is the median over the
second half of the steps (after warm-up).

    python bench/scaling.py --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
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


def run(ranks: int, threads: int, extra: list[str], data: Path, out: Path, args: argparse.Namespace) -> float:
    cmd = ["-m", "nanoseek", "train", str(ROOT / "configs" / "demo.toml"), f"data.path={data}",
           f"train.out_dir={out}", f"train.steps={args.steps}", "train.max_time=0", "train.dtype=fp32",
           f"train.batch_size={args.batch}", f"train.micro_batch_size={args.batch // 2}", "train.log_every=1",
           "eval.every=0", "eval.samples=0", "eval.batches=1", "checkpoint.every=0", f"model.vocab_size={args.vocab}",
           *extra, "--no-progress"]
    prefix = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   "--nproc-per-node", str(ranks)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "NANOSEEK_THREADS": str(threads)}
    r = subprocess.run([*prefix, *cmd], capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode:
        raise RuntimeError(r.stdout[-2000:] + r.stderr[-2000:])
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tps = [x["tokens_per_s"] for x in recs if x["kind"] == "train"]
    return statistics.median(tps[len(tps) // 2:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences of 256 tokens)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--cache", default=str(ROOT / "runs" / "bench-data"), help="tokenizer and data go here")
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    data = prepare_data(Path(args.cache), args.vocab)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = run(1, cores, [], data, Path(tmp) / "one", args)
        rows.append(("1 process", f"{cores} threads", base, 1.0))
        for name, extra in (("DDP", ["parallel.dp=ddp"]), ("FSDP2", ["parallel.dp=fsdp"]),
                            ("DDP + EP 2 (experts split)", ["parallel.dp=ddp", "parallel.ep=2"]),
                            ("FSDP2 + EP 2", ["parallel.dp=fsdp", "parallel.ep=2"])):
            tps = run(2, max(1, cores // 2), extra, data, Path(tmp) / name.replace(" ", "_"), args)
            rows.append((f"2 processes, {name}", f"{max(1, cores // 2)} threads each", tps, tps / base))
    table = Table(title=f"training tokens/s, demo preset, batch {args.batch} x 256, {cores} cores, gloo")
    for col in ("setup", "threads", "tokens/s", "scaling efficiency"):
        table.add_column(col, justify="left" if col == "setup" else "right")
    for name, threads, tps, eff in rows:
        table.add_row(name, threads, f"{tps:,.0f}", f"{eff:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
