"""nanoseek.cost.model and .hardware against the running model: parameters, FLOPs (FlopCounterMode on real forward
and backward passes, and on a real decode step), activation bytes (what autograd saves) and the peak memory of a
real training step (the CPU allocator's events, read by torch.profiler)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import nanoseek
from nanoseek.cost.hardware import ACCELERATORS, cpu_matmul_probe, match_device_name, peak_flops, table_peak
from nanoseek.cost.model import count_params, estimate, nonembedding_flops_per_token
from nanoseek.infer.forward import Batch, LatentCache, forward_cached
from nanoseek.train.parallel import activation_checkpointing

# qk_head_dim = v_head_dim (8 + 8 = 16) so that SDPA gets no zero padding and executes exactly the model's FLOPs
CONFIGS = {
    "dense": dict(first_k_dense_replace=2, num_nextn_predict_layers=0),
    "dense-no-experts": dict(first_k_dense_replace=2, num_nextn_predict_layers=0, n_routed_experts=0),
    "moe": dict(num_nextn_predict_layers=0),
    "moe-qlora-all-moe": dict(q_lora_rank=24, first_k_dense_replace=0, num_nextn_predict_layers=0),
    "moe-mtp-2shared": dict(num_nextn_predict_layers=1, n_shared_experts=2),
    "tied-bias": dict(tie_word_embeddings=True, attention_bias=True, q_lora_rank=24),
    "dense-past-the-layers-mtp": dict(first_k_dense_replace=9, num_nextn_predict_layers=1),  # MTP stays MoE
}


def tiny(**kw) -> nanoseek.ModelConfig:
    return nanoseek.preset("tiny", qk_nope_head_dim=8, **kw)


@pytest.mark.parametrize("kw", CONFIGS.values(), ids=CONFIGS.keys())
def test_parameter_counts_match_the_model(kw):
    cfg = tiny(**kw)
    model = nanoseek.NanoSeek(cfg)
    named = dict(model.named_parameters())  # a tied weight appears once
    frac = cfg.num_experts_per_tok / cfg.n_routed_experts if cfg.n_routed_experts else 0.0
    p = count_params(cfg)
    assert model.num_parameters() == p.total - p.mtp  # the model's own count leaves MTP out
    assert p.total == sum(t.numel() for t in named.values())
    assert p.active == round(sum(t.numel() * (frac if ".experts." in n else 1) for n, t in named.items()))
    assert p.embedding == sum(t.numel() for n, t in named.items() if n.split(".")[0] in ("embed_tokens", "lm_head"))
    assert p.mtp == sum(t.numel() for n, t in named.items() if n.startswith("mtp."))
    assert p.non_embedding == p.total - p.embedding


def _causal_sdpa_flops(q, k, v, dropout=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:
    """What torch's CPU flash kernel computes: q·kᵀ and p·v over the key blocks a query can see (it skips the
    masked half of a causal product): 2·(d_qk + d_v) per (query, visible key) pair and head."""
    b, h, t, d_qk = q
    s, d_v = k[2], v[3]
    pairs = t * (t + 1) // 2 if is_causal else t * s
    return 2 * b * h * pairs * (d_qk + d_v)


def _causal_sdpa_backward_flops(grad, q, k, v, out, lse, dropout=0.0, is_causal=False, *args, out_shape=None,
                                **kwargs) -> int:
    return 2 * _causal_sdpa_flops(q, k, v, dropout, is_causal)  # d q, d k, d v, d p: torch's 2x-forward rule


def _addmm_inplace_flops(acc, a, b, *args, out_shape=None, **kwargs) -> int:
    return 2 * a[0] * a[1] * b[1]


# Ops torch's counter has no formula for: CPU flash attention (counted causally, as the kernel runs it) and the
# in-place addmm_ with which the fused head accumulates d lm_head (model/loss.py; counted like addmm).
UNCOUNTED = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _causal_sdpa_flops,
             torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _causal_sdpa_backward_flops,
             torch.ops.aten.addmm_: _addmm_inplace_flops}


@pytest.mark.parametrize("kw", CONFIGS.values(), ids=CONFIGS.keys())
def test_train_flops_match_flop_counter(kw):
    cfg = tiny(**kw)
    model = nanoseek.NanoSeek(cfg)
    B, T = 2, 64  # long enough that attention is ~10% of the total: a wrong attention term fails the 5%
    x = torch.randint(0, cfg.vocab_size, (B, T))
    with FlopCounterMode(display=False, custom_mapping=UNCOUNTED) as counter:
        out = model(x, labels=x, return_logits=False)
        loss = out.ce_sum + sum(out.mtp_ce_sums)
        loss.backward()
    est = estimate(cfg, seq_len=T, micro_batch=B)
    # the fused head computes d h and d W in its forward (model/loss.py): same FLOPs, counted there
    assert counter.get_total_flops() == pytest.approx(est.train_flops_per_token * B * T, rel=0.05)


def test_decode_flops_match_flop_counter():
    """One decode step of 4 sequences over a latent cache of `context` tokens: absorbed MLA (infer/forward.py)."""
    cfg = tiny(num_nextn_predict_layers=0)
    model = nanoseek.NanoSeek(cfg).eval()
    slots, context = 4, 40  # 4 tokens x top-2 = 8 expert rows (the decode kernel: counted by its FLOP formula)
    cache = LatentCache(cfg, slots, 64, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        prompt = torch.randint(0, cfg.vocab_size, (slots, context - 1))
        forward_cached(model, cache, prompt, Batch.make(list(range(slots)), [0] * slots, [context - 1] * slots,
                                                        context - 1, torch.device("cpu")))
        step = Batch.make(list(range(slots)), [context - 1] * slots, [1] * slots, 1, torch.device("cpu"))
        with FlopCounterMode(display=False) as counter:
            model.lm_head(forward_cached(model, cache, torch.randint(0, cfg.vocab_size, (slots, 1)), step))
    est = estimate(cfg, seq_len=context, micro_batch=1)
    assert counter.get_total_flops() == pytest.approx(est.decode_flops_per_token(context) * slots, rel=0.05)


def test_nonembedding_flops_is_deepseek_llm_m():
    """M (arXiv 2401.02954 eq. 2) leaves out the vocabulary and counts attention over the full sequence."""
    cfg = tiny()
    assert nonembedding_flops_per_token(cfg, 64) == nonembedding_flops_per_token(tiny(vocab_size=4096), 64)
    per_key = 3 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    assert nonembedding_flops_per_token(cfg, 100) - nonembedding_flops_per_token(cfg, 36) == per_key * 64


def _saved_bytes(model, x, dtype: str) -> int:
    """Bytes of the distinct storages autograd saves for the backward (parameters left out)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        model(x, labels=x, return_logits=False)
    return sum(seen.values())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kw", [CONFIGS["moe-mtp-2shared"], CONFIGS["moe-qlora-all-moe"], CONFIGS["dense"]],
                         ids=["mtp", "qlora", "dense"])
def test_activation_bytes_match_saved_tensors(kw, dtype):
    cfg = tiny(**kw)
    model = nanoseek.NanoSeek(cfg).train()
    B, T = 4, 128
    measured = _saved_bytes(model, torch.randint(0, cfg.vocab_size, (B, T)), dtype)
    est = estimate(cfg, T, B, dtype, device="cpu").memory.activations.saved
    assert est == pytest.approx(measured, rel=0.10)


def _step_peak_bytes(cfg, B: int, T: int, dtype: str, ckpt: bool) -> float:
    """Parameters + AdamW state (held between steps) + the allocator's peak during one more training step."""
    torch.manual_seed(0)
    model = nanoseek.NanoSeek(cfg).train()
    if ckpt:
        activation_checkpointing(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the trainer's (train/loop.py)
    x = torch.randint(0, cfg.vocab_size, (B, T))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = model(x, labels=x, return_logits=False)
        (out.ce_sum + sum(out.mtp_ce_sums)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # creates AdamW's moments
    held = sum(p.nbytes for p in model.parameters())
    held += sum(t.nbytes for s in opt.state.values() for t in s.values() if t.dim())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:  # allocations (> 0) and frees (< 0) in time order
        live += e.nbytes()
        peak = max(peak, live)
    return held + peak


@pytest.mark.parametrize(("name", "kw", "B", "T", "dtype", "ckpt"), [
    ("tiny", {}, 8, 128, "fp32", False),  # activations dominate
    ("tiny", {}, 8, 128, "bf16", False),
    ("tiny", {}, 8, 128, "fp32", True),
    ("demo", dict(num_hidden_layers=2, vocab_size=2048), 1, 32, "fp32", False),  # weights and AdamW dominate
    ("demo", dict(num_hidden_layers=2, vocab_size=2048, q_lora_rank=64), 4, 64, "bf16", True),
], ids=["tiny-fp32", "tiny-bf16", "tiny-ckpt", "demo2-weights", "demo2-qlora-bf16-ckpt"])
def test_training_memory_matches_measured_peak(name, kw, B, T, dtype, ckpt):
    cfg = nanoseek.preset(name, **kw)
    measured = _step_peak_bytes(cfg, B, T, dtype, ckpt)
    est = estimate(cfg, T, B, dtype, activation_checkpointing=ckpt, device="cpu").memory.peak
    assert est == pytest.approx(measured, rel=0.25)


def test_sharded_and_replicated_memory_per_rank():
    cfg = nanoseek.preset("demo")
    one = estimate(cfg, 256, 4).memory
    ddp = estimate(cfg, 256, 4, dp="ddp", world=4).memory
    fsdp = estimate(cfg, 256, 4, dp="fsdp", world=4).memory
    assert ddp.weights == one.weights and ddp.ddp_buckets == one.grads  # replicated, plus the flat buckets
    assert fsdp.weights == one.weights / 4 and fsdp.optimizer == one.optimizer / 4 and fsdp.gathered > 0
    assert fsdp.peak < ddp.peak


def test_serving_memory_is_weights_plus_latent_cache():
    cfg = nanoseek.preset("demo")
    est = estimate(cfg, 256, 1, dtype="bf16")
    cache = LatentCache(cfg, slots=2, max_len=64, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert est.kv_bytes_per_token() == cache.nbytes // (2 * 64)
    weights = sum(p.numel() for n, p in nanoseek.NanoSeek(cfg).named_parameters() if not n.startswith("mtp."))
    assert est.serving_bytes(1000) == weights * 2 + 1000 * est.kv_bytes_per_token()


def test_accelerator_table_and_device_names():
    for acc in ACCELERATORS.values():
        assert acc.source and acc.fp32 > 0 and acc.memory_gb > 0 and acc.tdp_w > 0
        assert acc.bf16 is None or acc.bf16 > acc.fp32  # dense tensor-core bf16 beats plain fp32 everywhere
    names = {"NVIDIA H100 80GB HBM3": "H100-SXM", "NVIDIA H100 PCIe": "H100-PCIe", "NVIDIA H200": "H200",
             "NVIDIA A100-SXM4-80GB": "A100-80GB", "NVIDIA A100-PCIE-40GB": "A100-40GB", "NVIDIA L4": "L4",
             "Tesla T4": "T4", "NVIDIA GeForce RTX 4090": "RTX-4090", "NVIDIA GeForce RTX 3090": "RTX-3090"}
    for device_name, key in names.items():
        assert match_device_name(device_name).name == key
    assert match_device_name("NVIDIA GeForce GTX 1080") is None
    # a slice of a card, a laptop part, a superchip or an NVL card is not the table's card: probed instead
    for device_name in ("NVIDIA A100-SXM4-80GB MIG 1g.10gb", "NVIDIA H100 80GB HBM3 MIG 3g.40gb", "NVIDIA H200 NVL",
                        "NVIDIA GH200 480GB", "NVIDIA GeForce RTX 4090 Laptop GPU", "NVIDIA H100 NVL"):
        assert match_device_name(device_name) is None, device_name
    assert table_peak(ACCELERATORS["T4"], "bf16") == (ACCELERATORS["T4"].fp32, "T4 datasheet fp32 (no bf16 "
                                                                                 "tensor cores)")


def test_cpu_peak_is_the_best_probe_seen_on_this_machine(tmp_path, monkeypatch):
    """Load only slows a probe down: the best one on this machine (this CPU, threads, dtype, torch) is kept in
    nanoseek's cache and is the peak for later processes; a better probe replaces it; a broken file is ignored."""
    from nanoseek.cost import hardware

    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path))
    probes = iter([2e11, 1e11, 3e11, 5e10])
    monkeypatch.setattr(hardware, "matmul_probe", lambda *a, **k: next(probes))

    def new_process() -> float:
        monkeypatch.setattr(hardware, "_cpu_peaks", {})
        return cpu_matmul_probe("fp32")

    assert new_process() == 2e11  # the first probe on this machine
    assert new_process() == 2e11  # a slower one (a busy minute) does not lower it
    assert new_process() == 3e11  # a faster one raises it
    stored = json.loads((tmp_path / hardware.PEAKS_FILE).read_text())
    assert list(stored.values()) == [3e11] and "fp32" in next(iter(stored))
    (tmp_path / hardware.PEAKS_FILE).write_text("{not json")
    assert new_process() == 5e10  # unreadable: as if empty (and rewritten)
    assert list(json.loads((tmp_path / hardware.PEAKS_FILE).read_text()).values()) == [5e10]


def test_cpu_peak_is_a_cached_probe(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path))  # not the user's record of this machine's best probe
    flops, label = peak_flops(torch.device("cpu"), "fp32")
    assert flops > 1e8 and label == "CPU matmul probe fp32"
    assert cpu_matmul_probe("fp32") == flops  # measured once per process
    best = cpu_matmul_probe("fp32", again=True)  # measured anew: the best of all probes stays
    assert best >= flops and cpu_matmul_probe("fp32") == best
