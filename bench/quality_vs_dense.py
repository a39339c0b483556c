"""Quality per compute: the demo MoE+MLA model against a dense model of the same active FLOPs per token.

Same prepared data, same run config (configs/demo.toml: batch, schedule, seed), one run after the other on this
machine: the MoE for a wall-clock budget, the dense twin for the seconds the MoE actually trained (a run plans its
steps from its first steps' speed, so it ends near its budget, not at it), then the dense twin for the MoE's number
of tokens (the same training FLOPs, since the active FLOPs per token are equal). The twin is the same code with
every layer dense (first_k_dense_replace = num_hidden_layers) and the MLP width that matches the MoE's active
FLOPs per token; MTP is off in both so that only the feed-forward design differs. DeepSeek's claim is that, at
equal compute, the MoE wins.

    python bench/quality_vs_dense.py --data runs/demo/data-python-stdlib --minutes 5
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

import nanoseek
from nanoseek.cost.flops import forward_flops_per_token
from nanoseek.train.config import load_run_config
from nanoseek.train.run import train

console = Console(width=130)


def dense_twin(moe: nanoseek.ModelConfig, seq_len: int) -> nanoseek.ModelConfig:
    """All-dense config whose forward FLOPs per token match the MoE config's (MLP width rounded to 8)."""
    target = forward_flops_per_token(moe, seq_len)
    best = None
    for width in range(8, 16 * moe.hidden_size, 8):
        cand = nanoseek.ModelConfig(**{**moe.__dict__, "intermediate_size": width,
                                       "first_k_dense_replace": moe.num_hidden_layers})
        gap = abs(forward_flops_per_token(cand, seq_len) - target)
        if best is None or gap < best[0]:
            best = (gap, cand)
    return best[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="runs/demo/data-python-stdlib", help="a folder from `nanoseek data prepare`")
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "demo.toml"))
    p.add_argument("--minutes", type=float, default=5.0, help="training budget of each model")
    p.add_argument("overrides", nargs="*", help="config overrides for both runs")
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = [f"data.path={args.data}", "eval.every=0", "eval.samples=0", "eval.batches=32",
                "model.num_nextn_predict_layers=0", *args.overrides]
        timed = [*base, f"train.max_time={args.minutes * 60:g}"]
        moe_cfg = load_run_config(args.config, [*timed, f"train.out_dir={tmp}/moe"])
        dense_model = dense_twin(moe_cfg.model, moe_cfg.data.seq_len)
        runs = [("MoE + MLA (demo)", moe_cfg), ("dense, same wall-clock", None), ("dense, same tokens", None)]
        for i, (name, cfg) in enumerate(runs):
            if name == "dense, same wall-clock":  # the MoE's training seconds, not its budget
                cfg = load_run_config(args.config, [*base, f"train.max_time={rows[0][6]:.1f}",
                                                    f"train.out_dir={tmp}/dense_time"])
            elif name == "dense, same tokens":  # equal tokens x equal FLOPs/token = equal training compute
                cfg = load_run_config(args.config, [*base, f"train.tokens={rows[0][4]}", "train.max_time=0",
                                                    f"train.out_dir={tmp}/dt"])  # no time limit from the config
            if name.startswith("dense"):
                cfg.model = dense_model
            console.rule(name)
            s = train(cfg, progress=False).summary
            if name == "dense, same tokens" and s["tokens"] < rows[0][4]:
                raise SystemExit(f"the dense run stopped at {s['tokens']:,} tokens, short of the MoE's {rows[0][4]:,}")
            if name == "dense, same wall-clock" and abs(s["train_seconds"] / rows[0][6] - 1) > 0.05:
                console.print(f"[yellow]the dense run trained {s['train_seconds']:.0f} s against the MoE's "
                              f"{rows[0][6]:.0f} s: not the same wall-clock within 5%; run again[/yellow]")
            rows.append((name, s["parameters"], s["active_parameters"], forward_flops_per_token(cfg.model,
                         cfg.data.seq_len), s["tokens"], s["tokens_per_s"], s["train_seconds"], s["val_loss"],
                         s["val_bpb"]))
            runs[i] = (name, cfg)

    table = Table(title="MoE vs dense of the same active FLOPs per token, same data and run config")
    for col in ("model", "params", "active", "MFLOP/token", "tokens", "tokens/s", "train s", "val loss", "val bpb"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for name, params, active, flops, tokens, tps, secs, loss, bpb in rows:
        table.add_row(name, f"{params / 1e6:.1f}M", f"{active / 1e6:.1f}M", f"{flops / 1e6:.1f}", f"{tokens:,}",
                      f"{tps:,.0f}", f"{secs:.0f}", f"{loss:.3f}", f"{bpb:.3f}")
    console.print(table)
    moe, time_dense, token_dense = rows[0][8], rows[1][8], rows[2][8]
    console.print(f"bits per byte — MoE {moe:.3f}; dense at the same wall-clock {time_dense:.3f} "
                  f"({verdict(moe, time_dense)}); dense at the same tokens and FLOPs {token_dense:.3f} "
                  f"({verdict(moe, token_dense)})")


TIE = 0.03  # bits per byte: two runs of each model differed by up to this much (docs/LOG.md, 2026-11-29)


def verdict(moe: float, dense: float) -> str:
    if abs(moe - dense) < TIE:
        return f"a tie: within {TIE} bits/byte"
    return "MoE better" if moe < dense else "dense better"


if __name__ == "__main__":
    main()
