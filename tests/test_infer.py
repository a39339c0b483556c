"""The inference engine against the plain full-sequence forward (the independent reference)."""

from __future__ import annotations

import asyncio
import copy
import gc
import os
import random
import subprocess
import sys
import threading
import time
import traceback
import types
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import nanoseek
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer import Engine, EngineStopped, InferenceError, LatentCache, QueueFull, SamplingParams, kernels
from nanoseek.infer.forward import Batch, _attend_gathered, decode_moe, forward_cached
from nanoseek.infer.quant import Int8Experts, dequantize_rows, quantize_experts, quantize_rows
from nanoseek.infer.text import TextStream

CONFIGS = {
    "plain": {},
    "q_lora+yarn+interleave": dict(q_lora_rank=24, rope_interleave=True, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 1.0, "mscale_all_dim": 0.8,
        "beta_fast": 32, "beta_slow": 1}),
    "kernel widths": dict(qk_rope_head_dim=16),  # cache rows of 32 + 16: the attention kernel reads them in place
}


class IdText:
    """A decoder for tests without a trained tokenizer: token i reads as "<i>"."""

    eos_id = 1

    def decode(self, ids: list[int]) -> str:
        return "".join(f"<{i}>" for i in ids)


def tiny(seed: int = 0, **kw) -> nanoseek.NanoSeek:
    torch.manual_seed(seed)
    return nanoseek.NanoSeek(nanoseek.preset("tiny", initializer_range=0.1, max_position_embeddings=128, **kw)).eval()


def greedy_reference(model: nanoseek.NanoSeek, prompt: list[int], n: int) -> list[int]:
    """The plain full-sequence forward, token by token, on the model's device."""
    ids = torch.tensor([prompt], device=model.embed_tokens.weight.device)
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat((ids, model(ids)[:, -1].argmax(-1, keepdim=True)), dim=1)
    return ids[0, len(prompt):].tolist()


def greedy_shortfall(model: nanoseek.NanoSeek, prompt: list[int], tokens: list[int]) -> float:
    """How far `tokens` fall short of greedy under the plain full forward, fed the tokens themselves: the largest gap
    between the best logit and the chosen token's. 0 when every token is the argmax. For paths that round otherwise
    (bf16 products), whose near-ties may break the other way, where an exact match would depend on the CPU."""
    ids = torch.tensor([prompt + tokens], device=model.embed_tokens.weight.device)
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) - 1:-1].float()
    chosen = logits.gather(-1, ids[0, len(prompt):, None].to(logits.device))[:, 0]
    return (logits.max(-1).values - chosen).max().item()


PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17], [3], [40, 41, 42, 43], [100, 7]]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_forward_matches_full_forward(name, dtype):
    """In bf16 (`--dtype bf16`) the two paths round differently: within 0.15 on logits up to ~3, where bf16 and fp32
    forwards differ by ~0.07. With kernel widths (and the kernel built) the cached path attends in the kernel,
    over a bf16 cache too."""
    model = tiny(**CONFIGS[name]).to(dtype)
    ids = torch.randint(0, 256, (1, 40))
    cache = LatentCache(model.config, slots=3, max_len=64, device=torch.device("cpu"), dtype=dtype)
    with torch.no_grad():
        ref = model(ids)
        # the prompt in two pieces (prefill 25, then 15 more) into slot 2: the same logits as one full pass
        h1 = forward_cached(model, cache, ids[:, :25], Batch.make([2], [0], [25], 25, ids.device))
        h2 = forward_cached(model, cache, ids[:, 25:], Batch.make([2], [25], [15], 15, ids.device))
    got = model.lm_head(torch.cat((h1, h2), dim=1))
    assert got.dtype == ref.dtype == dtype
    assert (got.float() - ref.float()).abs().max() < (1e-4 if dtype == torch.float32 else 0.15)


def test_inference_dtype_auto_is_fp32_on_a_cpu(tmp_path, data_dir, monkeypatch):
    """`--dtype auto` is fp32 on a CPU, also one with bf16 tiles (training's auto picks bf16 there; decoding's fp32
    mat-vecs are the faster ones), bf16 on request; the routed experts follow --dtype unless --expert-dtype says
    otherwise; routing and rotary frequencies stay fp32."""
    from nanoseek.infer.engine import load_for_inference
    from nanoseek.model.moe import Experts

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)

    tiny(vocab_size=512).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((data_dir / name).read_bytes())

    def dtypes(m: nanoseek.NanoSeek) -> tuple[torch.dtype, ...]:
        experts = next(e for e in m.modules() if isinstance(e, Experts))
        return (m.embed_tokens.weight.dtype, experts.gate_up_proj.dtype, m.layers[1].mlp.gate.weight.dtype,
                m.rotary_emb.inv_freq.dtype)

    f32, b16 = torch.float32, torch.bfloat16
    assert dtypes(load_for_inference(tmp_path, device="cpu")[0]) == (f32, f32, f32, f32)
    model, tok = load_for_inference(tmp_path, device="cpu", dtype="bf16")
    assert dtypes(model) == (b16, b16, f32, f32)
    with pytest.raises(InferenceError, match="--expert-dtype fp32 with bf16 math would cast the experts"):
        load_for_inference(tmp_path, device="cpu", dtype="bf16", expert_dtype="fp32")
    assert dtypes(load_for_inference(tmp_path, device="cpu", expert_dtype="bf16")[0]) == (f32, b16, f32, f32)
    out = Engine(model, tok).generate([[tok.bos_id, 40, 41]], GREEDY)[0]
    assert len(out) == 10 and out[-1].finish_reason == "length"


def test_long_prefill_attends_in_slices_with_the_same_numbers(monkeypatch):
    """A prefill whose scores would exceed SCORE_ELEMENTS attends a few query rows at a time: bit-identical."""
    from nanoseek.infer import forward

    model = tiny()
    ids = torch.randint(0, 256, (2, 40))
    batch = Batch.make([0, 1], [0, 0], [40, 31], 40, ids.device)  # ragged: the second row pads 9 positions
    outs = []
    for limit in (forward.SCORE_ELEMENTS, 2 * 4 * 40 * 3):  # one pass; passes of 3 query rows
        monkeypatch.setattr(forward, "SCORE_ELEMENTS", limit)
        cache = LatentCache(model.config, slots=2, max_len=64, device=torch.device("cpu"), dtype=torch.float32)
        with torch.no_grad():
            outs.append(forward_cached(model, cache, ids, batch))
    assert torch.equal(outs[0], outs[1])


def test_long_prompts_prefill_with_expanded_keys_as_the_absorbed_form_does(monkeypatch):
    """A fresh prefill over more than KERNEL_KEYS tokens expands keys and values from the latent (MLA.attend, as in
    training) instead of absorbing kv_b_proj: the same hidden states at every real position (fp32, to rounding), the
    same cache rows; and the engine's greedy tokens for a long prompt beside a short one stay the full
    forward's. A batch with cached rows (a continuation) is never expanded."""
    from nanoseek.infer import forward
    from nanoseek.model.mla import MLA

    model = tiny()
    T, lengths = forward.KERNEL_KEYS + 16, [forward.KERNEL_KEYS + 16, forward.KERNEL_KEYS + 3]
    ids = torch.randint(0, 256, (2, T))
    expanded = []
    real_attend = MLA.attend
    monkeypatch.setattr(MLA, "attend", lambda self, *a: expanded.append(a[0].shape) or real_attend(self, *a))
    outs, caches = [], []
    for limit in (forward.KERNEL_KEYS, 10**9):  # expanded; absorbed (batched products) for every prefill
        monkeypatch.setattr(forward, "KERNEL_KEYS", limit)
        cache = LatentCache(model.config, slots=2, max_len=T + 8, device=torch.device("cpu"), dtype=torch.float32)
        with torch.no_grad():
            outs.append(forward_cached(model, cache, ids, Batch.make([0, 1], [0, 0], lengths, T, ids.device)))
        caches.append(cache)
    assert len(expanded) == model.config.num_hidden_layers  # the first pass only, every layer
    real = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    torch.testing.assert_close(outs[0][real], outs[1][real], rtol=1e-5, atol=1e-5)
    assert torch.equal(caches[0].rows[0], caches[1].rows[0])  # written before attending: the first layer's alike
    for a, b in zip(caches[0].rows[1:], caches[1].rows[1:]):  # then from hidden states equal to rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    monkeypatch.setattr(forward, "KERNEL_KEYS", 4)
    expanded.clear()
    with torch.no_grad():  # 5 new tokens after 70 cached: absorbed, over the cache
        forward_cached(model, caches[0], ids[:, :5], Batch.make([0, 1], [70, 70], [5, 5], 5, ids.device))
    assert not expanded

    long_prompt = torch.randint(2, 256, (40,)).tolist()  # over KERNEL_KEYS = 4: expanded
    outs = Engine(model, IdText(), max_batch=2).generate([long_prompt, [5, 6, 7]], GREEDY)
    assert expanded
    for prompt, events in zip([long_prompt, [5, 6, 7]], outs):
        assert [e.token_id for e in events] == greedy_reference(model, prompt, 10)


def test_stale_non_finite_rows_of_a_slot_do_not_reach_its_next_request():
    """A slot keeps an earlier request's rows past its new length. Batched with a longer row, a shorter one's keys
    span them; their softmax weight is 0, but 0 · NaN is NaN. Row 0 (3 cached + 2 new tokens, padded to 4) beside
    row 1 (10 keys): NaN rows at row 0's positions 5-9 change nothing, for real and padding queries alike."""
    model = tiny()
    ids = torch.randint(0, 256, (2, 4))
    batch = Batch.make([0, 1], [3, 6], [2, 4], 4, ids.device)
    outs = []
    for stale in (0.0, float("nan")):
        torch.manual_seed(1)
        cache = LatentCache(model.config, slots=2, max_len=16, device=torch.device("cpu"), dtype=torch.float32)
        for rows in cache.rows:
            rows.normal_()
            rows[0, 5:] = stale
        with torch.no_grad():
            outs.append(forward_cached(model, cache, ids, batch))
    assert outs[1].isfinite().all()
    assert torch.equal(outs[0], outs[1])


def test_bf16_attention_scores_are_not_rounded_before_the_softmax():
    """A bf16 cache (a bf16 model) attends as fp32 math on the bf16 values would: q·k rounded to bf16 first would
    be off by up to 0.25 at scores near 64, which the softmax turns into weights off by ~25%."""
    from nanoseek.infer.forward import _attend

    torch.manual_seed(0)
    B, T, h, r, rope, K = 2, 3, 4, 16, 8, 24
    q = (torch.randn(B, T, h, r + rope) * 3).bfloat16()
    keys = (torch.randn(B, K, r + rope) * 3).bfloat16()
    visible = torch.ones(B, T, K, dtype=torch.bool)
    got = _attend(q, keys, keys.float(), visible, 1.0, r).double()
    p = torch.einsum("bthd,bkd->bthk", q.double(), keys.double()).softmax(-1)
    want = torch.einsum("bthk,bkr->bthr", p, keys[..., :r].double())
    assert (got - want).abs().max().item() < 0.1  # outputs up to ~9: 0.03 now; 0.47 with bf16-rounded scores


def test_compiled_engine_equals_eager():
    """The compiled decode step (gathered experts, dynamic batch and key counts) gives the eager tokens, with
    requests joining and leaving, and never compiles again after its warm-up; two engines on different models in
    one process each keep their own graphs. The second model's Linear layers go through the decode kernel where it
    is built (infer/layout.py; test_linear_layers_through_the_kernel_decode_the_same checks its op is in the graph)."""
    from torch._dynamo.utils import counters

    from nanoseek.infer import layout

    params = [SamplingParams(max_tokens=6 + i, temperature=0, ignore_eos=True) for i in range(len(PROMPTS))]
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        model = tiny(**cfg)
        eager = Engine(model, IdText(), max_batch=3).generate(PROMPTS, params)
        if i == 1 and kernels.load():
            assert layout.use_decode_kernel(model) > 0
            assert Engine(model, IdText(), max_batch=3).generate(PROMPTS, params) == eager
        compiled = Engine(model, IdText(), max_batch=3, compile=True)
        compiled.start()
        compiled.ready.wait()
        graphs = counters["stats"]["unique_graphs"]
        try:
            got = compiled.generate(PROMPTS, params)
        finally:
            compiled.shutdown()
        assert counters["stats"]["unique_graphs"] == graphs, f"{name}: recompiled while decoding"
        assert compiled.compile, f"{name}: compilation fell back to eager"
        assert [[e.token_id for e in evs] for evs in got] == [[e.token_id for e in evs] for evs in eager], name


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_engine_equals_full_forward(name):
    model = tiny(**CONFIGS[name])
    outs = Engine(model, IdText(), max_batch=3).generate(PROMPTS, GREEDY)  # 5 requests, 3 slots: joins and leaves
    for prompt, events in zip(PROMPTS, outs):
        assert [e.token_id for e in events] == greedy_reference(model, prompt, 10)
        assert [e.finish_reason for e in events] == [None] * 9 + ["length"]
        assert events[-1].prompt_tokens == len(prompt) and events[-1].completion_tokens == 10


def test_engine_attending_in_the_kernel_equals_full_forward(monkeypatch):
    """tiny's cache rows (latent 32 + rope 8) are no width the attention kernel takes; with a rope of 16 (48) every
    decode step attends in it, reading the cache in place, and so do prefills over up to KERNEL_KEYS keys; greedy
    tokens stay the full forward's. With KERNEL_KEYS = 4 the longer prompts' prefills are expanded instead."""
    from nanoseek.infer import forward

    kernel_built()
    real = kernels.latent_attention
    model = tiny(qk_rope_head_dim=16)
    calls = []  # (query rows, keys) of each call
    monkeypatch.setattr(kernels, "latent_attention",
                        lambda q, rows, slots, visible, *args: calls.append((q.shape[1], visible.shape[-1]))
                        or real(q, rows, slots, visible, *args))
    for limit in (forward.KERNEL_KEYS, 4):
        monkeypatch.setattr(forward, "KERNEL_KEYS", limit)
        calls.clear()
        outs = Engine(model, IdText(), max_batch=3).generate(PROMPTS, GREEDY)
        prefills = {(T, keys) for T, keys in calls if T > 1}
        assert prefills and all(keys <= limit for _, keys in prefills)  # the short prompts' prefills
        assert max(map(len, PROMPTS)) > 4 and any(T == 1 for T, _ in calls)  # ... not the longer ones; decode steps
        for prompt, events in zip(PROMPTS, outs):
            assert [e.token_id for e in events] == greedy_reference(model, prompt, 10)


def test_kv_cache_bytes_per_token_formula_and_mha_ratio():
    config = nanoseek.preset("demo")
    cache = LatentCache(config, slots=2, max_len=16, device=torch.device("cpu"), dtype=torch.bfloat16)
    measured = cache.nbytes / (2 * 16)
    assert measured == LatentCache.bytes_per_token(config, torch.bfloat16) == 6 * (64 + 16) * 2
    # a full multi-head cache of the same model: 8 heads x (48-wide key + 32-wide value) per layer
    assert LatentCache.mha_bytes_per_token(config, torch.bfloat16) / measured == 8 * (48 + 32) / 80


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch():
    model = tiny()
    p = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=7, ignore_eos=True)
    alone = Engine(model, IdText()).generate([PROMPTS[0]], p)[0]
    crowd = Engine(model, IdText(), max_batch=4).generate(PROMPTS, [p, *[SamplingParams(
        max_tokens=12, temperature=1.0, seed=i, ignore_eos=True) for i in range(len(PROMPTS) - 1)]])[0]
    other = Engine(model, IdText()).generate([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=1.0, seed=8,
                                                                          ignore_eos=True))[0]
    tokens = lambda evs: [e.token_id for e in evs]
    assert tokens(alone) == tokens(crowd)
    assert tokens(alone) != tokens(other)
    assert tokens(alone) != greedy_reference(model, PROMPTS[0], 12)  # it really sampled


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = tiny()
    ref = greedy_reference(model, PROMPTS[1], 8)
    for p in (SamplingParams(max_tokens=8, top_k=1, seed=1, ignore_eos=True),
              SamplingParams(max_tokens=8, top_p=1e-6, seed=1, ignore_eos=True)):
        assert [e.token_id for e in Engine(model, IdText()).generate([PROMPTS[1]], p)[0]] == ref


def test_a_tiny_temperature_is_greedy_not_nan():
    """logits / 1e-40 overflow to inf and the softmax to NaN; the sampler divides logits relative to the largest."""
    model = tiny()
    ref = greedy_reference(model, PROMPTS[1], 8)
    for t in (1e-40, 1e-30, 1e-8):
        p = SamplingParams(max_tokens=8, temperature=t, seed=3, ignore_eos=True)
        assert [e.token_id for e in Engine(model, IdText()).generate([PROMPTS[1]], p)[0]] == ref
    with pytest.raises(InferenceError, match="temperature must be a finite number"):
        Engine(model, IdText()).generate([[1]], SamplingParams(temperature=float("inf")))


def _sampling_fails_for_top_k_7(monkeypatch) -> None:
    """The engine's sampling raises for requests with top_k=7: a failure inside a step, on demand."""
    import nanoseek.infer.engine as engine_mod

    real = engine_mod.sample

    def failing(logits, params, generator):
        if params.top_k == 7:
            raise RuntimeError("sampling broke (simulated)")
        return real(logits, params, generator)

    monkeypatch.setattr(engine_mod, "sample", failing)


def test_a_failed_prefill_answers_its_requests_and_frees_their_slots(monkeypatch):
    """Whatever fails inside a step: the requests in it get the error, their slots come back, the engine goes on."""
    _sampling_fails_for_top_k_7(monkeypatch)
    model = tiny()
    engine = Engine(model, IdText(), max_batch=1)
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            engine.generate([PROMPTS[0]], SamplingParams(max_tokens=4, top_k=7, ignore_eos=True))
        assert engine._free == [0] and engine.stats()["running"] == 0
        assert [e.token_id for e in engine.generate([PROMPTS[1]], GREEDY)[0]] == greedy_reference(model, PROMPTS[1],
                                                                                                   10)
    finally:
        engine.shutdown()


def test_a_failed_prefill_leaves_the_running_requests_alone(monkeypatch):
    """A prompt whose prefill fails gets the error; a request already decoding in the same batch is not touched
    (its cache rows are its own) and finishes with the tokens it would have had alone."""
    _sampling_fails_for_top_k_7(monkeypatch)
    model = tiny()
    engine = Engine(model, IdText(), max_batch=2)
    engine.start()

    async def run() -> list[int]:
        running = engine.stream(PROMPTS[1], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
        tokens = [(await running.__anext__()).token_id]  # decoding from here on
        with pytest.raises(RuntimeError, match="simulated"):
            async for _ in engine.stream(PROMPTS[0], SamplingParams(max_tokens=4, top_k=7, ignore_eos=True)):
                pass
        tokens += [ev.token_id async for ev in running]
        return tokens

    try:
        assert asyncio.run(run()) == greedy_reference(model, PROMPTS[1], 30)
        assert sorted(engine._free) == [0, 1] and engine.stats()["running"] == 0
    finally:
        engine.shutdown()


def test_a_cache_that_cannot_be_allocated_fails_the_waiting_requests_and_the_engine_idles(monkeypatch):
    """No memory for the cache: the waiting requests are told, the engine's thread goes back to waiting (it does
    not retry the allocation in a loop) and serves the next request once the allocation works."""
    import nanoseek.infer.engine as engine_mod

    model = tiny()
    real, tries = engine_mod.LatentCache, []

    def cache(*args, **kw):
        tries.append(1)
        if len(tries) == 1:
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kw)

    monkeypatch.setattr(engine_mod, "LatentCache", cache)
    engine = Engine(model, IdText(), max_batch=2)
    steps = []
    step = engine._step
    engine._step = lambda: (steps.append(1), step())[1]  # type: ignore[method-assign]
    engine.start()

    async def failed() -> None:
        with pytest.raises(RuntimeError, match="simulated"):
            async for _ in engine.stream(PROMPTS[0], GREEDY):
                pass

    try:
        asyncio.run(failed())
        time.sleep(0.05)
        idle = len(steps)
        time.sleep(0.3)
        assert len(steps) == idle and len(tries) == 1 and engine.stats()["waiting"] == 0
        out = engine.generate([PROMPTS[2]], GREEDY)
        assert [e.token_id for e in out[0]] == greedy_reference(model, PROMPTS[2], 10) and len(tries) == 2
    finally:
        engine.shutdown()


def test_generate_from_several_threads_shares_the_engine_thread_until_the_last_call_ends():
    """generate() without a running engine starts its thread and stops it when done; calls from other threads
    meanwhile use that thread, and the first call to end must not stop it under the others (they were told the
    engine shut down). The model's train/eval mode comes back as it was before the first call."""
    model = tiny().train()
    engine = Engine(model, IdText(), max_batch=4)
    results: dict[str, object] = {}

    def call(name: str, n: int) -> None:
        try:
            results[name] = len(engine.generate([[5, 6, 7]], SamplingParams(max_tokens=n, ignore_eos=True))[0])
        except Exception as e:  # the test reports what the call raised
            results[name] = e

    first = threading.Thread(target=call, args=("first", 20))  # starts the thread, and ends first
    first.start()
    while engine.stats()["running"] == 0 and first.is_alive():
        time.sleep(0.002)
    call("second", 120)  # tiny's context is 128 positions
    first.join(120)
    assert results == {"first": 20, "second": 120}
    assert engine._thread is None and model.training


def test_generate_wants_one_sampling_setting_per_prompt():
    engine = Engine(tiny(), IdText(), max_batch=2)
    with pytest.raises(InferenceError, match="2 prompts but 3 sampling parameters"):
        engine.generate(PROMPTS[:2], [GREEDY] * 3)


def test_logprobs_are_the_models():
    model = tiny()
    events = Engine(model, IdText()).generate([PROMPTS[0]], SamplingParams(max_tokens=3, temperature=0, logprobs=2,
                                                                           ignore_eos=True))[0]
    ids = torch.tensor([PROMPTS[0] + [e.token_id for e in events]])
    with torch.no_grad():
        logp = model(ids)[0].log_softmax(-1)
    for i, e in enumerate(events):
        row = logp[len(PROMPTS[0]) - 1 + i]
        assert abs(e.logprob - row[e.token_id].item()) < 1e-4
        assert e.top_logprobs[0] == (e.token_id, pytest.approx(e.logprob, abs=1e-6))  # greedy: the top one
        assert len(e.top_logprobs) == 2 and e.top_logprobs[1][1] <= e.top_logprobs[0][1]


def test_stop_token_and_stop_string():
    model = tiny()
    ref = greedy_reference(model, PROMPTS[1], 10)
    events = Engine(model, IdText()).generate([PROMPTS[1]], SamplingParams(max_tokens=10, temperature=0,
                                                                           stop_token_ids=[ref[3]]))[0]
    assert [e.token_id for e in events] == ref[: ref.index(ref[3]) + 1] and events[-1].finish_reason == "stop"
    model.config.eos_token_id = [1, ref[2]]  # every end id of the config stops, not only the tokenizer's EOS
    events = Engine(model, IdText()).generate([PROMPTS[1]], SamplingParams(max_tokens=10, temperature=0))[0]
    assert [e.token_id for e in events] == ref[: ref.index(ref[2]) + 1] and events[-1].finish_reason == "stop"
    events = Engine(model, IdText()).generate([PROMPTS[1]], SamplingParams(max_tokens=10, temperature=0,
                                                                           ignore_eos=True))[0]
    assert [e.token_id for e in events] == ref
    stop = f"<{ref[4]}><{ref[5]}>"
    events = Engine(model, IdText()).generate([PROMPTS[1]], SamplingParams(max_tokens=10, temperature=0, stop=[stop],
                                                                           ignore_eos=True))[0]
    text = "".join(e.text for e in events)
    full = IdText().decode(ref)
    assert text == full[: full.index(stop)] and events[-1].finish_reason == "stop"


def test_text_stream_holds_back_stop_prefixes_and_broken_characters(data_dir):
    tok = Tokenizer.load(data_dir.parent / "tok")
    text = "Hé, the café is open. END of story"
    ids = tok.encode(text)
    s = TextStream(tok, ["END"])
    pieces, stopped = [], False
    for i in ids:
        piece, stopped = s.add(i)
        pieces.append(piece)
        assert "\ufffd" not in piece and not "".join(pieces).endswith(("E", "EN"))
        if stopped:
            break
    assert stopped and "".join(pieces) == "Hé, the café is open. "
    s = TextStream(tok, [])
    assert "".join(s.add(i)[0] for i in tok.encode("naïve — ok")) + s.flush()[0] == "naïve — ok"


class ByteTokens:
    """A byte-level vocabulary made up for a test: token i stands for `pieces[i]`."""

    def __init__(self, *pieces: bytes):
        self.pieces = pieces

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_the_last_token_can_complete_a_stop_string_while_it_starts_a_character():
    # token 1 is a space and the first byte of an Arabic letter (such tokens are common in Arabic and Indic text)
    tok = ByteTokens(b"x", b" \xd8", b"\xa8y")
    s = TextStream(tok, [" "])
    assert s.add(0) == ("x", False) and s.add(1) == ("", False)  # " \xd8" is not a whole character yet
    assert s.flush() == ("", True)  # the answer ends here (max_tokens): the stop string counts all the same
    s = TextStream(tok, ["z"])
    assert [s.add(i) for i in (0, 1)] == [("x", False), ("", False)] and s.flush() == (" \ufffd", False)
    s = TextStream(tok, [" "])  # given the next byte, the stop string is found as the character completes
    assert [s.add(i) for i in (0, 1, 2)] == [("x", False), ("", False), ("", True)]



def test_model_text_for_a_terminal_loses_control_characters_only():
    from nanoseek.infer.text import terminal_safe

    assert terminal_safe("a\x1b[31mb\tc\nd\x9b2Je\x7f\r日本 é") == "a[31mb\tc\nd2Je日本 é"


def test_text_stream_holds_back_exactly_the_longest_stop_prefix():
    """Against the definition: the longest proper prefix of any stop string that the text ends with."""
    def naive(text: str, stops: list[str]) -> int:
        return max([n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])], default=0)

    rng = random.Random(0)
    for _ in range(5000):
        stops = ["".join(rng.choices("abc", k=rng.randint(1, 6))) for _ in range(rng.randint(1, 3))]
        stream = TextStream(IdText(), stops)
        stream.text = "".join(rng.choices("abc", k=rng.randint(0, 12)))
        assert stream._held() == naive(stream.text, stops), (stream.text, stops)


def test_text_stream_decodes_a_short_window_and_equals_the_whole_decode(data_dir):
    """Multi-byte characters split across tokens, a long answer: the pieces concatenate to the full decode, never
    show a broken character, and each decode call sees a few tokens, not the whole answer (O(1) per token)."""
    tok = Tokenizer.load(data_dir.parent / "tok")
    seen: list[int] = []

    class Counting:
        def decode(self, ids: list[int]) -> str:
            seen.append(len(ids))
            return tok.decode(ids)

    rng = random.Random(0)
    alphabet = "abc xyz.,é日本語🙂—\n"
    text = "".join(rng.choice(alphabet) for _ in range(600))
    ids = tok.encode(text)
    s = TextStream(Counting(), [])
    pieces = [s.add(i)[0] for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + s.flush()[0] == tok.decode(ids) == text
    assert len(ids) > 300 and max(seen) <= 8, max(seen)
    s = TextStream(tok, [])  # ends inside a character: flush releases what there is, as a whole decode would
    cut = ids[:next(n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd"))]
    assert "".join(s.add(i)[0] for i in cut) + s.flush()[0] == tok.decode(cut)



def test_mailbox_wakes_the_loop_once_per_batch_of_events():
    """What a decode step emits for many streams reaches their queues in order with one wake-up of the loop."""
    from nanoseek.infer.engine import _Mailbox

    wakeups = []

    class Counted(_Mailbox):
        def _deliver(self) -> None:  # runs once per call_soon_threadsafe: one per wake-up
            wakeups.append(len(self.pending))
            super()._deliver()

    loop = asyncio.new_event_loop()
    queues = [asyncio.Queue() for _ in range(3)]
    box = Counted(loop)
    try:
        posting = threading.Thread(target=lambda: [box.post(q, (i, step)) for step in range(4)
                                                   for i, q in enumerate(queues)])
        posting.start()
        posting.join()  # the loop is not running: everything waits for one wake-up
        loop.run_until_complete(asyncio.sleep(0))
        assert wakeups == [12]
        assert [[q.get_nowait() for _ in range(q.qsize())] for q in queues] == [
            [(i, step) for step in range(4)] for i in range(3)]
        box.post(queues[0], "next")  # after a delivery, the next event wakes the loop again
        loop.run_until_complete(asyncio.sleep(0))
        assert wakeups == [12, 1] and queues[0].get_nowait() == "next"
    finally:
        loop.close()
    gone = weakref.ref(loop)
    del loop
    gc.collect()
    assert gone() is None  # the engine keeps a mailbox per loop; it must not keep the loop alive
    box.post(queues[1], "late")  # and posting for a loop that is gone is a no-op, not an error


def test_a_step_posts_its_events_while_the_mailbox_is_held():
    """While held (one prefill or decode step), posts wake nothing, even once the loop has emptied the mailbox (on
    an idle core it did, and every event woke it again); the release wakes the loop once for all of them. The
    engine holds its loops' mailboxes around every step that emits: all stream events are posted held."""
    from nanoseek.infer.engine import _Mailbox

    wakeups = []

    class Counted(_Mailbox):
        def _deliver(self) -> None:
            wakeups.append(len(self.pending))
            super()._deliver()

    loop = asyncio.new_event_loop()
    q: asyncio.Queue = asyncio.Queue()
    box = Counted(loop)
    try:
        box.hold()
        box.post(q, 1)
        loop.run_until_complete(asyncio.sleep(0))
        assert wakeups == []  # held: no wake-up for the first event
        box.post(q, 2)
        box.release()
        loop.run_until_complete(asyncio.sleep(0))
        assert wakeups == [2] and [q.get_nowait(), q.get_nowait()] == [1, 2]
        box.hold()
        box.release()  # nothing posted: nothing to wake for
        loop.run_until_complete(asyncio.sleep(0))
        assert wakeups == [2]
    finally:
        loop.close()

    held = []
    real = _Mailbox.post

    def spy(self, events, ev):
        held.append(self.held)
        real(self, events, ev)

    engine = Engine(tiny(), IdText(), max_batch=4)

    async def streams() -> list[list[int]]:
        async def one(prompt: list[int]) -> list[int]:
            return [ev.token_id async for ev in engine.stream(prompt, GREEDY)]
        return await asyncio.gather(*(one(p) for p in PROMPTS[:4]))

    _Mailbox.post = spy
    try:
        got = asyncio.run(streams())
    finally:
        _Mailbox.post = real
        engine.shutdown()
    assert got == [[e.token_id for e in evs] for evs in Engine(tiny(), IdText(), max_batch=4).generate(PROMPTS[:4],
                                                                                                       GREEDY)]
    assert len(held) == 4 * 10 and all(held)


def test_bad_requests_are_clear_errors():
    engine = Engine(tiny(), IdText())
    with pytest.raises(InferenceError, match="exceeds the model's context of 128"):
        engine.generate([[1] * 100], SamplingParams(max_tokens=29))
    with pytest.raises(InferenceError, match="empty"):
        engine.generate([[]], SamplingParams())
    with pytest.raises(InferenceError, match="outside the vocabulary"):
        engine.generate([[99999]], SamplingParams())
    with pytest.raises(InferenceError, match="top_p"):
        engine.generate([[1]], SamplingParams(top_p=0))
    with pytest.raises(InferenceError, match="MTP"):
        Engine(tiny(num_nextn_predict_layers=0), IdText(), speculative="mtp")


def test_no_queue_still_fills_free_slots():
    """max_queue=0: no waiting line, so a request is refused only when every slot is taken (it used to refuse all)."""
    engine = Engine(tiny(), IdText(), max_batch=2, max_queue=0)
    engine.start()
    long = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)

    async def run() -> None:
        busy = [engine.stream(p, long) for p in PROMPTS[:2]]
        for g in busy:  # each takes a free slot
            await g.__anext__()
        with pytest.raises(QueueFull, match="waiting for a slot"):
            await engine.stream(PROMPTS[2], GREEDY).__anext__()
        for g in busy:
            await g.aclose()

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()
    with pytest.raises(InferenceError, match="max_queue"):
        Engine(tiny(), IdText(), max_queue=-1)


def test_wait_policy_holds_requests_until_a_slot_frees():
    """queue_policy="wait" with one slot and no waiting line: the requests that find it taken wait for it (instead
    of QueueFull) and each still gets its own greedy answer."""
    model = tiny()
    engine = Engine(model, IdText(), max_batch=1, max_queue=0, queue_policy="wait")
    engine.start()

    async def run() -> list[list[int]]:
        async def collect(prompt: list[int]) -> list[int]:
            return [e.token_id async for e in engine.stream(prompt, GREEDY)]

        return await asyncio.wait_for(asyncio.gather(*(collect(p) for p in PROMPTS[:3])), 120)

    try:
        got = asyncio.run(run())
    finally:
        engine.shutdown()
    assert got == [greedy_reference(model, p, 10) for p in PROMPTS[:3]]


def test_shutdown_tells_unfinished_requests_and_drops_them():
    """Requests still running or waiting when the engine stops get an error, and a restarted engine does not run
    them for callers that are gone."""
    model = tiny()
    engine = Engine(model, IdText(), max_batch=1)
    gate = threading.Event()  # holds the engine's first decode step until the test has queued a second request
    decode = engine._decode
    engine._decode = lambda: (gate.wait(), decode())  # type: ignore[method-assign]
    engine.start()
    long = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)

    async def run() -> None:
        running = engine.stream(PROMPTS[0], long)
        await running.__anext__()  # from its prefill
        waiting = asyncio.ensure_future(engine.stream(PROMPTS[1], long).__anext__())
        while engine.stats()["waiting"] == 0:
            await asyncio.sleep(0.001)
        threading.Timer(0.05, gate.set).start()  # the step ends after shutdown has asked the thread to stop
        engine.shutdown()
        with pytest.raises(EngineStopped, match="shut down"):
            await waiting
        with pytest.raises(EngineStopped, match="shut down"):
            async for _ in running:
                pass
        assert engine.stats() == {"running": 0, "waiting": 0, "tokens_in_flight": 0, "acceptance_rate": None}

    asyncio.run(run())
    with pytest.raises(EngineStopped, match="not taken"):  # a submit that lost the race with shutdown() is refused
        engine._submit(PROMPTS[2], GREEDY, lambda ev: None)
    out = engine.generate([PROMPTS[2]], GREEDY)  # its own thread again: only this request runs
    assert [e.token_id for e in out[0]] == greedy_reference(model, PROMPTS[2], 10)


def test_background_engine_streams_queues_and_frees_cancelled_slots():
    model = tiny()
    engine = Engine(model, IdText(), max_batch=2, max_queue=2)
    engine.start()

    async def run() -> None:
        async def collect(prompt):
            return [e async for e in engine.stream(prompt, GREEDY)]

        results = await asyncio.gather(*(collect(p) for p in PROMPTS[:2]))
        for p, evs in zip(PROMPTS, results):
            assert [e.token_id for e in evs] == greedy_reference(model, p, 10)
        # a client that leaves after 2 tokens gives its slot back
        long = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
        agen = engine.stream(PROMPTS[0], long)
        assert (await agen.__anext__()).token_id == greedy_reference(model, PROMPTS[0], 1)[0]
        await agen.__anext__()
        await agen.aclose()
        for _ in range(100):
            if engine.stats()["running"] == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats() == {"running": 0, "waiting": 0, "tokens_in_flight": 0, "acceptance_rate": None}
        # two long requests fill both slots, two wait, the next is refused
        busy = [engine.stream(p, long) for p in PROMPTS[:4]]
        for g in busy[:2]:
            await g.__anext__()
        waiting = [asyncio.ensure_future(g.__anext__()) for g in busy[2:]]
        await asyncio.sleep(0.05)
        assert engine.stats()["waiting"] == 2 and engine.stats()["running"] == 2
        with pytest.raises(QueueFull):
            await engine.stream(PROMPTS[4], GREEDY).__anext__()
        for g in busy[:2]:
            await g.aclose()
        for p, w in zip(PROMPTS[2:4], waiting):
            assert (await w).token_id == greedy_reference(model, p, 1)[0]
        for g in busy[2:]:
            await g.aclose()

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()


def _train_counting_model() -> nanoseek.NanoSeek:
    """A tiny model (with its MTP module) taught t[i+1] = t[i] + step mod 64 for a per-sequence step: both the next
    token and the one after are predictable, so MTP drafts get accepted."""
    torch.manual_seed(0)
    model = nanoseek.NanoSeek(nanoseek.preset("tiny", vocab_size=64, max_position_embeddings=64,
                                              initializer_range=0.02))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        start, step = torch.randint(0, 64, (16, 1)), torch.randint(1, 4, (16, 1))
        seq = (start + step * torch.arange(33)) % 64
        out = model(seq[:, :-1], seq[:, 1:])
        (out.loss + out.mtp_loss).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_mtp_speculative_decoding_is_exact_and_accepts_drafts():
    model = _train_counting_model()
    prompts = [[3, 5, 7], [10, 11], [60, 63, 2], [8, 9, 10, 11], [1, 2], [20, 22]]
    p = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    plain = Engine(model, IdText(), max_batch=4).generate(prompts, p)
    spec_engine = Engine(model, IdText(), max_batch=4, speculative="mtp")
    spec = spec_engine.generate(prompts, p)
    for prompt, a, b in zip(prompts, plain, spec):
        assert [e.token_id for e in a] == [e.token_id for e in b] == greedy_reference(model, prompt, 20)
    assert spec_engine.stats()["acceptance_rate"] > 0.5


@pytest.mark.parametrize("tokens", [1, 3])
def test_decode_expert_path_equals_grouped_gemm(tokens):
    """Few token copies (decoding) take a per-expert mat-vec path; it must be the grouped GEMM's numbers."""
    experts = tiny().layers[1].mlp.experts
    x, indices, weights = torch.randn(tokens, 64), torch.randint(0, 8, (tokens, 2)), torch.rand(tokens, 2)
    counts = torch.bincount(indices.flatten(), minlength=8)
    with torch.no_grad():
        fast = experts(x, indices, weights, counts)
    grouped = experts(x, indices, weights, counts)  # grad mode: the training path
    assert (fast - grouped).abs().max() < 1e-6


# The kernel library built with other flags, for a test that runs these tests in a subprocess (their own cache)
if os.environ.get("NANOSEEK_TEST_KERNEL_FLAGS") is not None:
    kernels.FLAG_SETS = (os.environ["NANOSEEK_TEST_KERNEL_FLAGS"].split(),)


def kernel_built() -> None:
    if kernels.compiler() is None:
        pytest.skip("no C++ compiler here: the decode kernel is not built and torch's path serves")
    assert kernels.load(), "a C++ compiler is present, so the decode kernel must build"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("tokens", [1, 3, 16, 40])
def test_routed_experts_kernel_equals_a_naive_reference(tokens, dtype):
    """The decode kernel (infer/kernels.cpp) against a float64 loop over tokens and their chosen experts, with
    experts shared between tokens (one read serves several) and pair counts that do not fill its tiles; expert
    weights in float32, stored in bfloat16, or in int8 with a scale per row (the reference reads the same bf16
    values, or the int8 values times their scales)."""
    kernel_built()
    torch.manual_seed(tokens)
    E, H, inner, k = 8, 48, 32, 3
    gate_up, down = torch.randn(E, 2 * inner, H) * 0.2, torch.randn(E, H, inner) * 0.2
    x, weights = torch.randn(tokens, H), torch.rand(tokens, k)
    indices = torch.stack([torch.randperm(E)[:k] for _ in range(tokens)])
    if dtype == torch.int8:
        (q_gate_up, s_gate_up), (q_down, s_down) = quantize_rows(gate_up), quantize_rows(down)
        with FlopCounterMode(display=False) as counter:  # its own op: counted as the float one is
            got = kernels.routed_experts(x, indices, weights, q_gate_up, q_down, s_gate_up, s_down)
        assert counter.get_total_flops() == 2 * tokens * k * 3 * H * inner
        gate_up, down = q_gate_up.double() * s_gate_up[..., None], q_down.double() * s_down[..., None]
    else:
        gate_up, down = gate_up.to(dtype), down.to(dtype)
        got = kernels.routed_experts(x, indices, weights, gate_up, down)
    want = experts_reference(x.double(), indices, weights, gate_up.double(), down.double())
    assert (got.double() - want).abs().max() < 1e-5 * want.abs().max()


def experts_reference(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                      down: torch.Tensor) -> torch.Tensor:
    """A naive loop over tokens and their chosen experts, in the inputs' dtype (float64 in the tests)."""
    want = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(indices[t].tolist(), weights[t].tolist()):
            gate, up = (gate_up[e] @ x[t]).chunk(2)
            want[t] += w * (down[e] @ (F.silu(gate) * up))
    return want


def test_routed_experts_kernel_rejects_bad_input_clearly():
    kernel_built()
    E, H, inner = 4, 32, 16
    gate_up, down, x = torch.randn(E, 2 * inner, H), torch.randn(E, H, inner), torch.randn(2, H)
    assert kernels.routed_experts(x[:0], torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), gate_up,
                                  down).shape == (0, H)
    no_inner = kernels.routed_experts(x, torch.tensor([[0, 1], [1, 2]]), torch.rand(2, 2), torch.randn(E, 0, H),
                                      torch.randn(E, H, 0))  # I = 0: an empty sum (it once divided by zero)
    assert torch.equal(no_inner, torch.zeros(2, H))
    with pytest.raises(RuntimeError, match="expert index 4 out of range"):
        kernels.routed_experts(x, torch.tensor([[0, 4], [1, 2]]), torch.rand(2, 2), gate_up, down)
    with pytest.raises(RuntimeError, match="mismatched shapes"):
        kernels.routed_experts(torch.randn(2, 48), torch.tensor([[0, 1], [1, 2]]), torch.rand(2, 2), gate_up, down)
    with pytest.raises(RuntimeError, match="must have the same dtype"):
        kernels.routed_experts(x, torch.tensor([[0, 1], [1, 2]]), torch.rand(2, 2), gate_up.bfloat16(), down)
    assert kernels.covers(x, gate_up, down) and kernels.covers(x, gate_up.bfloat16(), down.bfloat16())
    assert not kernels.covers(x.double(), gate_up, down) and not kernels.covers(torch.randn(2, 40), gate_up, down)
    assert not kernels.covers(x.bfloat16(), gate_up.bfloat16(), down.bfloat16())  # activations: float32 only
    assert not kernels.covers(x, gate_up.bfloat16(), down)
    (q_gate_up, s_gate_up), (q_down, s_down) = quantize_rows(gate_up), quantize_rows(down)
    assert kernels.covers(x, q_gate_up, q_down) and not kernels.covers_linear(q_gate_up[0])
    with pytest.raises(ValueError, match="int8 weights need both scales"):
        kernels.routed_experts(x, torch.tensor([[0, 1], [1, 2]]), torch.rand(2, 2), q_gate_up, q_down, s_gate_up)
    with pytest.raises(ValueError, match="int8 weights need both scales"):
        kernels.routed_experts(x, torch.tensor([[0, 1], [1, 2]]), torch.rand(2, 2), q_gate_up, q_down)
    with pytest.raises(RuntimeError, match="gate_up_proj: expected a 3-d int8"):  # scales for float weights
        kernels.routed_experts(x, torch.tensor([[0, 1], [1, 2]]), torch.rand(2, 2), gate_up, down, s_gate_up, s_down)
    with pytest.raises(RuntimeError, match=r"scales must be CPU tensors \[E, 2I\] and \[E, H\]"):
        kernels.routed_experts(x, torch.tensor([[0, 1], [1, 2]]), torch.rand(2, 2), q_gate_up, q_down, s_gate_up,
                               s_down[:, :8])


def test_kernel_ops_agree_with_their_compile_time_shapes():
    """torch.library.opcheck on each decode op: schema, the fake kernel that torch.compile traces with (shape,
    dtype and strides of the real output: a transposed x once made a compiled call fail), AOT dispatch."""
    kernel_built()
    torch.manual_seed(0)
    E, H, inner, N, k = 4, 32, 16, 3, 2
    gate_up, down = torch.randn(E, 2 * inner, H) * 0.2, torch.randn(E, H, inner) * 0.2
    if kernels.panel_width() == 32:  # bf16 panels: H and 2I multiples of the panel width
        gate_up, down = torch.randn(E, 4 * inner, 2 * H) * 0.2, torch.randn(E, 2 * H, 2 * inner) * 0.2
        H, inner = 2 * H, 2 * inner
    indices, weights = torch.randint(0, E, (N, k)), torch.rand(N, k)
    (q_gate_up, s_gate_up), (q_down, s_down) = quantize_rows(gate_up), quantize_rows(down)
    batch = Batch.make([1, 0], [3, 5], [1, 1], 1, torch.device("cpu"))
    ops = torch.ops.nanoseek_cpu
    cases = [(ops.routed_experts, (torch.randn(N, H), indices, weights, gate_up, down)),
             (ops.routed_experts, (torch.randn(H, N).t(), indices, weights, gate_up, down)),
             (ops.routed_experts_int8, (torch.randn(H, N).t(), indices, weights, q_gate_up, q_down, s_gate_up,
                                        s_down)),
             (ops.linear_panels, (torch.randn(5, 48), kernels.pack_linear(torch.randn(2 * kernels.panel_width(), 48)))),
             (ops.linear_panels, (torch.randn(5, 48), kernels.pack_linear(torch.randn(2 * kernels.panel_width(), 48),
                                                                          torch.bfloat16))),
             (ops.routed_experts_bf16, (torch.randn(H, N).t(), indices, weights, kernels.pack_experts(gate_up),
                                        kernels.pack_experts(down))),
             (ops.latent_attention, (torch.randn(2, 1, 3, 32), torch.randn(2, 10, 32), batch.slots, batch.visible,
                                     0.2, 16))]
    for op, args in cases:
        checks = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
        assert set(torch.library.opcheck(op, args, test_utils=checks).values()) == {"SUCCESS"}, op


def test_latent_attention_kernel_equals_a_naive_reference():
    """kernels.latent_attention (MLA's absorbed attention read from the cache in place) against float64 einsums over
    the gathered rows: ragged lengths in slots out of order, one and two query rows (MTP speculation), a causal
    prefill (later keys not visible), head counts that fill its items of 12 and tiles of 6 and leave each remainder
    (4, 2, 1), latents of one and of several vector tiles, query rows and one row's head groups split over two
    threads, one or two sequences' long contexts split over them (parts merged), a context where most keys are
    masked. What it does not take is refused or not covered."""
    kernel_built()
    torch.manual_seed(0)

    def naive(q, rows, slots, visible, scale, r):
        keys = rows[slots, : visible.shape[-1]].double()
        scores = torch.einsum("bthd,bkd->bthk", q.double(), keys) * scale
        p = scores.masked_fill(~visible[:, :, None], float("-inf")).softmax(-1)
        return torch.einsum("bthk,bkr->bthr", p, keys[..., :r])

    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for B, T, h, r, rope, S, L, starts in (
                    (3, 1, 8, 64, 16, 5, 100, [10, 50, 0]), (2, 2, 5, 32, 16, 4, 70, [3, 60]),
                    (16, 1, 8, 64, 16, 16, 600, list(range(0, 560, 35))), (1, 1, 3, 16, 16, 1, 9, [7]),
                    (2, 2, 4, 48, 32, 3, 1200, [1100, 2]), (1, 1, 8, 64, 16, 2, 1000, [900]),
                    (4, 1, 31, 80, 16, 4, 90, [5, 80, 1, 33]), (5, 1, 12, 256, 32, 6, 70, [60, 3, 17, 0, 41]),
                    (1, 1, 12, 256, 32, 1, 70, [66]), (3, 7, 13, 64, 16, 3, 40, [0, 0, 0]),
                    (1, 1, 12, 256, 32, 2, 600, [599]), (2, 1, 13, 64, 16, 3, 700, [650, 100])):
                D = r + rope
                rows = torch.randn(S, L, D) * 2  # larger scores than a trained model's: a peaked softmax too
                n_new = [T] * B if any(starts) else [T, T - 3, 1][:B]  # a ragged fresh batch: a causal prefill
                batch = Batch.make(torch.randperm(S)[:B].tolist(), starts, n_new, T, torch.device("cpu"))
                q = torch.randn(B, T, h, D)
                scale = D ** -0.5
                got = kernels.latent_attention(q, rows, batch.slots, batch.visible, scale, r)
                assert got.shape == (B, T, h, r) and got.dtype == torch.float32
                want = naive(q, rows, batch.slots, batch.visible, scale, r)
                torch.testing.assert_close(got.double(), want, rtol=0, atol=4e-6 * want.abs().max().item())
                # a bf16 cache (a bf16 model's) is widened exactly: the same as the fp32 math over its values
                half = rows.bfloat16()
                got = kernels.latent_attention(q, half, batch.slots, batch.visible, scale, r)
                want = naive(q, half.float(), batch.slots, batch.visible, scale, r)
                torch.testing.assert_close(got.double(), want, rtol=0, atol=4e-6 * want.abs().max().item())
                got = kernels.latent_attention(q.bfloat16(), half, batch.slots, batch.visible, scale, r)
                want = naive(q.bfloat16().float(), half.float(), batch.slots, batch.visible, scale, r)
                assert got.dtype == torch.bfloat16  # fp32 math, the output rounded once
                torch.testing.assert_close(got.double(), want.bfloat16().double(), rtol=0,
                                           atol=8e-3 * want.abs().max().item())
    finally:
        torch.set_num_threads(threads)
    rows, q = torch.randn(2, 10, 32), torch.randn(1, 1, 2, 32)
    visible = torch.ones(1, 1, 4, dtype=torch.bool)
    assert kernels.covers_attention(q, rows, 16) and kernels.covers_attention(q.bfloat16(), rows.bfloat16(), 16)
    assert not kernels.covers_attention(q, rows.half(), 16)  # an fp16 cache keeps torch's path
    assert not kernels.covers_attention(q, rows.transpose(0, 1), 16)  # the kernel would copy it at every call
    assert not kernels.covers_attention(q, rows, 8)  # latents: a multiple of 16 floats
    assert not kernels.covers_attention(torch.randn(1, 1, 2, 40), torch.randn(2, 10, 40), 16)  # nor the width
    with pytest.raises(RuntimeError, match="slot 2 out of range"):
        kernels.latent_attention(q, rows, torch.tensor([2]), visible, 1.0, 16)
    with pytest.raises(RuntimeError, match="K <= the cache's length"):
        kernels.latent_attention(q, rows, torch.tensor([0]), torch.ones(1, 1, 11, dtype=torch.bool), 1.0, 16)
    with pytest.raises(RuntimeError, match="float32 or bfloat16 CPU cache"):
        kernels.latent_attention(q, torch.randn(2, 10, 48), torch.tensor([0]), visible, 1.0, 16)


def test_latent_attention_kernel_lets_a_nan_show_as_torch_does():
    """A NaN query head, or a NaN in a key a row sees, makes those outputs NaN in the kernel as in torch's path (a
    numerical failure upstream shows, not zeros); a NaN in a stale row that the row does not see changes nothing;
    visible keys that all score -inf give NaN too (a row that sees no key gives zeros)."""
    kernel_built()
    torch.manual_seed(0)
    rows, q = torch.randn(2, 20, 32), torch.randn(2, 1, 4, 32)
    q[0, 0, 1] = float("nan")  # one head of row 0
    rows[1, 3] = float("nan")  # a key row 1 sees
    rows[0, 12] = float("nan")  # past row 0's 11 positions, within the 13 keys of the batch: stale
    batch = Batch.make([0, 1], [10, 12], [1, 1], 1, torch.device("cpu"))
    got = kernels.latent_attention(q, rows, batch.slots, batch.visible, 32**-0.5, 16)
    want = _attend_gathered(q, rows, batch, 32**-0.5, 16)
    assert got[0, 0, 1].isnan().all() and got[1].isnan().all()
    assert torch.equal(got.isnan(), want.isnan())
    finite = got.isfinite()
    assert finite.sum() == 3 * 16 and torch.allclose(got[finite], want[finite], atol=1e-6)
    # the same over long contexts, whose keys the kernel splits over the threads (a NaN in one part, a stale one)
    rows = torch.randn(2, 600, 32)
    rows[1, 300] = float("nan")  # seen by row 1, in the second part of its keys
    rows[0, 540] = float("nan")  # past row 0's 501 positions: stale
    batch = Batch.make([0, 1], [500, 550], [1, 1], 1, torch.device("cpu"))
    q = torch.randn(2, 1, 4, 32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = kernels.latent_attention(q, rows, batch.slots, batch.visible, 32**-0.5, 16)
    finally:
        torch.set_num_threads(threads)
    want = _attend_gathered(q, rows, batch, 32**-0.5, 16)
    assert got[1].isnan().all() and torch.equal(got.isnan(), want.isnan())
    assert torch.allclose(got[0], want[0], atol=1e-6)
    # every visible key scoring -inf (a -inf in the query, or scores beyond fp32) is NaN, not "no key seen" (zeros)
    rows, q = torch.randn(1, 600, 32), torch.randn(1, 1, 2, 32)
    rows[0, :, 20] = 1.0
    q[0, 0, 0, 20] = float("-inf")
    for starts in ([3], [599]):  # a short context, and a long one split over the threads
        batch = Batch.make([0], starts, [1], 1, torch.device("cpu"))
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            try:
                got = kernels.latent_attention(q, rows, batch.slots, batch.visible, 32**-0.5, 16)
            finally:
                torch.set_num_threads(threads)
            want = _attend_gathered(q, rows, batch, 32**-0.5, 16)
            assert got[0, 0, 0].isnan().all() and torch.equal(got.isnan(), want.isnan())


def test_linear_panels_kernel_equals_a_naive_reference():
    """kernels.linear_panels (x·Wᵀ over W packed into panels of P output columns) against float64 products: row
    counts that fill its tiles of 6 rows and that leave each remainder (1 has its own loop), any width `in` (odd
    ones too); pack_linear and unpack_linear are inverses. What it does not take is refused or not covered."""
    kernel_built()
    torch.manual_seed(0)
    P = kernels.panel_width()
    assert P in (16, 32)  # two vectors: of 8 floats (AVX2, and NEON as two registers each), of 16 (AVX-512)
    for out_features, in_features in ((P, 16), (2 * P, 40), (10 * P, 128), (P, 7), (3 * P, 1)):
        w = torch.randn(out_features, in_features) * 0.2
        panels = kernels.pack_linear(w)
        assert panels.shape == (out_features // P, in_features, P) and torch.equal(panels[1 % len(panels), :, 3],
                                                                                    w[(1 % len(panels)) * P + 3])
        assert torch.equal(kernels.unpack_linear(panels), w)
        for rows in (0, 1, 2, 3, 4, 5, 6, 7, 11, 12, 16, 33, 100):
            x = torch.randn(rows, in_features)
            got = kernels.linear_panels(x, panels)
            want = x.double() @ w.double().T
            assert got.shape == (rows, out_features) and got.dtype == torch.float32
            scale = max([1.0, *want.abs().flatten().tolist()])
            torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * scale)
    threads = torch.get_num_threads()
    try:  # rows in several chunks (~128 KB of x each: 6 rows of 6,000), panels split over two threads
        torch.set_num_threads(2)
        for out_features, in_features, rows in ((4 * P, 6000, 13), (64 * P, 64, 16)):
            w, x = torch.randn(out_features, in_features) * 0.2, torch.randn(rows, in_features)
            want = x.double() @ w.double().T
            torch.testing.assert_close(kernels.linear_panels(x, kernels.pack_linear(w)).double(), want, rtol=0,
                                       atol=1e-5 * max(1.0, want.abs().max().item()))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(kernels.linear_panels(torch.randn(2, 0), torch.empty(1, 0, P)), torch.zeros(2, P))  # in = 0
    assert not kernels.covers_linear(torch.randn(P, 0))  # nn.Linear(0, P) keeps torch's path
    w = torch.randn(2 * P, 48)
    assert kernels.covers_linear(w) and kernels.covers_linear(w.t().contiguous().t())  # packing copies any layout
    assert not kernels.covers_linear(w.bfloat16())  # float32 weights only
    assert not kernels.covers_linear(torch.randn(P + 4, 48))  # out: not a multiple of the panel width
    assert not kernels.covers_linear(torch.randn(2, P, 48))  # not a Linear's weight
    panels = kernels.pack_linear(w)
    assert kernels.takes_panels(torch.randn(2, 48), panels)
    assert not kernels.takes_panels(torch.randn(2, 48).bfloat16(), panels)  # activations: float32 only
    assert not kernels.takes_panels(torch.randn(2, 48), panels.bfloat16())  # a model cast after packing
    with pytest.raises(RuntimeError, match=r"expected float32 CPU panels \[out / \d+, 32, \d+\] for x \[N, 32\]"):
        kernels.linear_panels(torch.randn(2, 32), panels)  # x's width is not the weight's
    with pytest.raises(RuntimeError, match="expected float32 CPU panels"):
        kernels.linear_panels(torch.randn(2, 48), w)  # a weight that was not packed
    with pytest.raises(RuntimeError, match="x: expected a 2-d float32 CPU tensor"):
        kernels.linear_panels(torch.randn(2, 48).double(), panels)


def bf16_values(t: torch.Tensor) -> torch.Tensor:
    """t rounded to bf16 (to nearest even), as float64: what a bf16 product reads."""
    return t.bfloat16().double()


def test_bf16_products_kernels_equal_a_naive_reference():
    """--matmul-dtype bf16 (infer/bf16.py): linear_panels over bf16 panels, and routed_experts_bf16 over experts packed
    the same way, against float64 products of the bf16-rounded factors (x, the weights, and the experts' hidden
    activations silu(gate)·up·gate weight): row counts that fill the tiles of 8 rows and leave each remainder, rows in
    several chunks and panels over two threads, tokens sharing experts. On a CPU with AVX512-BF16 that is
    `vdpbf16ps`; elsewhere both factors widened. The packing round-trips to the bf16 weights; what the kernels do not
    take is refused or not covered."""
    kernel_built()
    if os.environ.get("NANOSEEK_TEST_KERNEL_FLAGS") == "-fopenmp":  # built for any CPU: the widened products
        assert not kernels.bf16_products()
    torch.manual_seed(0)
    P = kernels.panel_width()
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for out_features, in_features, row_counts in ((P, 16, range(0, 18)), (3 * P, 130, (1, 8, 9, 33)),
                                                          (4 * P, 6000, (13,)), (64 * P, 64, (16,))):
                w = torch.randn(out_features, in_features) * 0.2
                panels = kernels.pack_linear(w, torch.bfloat16)
                assert panels.shape == (out_features // P, in_features // 2, P, 2) and panels.dtype == torch.bfloat16
                assert torch.equal(panels[0, 1, 3], w[3, 2:4].bfloat16())  # column 3's pair (k = 2, 3)
                assert torch.equal(kernels.unpack_linear(panels), w.bfloat16())
                for rows in row_counts:
                    x = torch.randn(rows, in_features)
                    got = kernels.linear_panels(x, panels)
                    want = bf16_values(x) @ bf16_values(w).T
                    assert got.shape == (rows, out_features) and got.dtype == torch.float32
                    torch.testing.assert_close(got.double(), want, rtol=0,
                                               atol=1e-5 * max([1.0, *want.abs().flatten().tolist()]))
                    if rows and in_features < 1000:  # really rounded: float32 products differ by more
                        assert (x.double() @ w.double().T - want).abs().max() > 1e-4
    finally:
        torch.set_num_threads(threads)
    assert kernels.covers_linear(torch.randn(P, 48), torch.bfloat16)
    assert kernels.covers_linear(torch.randn(P, 48).bfloat16(), torch.bfloat16)  # a bf16 checkpoint's weight
    assert not kernels.covers_linear(torch.randn(P, 47), torch.bfloat16)  # pairs: an even width
    assert kernels.covers_linear(torch.randn(P, 47))  # float32 products take any
    with pytest.raises(RuntimeError, match=r"expected bfloat16 panels \[out / \d+, 16, \d+, 2\] for x \[N, 32\]"):
        kernels.linear_panels(torch.randn(2, 32), kernels.pack_linear(torch.randn(P, 48), torch.bfloat16))
    with pytest.raises(RuntimeError, match=r"for x \[N, 47\]"):  # one short of the weight's 48: not its pairs
        kernels.linear_panels(torch.randn(2, 47), kernels.pack_linear(torch.randn(P, 48), torch.bfloat16))

    E, H, inner, k = 8, 2 * P, P, 3
    gate_up, down = torch.randn(E, 2 * inner, H) * 0.2, torch.randn(E, H, inner) * 0.2
    packed_gate_up, packed_down = kernels.pack_experts(gate_up), kernels.pack_experts(down)
    assert packed_gate_up.shape == (E, 2 * inner // P, H // 2, P, 2) and packed_down.shape == (E, H // P, inner // 2,
                                                                                                 P, 2)
    assert torch.equal(kernels.unpack_experts(packed_gate_up), gate_up.bfloat16())
    assert torch.equal(kernels.unpack_experts(packed_down), down.bfloat16())
    def experts_case(tokens: int, atol: float = 1e-5) -> torch.Tensor:
        x, weights = torch.randn(tokens, H), torch.rand(tokens, k)
        indices = torch.stack([torch.randperm(E)[:k] for _ in range(tokens)])
        with FlopCounterMode(display=False) as counter:
            got = kernels.routed_experts_bf16(x, indices, weights, packed_gate_up, packed_down)
        assert counter.get_total_flops() == 2 * tokens * k * 3 * H * inner
        want = torch.zeros(tokens, H, dtype=torch.float64)
        for t in range(tokens):
            for e, w in zip(indices[t].tolist(), weights[t].tolist()):
                gate, up = (bf16_values(gate_up[e]) @ bf16_values(x[t])).chunk(2)
                hidden = (F.silu(gate) * up * w).float()  # float32 in the kernel, then rounded
                want[t] += bf16_values(down[e]) @ bf16_values(hidden)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=atol * want.abs().max().item())
        return got

    for tokens in (1, 3, 16, 40):
        experts_case(tokens)
    try:  # wide enough for each matrix's panels to be split over two threads
        torch.set_num_threads(2)
        E, H, inner = 4, 24 * P, 12 * P
        gate_up, down = torch.randn(E, 2 * inner, H) * 0.05, torch.randn(E, H, inner) * 0.05
        packed_gate_up, packed_down = kernels.pack_experts(gate_up), kernels.pack_experts(down)
        experts_case(5)
        # 300 pairs: the passes over them (gathering rows, the hidden activations) split over the threads too. The
        # threads split the work, not the sums: one thread gives the same bits. (Against float64, a few hidden
        # activations of so many round to the neighbouring bf16 number, the kernel's silu being float32: 1e-3.)
        torch.manual_seed(1)
        two = experts_case(100, atol=1e-3)
        torch.set_num_threads(1)
        torch.manual_seed(1)
        assert torch.equal(experts_case(100, atol=1e-3), two)
    finally:
        torch.set_num_threads(threads)
    for n_threads in (1, 2):  # MLA's per-head products: each head's panels as an expert's
        torch.set_num_threads(n_threads)
        try:
            # (17, 3, 6000, 2P): rows in chunks of 8, and two threads splitting the second head's panels
            for rows, heads, inner, out_features in ((0, 3, 16, P), (1, 12, 64, 8 * P), (9, 3, 30, 2 * P),
                                                     (33, 2, 8 * P, P), (5, 1, 6000, P), (17, 3, 6000, 2 * P)):
                heads_linear_case(rows, heads, inner, out_features)
        finally:
            torch.set_num_threads(threads)
    x, weights, indices = torch.randn(2, H), torch.rand(2, k), torch.tensor([[0, 1, 2], [3, 2, 1]])
    with pytest.raises(RuntimeError, match=r"expected bfloat16 CPU panels gate_up \[E, 2I / \d+"):
        kernels.routed_experts_bf16(x, indices, weights, gate_up.bfloat16(), down.bfloat16())  # not packed
    with pytest.raises(RuntimeError, match="mismatched shapes"):
        kernels.routed_experts_bf16(torch.randn(2, 2 * H), indices[:2], weights[:2], packed_gate_up, packed_down)


def heads_linear_case(rows: int, heads: int, inner: int, out_features: int) -> None:
    """heads_linear_bf16 (x [rows, heads, in] times each head's weight [out, in], packed as pack_experts packs an
    expert's) against float64 products of the bf16-rounded factors; its FLOPs as counted; what it does not take."""
    w, x = torch.randn(heads, out_features, inner) * 0.2, torch.randn(rows, heads, inner)
    panels = kernels.pack_experts(w)
    with FlopCounterMode(display=False) as counter:
        got = kernels.heads_linear_bf16(x, panels)
    assert counter.get_total_flops() == 2 * rows * heads * inner * out_features
    want = torch.einsum("nhi,hoi->nho", bf16_values(x), bf16_values(w))
    assert got.shape == (rows, heads, out_features) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * max([1.0, *want.abs().flatten().tolist()]))
    if rows:  # the factors really rounded
        assert (torch.einsum("nhi,hoi->nho", x.double(), w.double()) - want).abs().max() > 1e-4
        strided = torch.randn(rows, heads, inner + 2)[..., :inner]  # a split's view, as q_nope is: copied once
        want = torch.einsum("nhi,hoi->nho", bf16_values(strided), bf16_values(w))
        torch.testing.assert_close(kernels.heads_linear_bf16(strided, panels).double(), want, rtol=0,
                                   atol=1e-5 * max([1.0, *want.abs().flatten().tolist()]))
    with pytest.raises(RuntimeError, match=rf"expected bfloat16 panels \[{heads + 1}, out / "):
        kernels.heads_linear_bf16(torch.randn(rows, heads + 1, inner), panels)  # another head count


def test_linear_layers_through_the_kernel_decode_the_same(monkeypatch, tmp_path):
    """infer/layout.py: with the decode kernel chosen, every Linear the kernel takes becomes a KernelLinear with its
    weight packed (kv_b_proj, read as stored by absorbed attention, stays). Same logits and greedy tokens; every
    product goes through the kernel (decode steps, a long prefill), except a forward whose gradients are wanted
    (the kernel has none), which gives the plain model's gradients. state_dict still has the weights [out, in],
    save_pretrained writes them (the MTP layer's copy of the head too) and load_state_dict takes them. A compiled
    decode step has the kernel's op in its graph at any batch. Cast after packing, a layer is an nn.Linear again."""
    from torch import nn

    from nanoseek.infer import layout
    from nanoseek.infer.forward import decode_step

    kernel_built()
    model = tiny()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    want = [[e.token_id for e in evs] for evs in Engine(model, IdText(), max_batch=3).generate(PROMPTS, GREEDY)]
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        logits = model(ids)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    packed = {name for name, m in linears.items() if not name.endswith("kv_b_proj") and kernels.covers_linear(m.weight)}
    assert "lm_head" in packed and len(packed) >= len(linears) // 2
    assert layout.use_decode_kernel(model) == len(packed)
    assert {name for name, m in linears.items() if type(m) is layout.KernelLinear} == packed
    assert all(linears[name].weight.dim() == 3 for name in packed)
    state = model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)
    model.save_pretrained(str(tmp_path / "saved"))
    saved = nanoseek.NanoSeek.from_pretrained(str(tmp_path / "saved")).state_dict()
    assert all(torch.equal(saved[k], before[k]) for k in before)
    rows = []
    real = kernels.linear_panels
    monkeypatch.setattr(kernels, "linear_panels", lambda x, w: rows.append(len(x)) or real(x, w))
    with torch.no_grad():
        torch.testing.assert_close(model(ids[:, :3]), logits[:, :3], rtol=1e-5, atol=1e-5)  # 3 rows
        assert rows and set(rows) == {3}
        rows.clear()
        long = torch.randint(0, model.config.vocab_size, (1, 100))
        model(long)
        assert set(rows) == {100}  # a long prefill too
    got = [[e.token_id for e in evs] for evs in Engine(model, IdText(), max_batch=3).generate(PROMPTS, GREEDY)]
    assert got == want and 3 in rows
    rows.clear()
    plain = tiny()  # gradients wanted: the BLAS, the plain model's gradients
    loss, plain_loss = model(ids).float().logsumexp(-1).sum(), plain(ids).float().logsumexp(-1).sum()
    loss.backward()
    plain_loss.backward()
    assert rows == [] and model.lm_head.weight.grad is not None
    torch.testing.assert_close(kernels.unpack_linear(model.lm_head.weight.grad), plain.lm_head.weight.grad,
                               rtol=1e-4, atol=1e-6)
    other = tiny(seed=1)
    model.load_state_dict(other.state_dict())  # weights [out, in] in, packed
    with torch.no_grad():
        torch.testing.assert_close(model(ids), other(ids), rtol=1e-5, atol=1e-5)
    model.load_state_dict(before)
    with pytest.raises(RuntimeError, match=r"size mismatch for lm_head\.weight"):  # named, as nn.Linear has it
        model.load_state_dict({**before, "lm_head.weight": before["lm_head.weight"][:-1]})
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(batch_rows: int, fn=decode_step) -> None:
        cache = LatentCache(model.config, batch_rows, 8, torch.device("cpu"), torch.float32)
        batch = Batch.make(list(range(batch_rows)), [0] * batch_rows, [1] * batch_rows, 1, torch.device("cpu"))
        with torch.inference_mode():
            fn(model, cache, torch.randint(0, model.config.vocab_size, (batch_rows, 1)), batch)

    rows.clear()
    step(3)  # eager: how many products a decode step sends to the kernel
    per_step = len(rows)
    monkeypatch.setattr(kernels, "linear_panels", real)
    for batch_rows in (3, 40):  # compiled, a few rows and many
        step(batch_rows, torch.compile(decode_step, backend=capture, fullgraph=True))
        ops = [n for n in graphs[-1].graph.nodes
               if n.target in (torch.ops.nanoseek_cpu.linear_panels, torch.ops.nanoseek_cpu.linear_panels.default)]
        assert len(ops) == per_step > 0
    torch._dynamo.reset()
    with_bias = nn.Linear(32, 2 * kernels.panel_width())
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        plain = with_bias(x)
        assert layout.use_decode_kernel(with_bias) == 1
        torch.testing.assert_close(with_bias(x), plain, rtol=1e-5, atol=1e-6)
        with_bias.to(torch.float64)  # cast after packing: unpacked, a plain nn.Linear again
        assert type(with_bias) is nn.Linear and with_bias.weight.shape == (2 * kernels.panel_width(), 32)
        torch.testing.assert_close(with_bias(x.double()), plain.double(), rtol=1e-5, atol=1e-6)


def test_engine_without_the_kernel_gives_the_same_tokens(monkeypatch):
    """Where the kernel is not built (or does not cover the model), decoding takes torch's path: same tokens.
    Where it is built, the engine's decode steps do call it (a dispatch that never picks it would pass the rest)."""
    from nanoseek.model.moe import MoE

    model = tiny()
    decoded = []  # token rows of each kernel call made inside a decode step
    real = kernels.routed_experts

    def spy(x, *rest):
        if any(f.name == "_decode" for f in traceback.extract_stack()):
            decoded.append(len(x))
        return real(x, *rest)

    monkeypatch.setattr(kernels, "routed_experts", spy)
    with_kernel = Engine(model, IdText(), max_batch=3).generate(PROMPTS, GREEDY)
    if kernels.load():  # each MoE layer, once per step, for the 9 tokens after each prompt's first
        moe_layers = sum(isinstance(layer.mlp, MoE) for layer in model.layers)
        assert sum(decoded) == len(PROMPTS) * 9 * moe_layers and max(decoded) <= 3, decoded
    monkeypatch.setattr(kernels, "covers", lambda *tensors: False)
    calls = len(decoded)
    without = Engine(model, IdText(), max_batch=3).generate(PROMPTS, GREEDY)
    assert len(decoded) == calls  # torch's path only
    assert [[e.token_id for e in evs] for evs in with_kernel] == [[e.token_id for e in evs] for evs in without]


def test_bf16_experts_decode_as_fp32_with_rounded_experts(monkeypatch, tmp_path):
    """--expert-dtype bf16: the routed experts take half their memory, and every decode path (the kernel, torch's
    eager path, the compiled step) gives the tokens of an fp32 model whose experts hold the same rounded values."""
    from nanoseek.model.hf import cast_model
    from nanoseek.model.moe import Experts

    def expert_tensors(m: nanoseek.NanoSeek) -> list[torch.Tensor]:
        return [p for e in m.modules() if isinstance(e, Experts) for p in (e.gate_up_proj, e.down_proj)]

    model, rounded = tiny(), tiny()
    fp32_bytes = sum(p.nbytes for p in expert_tensors(model))
    cast_model(model, torch.float32, torch.bfloat16)
    assert sum(p.nbytes for p in expert_tensors(model)) == fp32_bytes // 2
    assert model.embed_tokens.weight.dtype == torch.float32  # only the experts
    for p in expert_tensors(rounded):
        p.data = p.data.bfloat16().float()
    want = [greedy_reference(rounded, p, 10) for p in PROMPTS]
    assert [greedy_reference(model, p, 10) for p in PROMPTS] == want  # the model's own (grouped GEMM) path

    def tokens(engine: Engine) -> list[list[int]]:
        return [[e.token_id for e in evs] for evs in engine.generate(PROMPTS, GREEDY)]

    assert tokens(Engine(model, IdText(), max_batch=3)) == want  # through the kernel where it is built
    # compiled: inductor at 1 row, the kernel above (forced: on a CPU without AVX-512 inductor's is chosen there)
    monkeypatch.setattr(kernels, "beats_inductor", lambda: True)
    compiled = Engine(model, IdText(), max_batch=3, compile=True)
    assert tokens(compiled) == want and compiled.compile
    monkeypatch.undo()
    # the numbers, not only the tokens: the rounded model's, and not the unrounded one's
    scored = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=0)

    def logprobs(m: nanoseek.NanoSeek) -> list[float]:
        return [e.logprob for evs in Engine(m, IdText(), max_batch=3).generate(PROMPTS, scored) for e in evs]

    got, ref, unrounded = logprobs(model), logprobs(rounded), logprobs(tiny())
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-5 < max(abs(a - b) for a, b in zip(got, unrounded))
    monkeypatch.setattr(kernels, "covers", lambda *tensors: False)
    assert tokens(Engine(model, IdText(), max_batch=3)) == want  # torch's eager path

    # and from a checkpoint folder, read straight into bf16 storage
    rounded.save_pretrained(str(tmp_path / "m"))
    loaded = nanoseek.load_pretrained(tmp_path / "m", expert_dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in expert_tensors(loaded))
    assert all(torch.equal(a.float(), b) for a, b in zip(expert_tensors(loaded), expert_tensors(rounded)))


def test_int8_rows_are_symmetric_and_within_half_a_step():
    """infer/quant.py: one scale per row, max|row| / 127; every weight within half a step of its int8 value; a row's
    largest magnitude is exactly ±127 steps; an all-zero row stays zeros (scale 0, no division by it)."""
    torch.manual_seed(0)
    w = torch.randn(3, 40, 64) * torch.logspace(-4, 1, 40)[:, None]  # rows of very different sizes
    w[1, 7] = 0.0
    w[2, 5] *= 1e-33  # max|row| ~1e-36: its scale is below float32's smallest normal number
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (3, 40) and scale.dtype == torch.float32
    assert torch.equal(scale, w.abs().amax(-1) / 127)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    assert (q.abs().amax(-1)[scale > 0] == 127).all()
    err = (w - dequantize_rows(q, scale)).abs()
    assert (err <= scale[..., None] / 2 * (1 + 1e-6)).all()
    assert not q[1, 7].any() and scale[1, 7] == 0 and not dequantize_rows(q, scale)[1, 7].any()


def test_int8_kernel_splits_rows_over_threads_with_each_rows_scale():
    """Wide enough experts that the kernel splits their rows between two threads: each thread scales the rows it
    computed by their own scales (the float64 reference over the dequantized weights, and one thread's answer)."""
    kernel_built()
    torch.manual_seed(0)
    E, H, inner, k, tokens = 8, 256, 256, 2, 16
    gate_up, down = torch.randn(E, 2 * inner, H) * torch.rand(E, 2 * inner, 1), torch.randn(E, H, inner)
    (q_gate_up, s_gate_up), (q_down, s_down) = quantize_rows(gate_up), quantize_rows(down)
    x, weights = torch.randn(tokens, H), torch.rand(tokens, k)
    indices = torch.stack([torch.randperm(E)[:k] for _ in range(tokens)])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.routed_experts(x, indices, weights, q_gate_up, q_down, s_gate_up, s_down)
        torch.set_num_threads(2)
        two = kernels.routed_experts(x, indices, weights, q_gate_up, q_down, s_gate_up, s_down)
    finally:
        torch.set_num_threads(threads)
    ref = experts_reference(x.double(), indices, weights, dequantize_rows(q_gate_up, s_gate_up, torch.float64),
                            dequantize_rows(q_down, s_down, torch.float64))
    assert torch.equal(one, two) or (one - two).abs().max() < 1e-6 * ref.abs().max()
    assert (two.double() - ref).abs().max() < 1e-5 * ref.abs().max()


def test_int8_experts_decode_as_fp32_with_dequantized_experts(monkeypatch, tmp_path, data_dir):
    """--expert-dtype int8: the routed experts take a quarter of their memory (plus a scale per row), and every
    decode path (the kernel eager and compiled, torch's indexed path, the model's own grouped path) computes what an
    fp32 model whose experts hold the dequantized values computes."""
    from nanoseek.infer.engine import load_for_inference
    from nanoseek.model.hf import CheckpointError
    from nanoseek.model.moe import Experts

    kernel_built()

    def experts_of(m: nanoseek.NanoSeek) -> list[Experts]:
        return [e for e in m.modules() if isinstance(e, Experts)]

    model, dequantized = tiny(num_nextn_predict_layers=1), tiny(num_nextn_predict_layers=1)
    fp32_bytes = sum(e.gate_up_proj.nbytes + e.down_proj.nbytes for e in experts_of(model))
    rows = sum(e.gate_up_proj.shape[0] * (e.gate_up_proj.shape[1] + e.down_proj.shape[1]) for e in experts_of(model))
    assert quantize_experts(model) == len(experts_of(model)) == 2  # one MoE layer and the MTP module's
    assert all(isinstance(e, Int8Experts) for e in experts_of(model))
    assert sum(b.nbytes for e in experts_of(model) for b in e.state_dict().values()) == fp32_bytes // 4 + 4 * rows
    cast = copy.deepcopy(experts_of(model)[0]).to(torch.bfloat16)  # the scales keep fp32, the bytes stay int8
    assert (cast.gate_up_proj.dtype, cast.down_scale.dtype) == (torch.int8, torch.float32)
    for q, d in zip(experts_of(model), experts_of(dequantized)):
        d.gate_up_proj.data, d.down_proj.data = q.stacked()
    want = [greedy_reference(dequantized, p, 10) for p in PROMPTS]
    assert [greedy_reference(model, p, 10) for p in PROMPTS] == want  # the model's own (grouped GEMM) path

    # one MoE layer's decode step, through the kernel and through torch's indexed path: the dequantized numbers
    x = torch.randn(1, 5, 64)
    with torch.no_grad():
        ref = decode_moe(dequantized.layers[1].mlp, x, kernel=False)
        experts = model.layers[1].mlp.experts
        assert kernels.covers(x.view(5, 64), experts.gate_up_proj, experts.down_proj)
        for kernel in (False, True):
            assert (decode_moe(model.layers[1].mlp, x, kernel) - ref).abs().max() < 1e-5 * ref.abs().max()

    def tokens(engine: Engine) -> list[list[int]]:
        return [[e.token_id for e in evs] for evs in engine.generate(PROMPTS, GREEDY)]

    assert tokens(Engine(model, IdText(), max_batch=3)) == want  # through the kernel where it is built
    compiled = Engine(model, IdText(), max_batch=3, compile=True)
    assert tokens(compiled) == want and compiled.compile
    speculative = Engine(model, IdText(), max_batch=3, speculative="mtp")  # the MTP module's int8 experts
    assert tokens(speculative) == want
    scored = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=0)

    def logprobs(m: nanoseek.NanoSeek) -> list[float]:
        return [e.logprob for evs in Engine(m, IdText(), max_batch=3).generate(PROMPTS, scored) for e in evs]

    got, ref_lp, unquantized = logprobs(model), logprobs(dequantized), logprobs(tiny(num_nextn_predict_layers=1))
    assert max(abs(a - b) for a, b in zip(got, ref_lp)) < 1e-5 < max(abs(a - b) for a, b in zip(got, unquantized))
    monkeypatch.setattr(kernels, "covers", lambda *tensors: False)
    assert tokens(Engine(model, IdText(), max_batch=3)) == want  # torch's eager path
    monkeypatch.undo()

    # from a checkpoint folder: quantized at load; a quantized model is not saved (its format is for serving)
    source = tiny(vocab_size=512)
    source.save_pretrained(str(tmp_path / "m"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "m" / name).write_bytes((data_dir / name).read_bytes())
    loaded, _ = load_for_inference(tmp_path / "m", device="cpu", expert_dtype="int8")
    with pytest.raises(InferenceError, match=r"--expert-dtype int8 is for CPUs .* not meta: add --device cpu"):
        load_for_inference(tmp_path / "m", device="meta", dtype="fp32", expert_dtype="int8")
    with pytest.raises(InferenceError, match="--expert-dtype int8 computes in fp32"):
        load_for_inference(tmp_path / "m", device="cpu", dtype="bf16", expert_dtype="int8")
    quantize_experts(source)
    assert [type(e) for e in experts_of(loaded)] == [Int8Experts] * 2
    assert all(torch.equal(a, b) for x, y in zip(experts_of(loaded), experts_of(source))
               for a, b in zip(x.state_dict().values(), y.state_dict().values()))
    with pytest.raises(CheckpointError, match="routed experts are int8, quantized for serving"):
        loaded.save_pretrained(str(tmp_path / "again"))
    assert not (tmp_path / "again").exists()


def test_kernels_built_for_any_cpu_compute_the_same(tmp_path):
    """The library built without -march (no AVX2, AVX-512 or AVX512-BF16: gcc's generic vectors, as on a CPU without
    them): the kernel tests pass there too; bf16 products are computed by widening both factors."""
    kernel_built()
    env = {**os.environ, "NANOSEEK_TEST_KERNEL_FLAGS": "-fopenmp", "NANOSEEK_CACHE": str(tmp_path)}
    tests = ("bf16_products_kernels or routed_experts_kernel_equals or linear_panels_kernel_equals or "
             "latent_attention_kernel_equals or compile_time_shapes")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", tests,
                             "-c", os.devnull, "--rootdir", str(Path(__file__).parents[1])],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout
    probe = ("from nanoseek.infer import kernels; kernels.FLAG_SETS = (['-fopenmp'],); "
             "print(kernels.load(), kernels.bf16_products(), kernels.panel_width())")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["True", "False", "16"]  # built, no bf16 instructions, panels of two 8-float vectors


def test_bf16_products_decode_as_the_packed_model_close_to_fp32(monkeypatch, tmp_path):
    """--matmul-dtype bf16 (infer/bf16.py): the Linear layers the kernel takes and the routed experts (main layers and
    MTP) are packed in bf16, half the bytes; the engine (eager, compiled, MTP speculation; a long prompt's prefill
    expanded) gives greedy tokens of the packed model's own full forward (near-ties aside), which stays close to the
    fp32 model's logits without being them. state_dict and save_pretrained give the bf16-rounded weights in their
    usual layout, load_state_dict takes them; cast, the experts are an `Experts` again; with gradients wanted the
    experts multiply unpacked copies."""
    from torch import nn

    from nanoseek.infer import forward
    from nanoseek.infer.bf16 import PackedExperts, PackedKVB, use_bf16_products
    from nanoseek.model.moe import Experts

    kernel_built()
    P = kernels.panel_width()  # value heads and latents the panels' width: kv_b_proj's per-head products packed too
    shape = dict(num_nextn_predict_layers=1, v_head_dim=P, kv_lora_rank=P)
    model, plain = tiny(**shape), tiny(**shape)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    experts_bytes = sum(p.nbytes for m in model.modules() if isinstance(m, Experts) for p in m.parameters())
    linears, experts = use_bf16_products(model)
    assert experts == 2 and linears >= 10  # one MoE layer and the MTP module's; the head and most projections
    kv_b = [m for m in model.modules() if isinstance(m, PackedKVB)]
    assert len(kv_b) == 3 and kv_b[0].uk.shape == (4, P // P, 8, P, 2)  # 2 layers + MTP; W_UKᵀ [heads, r, dn]
    packed = [m for m in model.modules() if isinstance(m, PackedExperts)]
    assert len(packed) == 2 and sum(p.nbytes for m in packed for p in m.parameters()) == experts_bytes // 2
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.embed_tokens.weight.dtype == torch.float32
    state = model.state_dict()
    assert state.keys() == before.keys()
    assert all(torch.equal(state[k].float(), before[k].bfloat16().float() if state[k].dtype == torch.bfloat16
                           else before[k]) for k in before)
    assert state["layers.1.mlp.experts.gate_up_proj"].dtype == torch.bfloat16

    # The engine's absorbed attention rounds each head's query and latent output to bf16 (PackedKVB); the full
    # forward multiplies the latent unrounded: logits ~0.02 apart (of ~3), so a near-tie may break either way (it
    # does at one token on an AVX2 CPU). Every token must be greedy under the full forward up to that, and most exactly.
    def check(engine: Engine, prompts: list[list[int]], want: list[list[int]]) -> None:
        got = [[e.token_id for e in evs] for evs in engine.generate(prompts, GREEDY)]
        assert [len(t) for t in got] == [10] * len(prompts)
        assert max(greedy_shortfall(model, p, t) for p, t in zip(prompts, got)) < 0.05
        assert sum(t == w for t, w in zip(got, want)) >= len(want) - 1

    want = [greedy_reference(model, p, 10) for p in PROMPTS]
    check(Engine(model, IdText(), max_batch=3), PROMPTS, want)
    compiled = Engine(model, IdText(), max_batch=3, compile=True)
    check(compiled, PROMPTS, want)
    assert compiled.compile
    check(Engine(model, IdText(), max_batch=3, speculative="mtp"), PROMPTS, want)
    long = torch.randint(2, 256, (forward.KERNEL_KEYS + 6,)).tolist()  # prefilled expanded: PackedKVB's own forward
    want_long = [greedy_reference(model, long, 10)]
    for engine in (Engine(model, IdText()), Engine(model, IdText(), speculative="mtp")):
        check(engine, [long], want_long)
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        got, ref = model(ids), plain(ids)
    assert 1e-4 < (got - ref).abs().max() < 0.02 * ref.abs().max()  # bf16 rounding: close, not equal

    # gradients wanted: the experts' unpacked copies (the kernels have no backward)
    model(ids).float().logsumexp(-1).sum().backward()
    assert all(m.gate_up_proj.grad is None for m in packed)  # frozen: packed for serving
    model.zero_grad()

    model.save_pretrained(str(tmp_path / "saved"))
    saved = nanoseek.NanoSeek.from_pretrained(str(tmp_path / "saved"), dtype="fp32").state_dict()
    assert all(torch.equal(saved[k], state[k].float()) for k in state)
    model.load_state_dict(plain.state_dict())  # weights in their usual layout, packed (rounded) again
    assert torch.equal(model.state_dict()["layers.1.mlp.experts.down_proj"],
                       plain.state_dict()["layers.1.mlp.experts.down_proj"].bfloat16())
    kv_b_key = "layers.0.self_attn.kv_b_proj.weight"
    assert torch.equal(model.state_dict()[kv_b_key], plain.state_dict()[kv_b_key].bfloat16())
    assert kv_b[0].uk is model.layers[0].self_attn.kv_b_proj.uk  # loaded in place
    wrong = {**plain.state_dict(), kv_b_key: plain.state_dict()[kv_b_key].T}  # as nn.Linear reports it
    with pytest.raises(RuntimeError, match=rf"size mismatch for {kv_b_key}: copying a param with shape"):
        model.load_state_dict(wrong)
    assert torch.equal(model.state_dict()[kv_b_key], plain.state_dict()[kv_b_key].bfloat16())  # untouched
    missing = {k: v for k, v in plain.state_dict().items() if k != kv_b_key}
    assert model.load_state_dict(missing, strict=False).missing_keys == [kv_b_key]
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "layers.0.self_attn.kv_b_proj.bias"'):
        model.load_state_dict({**plain.state_dict(), "layers.0.self_attn.kv_b_proj.bias": torch.zeros(1)})

    cast = copy.deepcopy(model).to(torch.bfloat16)  # bf16 activations: the panels stay, torch multiplies
    assert isinstance(cast.layers[0].self_attn.kv_b_proj, PackedKVB)
    q = torch.randn(2, 4, 16, dtype=torch.bfloat16)
    weight = cast.layers[0].self_attn.kv_b_proj.unpacked().view(4, -1, P)
    assert torch.equal(cast.layers[0].self_attn.kv_b_proj.query_latent(q),
                       torch.einsum("...hd,hdr->...hr", q, weight[:, :16]))
    assert [len(evs) for evs in Engine(cast, IdText(), max_batch=2).generate(PROMPTS[:2], GREEDY)] == [10, 10]
    model.to(torch.float64)  # cast: unpacked, the model's own modules again
    assert all(type(m) is Experts and m.gate_up_proj.dim() == 3 for m in model.modules() if isinstance(m, Experts))
    kv_b_weight = model.layers[0].self_attn.kv_b_proj.weight
    assert type(model.layers[0].self_attn.kv_b_proj) is nn.Linear and kv_b_weight.dtype == torch.float64
    assert torch.equal(kv_b_weight, plain.layers[0].self_attn.kv_b_proj.weight.bfloat16().double())


def test_load_for_inference_with_bf16_products(tmp_path, data_dir):
    """`--matmul-dtype bf16` from a checkpoint folder: packed at load, said in the layout line (and suggested there
    without it, on a CPU with AVX512-BF16); combinations it cannot serve are refused with what to do instead."""
    from nanoseek.infer.bf16 import PackedExperts
    from nanoseek.infer.engine import load_for_inference

    kernel_built()
    tiny(vocab_size=512).save_pretrained(str(tmp_path / "m"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "m" / name).write_bytes((data_dir / name).read_bytes())
    model, _ = load_for_inference(tmp_path / "m", device="cpu", matmul_dtype="bf16")
    assert isinstance(model.layers[1].mlp.experts, PackedExperts)
    assert model.linear_layout.startswith("bf16 products (") and "routed-expert modules packed" in model.linear_layout
    plain, _ = load_for_inference(tmp_path / "m", device="cpu")  # fp32 products: a hint where bf16 ones are native
    assert ("--matmul-dtype bf16 decodes" in plain.linear_layout) == kernels.bf16_products()
    for kw, message in ((dict(device="meta", dtype="fp32"), "--matmul-dtype bf16 is for CPUs .* not meta"),
                        (dict(device="cpu", dtype="bf16"), "keeps the activations in fp32"),
                        (dict(device="cpu", expert_dtype="int8"), "multiplies bf16 experts, not int8"),
                        (dict(device="cpu", expert_dtype="fp32"), "multiplies bf16 experts, not fp32")):
        with pytest.raises(InferenceError, match=message):
            load_for_inference(tmp_path / "m", matmul_dtype="bf16", **kw)


def test_kernel_build_failure_is_a_warning_and_leaves_nothing_behind(tmp_path):
    """A compiler that fails: load() says False with the reason, no half-built library stays in the cache."""
    cxx = tmp_path / "cxx"
    cxx.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "fake 1.0" && exit 0\necho "fatal: no" >&2; exit 1\n')
    cxx.chmod(0o755)
    env = {**os.environ, "CXX": str(cxx), "NANOSEEK_CACHE": str(tmp_path / "cache")}
    code = "from nanoseek.infer import kernels; print(kernels.load(), kernels.cache_dir())"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["False", str(tmp_path / "cache" / "kernels")], result.stderr
    assert "could not build the decode kernel" in result.stderr and "fatal: no" in result.stderr
    assert list((tmp_path / "cache" / "kernels").iterdir()) == []
    # NANOSEEK_KERNELS=0 (README): torch's path without trying a build, even with a working compiler (load()
    # itself is cached per process: its undecorated body here)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOSEEK_KERNELS", "0")
        mp.setenv("NANOSEEK_CACHE", str(tmp_path / "off"))
        assert kernels.load.__wrapped__() is False and not (tmp_path / "off").exists()


def test_a_built_kernel_is_readable_and_a_cached_one_that_does_not_load_is_built_again(tmp_path):
    """A "compiler" ($CXX with an argument of its own) whose library never loads: the file lands in the cache with
    the mode the umask gives a compiler's output (0755 under 022: another user sharing the cache can load it),
    and a later process that finds it unloadable builds it once more instead of falling back for good."""
    cxx, calls = tmp_path / "cxx", tmp_path / "calls"
    cxx.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nfor a; do [ "$a" = --version ] && echo "fake 1.0" && exit 0; '
                   'done\nwhile [ $# -gt 0 ]; do [ "$1" = -o ] && printf junk > "$2"; shift; done\nexit 0\n')
    cxx.chmod(0o755)
    env = {**os.environ, "CXX": f"{cxx} -DWRAPPED", "NANOSEEK_CACHE": str(tmp_path / "cache")}
    code = "import os; os.umask(0o022); from nanoseek.infer import kernels; print(kernels.load())"
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert result.stdout.split() == ["False"] and "could not build the decode kernel" in result.stderr
    [library] = (tmp_path / "cache" / "kernels").iterdir()
    assert library.stat().st_mode & 0o777 == 0o755
    lines = [line.split() for line in calls.read_text().splitlines()]
    assert all(args[0] == "-DWRAPPED" for args in lines)
    assert sum("-o" in args for args in lines) == 2  # built by the first process, and again by the second


def test_linear_weights_stored_transposed_decode_the_same():
    """infer/layout.py: where this CPU's BLAS is faster on Wᵀ, the engine's loader stores the wide Linear weights
    transposed. Same shapes and values, views of the new layout; the same logits (to rounding) and greedy tokens;
    kv_b_proj (read through a view), narrow layers and an lm_head tied to the embedding keep their layout."""
    from torch import nn

    from nanoseek.infer import layout

    model = tiny()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    want = [[e.token_id for e in evs] for evs in Engine(model, IdText(), max_batch=3).generate(PROMPTS, GREEDY)]
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        logits = model(ids)
    assert layout.transpose_linears(model) == len(layout.eligible(model)) > 0
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    moved = {name for name, m in linears.items() if not m.weight.is_contiguous()}
    assert "lm_head" in moved and not any(name.endswith("kv_b_proj") for name in moved)
    assert moved == {name for name, m in linears.items() if m.out_features >= m.in_features} - \
        {name for name in linears if name.endswith("kv_b_proj")}
    assert all(m.weight.t().is_contiguous() for name, m in linears.items() if name in moved)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(ids), logits, rtol=1e-5, atol=1e-5)
    got = [[e.token_id for e in evs] for evs in Engine(model, IdText(), max_batch=3).generate(PROMPTS, GREEDY)]
    assert got == want

    tied = tiny(tie_word_embeddings=True)
    assert "lm_head" not in {n for n, m in tied.named_modules() if m in layout.eligible(tied)}
    assert layout.choose_linear_layout(tiny().to(torch.bfloat16)) == "linear weights as stored"  # CPU fp32 only


def test_the_linear_timing_measures_each_way_at_one_and_sixteen_rows(monkeypatch):
    """layout.timings: every way (BLAS as stored, transposed, the kernel where built) timed at 1 and 16 rows; the
    totals are the sums of the two sizes' medians, and the "@1" figures the one-row medians."""
    from nanoseek.infer import layout

    calls: list[tuple[str, int]] = []
    clock = types.SimpleNamespace(perf_counter=iter(range(10_000)).__next__)  # every call: 1 "second"
    monkeypatch.setattr(layout, "time", clock)  # layout's own name for the module: other code keeps the real clock
    real_linear, real_panels = torch.nn.functional.linear, kernels.linear_panels
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w: calls.append(
        ("transposed" if not w.is_contiguous() else "stored", len(x))) or real_linear(x, w))
    monkeypatch.setattr(kernels, "linear_panels", lambda x, w: calls.append(("kernel", len(x))) or real_panels(x, w))
    t = layout.timings(64, 32, repeats=3)
    ways = ["stored", "transposed"] + (["kernel"] if kernels.load() else [])
    assert sorted(set(calls)) == sorted((w, r) for w in ways for r in layout.ROWS) and len(calls) == 3 * len(ways) * 2
    assert t == {**{w: 2 for w in ways}, **{f"{w}@1": 1 for w in ways}}



def test_engine_thread_starts_without_the_callers_openmp_team():
    """Every thread that runs a parallel region keeps an OpenMP team of its own; with the loading thread's team
    and the engine's both alive, libgomp stops letting idle workers spin and each parallel region waits ~65 µs
    for a wake-up on a VM (a decode step ran 2-3x slower on 2 threads). The caller's team must be gone once the
    engine runs, and release_openmp_threads must free it (counted as the process' threads, in a fresh process),
    torch's runtime and not another libgomp that a package loaded later (the system's, where there is one)."""
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("counts threads in /proc (Linux)")
    code = """
import ctypes, glob, os, time, torch
import nanoseek
for other in glob.glob("/usr/lib*/libgomp.so.1*") + glob.glob("/usr/lib*/*/libgomp.so.1*"):
    ctypes.CDLL(other)  # a second runtime in the process, mapped at a lower address than torch's
    break
from nanoseek.device import release_openmp_threads
from nanoseek.infer import Engine, SamplingParams

def threads(expect):  # a released worker exits shortly after the call returns
    for _ in range(200):
        n = len(os.listdir("/proc/self/task"))
        if n == expect:
            break
        time.sleep(0.01)
    return n

torch.set_num_threads(3)
x = torch.randn(2_000_000)
model = nanoseek.NanoSeek(nanoseek.preset("tiny")).eval()

class IdText:
    eos_id = 1
    def decode(self, ids):
        return ""

engine = Engine(model, IdText())
engine.generate([[5, 6, 7]], SamplingParams(max_tokens=2, ignore_eos=True))  # the interpreter's own threads
base = threads(-1)
(x * 2).sum()  # a parallel region on the main thread: its team of 2 workers
team = threads(base + 2)
freed = release_openmp_threads()
after = threads(base)
(x * 2).sum()
again = threads(base + 2)
engine.generate([[5, 6, 7]], SamplingParams(max_tokens=2, ignore_eos=True))
print(base, team, freed, after, again, threads(base))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    base, team, freed, after, again, after_engine = out.stdout.split()
    if freed != "True" and not list((Path(torch.__file__).parent / "lib").glob("libgomp*")):
        pytest.skip("this torch's OpenMP runtime has no omp_pause_resource_all")  # a Linux wheel's libgomp has
    base = int(base)
    assert (int(team), int(after), int(again), int(after_engine)) == (base + 2, base, base + 2, base)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_cache_under_an_fp32_model(name):
    """`--kv-dtype bf16`: the latent rows are rounded to bf16 as they are written and the math stays fp32 (in
    torch's path, and in the attention kernel with kernel widths): the logits stay within 0.05 of the full forward's
    (rounding moves them by ~1e-2 on tiny's random weights; fp32 rows: 1e-4), for half the cache's bytes. The
    engine keeps its cache so when asked, and refuses a dtype it does not know. A bf16 model over an fp32 cache
    works too."""
    from nanoseek.infer.sampling import InferenceError

    model = tiny(**CONFIGS[name])
    cpu = torch.device("cpu")
    ids = torch.randint(0, 256, (1, 40))
    cache = LatentCache(model.config, slots=3, max_len=64, device=cpu, dtype=torch.bfloat16)
    assert cache.nbytes * 2 == LatentCache(model.config, slots=3, max_len=64, device=cpu, dtype=torch.float32).nbytes
    with torch.no_grad():
        ref = model(ids)
        h1 = forward_cached(model, cache, ids[:, :25], Batch.make([2], [0], [25], 25, cpu))
        h2 = forward_cached(model, cache, ids[:, 25:], Batch.make([2], [25], [15], 15, cpu))
    got = model.lm_head(torch.cat((h1, h2), dim=1))
    assert got.dtype == torch.float32 and cache.rows[0].dtype == torch.bfloat16
    assert 1e-5 < (got - ref).abs().max() < 0.05
    engine = Engine(model, IdText(), max_batch=2, kv_dtype="bf16")
    outs = engine.generate(PROMPTS[:2], GREEDY)
    assert engine._cache.rows[0].dtype == torch.bfloat16 and [len(events) for events in outs] == [10, 10]
    # and the other way round: a bf16 model over an fp32 cache (`--dtype bf16 --kv-dtype fp32`)
    half = model.to(torch.bfloat16)
    cache = LatentCache(half.config, slots=3, max_len=64, device=cpu, dtype=torch.float32)
    with torch.no_grad():
        h = forward_cached(half, cache, ids[:, :25], Batch.make([2], [0], [25], 25, cpu))
        ref = half(ids[:, :25])
    assert h.dtype == torch.bfloat16 and (half.lm_head(h).float() - ref.float()).abs().max() < 0.15
    with pytest.raises(InferenceError, match="kv_dtype must be"):
        Engine(model, IdText(), kv_dtype="fp8")
