"""The decode kernels (infer/kernels.cpp) against torch's paths: routed experts, what they do to a whole compiled
decode step, Linear layers, attention.

1. The routed experts of the `demo` preset's 5 MoE layers (32 experts, top-4, random weights), 1 / 4 / 16 tokens:
   the kernel vs inductor's fused gathered kernel (what a compiled step used before; all layers in one graph) and
   vs the model's own eager path (per-pair mat-vecs below 32 pairs, grouped GEMMs above). Weights in cache, and
   cold (a 240 MB sweep before each call: in a real step the rest of the model has evicted them). Also the kernel
   over the same experts stored in bf16 (`--expert-dtype bf16`: half the bytes; checked against the kernel over the
   rounded weights in fp32, which it must equal exactly) and in int8 with a scale per row (`--expert-dtype int8`:
   a quarter; checked against the kernel over the dequantized weights in fp32), and packed for bf16 products
   (`--matmul-dtype bf16`, infer/bf16.py: bf16 weights and inputs, float32 sums; `vdpbf16ps` on AVX512-BF16).
2. The compiled decode step (`infer/forward.py: decode_step`, the engine's graph) with the experts kernel, with
   torch's path, with the Linear kernel as well (a copy whose Linear weights are packed: fp32 as the engine serves
   it) and with bf16 products (a packed copy), alternated in one process.
3. Every Linear layer a decode step runs (attention projections, shared experts, the dense layer, lm_head) at 1 / 4
   / 16 rows, and at 576 (a prefill of 16 prompts of 36 tokens), cold: the kernel's `linear_panels` over the
   weights packed into its panels vs the BLAS (F.linear) with the weights as stored and transposed (the layouts
   `infer/layout.py` chooses between), and vs the kernel over bf16 panels (bf16 products).
4. MLA's per-head products of every layer (W_UKᵀ·q_nope and W_UV·o, absorbed attention's use of kv_b_proj) at 1 / 4
   / 16 / 576 rows, cold: torch's einsum over the float32 weight vs `heads_linear_bf16` over per-head bf16 panels
   (bf16 products).
5. One layer's attention at a decode step, 1 and 16 sequences at 65, 513 and 1,024 tokens of context: the kernel's
   `latent_attention` (the cache read in place) vs torch's path (the rows gathered, two batched products, a
   softmax).
Medians of alternated repeats (this machine is noisy); every variant's output is checked against the others.

    python bench/decode_kernel.py
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import nanoseek
from nanoseek.infer import kernels
from nanoseek.infer.bf16 import PackedKVB, use_bf16_products
from nanoseek.infer.engine import _compiled, _mark_dynamic
from nanoseek.infer.forward import Batch, LatentCache, _attend_gathered, decode_step
from nanoseek.infer.layout import use_decode_kernel
from nanoseek.infer.quant import Int8Experts

warnings.filterwarnings("ignore")


def gathered(x, indices, weights, gate_up, down):
    """Inductor's formulation: each (token, expert) pair reads its expert's weights by index."""
    N, k = indices.shape
    chosen = indices.flatten()
    gate, up = (gate_up[chosen] * x.repeat_interleave(k, dim=0)[:, None]).sum(-1).chunk(2, dim=-1)
    mid = F.silu(gate) * up * weights.flatten()[:, None]
    return (down[chosen] * mid[:, None]).sum(-1).view(N, k, -1).sum(1)


def timed(fn, repeats: int, sweep: torch.Tensor | None) -> float:
    times = []
    for _ in range(repeats):
        if sweep is not None:
            sweep.add_(1.0)
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def experts_table(model: nanoseek.NanoSeek, console: Console) -> None:
    moes = [layer.mlp for layer in model.layers[model.config.num_dense_layers:]]
    gate_ups = [moe.experts.gate_up_proj for moe in moes]
    downs = [moe.experts.down_proj for moe in moes]

    def all_layers(expert_fn, x, routes, gate_ups=gate_ups, downs=downs):  # the same x through every MoE layer
        return [expert_fn(x, i, w, g, d) for (w, i), g, d in zip(routes, gate_ups, downs)]

    bf16 = [g.detach().bfloat16() for g in gate_ups], [d.detach().bfloat16() for d in downs]
    rounded = [g.float() for g in bf16[0]], [d.float() for d in bf16[1]]
    int8 = [Int8Experts(moe.experts) for moe in moes]

    def int8_layers(x, routes):
        return [kernels.routed_experts(x, i, w, q.gate_up_proj, q.down_proj, q.gate_up_scale, q.down_scale)
                for (w, i), q in zip(routes, int8)]

    dequantized = [q.stacked()[0] for q in int8], [q.stacked()[1] for q in int8]
    packed = [kernels.pack_experts(g) for g in gate_ups], [kernels.pack_experts(d) for d in downs]

    # one graph for all layers, so that the compiled function's call cost is paid once, as in a decode step
    inductor = torch.compile(lambda x, routes: all_layers(gathered, x, routes), dynamic=False)
    sweep = torch.empty(60_000_000)
    table = Table(title="routed experts of the 5 MoE layers (median µs; ratio = that time / the kernel's)")
    for col in ("tokens", "weights", "kernel", "kernel, bf16 experts", "ratio", "kernel, int8 experts", "ratio",
                "bf16 products", "ratio", "inductor gathered", "ratio", "model eager path", "ratio"):
        table.add_column(col, justify="right")
    for n in (1, 4, 16):
        x = torch.randn(n, model.config.hidden_size)
        routes = [moe.gate(x)[:2] for moe in moes]
        counts = [torch.bincount(i.flatten(), minlength=moe.n_experts) for moe, (_, i) in zip(moes, routes)]
        variants = {
            "kernel": lambda x=x, routes=routes: all_layers(kernels.routed_experts, x, routes),
            "bf16": lambda x=x, routes=routes: all_layers(kernels.routed_experts, x, routes, *bf16),
            "int8": lambda x=x, routes=routes: int8_layers(x, routes),
            "products": lambda x=x, routes=routes: all_layers(kernels.routed_experts_bf16, x, routes, *packed),
            "inductor": lambda x=x, routes=routes: inductor(x, routes),
            "model": lambda x=x, routes=routes, counts=counts: [
                moe.experts(x, i, w, c) for moe, (w, i), c in zip(moes, routes, counts)],
        }
        outs = {name: torch.stack(f()) for name, f in variants.items() if name not in ("bf16", "int8", "products")}
        assert all((o - outs["kernel"]).abs().max() < 1e-4 for o in outs.values()), "variants disagree"
        assert torch.equal(torch.stack(variants["bf16"]()),
                           torch.stack(all_layers(kernels.routed_experts, x, routes, *rounded))), "bf16 disagrees"
        want = torch.stack(all_layers(kernels.routed_experts, x, routes, *dequantized))
        assert (torch.stack(variants["int8"]()) - want).abs().max() < 1e-5 * want.abs().max(), "int8 disagrees"
        products = torch.stack(variants["products"]())  # bf16 rounding of x, weights and hidden activations
        assert (products - outs["kernel"]).abs().max() < 2e-2 * outs["kernel"].abs().max(), "bf16 products disagree"
        for cold in (False, True):
            res: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(15):
                for name, f in variants.items():
                    res[name].append(timed(f, 3, sweep if cold else None))
            med = {name: statistics.median(v) * 1e6 for name, v in res.items()}
            table.add_row(str(n), "cold" if cold else "in cache", f"{med['kernel']:.0f}", f"{med['bf16']:.0f}",
                          f"{med['bf16'] / med['kernel']:.2f}x", f"{med['int8']:.0f}",
                          f"{med['int8'] / med['kernel']:.2f}x", f"{med['products']:.0f}",
                          f"{med['products'] / med['kernel']:.2f}x", f"{med['inductor']:.0f}",
                          f"{med['inductor'] / med['kernel']:.2f}x", f"{med['model']:.0f}",
                          f"{med['model'] / med['kernel']:.2f}x")
    console.print(table)


def step_table(model: nanoseek.NanoSeek, console: Console) -> None:
    real = kernels.covers, kernels.beats_inductor
    panels, packed = copy.deepcopy(model), copy.deepcopy(model)
    use_decode_kernel(panels)  # fp32 as the engine serves it where the Linear kernel wins (infer/layout.py)
    use_bf16_products(packed)
    # the kernel variant takes it at every batch of several rows, also where the engine would choose inductor's
    variants = {"kernel": (real[0], lambda: True), "torch": (lambda *tensors: False, real[1]),
                "panels": (real[0], lambda: True), "bf16 products": (real[0], lambda: True)}
    models = {"kernel": model, "torch": model, "panels": panels, "bf16 products": packed}
    # each its own compiled copy of the engine's step, traced with or without the kernel
    steps = {name: _compiled(decode_step) for name in variants}
    sizes = (1, 4, 16)
    cache = LatentCache(model.config, max(sizes), 128, torch.device("cpu"), torch.float32)
    res: dict[tuple[str, int], list[float]] = {(name, b): [] for name in variants for b in sizes}

    # inputs built before timing; new tokens at every call (the same ones for both variants), so that each step
    # routes to other experts, as decoding does, instead of finding the last call's experts in cache
    gen = torch.Generator().manual_seed(0)
    calls = 10
    inputs = {b: [torch.randint(0, model.config.vocab_size, (b, 1), generator=gen) for _ in range(calls)]
              for b in (1, 2, *sizes)}
    batches = {b: Batch.make(list(range(b)), [80] * b, [1] * b, 1, torch.device("cpu")) for b in inputs}
    for b in inputs:
        _mark_dynamic(inputs[b][0], batches[b])

    def run(name: str, b: int, i: int = 0) -> torch.Tensor:
        return steps[name](models[name], cache, inputs[b][i], batches[b])[1]

    def timed_calls(name: str, b: int) -> float:
        kernels.covers, kernels.beats_inductor = variants[name]
        times = []
        for i in range(calls):
            t = time.perf_counter()
            run(name, b, i)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    try:
        with torch.inference_mode():
            for b in inputs:
                logits = []
                for name in variants:
                    kernels.covers, kernels.beats_inductor = variants[name]
                    logits.append(run(name, b))
                assert (logits[0] - logits[1]).abs().max() < 1e-4
                assert (logits[0] - logits[2]).abs().max() < 1e-4
                # bf16 products: the packed model's own eager step (inputs a float32 ulp apart can round to bf16 an
                # ulp apart); against fp32 the rounding can flip one of a random model's near-ties of the router,
                # and that token's logits differ by far more
                eager = decode_step(packed, cache, inputs[b][0], batches[b])[1]
                assert (logits[3] - eager).abs().max() < 2e-2 * eager.abs().max()
            for _ in range(20):
                for name in variants:
                    for b in sizes:
                        res[(name, b)].append(timed_calls(name, b))
    finally:
        kernels.covers, kernels.beats_inductor = real
    table = Table(title="compiled decode step (demo preset, 80 cached tokens, new tokens each call; median ms)")
    for col in ("batch", "with kernel", "torch path", "torch / kernel", "and Linear kernel", "bf16 products",
                "Linear kernel / bf16"):
        table.add_column(col, justify="right")
    for b in sizes:
        k, t, pk, bf = (statistics.median(res[(name, b)]) * 1e3 for name in variants)
        table.add_row(str(b), f"{k:.2f}", f"{t:.2f}", f"{t / k:.2f}x", f"{pk:.2f}", f"{bf:.2f}", f"{pk / bf:.2f}x")
    console.print(table)


def linears_table(model: nanoseek.NanoSeek, console: Console) -> None:
    linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and not name.startswith("mtp") and not name.endswith("kv_b_proj")  # kv_b_proj: read as a view
               and kernels.covers_linear(m.weight)]  # out a multiple of the panel width (16 floats on AVX2)
    weights = [m.weight.detach() for m in linears]
    layouts = {"kernel": [kernels.pack_linear(w) for w in weights], "stored": weights,
               "transposed": [w.t().contiguous().t() for w in weights],
               "bf16": [kernels.pack_linear(w, torch.bfloat16) for w in weights]}
    sweep = torch.empty(60_000_000)
    table = Table(title=f"the {len(linears)} Linear layers of a decode step, cold (median µs for all; ratio = that "
                        "time / the kernel's)")
    for col in ("rows", "kernel", "BLAS, as stored", "ratio", "BLAS, transposed", "ratio", "bf16 products",
                "ratio"):
        table.add_column(col, justify="right")
    for n in (1, 4, 16, 576):
        xs = [torch.randn(n, w.shape[1]) for w in weights]
        variants = {name: (lambda ws=ws, fn=kernels.linear_panels if name in ("kernel", "bf16") else F.linear, xs=xs: [
            fn(x, w) for x, w in zip(xs, ws)]) for name, ws in layouts.items()}
        outs = {name: f() for name, f in variants.items()}
        assert all((a - b).abs().max() < (2e-2 if name == "bf16" else 1e-4) * max(1.0, b.abs().max())
                   for name, o in outs.items() for a, b in zip(o, outs["kernel"]))
        res: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(15):
            for name, f in variants.items():
                res[name].append(timed(f, 3, sweep))
        med = {name: statistics.median(v) * 1e6 for name, v in res.items()}
        table.add_row(str(n), f"{med['kernel']:.0f}", f"{med['stored']:.0f}", f"{med['stored'] / med['kernel']:.2f}x",
                      f"{med['transposed']:.0f}", f"{med['transposed'] / med['kernel']:.2f}x", f"{med['bf16']:.0f}",
                      f"{med['bf16'] / med['kernel']:.2f}x")
    console.print(table)


def absorbed_table(model: nanoseek.NanoSeek, console: Console) -> None:
    """MLA's two per-head products of every layer (W_UKᵀ q_nope, W_UV o), cold: torch's einsum over the float32
    kv_b_proj weight (as served in fp32) vs heads_linear_bf16 over its per-head bf16 panels (infer/bf16.py)."""
    attns = [layer.self_attn for layer in model.layers]
    if not all(PackedKVB.takes(a) for a in attns):
        console.print("the per-head products: the panels do not take this model's kv_b_proj, nothing to compare")
        return
    cfg = model.config
    heads, dn, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank
    views = [a.kv_b_proj.weight.detach().view(heads, dn + cfg.v_head_dim, r) for a in attns]
    plain = [(w[:, :dn], w[:, dn:]) for w in views]
    packed = [PackedKVB(a.kv_b_proj, heads, dn) for a in attns]
    sweep = torch.empty(60_000_000)
    table = Table(title=f"the per-head products of absorbed attention in {len(attns)} layers, cold (median µs)")
    for col in ("rows", "einsum, fp32", "heads_linear_bf16", "einsum / kernel"):
        table.add_column(col, justify="right")
    for n in (1, 4, 16, 576):
        q_nope, o = torch.randn(n, heads, dn), torch.randn(n, heads, r)
        variants = {"einsum": lambda q_nope=q_nope, o=o: [(torch.einsum("nhd,hdr->nhr", q_nope, uk),
                                                           torch.einsum("nhr,hvr->nhv", o, uv)) for uk, uv in plain],
                    "kernel": lambda q_nope=q_nope, o=o: [(m.query_latent(q_nope), m.values(o)) for m in packed]}
        outs = {name: f() for name, f in variants.items()}
        assert all((a - b).abs().max() < 2e-2 * max(1.0, b.abs().max()) for pair, ref in zip(outs["kernel"],
                   outs["einsum"]) for a, b in zip(pair, ref))
        res: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(15):
            for name, f in variants.items():
                res[name].append(timed(f, 3, sweep))
        e, k = (statistics.median(res[name]) * 1e6 for name in variants)
        table.add_row(str(n), f"{e:.0f}", f"{k:.0f}", f"{e / k:.2f}x")
    console.print(table)


def attention_table(model: nanoseek.NanoSeek, console: Console) -> None:
    """One layer's absorbed attention for a decode step (one query row per sequence, all heads), in cache."""
    cfg = model.config
    r, width, heads = cfg.kv_lora_rank, cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.num_attention_heads
    rows = torch.randn(16, cfg.max_position_embeddings, width)
    scale = model.layers[0].self_attn.softmax_scale
    table = Table(title="a layer's attention at a decode step (median µs; torch = the cache's rows gathered, two "
                        "batched products and a softmax, eager)")
    for col in ("sequences", "context", "kernel", "torch", "torch / kernel"):
        table.add_column(col, justify="right")
    for b in (1, 16):
        for context in (64, 512, cfg.max_position_embeddings - 1):
            batch = Batch.make(list(range(b)), [context] * b, [1] * b, 1, torch.device("cpu"))
            q = torch.randn(b, 1, heads, width)
            variants = {"kernel": lambda q=q, batch=batch: kernels.latent_attention(q, rows, batch.slots,
                                                                                    batch.visible, scale, r),
                        "torch": lambda q=q, batch=batch: _attend_gathered(q, rows, batch, scale, r)}
            assert (variants["kernel"]() - variants["torch"]()).abs().max() < 1e-4
            res: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(15):
                for name, f in variants.items():
                    res[name].append(timed(f, 5, None))
            k, t = (statistics.median(res[name]) * 1e6 for name in variants)
            table.add_row(str(b), str(context + 1), f"{k:.0f}", f"{t:.0f}", f"{t / k:.2f}x")
    console.print(table)


def main() -> None:
    if not kernels.load():
        raise SystemExit("the decode kernel could not be built here (see the warning above): nothing to compare")
    torch.manual_seed(0)
    model = nanoseek.NanoSeek(nanoseek.preset("demo")).eval()
    console = Console(width=140)
    with torch.inference_mode():
        experts_table(model, console)
    step_table(model, console)
    with torch.inference_mode():
        linears_table(model, console)
        absorbed_table(model, console)
        attention_table(model, console)


if __name__ == "__main__":
    main()
