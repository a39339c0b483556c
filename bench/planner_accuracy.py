"""The step time `nanoseek plan --cpu` predicts against the one a real training run measures, on this machine.

For a few small budgets: plan (the planner measures the matmul probe and a few demo-preset steps, plans, then times
a few steps of the planned model itself and re-plans at that utilisation: `make_cpu_plan`), then train the planned
config for a few steps in-process with nanoseek.train.run.train on random tokens (the step time does not depend on
the text), and compare with the median step after warm-up. The goal is a ratio within 0.7-1.3. The planner times
one micro-batch of the planned model (forward, backward and an AdamW update) and multiplies by the accumulation, so
with accumulation it counts the update once per micro-batch where a run makes it once per step (a few % of a step
here); the ratio checks that, what its timing leaves out (the training loop's work) and the machine's drift between
the two measurements.

    python bench/planner_accuracy.py                    # budgets of 0.25, 1 and 4 hours
    python bench/planner_accuracy.py --hours 0.5 2 --steps 8
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from nanoseek.cost.plan import Budget, calibrate_cpu, cpu_hardware, make_cpu_plan, run_config
from nanoseek.train.run import train

console = Console()


class RandomTokens:
    """Uniform random token ids: a BatchSource for nanoseek.train.run.train."""

    def __init__(self, vocab_size: int, seq_len: int):
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.gen = torch.Generator().manual_seed(0)

    def next(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(0, self.vocab_size, (n, self.seq_len + 1), generator=self.gen)
        return ids[:, :-1], ids[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def measured_step(plan, steps: int, warmup: int) -> float:
    """Median seconds of the steps after `warmup` in a real run of the planned config."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = run_config(plan, out_dir=str(Path(tmp) / "run"))
        cfg.train.tokens, cfg.train.steps, cfg.train.log_every = 0, steps, 1
        cfg.optim.warmup = 1
        cfg.eval.every, cfg.eval.samples, cfg.checkpoint.every = 0, 0, 0
        cfg.cost.energy = False
        train(cfg, batches=RandomTokens(cfg.model.vocab_size, cfg.data.seq_len), val=[], progress=False)
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        elapsed = [r["elapsed"] for r in records if r.get("kind") == "train"]
    per_step = [elapsed[0], *(b - a for a, b in itertools.pairwise(elapsed))]  # per_step[i]: step i+1's seconds
    return statistics.median(per_step[warmup:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hours", type=float, nargs="+", default=[0.25, 1.0, 4.0], help="budgets to plan")
    p.add_argument("--steps", type=int, default=6, help="training steps measured per plan")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out (allocation, kernel choice)")
    args = p.parse_args()
    if not 0 <= args.warmup < args.steps:
        p.error(f"--warmup {args.warmup} must be >= 0 and below --steps {args.steps}: some steps must be measured")

    hw = cpu_hardware()
    cal = calibrate_cpu(hw.dtype)
    console.print(f"{hw.name}, {hw.dtype}: matmul probe {hw.peak / 1e9:.0f} GFLOP/s; calibration {cal.what}: "
                  f"{cal.seconds:.3f} s, {cal.achieved / 1e9:.0f} GFLOP/s (MFU {hw.mfu:.0%})")
    table = Table(title="planner: predicted vs measured step time on this CPU")
    for col in ("budget", "model (hidden x layers)", "params total / active", "micro x accum", "predicted s",
                "measured s", "predicted / measured"):
        table.add_column(col, justify="right")
    for hours in args.hours:
        plan = make_cpu_plan(Budget.make(1, hours=hours), hw, seq_len=256, vocab_size=8192)
        measured = measured_step(plan, args.steps, args.warmup)
        c, lay, params = plan.config, plan.layout, plan.estimate.params
        table.add_row(f"{hours:g} h", f"{c.hidden_size} x {c.num_hidden_layers}",
                      f"{params.total / 1e6:.1f}M / {params.active / 1e6:.1f}M",
                      f"{lay.micro_batch} x {lay.accumulation}", f"{plan.step_seconds:.3f}", f"{measured:.3f}",
                      f"{plan.step_seconds / measured:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
