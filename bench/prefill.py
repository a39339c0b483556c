"""A prompt's prefill through the latent cache (`infer/forward.py: forward_cached`, what the engine runs for new
requests) with MLA's attention in its three forms, alternated in one process:

- now: what the engine runs: for a prompt over KERNEL_KEYS (64) tokens keys and values expanded from the latent and
  fused causal attention, as in training; for shorter ones the decode kernel;
- absorbed, batched: kv_b_proj folded into the queries and outputs, attention as two batched products over the
  gathered cache rows (what the engine ran for every prefill before 2026-12-01);
- absorbed, kernel: the same in the decode kernel (`latent_attention`, the cache read in place).

One prompt of each --lengths, and 16 prompts of 22 tokens (a wave of `bench/serve_load.py`'s chat requests). A random
model of --preset (default `small`: absorbing costs heads·(2·kv_lora_rank + rope) products per query and key there,
against heads·(nope + rope + v) expanded); --matmul-dtype bf16 packs it for bf16 products as `nanoseek serve` does.
Medians of alternated repeats; every form's hidden states are checked against the engine's (the median
position within 1% of the largest value: with bf16 products the forms round differently, which flips some of a
random model's router near-ties; in fp32 they agree to ~1e-6, docs/LOG.md).

    python bench/prefill.py
    python bench/prefill.py --preset demo --lengths 256,2048 --matmul-dtype fp32
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

import nanoseek
from nanoseek.config import PRESETS
from nanoseek.infer import forward, kernels
from nanoseek.infer.bf16 import use_bf16_products
from nanoseek.infer.forward import Batch, LatentCache, forward_cached


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=PRESETS)
    ap.add_argument("--lengths", default="128,512,2048", help="prompt lengths, one prompt each")
    ap.add_argument("--matmul-dtype", default="bf16", choices=("fp32", "bf16"))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    kernels.load()
    torch.manual_seed(0)
    cfg = nanoseek.preset(args.preset)
    model = nanoseek.NanoSeek(cfg).eval()
    if args.matmul_dtype == "bf16":
        if not kernels.bf16_products():
            raise SystemExit("bf16 products need a CPU with AVX512-BF16 and the kernel built: try --matmul-dtype fp32")
        use_bf16_products(model)
    shapes = [(16, 22)] + [(1, int(n)) for n in args.lengths.split(",")]
    table = Table(title=f"prefill of the {args.preset} preset ({args.matmul_dtype} products, {torch.get_num_threads()}"
                        " threads): median ms of the forward over the cache")
    for col in ("prompts × tokens", "now", "absorbed, batched", "absorbed, kernel", "batched / now"):
        table.add_column(col, justify="right")
    default_keys = forward.KERNEL_KEYS
    for B, T in shapes:
        ids = torch.randint(0, cfg.vocab_size, (B, T))
        lengths = [T - b % 3 for b in range(B)]  # ragged, as a wave of prompts is
        fresh = Batch.make(list(range(B)), [0] * B, lengths, T, ids.device)
        cache = LatentCache(cfg, slots=B, max_len=T, device=ids.device, dtype=torch.float32)
        # (batch, KERNEL_KEYS): a batch not marked fresh is never expanded; 0 keys or a billion choose the products
        forms = {"now": (fresh, default_keys), "absorbed, batched": (dataclasses.replace(fresh, fresh=False), 0),
                 "absorbed, kernel": (dataclasses.replace(fresh, fresh=False), 10**9)}

        def run(form: str, forms=forms, cache=cache, ids=ids) -> torch.Tensor:
            batch, forward.KERNEL_KEYS = forms[form]
            with torch.inference_mode():
                return forward_cached(model, cache, ids, batch)

        outs = {form: run(form) for form in forms}
        real = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
        scale = outs["now"][real].abs().max().item()
        for form, out in outs.items():  # per position: bf16 rounding flips some of a random model's router near-ties
            typical = (out - outs["now"])[real].abs().amax(-1).median().item()
            assert typical < 1e-2 * scale, f"{form}: the median position differs by {typical} ({scale} at most)"
        times: dict[str, list[float]] = {form: [] for form in forms}
        for _ in range(args.repeats):
            for form in forms:
                t = time.perf_counter()
                run(form)
                times[form].append(time.perf_counter() - t)
        forward.KERNEL_KEYS = default_keys
        ms = {form: statistics.median(ts) * 1e3 for form, ts in times.items()}
        table.add_row(f"{B} × {T}", *(f"{v:,.1f}" for v in ms.values()),
                      f"{ms['absorbed, batched'] / ms['now']:.2f}x")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
