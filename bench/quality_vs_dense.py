"""Quality per compute: the demo MoE+MLA model against a dense model of the same active FLOPs per token.

Both train on the same prepared data, with the same run config (configs/demo.toml: batch, schedule, seed) and
the same wall-clock budget, one after the other on this machine. The dense model is the same code with every
layer dense (first_k_dense_replace = num_hidden_layers) and the MLP width that gives it the MoE model's active
FLOPs per token; MTP is off in both so that only the feed-forward design differs. Prints validation loss and
bits per byte side by side: DeepSeek's claim is that, at equal compute, the MoE wins.

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

console = Console()


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
        base = [f"data.path={args.data}", f"train.max_time={args.minutes * 60:g}", "eval.every=0",
                "eval.samples=0", "eval.batches=32", "model.num_nextn_predict_layers=0", *args.overrides]
        moe_cfg = load_run_config(args.config, [*base, f"train.out_dir={tmp}/moe"])
        dense_cfg = load_run_config(args.config, [*base, f"train.out_dir={tmp}/dense"])
        dense_cfg.model = dense_twin(moe_cfg.model, moe_cfg.data.seq_len)
        for name, cfg in (("MoE + MLA (demo)", moe_cfg), ("dense, same active FLOPs", dense_cfg)):
            console.rule(name)
            result = train(cfg, progress=False)
            s = result.summary
            flops = forward_flops_per_token(cfg.model, cfg.data.seq_len)
            rows.append((name, s["parameters"], s["active_parameters"], flops, s["tokens"], s["tokens_per_s"],
                         s["val_loss"], s["val_bpb"]))

    table = Table(title=f"quality at equal wall-clock ({args.minutes:g} min each) on the same data")
    for col in ("model", "params", "active", "fwd MFLOP/token", "tokens seen", "tokens/s", "val loss", "val bpb"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for name, params, active, flops, tokens, tps, loss, bpb in rows:
        table.add_row(name, f"{params / 1e6:.1f}M", f"{active / 1e6:.1f}M", f"{flops / 1e6:.1f}", f"{tokens:,}",
                      f"{tps:,.0f}", f"{loss:.3f}", f"{bpb:.3f}")
    console.print(table)
    (moe_bpb, dense_bpb) = rows[0][7], rows[1][7]
    verdict = "MoE better" if moe_bpb < dense_bpb else "dense better"
    console.print(f"bits per byte: MoE {moe_bpb:.3f} vs dense {dense_bpb:.3f} ({verdict}, "
                  f"{100 * (dense_bpb - moe_bpb) / dense_bpb:+.1f}% for the MoE)")


if __name__ == "__main__":
    main()
