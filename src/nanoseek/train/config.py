"""A training run's configuration: TOML sections as dataclasses, every field overridable as key=value.

    [model]      preset + any HF deepseek_v3 field (nanoseek.config.ModelConfig)
    [data]       prepared data folder, sequence length
    [train]      length (tokens / steps / wall time), batch sizes, dtype, device, output folder
    [optim]      AdamW and the learning-rate schedule
    [balance]    auxiliary-loss-free bias update (γ) and the optional sequence-wise balance loss (α)
    [mtp]        Multi-Token Prediction loss weight λ and its schedule
    [eval]       validation loss / bits per byte and samples, every N steps
    [checkpoint] every N steps, keep the last K
    [parallel]   torchrun runs: ddp | fsdp, expert parallelism, activation checkpointing, timeout
    [cost]       what the run's energy costs in money and CO2, and the peak FLOP/s that MFU is measured against
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.config import ConfigError, ModelConfig, from_dict, load_toml, model_config_from_section
from nanoseek.train.schedule import LRSchedule


@dataclass
class DataConfig:
    path: str = ""  # a folder written by `nanoseek data prepare`
    seq_len: int = 512


@dataclass
class TrainConfig:
    out_dir: str = "runs/run"
    tokens: int = 0  # training length in tokens (0: use steps)
    steps: int = 0  # training length in optimizer steps (0: use tokens)
    max_time: float = 0.0  # seconds of training steps (evaluations, checkpoints not counted); stop (with a
    # checkpoint) when reached. 0: no limit
    batch_size: int = 32  # sequences per optimizer step, all ranks together
    micro_batch_size: int = 8  # sequences per forward/backward on one rank
    batch_size_start: int = 0  # batch-size ramp: start here (0: no ramp) ...
    batch_ramp_tokens: int = 0  # ... and reach batch_size after this many tokens
    dtype: str = "fp32"  # fp32 | bf16 (autocast; weights and optimizer stay fp32) | auto (bf16 where it is fast)
    device: str = "auto"  # auto: cuda, then mps, then cpu
    seed: int = 0
    compile: bool = False
    log_every: int = 10
    max_nonfinite: int = 5  # stop after this many non-finite losses in a row (each one skips its step)


@dataclass
class OptimConfig:
    lr: float = 3e-3
    schedule: str = "cosine"  # cosine | wsd | multistep | constant
    unit: str = "steps"  # steps | tokens: what warmup and the schedule count
    warmup: float = 100  # in `unit`s
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd: final decay share
    milestones: list[float] = field(default_factory=lambda: [0.8, 0.9])  # multistep
    factors: list[float] = field(default_factory=lambda: [0.316, 0.1])
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # DeepSeek-V3 §4.2
    eps: float = 1e-8
    weight_decay: float = 0.1  # on matrices; norms, biases and the routing bias get none
    grad_clip: float = 1.0


@dataclass
class BalanceConfig:
    bias_update_speed: float = 1e-3  # γ: b_i ± γ after each step towards the mean load (V3: 0.001)
    bias_freeze_at: float = 1.0  # fraction of training after which γ = 0 (V3 stops for the last 500B of 14.8T)
    seq_aux_alpha: float = 0.0  # α of the sequence-wise balance loss (V3: 0.0001)


@dataclass
class MTPConfig:
    weight: float = 0.3  # λ (V3: 0.3 for the first 10T tokens, then 0.1)
    weight_after: float = 0.1
    switch_at: float = 0.7  # fraction of training where λ becomes weight_after (1.0: never)


@dataclass
class EvalConfig:
    every: int = 200  # steps; 0: only at the end
    batches: int = 8  # validation batches of micro_batch_size sequences
    samples: int = 2  # sampled continuations shown at each evaluation
    sample_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 50
    prompts: list[str] = field(default_factory=list)  # default: the start of validation documents


@dataclass
class CheckpointConfig:
    every: int = 500  # steps; a final checkpoint is always written
    keep: int = 3  # 0: keep all


DP_MODES = ("ddp", "fsdp")


@dataclass
class ParallelConfig:
    """Used when started by torchrun (any number of ranks); see train/parallel.py."""

    dp: str = "ddp"  # ddp | fsdp: how the non-expert weights are kept on each rank (replicated | sharded)
    ep: int = 1  # expert parallelism: routed experts split over this many ranks (divides the world size)
    cpu_offload: bool = False  # fsdp: sharded weights, gradients and optimizer state live in CPU memory (GPU)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    timeout: float = 300.0  # seconds a rank waits for the others (start-up, collectives, rank 0's checkpoint I/O)


@dataclass
class CostConfig:
    """Prices and grid intensity for the cost columns of metrics.jsonl (see nanoseek.cost.energy)."""

    price_per_kwh: float = 0.15  # USD per kWh. A placeholder, roughly a world average: set your own tariff
    price_per_hour: float = 0.0  # USD per machine-hour of a rented machine; when > 0 it replaces price_per_kwh
    country: str = "world"  # ISO 3166-1 alpha-3 code (FRA, USA, IND, ...) for the grid's CO2 per kWh; "world"
    # (the default: no country is a fair guess for a project used anywhere) is the world average
    carbon_intensity: float = 0.0  # gCO2e per kWh; > 0 overrides the country's figure (your supplier's, say)
    energy: bool = True  # measure energy (codecarbon, offline); false: no energy, CO2 or per-kWh cost columns
    peak_flops: float = 0.0  # FLOP/s per rank that MFU is relative to; 0: the accelerator table or a matmul probe


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cost: CostConfig = field(default_factory=CostConfig)

    def validate(self) -> None:
        t, o = self.train, self.optim
        at_least = {"train.tokens": (t.tokens, 0, "use steps"), "train.steps": (t.steps, 0, "use tokens"),
                    "train.max_time": (t.max_time, 0, "no limit"), "train.log_every": (t.log_every, 1, ""),
                    "train.max_nonfinite": (t.max_nonfinite, 1, ""), "data.seq_len": (self.data.seq_len, 1, ""),
                    "checkpoint.keep": (self.checkpoint.keep, 0, "all"),
                    "checkpoint.every": (self.checkpoint.every, 0, "only at the end"),
                    "eval.every": (self.eval.every, 0, "only at the end"),
                    "eval.batches": (self.eval.batches, 0, "no validation loss"),
                    "eval.samples": (self.eval.samples, 0, "none"),
                    "eval.sample_tokens": (self.eval.sample_tokens, 1, ""),
                    "eval.temperature": (self.eval.temperature, 0, "greedy"), "eval.top_k": (self.eval.top_k, 0, "all"),
                    "optim.warmup": (o.warmup, 0, "none"), "optim.weight_decay": (o.weight_decay, 0, "none"),
                    "optim.grad_clip": (o.grad_clip, 0, "no clipping"), "optim.min_lr_ratio": (o.min_lr_ratio, 0, ""),
                    "train.seed": (t.seed, 0, ""), "train.batch_size_start": (t.batch_size_start, 0, "no ramp"),
                    "train.batch_ramp_tokens": (t.batch_ramp_tokens, 0, "no ramp"),
                    "mtp.weight": (self.mtp.weight, 0, "no MTP loss"),
                    "mtp.weight_after": (self.mtp.weight_after, 0, "no MTP loss"),
                    "balance.bias_update_speed": (self.balance.bias_update_speed, 0, "no bias update"),
                    "balance.seq_aux_alpha": (self.balance.seq_aux_alpha, 0, "off")}
        for key, (value, low, zero) in at_least.items():
            if not value >= low:  # NaN too
                raise ConfigError(f"{key}={value} must be >= {low}" + (f" (0: {zero})" if zero else ""))
        if not (o.min_lr_ratio <= 1 and o.weight_decay < math.inf and o.grad_clip < math.inf):
            raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio} must be at most 1 (the schedule's end, a "
                              f"fraction of optim.lr), and optim.weight_decay={o.weight_decay} and "
                              f"optim.grad_clip={o.grad_clip} finite")
        if not (0 < o.lr < math.inf and 0 < o.eps < math.inf):
            raise ConfigError(f"optim.lr={o.lr} and optim.eps={o.eps} must be positive numbers")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise ConfigError(f"optim.betas={o.betas} must be two numbers in [0, 1), e.g. [0.9,0.95]")
        if (t.tokens > 0 and t.steps > 0) or not (t.tokens > 0 or t.steps > 0 or t.max_time > 0):
            raise ConfigError("set the run's length: train.tokens or train.steps (one of them: to use tokens with "
                              "a config that sets steps, add train.steps=0), or only "
                              "train.max_time (seconds; the steps are then fixed after timing the first ones)")
        if t.dtype not in ("fp32", "bf16", "auto"):
            raise ConfigError(f"train.dtype={t.dtype!r}: use 'fp32', 'bf16' or 'auto'")
        if self.optim.unit not in ("steps", "tokens"):
            raise ConfigError(f"optim.unit={self.optim.unit!r}: use 'steps' or 'tokens'")
        try:  # the schedule's own checks, before any training (a time-budgeted run builds it after 6 steps)
            LRSchedule(peak=o.lr, total=1.0, kind=o.schedule, decay_fraction=o.decay_fraction,
                       milestones=list(o.milestones), factors=list(o.factors))
        except ValueError as e:
            raise ConfigError(f"optim: {e}") from None
        for key, value in (("balance.bias_freeze_at", self.balance.bias_freeze_at),
                           ("mtp.switch_at", self.mtp.switch_at)):
            if not 0 <= value <= 1:  # NaN too
                raise ConfigError(f"{key}={value} is a fraction of the run: give a number in [0, 1] (1: never)")
        if bool(t.batch_size_start) != bool(t.batch_ramp_tokens):
            raise ConfigError("a batch-size ramp needs both train.batch_size_start and train.batch_ramp_tokens "
                              f"(got {t.batch_size_start} and {t.batch_ramp_tokens}; 0 and 0: no ramp)")
        if t.micro_batch_size <= 0 or t.batch_size % t.micro_batch_size:
            raise ConfigError(f"train.batch_size={t.batch_size} must be a multiple of train.micro_batch_size="
                              f"{t.micro_batch_size}")
        p = self.parallel
        if p.dp not in DP_MODES:
            raise ConfigError(f"parallel.dp={p.dp!r}: use one of {', '.join(DP_MODES)}")
        if p.cpu_offload and p.dp != "fsdp":
            raise ConfigError(f"parallel.cpu_offload is FSDP's: set parallel.dp=fsdp as well (got {p.dp!r})")
        if p.ep < 1 or (self.model.n_routed_experts and self.model.n_routed_experts % p.ep):
            raise ConfigError(f"parallel.ep={p.ep} must be >= 1 and divide the {self.model.n_routed_experts} routed "
                              "experts (each rank of an ep group holds as many)")
        if not p.timeout > 0:
            raise ConfigError(f"parallel.timeout={p.timeout} must be > 0 (seconds)")
        if self.data.seq_len > self.model.max_position_embeddings:
            raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds model.max_position_embeddings="
                              f"{self.model.max_position_embeddings}")
        c = self.cost
        if not all(0 <= v < math.inf for v in (c.price_per_kwh, c.price_per_hour, c.carbon_intensity,
                                                c.peak_flops)):  # NaN too
            raise ConfigError("cost.price_per_kwh, cost.price_per_hour, cost.carbon_intensity and cost.peak_flops "
                              "must be numbers >= 0 (0: unused or automatic)")
        if c.carbon_intensity == 0:
            from nanoseek.cost.energy import grid_intensity

            grid_intensity(c.country)  # an unknown country fails here, before any training

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    data = dict(data)
    model = model_config_from_section(data.pop("model", {}))
    cfg = from_dict(RunConfig, data)
    cfg.model = model
    cfg.validate()
    return cfg


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    return run_config_from_dict(load_toml(path, overrides))


def to_toml(data: dict[str, Any]) -> str:
    """Write nested dicts of scalars and lists as TOML (what the resolved config holds). TOML has no null:
    None is written as "none", which from_dict reads back as None for optional fields."""
    def value(v: Any) -> str:
        if v is None:
            return '"none"'
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):  # a JSON string is a TOML basic string, but for DEL, which TOML wants escaped
            return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(f"cannot write {type(v).__name__} as TOML")

    lines: list[str] = []
    for section, body in data.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {value(v)}" for k, v in body.items()]
        lines.append("")
    return "\n".join(lines)
