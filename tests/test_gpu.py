"""On a CUDA GPU only (skipped elsewhere): the device paths the CPU tests cannot reach. A model loaded straight onto
the GPU once failed there (a CPU tensor compared with a GPU parameter). bench/gpu_check.py runs this file first.
NANOSEEK_TEST_DEVICE=mps (or cpu, to rehearse the file) runs it on another device."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import nanoseek
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.engine import load_for_inference
from tests.test_infer import GREEDY, PROMPTS, IdText, greedy_reference, tiny

CUDA = torch.device(os.environ.get("NANOSEEK_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_loaded_onto_the_gpu_it_computes_the_cpu_logits(tmp_path):
    """Straight from safetensors onto the GPU, with the MTP module's copies of the embedding and head."""
    tiny(tie_word_embeddings=False).save_pretrained(tmp_path)
    cpu = nanoseek.from_pretrained(tmp_path).eval()
    gpu = nanoseek.from_pretrained(tmp_path, device=CUDA).eval()
    assert gpu.embed_tokens.weight.device.type == CUDA.type and cpu.config.num_nextn_predict_layers > 0
    ids = torch.randint(0, cpu.config.vocab_size, (2, 24))
    with torch.no_grad():
        a, b = cpu(ids), gpu(ids.to(CUDA)).cpu()
    assert (a - b).abs().max().item() < 1e-4  # fp32 on both (TF32 is off by default): only kernels differ


def test_engine_on_the_gpu_greedy_seeded_and_speculative():
    model = tiny().to(CUDA)
    outs = Engine(model, IdText(), max_batch=3).generate(PROMPTS, GREEDY)
    for prompt, events in zip(PROMPTS, outs):
        assert [e.token_id for e in events] == greedy_reference(model, prompt, 10)
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    alone = Engine(model, IdText()).generate([PROMPTS[0]], p)[0]
    crowd = Engine(model, IdText(), max_batch=4).generate(PROMPTS[:3], [p, GREEDY, GREEDY])[0]
    assert [e.token_id for e in alone] == [e.token_id for e in crowd]
    spec = Engine(model, IdText(), max_batch=3, speculative="mtp").generate(PROMPTS, GREEDY)
    assert [[e.token_id for e in s] for s in spec] == [[e.token_id for e in o] for o in outs]


def test_served_model_with_bf16_experts_loads_on_the_gpu(tmp_path):
    texts = [f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(200)]
    train_tokenizer(iter(texts), 300, tmp_path)
    tiny(vocab_size=512).save_pretrained(tmp_path)
    model, tokenizer = load_for_inference(tmp_path, device=str(CUDA), expert_dtype="bf16", dtype="fp32")
    assert model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16  # fp32 math over bf16 experts
    assert model.embed_tokens.weight.dtype == torch.float32
    out = Engine(model, tokenizer).generate([[5, 6, 7]], GREEDY)[0]
    assert len(out) == 10


def test_bf16_training_step_uses_the_grouped_gemm(monkeypatch):
    calls: list[torch.dtype] = []
    grouped_mm = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda a, b, **kw: calls.append(a.dtype) or grouped_mm(a, b, **kw))
    torch.manual_seed(0)
    model = nanoseek.NanoSeek(nanoseek.preset("tiny")).to(CUDA)
    ids = torch.randint(0, model.config.vocab_size, (4, 65), device=CUDA)
    with torch.autocast(CUDA.type, dtype=torch.bfloat16):
        out = model(ids[:, :-1], ids[:, 1:], return_logits=False)
    (out.loss + out.mtp_loss).backward()
    assert calls and set(calls) == {torch.bfloat16}  # forward and both backward products, fused, in bf16
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.layers[1].mlp.experts.gate_up_proj.grad.abs().sum() > 0


def test_a_checkpoint_restores_the_gpu_random_state(tmp_path):
    """Dropout masks on the GPU come from its own generator: a resumed run must draw what the first one would."""
    from nanoseek.train.checkpoint import TrainState, load_checkpoint, save_checkpoint

    model = tiny().to(CUDA)
    opt = torch.optim.AdamW(model.parameters())
    ckpt = save_checkpoint(tmp_path, model, model, opt, TrainState(), keep=1)
    expected = torch.rand(8, device=CUDA)
    torch.rand(8, device=CUDA)
    load_checkpoint(ckpt, model, model, opt)
    assert torch.equal(torch.rand(8, device=CUDA), expected)
