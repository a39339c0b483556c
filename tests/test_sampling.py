"""The distribution a sampled request draws from, against its closed form on fixed logits, and sample()'s draws
against that distribution."""

from __future__ import annotations

import pytest
import torch

from nanoseek.infer.sampling import SamplingParams, probabilities, sample

P = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
LOGITS = P.log().float()  # shifted by a constant on purpose below: only differences between logits count


def closed_form(weights: list[float]) -> torch.Tensor:
    w = torch.tensor(weights, dtype=torch.float64)
    return w / w.sum()


CASES = [
    (dict(), P),
    (dict(top_p=0.7), closed_form([0.5, 0.3, 0, 0])),  # the first two reach 0.8 >= 0.7; the first alone does not
    (dict(top_p=1e-6), closed_form([1, 0, 0, 0])),  # always at least the most likely token
    (dict(top_k=3), closed_form([0.5, 0.3, 0.15, 0])),
    (dict(top_k=1), closed_form([1, 0, 0, 0])),
    (dict(top_k=10), P),  # more than the vocabulary: no limit
    (dict(temperature=0.5), closed_form([p ** 2 for p in P.tolist()])),  # p^(1/T)
    (dict(temperature=2.0), closed_form([p ** 0.5 for p in P.tolist()])),
    # temperature before the nucleus: at T=0.5 the first token alone holds 0.685 >= 0.6 (untempered, the nucleus
    # would keep two tokens and the temperature then reweight them to 0.735 / 0.265)
    (dict(temperature=0.5, top_p=0.6), closed_form([1, 0, 0, 0])),
    # top-p over what top-k left, renormalised: the first two hold 0.8 / 0.95 = 0.842 >= 0.82 of it (of the
    # untruncated mass they hold only 0.8, which would keep the third too)
    (dict(top_k=3, top_p=0.82), closed_form([0.5, 0.3, 0, 0])),
    (dict(temperature=1e-40), closed_form([1, 0, 0, 0])),  # not NaN: the logits are divided relative to the max
]


@pytest.mark.parametrize("params, want", CASES,
                         ids=[",".join(f"{k}={v}" for k, v in params.items()) or "plain" for params, _ in CASES])
def test_probabilities_are_the_closed_form(params, want):
    got = probabilities(LOGITS + 3.0, SamplingParams(**params))
    assert got.dtype == torch.float32 and got.shape == (4,)
    assert torch.allclose(got.double(), want, atol=1e-6), (params, got.tolist(), want.tolist())


def test_sample_draws_from_those_probabilities():
    """Frequencies of seeded draws within 5 binomial standard deviations of the closed form (at 4000 draws about
    0.035): a temperature of T^0.5 instead of T (0.673 / 0.327) or a nucleus cut at top_p / 2 (1 / 0) is far out."""
    params, n = SamplingParams(temperature=0.5, top_p=0.7), 4000
    want = closed_form([0.25, 0.09, 0, 0])  # p^2 of the two tokens the nucleus keeps: 0.735 / 0.265
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([sample(LOGITS, params, g) for _ in range(n)]), minlength=4)
    freq = counts.double() / n
    assert torch.all((freq - want).abs() <= 5 * (want * (1 - want) / n).sqrt()), freq.tolist()
    assert sample(LOGITS, SamplingParams(temperature=0), None) == 0  # greedy: the argmax, no generator needed
