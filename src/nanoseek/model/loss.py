"""Cross-entropy of the output head without materialising the [tokens, vocab] logits.

The head and the loss are fused and run over chunks of rows: for each chunk, logits = h·Wᵀ, the loss is
logsumexp(logits) - logits[target], and (when gradients are wanted) d logits = softmax(logits) - onehot(target)
is turned at once into d h = d logits·W and d W += d logitsᵀ·h. Only one [chunk, vocab] block exists at a
time, so memory drops from O(tokens·vocab) to O(chunk·vocab) and the softmax never round-trips through main
memory. Same idea as Liger's fused linear cross-entropy and Apple's Cut Cross-Entropy, in plain PyTorch.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _chunk_rows(vocab: int) -> int:
    # a [rows, vocab] fp32 block of ~4 MB stays in cache; at least 64 rows keep the matmuls efficient
    return max(64, min(4096, (1 << 20) // vocab))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,  # type: ignore[override]
                compute_dtype: torch.dtype, grad_enabled: bool) -> torch.Tensor:
        # needs_input_grad says True under torch.no_grad too: without the caller's grad mode, evaluation would
        # pay for d h and a [vocab, hidden] d W it never uses
        want_h, want_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        w = weight.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want_w else None
        step = _chunk_rows(weight.shape[0])
        for start in range(0, h.shape[0], step):
            hc = h[start:start + step].to(compute_dtype)
            yc = labels[start:start + step]
            valid = yc != IGNORE_INDEX
            target = yc.clamp(min=0).unsqueeze(1)
            logp = torch.log_softmax((hc @ w.T).float(), dim=-1)  # one fused pass over the block
            total -= (logp.gather(1, target).squeeze(1) * valid).sum()
            if want_h or want_w:
                probs = logp.exp_()  # softmax, in place
                probs.scatter_add_(1, target, -valid.unsqueeze(1).to(probs.dtype))  # minus onehot(target)
                if not valid.all():
                    probs.mul_(valid.unsqueeze(1))  # ignored rows contribute nothing
                g = probs.to(compute_dtype)
                if want_h:
                    grad_h[start:start + step] = (g @ w).to(h.dtype)
                if want_w and g.dtype == grad_w.dtype:
                    grad_w.addmm_(g.T, hc)  # accumulate inside the GEMM
                elif want_w:
                    grad_w.add_(g.T @ hc)  # bf16 product, fp32 sum
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over rows with labels != -100 of CE(h·weightᵀ, labels): h [N, H], weight [V, H], labels [N]."""
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, labels, dtype, torch.is_grad_enabled())
