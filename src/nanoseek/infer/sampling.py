"""Choosing the next token: greedy, or temperature / top-k / top-p sampling with a per-request seed.

Each request samples with its own `torch.Generator`: the batch never shares random numbers between requests, so a
seeded request draws the same numbers alone or in a batch. Its text is the same too, unless the batch's products,
rounded differently at another batch size, move a logit across a sampling boundary (a rare near-tie).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MIN_TEMPERATURE = 1e-6


class InferenceError(ValueError):
    """A request the engine cannot serve as asked; the message names the field and the limit."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # generation ends before the first of these strings
    stop_token_ids: list[int] = field(default_factory=list)  # besides EOS (unless ignore_eos)
    logprobs: int | None = None  # None: off; n: the chosen token's logprob and the n most likely alternatives
    ignore_eos: bool = False

    def check(self) -> None:
        if self.max_tokens < 1:
            raise InferenceError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0 <= self.temperature < math.inf:
            raise InferenceError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InferenceError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InferenceError(f"top_k must be >= 0, got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InferenceError(f"logprobs must be between 0 and 20, got {self.logprobs}")
        if any(not s for s in self.stop):
            raise InferenceError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def generator_for(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator()
    if params.seed is None:
        g.seed()  # fresh entropy: an unseeded request is not reproducible, as in the OpenAI API
    else:
        g.manual_seed(params.seed)
    return g


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits [vocab] (fp32) -> one token id."""
    if params.greedy:
        return int(logits.argmax())
    return int(torch.multinomial(probabilities(logits, params), 1, generator=generator))


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled (not greedy) request draws from, on the CPU: softmax(logits / temperature), then
    top-k, then top-p over what is left, renormalised (temperature first, as vLLM and transformers apply them)."""
    logits = logits.cpu()  # the generator is a CPU one: the same draw on any device
    # Relative to the largest logit, and at least MIN_TEMPERATURE: logits / 1e-40 overflow to inf (and 1e-40 is a
    # float32 subnormal, which the engine's thread flushes to 0), making the softmax NaN. Below ~1e-4 sampling
    # is greedy in all but near-ties anyway.
    logits = (logits - logits.max()) / max(params.temperature, MIN_TEMPERATURE)
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        # nucleus: keep the most likely tokens until their mass reaches top_p (always at least the first)
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits.softmax(dim=-1)


def token_logprobs(logits: torch.Tensor, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """The model's log-probability of `token` (before temperature and truncation, as OpenAI reports it) and the
    n most likely tokens with theirs."""
    logp = logits.float().log_softmax(dim=-1)
    top = logp.topk(n) if n else None
    alternatives = [(int(i), float(v)) for v, i in zip(top.values, top.indices)] if top is not None else []
    return float(logp[token]), alternatives
