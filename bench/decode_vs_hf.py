"""Decode speed of nanoseek's engine vs transformers' `generate` on the same model, and the KV cache it keeps.

Same checkpoint (the `demo` preset with its MTP module, random weights: speed does not depend on them), same
prompts, greedy, a fixed number of new tokens (EOS ignored), fp32, the same threads, each off the main thread with
denormals flushed. transformers 5 also caches the compressed latents (c_kv and the rotary key), but expands them
through kv_b_proj into per-head keys and values for SDPA at every step, over the whole cache; nanoseek folds kv_b_proj
into the query and output (absorbed MLA). transformers' experts implementation is screened per batch size and
the fastest is kept. The two alternate in rounds and the median of the paired ratios counts (this machine is noisy).
Also checks that both produced the same tokens, and measures the caches: bytes per token of transformers' cache
after a generate and of nanoseek's, against the formula and against a multi-head cache of the same model.

    python bench/decode_vs_hf.py                    # batch 1 and 16, 64 new tokens
    python bench/decode_vs_hf.py --speculative      # also nanoseek with MTP self-speculation (batch 1)
    python bench/decode_vs_hf.py --eager            # nanoseek's decode step uncompiled (Engine(compile=False))
    python bench/decode_vs_hf.py --threads 1        # both on one thread (`nanoseek serve`'s default on 2 cores)
    python bench/decode_vs_hf.py --device cuda --dtype bf16   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
import warnings
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import nanoseek
from nanoseek.device import pick_device, release_openmp_threads
from nanoseek.infer import Engine, LatentCache, SamplingParams
from nanoseek.infer.layout import choose_linear_layout

warnings.filterwarnings("ignore")


class IdText:
    eos_id = -1  # never stops on its own: every request makes exactly max_tokens

    def decode(self, ids: list[int]) -> str:
        return ""


def nanoseek_run(engine: Engine, prompts: torch.Tensor, n: int) -> tuple[float, list]:
    t = time.perf_counter()
    outs = engine.generate(prompts.tolist(), SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    return time.perf_counter() - t, [[e.token_id for e in evs] for evs in outs]


def hf_run(hf, prompts: torch.Tensor, n: int) -> tuple[float, list, Any]:
    """In a fresh thread, like nanoseek's engine: on a loaded machine the main thread's OpenMP team decodes up to
    20x slower (docs/LOG.md), which would flatter nanoseek."""
    result: list = []

    def run() -> None:
        torch.set_flush_denormal(True)  # as the engine's thread does
        t = time.perf_counter()
        with torch.inference_mode():
            out = generate(hf, prompts, n)
        result.extend((time.perf_counter() - t, out.sequences[:, prompts.shape[1]:].tolist(), out.past_key_values))

    release_openmp_threads()  # as Engine.start does: the main thread's OpenMP team would halve the new thread's
    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    return result[0], result[1], result[2]


def generate(hf, prompts: torch.Tensor, n: int):
    """Exactly n new tokens: no EOS (generation_config.eos_token_id is None), so nothing is suppressed either."""
    return hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, do_sample=False,
                       pad_token_id=0, return_dict_in_generate=True)


def cache_bytes_per_token(cache, batch: int) -> float:
    """What transformers' cache holds after a generate, per token of one sequence."""
    held = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
    return held / (batch * cache.get_seq_length())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="new tokens per sequence")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--speculative", action="store_true")
    p.add_argument("--eager", action="store_true", help="nanoseek's decode step uncompiled")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (both models on it)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="both models' weights")
    p.add_argument("--threads", type=int, help="CPU threads of both (default: torch's, one per core)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    config = nanoseek.preset(args.preset)
    console = Console(width=130)
    with tempfile.TemporaryDirectory() as ckpt:
        nanoseek.NanoSeek(config).save_pretrained(ckpt)
        ours = nanoseek.from_pretrained(ckpt).to(device, dtype).eval()
        console.print(f"nanoseek: {choose_linear_layout(ours)}")  # what its loader does for serve and generate
        impls = {impl: DeepseekV3ForCausalLM.from_pretrained(ckpt, attn_implementation="sdpa", dtype=dtype,
                                                             experts_implementation=impl).to(device).eval()
                 for impl in ("grouped_mm", "eager", "batched_mm")}
        for model in impls.values():
            model.generation_config.eos_token_id = None
        table = Table(title=f"greedy decode, {args.preset} preset, prompt {args.prompt} + {args.new} new tokens, "
                            f"{args.dtype}, {device.type}"
                            f"{f' ({torch.get_num_threads()} threads)' if device.type == 'cpu' else ''}, nanoseek "
                            f"{'eager' if args.eager else 'compiled'}")
        for col in ("batch", "nanoseek tok/s", "transformers tok/s", "experts (screened)",
                    "ratio (median of pairs)", "same tokens"):
            table.add_column(col, justify="right")
        for batch in map(int, args.batches.split(",")):
            prompts = torch.randint(5, config.vocab_size, (batch, args.prompt)).to(device)
            runs = [("plain", False)] + ([("MTP speculative", True)] if args.speculative and batch == 1 else [])
            screen = {impl: min(hf_run(m, prompts, 8)[0] for _ in range(2)) for impl, m in impls.items()}
            impl = min(screen, key=screen.get)
            hf = impls[impl]
            for name, spec in runs:
                engine = Engine(ours, IdText(), max_batch=batch, speculative="mtp" if spec else None,
                                compile=not args.eager)
                nanoseek_run(engine, prompts, 4)  # warm-up (and compilation)
                t_ours, t_hf, ratios, same = [], [], [], True
                for _ in range(args.rounds):
                    a, toks_a = nanoseek_run(engine, prompts, args.new)
                    b, toks_b, hf_cache = hf_run(hf, prompts, args.new)
                    t_ours.append(a)
                    t_hf.append(b)
                    ratios.append(b / a)
                    same &= toks_a == toks_b
                total = batch * args.new
                table.add_row(f"{batch} ({name})", f"{total / statistics.median(t_ours):,.0f}",
                              f"{total / statistics.median(t_hf):,.0f}", impl, f"{statistics.median(ratios):.2f}x",
                              "yes" if same else "no")
        console.print(table)
        console.print(f"transformers' cache after its last generate: {cache_bytes_per_token(hf_cache, batch):,.0f} "
                      f"bytes/token ({str(dtype).removeprefix('torch.')})")

        for dtype in (torch.float32, torch.bfloat16):
            cache = LatentCache(config, slots=4, max_len=256, device=torch.device("cpu"), dtype=dtype)
            measured = cache.nbytes / (4 * 256)
            formula = LatentCache.bytes_per_token(config, dtype)
            mha = LatentCache.mha_bytes_per_token(config, dtype)
            console.print(f"nanoseek's KV cache {str(dtype).removeprefix('torch.')}: {measured:,.0f} bytes/token "
                          "allocated, "
                          f"{formula:,} by the formula layers x (kv_lora_rank + qk_rope_head_dim) x bytes; a "
                          f"multi-head cache of the same model: {mha:,} bytes/token ({mha / measured:.1f}x more)")


if __name__ == "__main__":
    main()
