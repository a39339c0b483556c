"""Learning-rate and batch-size schedules, as functions of training progress.

Progress is counted in optimizer steps or in tokens (`unit`), so that a batch-size ramp does not distort a
schedule written in tokens (DeepSeek writes theirs in tokens). Three learning-rate shapes:

- `cosine`: linear warmup to the peak, then cosine down to `min_lr_ratio·peak` at the end.
- `wsd` (warmup-stable-decay): warmup, constant at the peak, then a linear decay over the last
  `decay_fraction` of training. A run can be extended from any point of its stable phase.
- `multistep` (DeepSeek LLM, arXiv 2401.02954 §2.3): warmup, the peak until 80% of training, ×0.316 until
  90%, ×0.1 after (`milestones`/`factors` configurable). Like WSD, the first phase can be reused.
- `constant`: warmup, then the peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SCHEDULES = ("cosine", "wsd", "multistep", "constant")


@dataclass
class LRSchedule:
    peak: float
    total: float  # training length, in `unit`s
    warmup: float = 0.0  # in `unit`s
    kind: str = "cosine"
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd
    milestones: list[float] = field(default_factory=lambda: [0.8, 0.9])  # multistep, fractions of total
    factors: list[float] = field(default_factory=lambda: [0.316, 0.1])

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.kind!r}; choose one of {', '.join(SCHEDULES)}")
        if self.total <= 0:
            raise ValueError(f"schedule length must be > 0, got {self.total}")
        if not 0 <= self.warmup < self.total:
            raise ValueError(f"warmup ({self.warmup}) must be in [0, total={self.total})")
        if self.kind == "multistep" and (len(self.milestones) != len(self.factors) or not all(
                0 <= a <= b <= 1 for a, b in zip(self.milestones, [*self.milestones[1:], 1]))):
            raise ValueError(f"multistep milestones {self.milestones} must be increasing fractions in [0, 1], as "
                             f"many as factors {self.factors}")
        if self.kind == "wsd" and not 0 < self.decay_fraction <= 1:
            raise ValueError(f"wsd decay_fraction must be in (0, 1], got {self.decay_fraction}")

    def __call__(self, t: float) -> float:
        """Learning rate at progress t (steps or tokens done before this step)."""
        if t < self.warmup:
            return self.peak * (t + 1) / (self.warmup + 1)  # never exactly 0: the first step learns
        lo = self.peak * self.min_lr_ratio
        frac = min(t / self.total, 1.0)
        if self.kind == "cosine":
            p = min((t - self.warmup) / (self.total - self.warmup), 1.0)
            return lo + (self.peak - lo) * 0.5 * (1 + math.cos(math.pi * p))
        if self.kind == "wsd":  # the decay starts after the warmup, even where decay_fraction reaches back into it
            start = max(self.warmup, (1.0 - self.decay_fraction) * self.total)
            if t <= start:
                return self.peak
            return self.peak + (lo - self.peak) * min((t - start) / (self.total - start), 1.0)
        if self.kind == "multistep":
            lr = self.peak
            for milestone, factor in zip(self.milestones, self.factors):
                if frac >= milestone:
                    lr = self.peak * factor
            return lr
        return self.peak


@dataclass
class BatchRamp:
    """Global batch size (sequences) as a function of tokens seen: linear from `start` to `end` over
    `ramp_tokens` (DeepSeek-V3: 3072 -> 15360 over 469B tokens), rounded down to a multiple of `multiple`
    (micro-batch × data-parallel ranks) so that gradient accumulation is a whole number of micro-batches."""

    end: int
    start: int = 0  # 0: no ramp
    ramp_tokens: int = 0
    multiple: int = 1

    def __post_init__(self) -> None:
        if self.end <= 0 or self.end % self.multiple:
            raise ValueError(f"train.batch_size={self.end} must be a positive multiple of train.micro_batch_size × "
                             f"data-parallel ranks = {self.multiple}")
        if self.start and (not self.multiple <= self.start <= self.end or self.start % self.multiple):
            raise ValueError(f"train.batch_size_start={self.start} must be a multiple of train.micro_batch_size × "
                             f"data-parallel ranks = {self.multiple} in [{self.multiple}, {self.end}]")

    def __call__(self, tokens: int) -> int:
        if not self.start or not self.ramp_tokens or tokens >= self.ramp_tokens:
            return self.end
        size = self.start + (self.end - self.start) * tokens / self.ramp_tokens
        return max(self.multiple, int(size) // self.multiple * self.multiple)


def piecewise(t: float, total: float, values: list[float], switches: list[float]) -> float:
    """values[i] from switch i-1 to switch i (fractions of total): e.g. MTP weight 0.3 then 0.1 (V3 §4.2)."""
    frac = t / total if total else 0.0
    value = values[0]
    for v, s in zip(values[1:], switches):
        if frac >= s:
            value = v
    return value


def plan_length(ramp: BatchRamp, seq_len: int, steps: int = 0, tokens: int = 0,
                start: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """(optimizer steps, tokens) of a run `steps` long or `tokens` long, following the batch ramp from `start`
    (steps, tokens) already done: a resumed run counts what it did at its earlier batch size, not the new one."""
    done_steps, done_tokens = start
    while (done_steps < steps) if steps else (done_tokens < tokens):
        done_tokens += ramp(done_tokens) * seq_len
        done_steps += 1
    return done_steps, done_tokens


def lr_schedule(optim, total_steps: int, total_tokens: int) -> LRSchedule:
    """The configured schedule over a run of the given length (warmup capped at half the run: whole steps, so
    that a one-step run takes its step at the peak rate)."""
    total = total_steps if optim.unit == "steps" else total_tokens
    cap = total // 2 if optim.unit == "steps" else 0.5 * total
    return LRSchedule(peak=optim.lr, total=total, warmup=min(optim.warmup, cap), kind=optim.schedule,
                      min_lr_ratio=optim.min_lr_ratio, decay_fraction=optim.decay_fraction,
                      milestones=list(optim.milestones), factors=list(optim.factors))
