"""The fused head + cross-entropy equals F.cross_entropy on materialised logits: value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nanoseek
from nanoseek.model.loss import IGNORE_INDEX, _chunk_rows, linear_cross_entropy


@pytest.mark.parametrize("vocab", [50, 12000, 70000])  # one chunk, several chunks, the 64-row minimum
def test_matches_cross_entropy_with_ignored_rows(vocab):
    torch.manual_seed(0)
    N, H = 300, 32
    h = torch.randn(N, H, requires_grad=True)
    w = (torch.randn(vocab, H) * 0.3).requires_grad_()
    labels = torch.randint(0, vocab, (N,))
    labels[::7] = IGNORE_INDEX
    ref = F.cross_entropy(h @ w.T, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    got = linear_cross_entropy(h, w, labels)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    g_ref = torch.autograd.grad(ref * 0.7, (h, w))
    g_got = torch.autograd.grad(got * 0.7, (h, w))
    for a, b in zip(g_got, g_ref):
        assert (a - b).abs().max().item() < 1e-5
    assert _chunk_rows(vocab) < N or vocab == 50


def test_no_grad_and_partial_grad():
    h, w = torch.randn(10, 8), torch.randn(20, 8, requires_grad=True)
    labels = torch.randint(0, 20, (10,))
    with torch.no_grad():
        assert linear_cross_entropy(h, w, labels).item() == pytest.approx(
            F.cross_entropy(h @ w.T, labels, reduction="sum").item(), rel=1e-6)
    (gw,) = torch.autograd.grad(linear_cross_entropy(h, w, labels), (w,))
    (ref,) = torch.autograd.grad(F.cross_entropy(h @ w.T, labels, reduction="sum"), (w,))
    assert torch.allclose(gw, ref, atol=1e-6)
    # under no_grad only the logits' matmul runs (evaluation): no d h, no [vocab, hidden] d W


def _matmuls(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::addmm_"))


def test_no_gradient_work_under_no_grad():
    h, w = torch.randn(10, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    labels = torch.randint(0, 20, (10,))
    with torch.no_grad():
        evaluating = _matmuls(lambda: linear_cross_entropy(h, w, labels))
    training = _matmuls(lambda: linear_cross_entropy(h, w, labels))
    assert evaluating == 1 and training == 3  # logits; then also d h = d logits·W and d W += d logitsᵀ·h


def test_bf16_autocast_close():
    torch.manual_seed(0)
    h, w = torch.randn(200, 64, requires_grad=True), (torch.randn(500, 64) * 0.2).requires_grad_()
    labels = torch.randint(0, 500, (200,))
    ref = F.cross_entropy(h @ w.T, labels, reduction="sum")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, w, labels)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(ref.item(), rel=1e-2)
    got.backward()
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32


def test_model_training_path_equals_logits_path():
    torch.manual_seed(0)
    model = nanoseek.NanoSeek(nanoseek.preset("tiny", initializer_range=0.05, tie_word_embeddings=True))
    ids = torch.randint(0, 256, (2, 21))
    x, y = ids[:, :-1], ids[:, 1:]
    a = model(x, labels=y)
    (a.loss + a.mtp_loss).backward()
    ga = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    b = model(x, labels=y, return_logits=False)
    (b.loss + b.mtp_loss).backward()
    assert b.logits is None and not b.mtp_logits
    assert b.ce_sum.item() == pytest.approx(a.ce_sum.item(), rel=1e-5)
    assert b.mtp_ce_sums[0].item() == pytest.approx(a.mtp_ce_sums[0].item(), rel=1e-5)
    assert max((p.grad - g).abs().max().item() for p, g in zip(model.parameters(), ga)) < 1e-6
