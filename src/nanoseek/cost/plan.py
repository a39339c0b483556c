"""`nanoseek plan`: from a budget and some hardware to a compute-optimal run config.

    budget ($ at a price per device-hour, or hours)  x  hardware (accelerators from the table, or this CPU)
      -> compute C the run may spend, at a stated utilisation (MFU): assumed on GPUs; measured on this CPU (a
         demo-preset training step, then the planned model's own step, see make_cpu_plan)
      -> DeepSeek LLM's scaling laws (Bi et al. 2024, arXiv 2401.02954, §3, eq. 1 and 4):
             M_opt = 0.1715·C^0.5243   model scale, non-embedding training FLOPs per token
             D_opt = 5.8316·C^0.4757   training tokens            (M_opt·D_opt = C)
             B_opt = 0.2920·C^0.3271   batch size, tokens
             η_opt = 0.3118·C^-0.1250  peak learning rate
      -> a DeepSeek-V3-shaped config (the presets' shape, scaled) whose M is closest to M_opt, trained on D_opt tokens
      -> micro-batch, accumulation and data-parallel strategy that fit each device's memory (nanoseek.cost.model)
      -> step time, wall time, kWh, $, CO2 and a TOML that `nanoseek train` runs.

The laws are fitted on dense models at 1e17-3e20 FLOPs with DeepSeek's data; a budget far outside that range, and
a MoE model, are extrapolations. C counts what the laws count (M excludes the vocabulary); the compute the run
really spends (output head, MTP, causal attention, all included) is what has to fit the budget, so C is the
largest budget whose optimal run costs no more than the hardware delivers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nanoseek.config import ConfigError, ModelConfig
from nanoseek.cost.energy import grid_intensity, machine_power
from nanoseek.cost.flops import train_flops_per_token
from nanoseek.cost.hardware import accelerator, cpu_matmul_probe, table_peak
from nanoseek.cost.model import Estimate, count_params, estimate, nonembedding_flops_per_token
from nanoseek.train.config import RunConfig


class PlanError(ConfigError):
    """A budget or hardware that cannot give a sensible run; the message says what it can and cannot buy."""


# ---- the scaling law -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScalingLaw:
    """Power laws in the compute budget C (FLOPs): y = coefficient · C^exponent."""

    name: str
    source: str
    model: tuple[float, float]  # M_opt: non-embedding FLOPs per token
    data: tuple[float, float]  # D_opt: tokens
    batch: tuple[float, float]  # B_opt: tokens per step
    lr: tuple[float, float]  # η_opt

    @staticmethod
    def _at(law: tuple[float, float], c: float) -> float:
        return law[0] * c ** law[1]

    def m_opt(self, c: float) -> float:
        return self._at(self.model, c)

    def d_opt(self, c: float) -> float:
        return self._at(self.data, c)

    def b_opt(self, c: float) -> float:
        return self._at(self.batch, c)

    def lr_opt(self, c: float) -> float:
        return self._at(self.lr, c)

    def c_for_model(self, m: float) -> float:
        """The budget whose optimal model scale is m."""
        return (m / self.model[0]) ** (1 / self.model[1])


DEEPSEEK_LLM = ScalingLaw(
    name="DeepSeek LLM", source="Bi et al. 2024, DeepSeek LLM, arXiv 2401.02954, §3 eq. 1 and 4",
    model=(0.1715, 0.5243), data=(5.8316, 0.4757), batch=(0.2920, 0.3271), lr=(0.3118, -0.1250))


# ---- hardware and budget ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hardware:
    """`count` devices that each deliver `peak`·`mfu` FLOP/s on training and hold `memory` bytes."""

    name: str
    count: int
    device: str  # "cuda" | "cpu": which kernels the memory estimate assumes
    dtype: str
    peak: float
    peak_source: str
    mfu: float
    mfu_source: str
    memory: float  # usable bytes per device
    memory_source: str
    watts: float  # per device
    watts_source: str

    @property
    def flops_per_second(self) -> float:
        return self.count * self.peak * self.mfu


# A GPU's usable memory is less than its label: the CUDA context, the allocator's fragmentation and NCCL buffers.
GPU_USABLE = 0.9
# Model FLOPs utilisation assumed on GPUs: what nanoseek itself measured, the small preset (hidden 768, 12 layers)
# in bf16 on one H200: 5.2-6.4% (docs/LOG.md, 2026-11-29 session 8). Large dense models on tuned stacks reach
# 30-50% (PaLM, arXiv 2204.02311, Table 3), but a plan that assumed that here would run ~6x over its time and
# money: measure yours (a short run's `mfu` column) and pass it as --mfu.
GPU_MFU = 0.06
# accelerators per machine, to turn a per-device price into the per-machine price a run's config holds
GPUS_PER_MACHINE = 8


def _power(watts: float | None, default: float, source: str) -> dict[str, Any]:
    """Hardware's watts and their source: --watts when given (a positive number), else the default."""
    if watts is None:
        return {"watts": default, "watts_source": source}
    if not 0 < watts < math.inf:
        raise PlanError(f"--watts must be a positive power per device, got {watts:g}")
    return {"watts": watts, "watts_source": "given (--watts)"}


def gpu_hardware(name: str, count: int, mfu: float = GPU_MFU, dtype: str = "auto",
                 watts: float | None = None) -> Hardware:
    """`count` accelerators from the table; bf16 where they have bf16 tensor cores."""
    acc = accelerator(name)
    if count < 1:
        raise PlanError(f"--count must be >= 1, got {count}")
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu must be in (0, 1], got {mfu}")
    dtype = ("bf16" if acc.bf16 is not None else "fp32") if dtype == "auto" else dtype
    peak, label = table_peak(acc, dtype)
    return Hardware(name=acc.name, count=count, device="cuda", dtype=dtype, peak=peak, peak_source=label, mfu=mfu,
                    mfu_source="given (--mfu)" if mfu != GPU_MFU else
                    "assumed: nanoseek's own, small preset on an H200; --mfu sets yours",
                    memory=acc.memory_gb * 1e9 * GPU_USABLE,
                    memory_source=f"{acc.memory_gb:g} GB datasheet, {GPU_USABLE:.0%} usable",
                    **_power(watts, acc.tdp_w, f"{acc.name} board power (datasheet)"))


@dataclass(frozen=True)
class Calibration:
    """A measured training step of a model on this CPU: its model FLOP/s against the matmul probe."""

    achieved: float  # FLOP/s
    probe: float
    seconds: float
    what: str

    @property
    def efficiency(self) -> float:
        return self.achieved / self.probe


_measured: dict[str, Calibration] = {}


def measure_cpu_step(cfg: ModelConfig, dtype: str, seq_len: int, micro_batch: int, what: str,
                     steps: int = 3) -> Calibration:
    """Time training steps (forward, backward, AdamW) of `cfg` at micro_batch x seq_len: the median one, as a run
    of many steps sees the machine's usual load rather than its quietest moment. Once per process and shape."""
    import nanoseek

    key = repr((cfg, dtype, seq_len, micro_batch))
    if key in _measured:
        return _measured[key]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nanoseek.NanoSeek(cfg).train()
        ids = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len + 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=hasattr(torch, "_fused_adamw_") or None)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step() -> float:
        t = time.perf_counter()
        with autocast:
            out = model(ids[:, :-1], labels=ids[:, 1:], return_logits=False)
        (out.ce_sum + sum(out.mtp_ce_sums)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    step()  # the first step allocates and picks kernels
    seconds = statistics.median(step() for _ in range(steps))
    flops = train_flops_per_token(cfg, seq_len, mtp=cfg.num_nextn_predict_layers > 0) * micro_batch * seq_len
    probe = cpu_matmul_probe(dtype)
    if flops / seconds > probe:  # a step beat the peak: every window of that probe was slowed (a busy machine)
        probe = cpu_matmul_probe(dtype, again=True)
    _measured[key] = Calibration(achieved=flops / seconds, probe=probe, seconds=seconds,
                                 what=f"{what}, {micro_batch} x {seq_len} tokens, {dtype}")
    return _measured[key]


def calibrate_cpu(dtype: str, seq_len: int = 256) -> Calibration:
    """The demo preset's measured step: the utilisation a CPU plan starts from."""
    import nanoseek

    cfg = nanoseek.preset("demo", max_position_embeddings=max(seq_len, 1024))
    return measure_cpu_step(cfg, dtype, seq_len, 8, "demo preset")


def cpu_hardware(dtype: str = "auto", watts: float | None = None, seq_len: int = 256) -> Hardware:
    """This machine's CPU: the matmul probe for the peak, a measured demo step for the utilisation."""
    from nanoseek.device import pick_dtype

    dtype = pick_dtype(dtype, torch.device("cpu"))
    cal = calibrate_cpu(dtype, seq_len)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware(name=f"CPU ({torch.get_num_threads()} threads)", count=1, device="cpu", dtype=dtype,
                    peak=cal.probe, peak_source=f"CPU matmul probe {dtype}", mfu=cal.efficiency,
                    mfu_source=f"measured: {cal.what} at {cal.achieved / 1e9:.0f} GFLOP/s",
                    memory=0.8 * ram, memory_source=f"{ram / 2**30:.0f} GiB RAM, 80% usable",
                    **_power(watts, *(machine_power() if watts is None else (0.0, ""))))


@dataclass(frozen=True)
class Budget:
    """Hours of the hardware, from a time limit or from dollars at a price per device-hour (the binding one)."""

    hours: float
    usd: float | None
    price_per_hour: float  # per device
    why: str

    @classmethod
    def make(cls, count: int, usd: float | None = None, price_per_hour: float | None = None,
             hours: float | None = None) -> Budget:
        if usd is None and hours is None:
            raise PlanError("give a budget: --budget-usd (with --price-per-hour) or --hours")
        if usd is not None and (usd <= 0 or not math.isfinite(usd)):
            raise PlanError(f"--budget-usd must be a positive amount, got {usd}")
        if hours is not None and (hours <= 0 or not math.isfinite(hours)):
            raise PlanError(f"--hours must be positive, got {hours}")
        if usd is not None and not price_per_hour:
            raise PlanError("--budget-usd needs --price-per-hour (USD per device-hour) to turn dollars into hours")
        if price_per_hour is not None and not 0 <= price_per_hour < math.inf:
            raise PlanError(f"--price-per-hour must be a number >= 0 (USD per device-hour), got {price_per_hour}")
        price = price_per_hour or 0.0
        options = []
        if usd is not None:
            options.append((usd / (price * count), f"${usd:g} at ${price:g}/device-hour x {count}"))
        if hours is not None:
            options.append((hours, f"{hours:g} h"))
        h, why = min(options)
        return cls(hours=h, usd=usd, price_per_hour=price, why=why)


# ---- the model family ------------------------------------------------------------------------------------------
def _round(x: float, multiple: int) -> int:
    return max(multiple, round(x / multiple) * multiple)


def scaled_config(hidden: int, layers: int, vocab_size: int, seq_len: int) -> ModelConfig:
    """The DeepSeek shape at another size (demo preset at hidden 256, small at 768, V2-Lite 2048, V2 5120, V3 7168).
    Head size 32 below hidden 512, 64 below 2048, then 128; heads = hidden / head size; latent K/V a quarter of hidden
    (at most 512); low-rank queries from hidden 768 (half of hidden, at most 1536); one dense layer; SwiGLU width
    8/3·hidden; experts half as wide as hidden (a third from 768): 32 top-4 in 4 groups as in the demo preset, 64
    top-6 in 8 groups from 512 (small, V2-Lite), 160 top-6 from 4096 (V2), 256 top-8 from 6144 (V3); one shared
    expert; MTP depth 1."""
    head = 32 if hidden < 512 else 64 if hidden < 2048 else 128
    experts, top_k, groups, top_groups = (
        (32, 4, 4, 2) if hidden < 512 else (64, 6, 8, 4) if hidden < 4096 else (160, 6, 8, 3) if hidden < 6144
        else (256, 8, 8, 4))
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=max(2, hidden // head), qk_nope_head_dim=head, qk_rope_head_dim=head // 2,
        v_head_dim=head, kv_lora_rank=min(512, _round(hidden / 4, 16)),
        q_lora_rank=None if hidden < 768 else min(1536, _round(hidden / 2, 64)),
        intermediate_size=_round(8 * hidden / 3, 64), first_k_dense_replace=1,
        moe_intermediate_size=_round(hidden / 2 if hidden < 768 else hidden / 3, 32),
        n_routed_experts=experts, num_experts_per_tok=top_k, n_group=groups, topk_group=top_groups,
        n_shared_experts=1, num_nextn_predict_layers=1, max_position_embeddings=max(seq_len, 1024),
        initializer_range=0.02 if hidden < 2048 else 0.006)


@dataclass(frozen=True)
class Candidate:
    hidden: int
    layers: int
    m: float  # DeepSeek LLM's M: non-embedding training FLOPs per token
    flops: float  # training FLOPs per token the run really spends

    def config(self, vocab_size: int, seq_len: int) -> ModelConfig:
        return scaled_config(self.hidden, self.layers, vocab_size, seq_len)


# hidden / layers: the presets and DeepSeek's models lie inside (demo 43, small 64, DeepSeek LLM 67B 86, V3 117)
ASPECT = (16, 128)


@functools.cache
def family(vocab_size: int, seq_len: int) -> tuple[Candidate, ...]:
    """Every shape of the family, hidden 64 to 8192 in steps of 64, 2 to 96 layers, sorted by M."""
    out = []
    for hidden in range(64, 8193, 64):
        for layers in range(2, 97):
            if not ASPECT[0] <= hidden / layers <= ASPECT[1]:
                continue
            cfg = scaled_config(hidden, layers, vocab_size, seq_len)
            out.append(Candidate(hidden, layers, nonembedding_flops_per_token(cfg, seq_len),
                                 train_flops_per_token(cfg, seq_len, mtp=True)))
    return tuple(sorted(out, key=lambda c: c.m))


def _ranking(cands: tuple[Candidate, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(log M, aspect penalty) of each shape: what `closest` ranks them by."""
    return (np.log([c.m for c in cands]), 0.05 * np.abs(np.log([c.hidden / c.layers / 64 for c in cands])))


def _closest_index(ranking: tuple[np.ndarray, np.ndarray], m_opt: float) -> int:
    log_m, penalty = ranking
    return int(np.argmin(np.abs(log_m - math.log(m_opt)) + penalty))


def closest(cands: tuple[Candidate, ...], m_opt: float) -> Candidate:
    """The shape whose M is closest to M_opt (in ratio), preferring hidden/layers near 64 among near-ties."""
    return cands[_closest_index(_ranking(cands), m_opt)]


# ---- parallelism and memory ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    strategy: str  # "single" | "ddp" | "fsdp"
    activation_checkpointing: bool
    micro_batch: int
    accumulation: int
    global_batch: int  # sequences
    estimate: Estimate


def fit_layout(cfg: ModelConfig, hw: Hardware, seq_len: int, batch_seqs: int) -> Layout:
    """DDP (or one process) if the model fits with micro-batch 1, else FSDP, else FSDP with activation
    checkpointing (both need several devices: a single process trains unwrapped); the largest power-of-two
    micro-batch that fits; accumulation makes up the global batch (rounded up to micro-batch x devices)."""
    n = hw.count
    per_rank = max(1, math.ceil(batch_seqs / n))
    options = [("single" if n == 1 else "ddp", False)]
    if n > 1:
        options += [("fsdp", False), ("fsdp", True)]
    for strategy, ckpt in options:
        def est(m: int, s: str = strategy, ck: bool = ckpt) -> Estimate:
            return estimate(cfg, seq_len, m, hw.dtype, dp="fsdp" if s == "fsdp" else "ddp", world=n,
                            activation_checkpointing=ck, device=hw.device)

        if est(1).memory.peak > hw.memory:
            continue
        micro = 1
        while micro * 2 <= per_rank and est(micro * 2).memory.peak <= hw.memory:
            micro *= 2
        accumulation = math.ceil(per_rank / micro)
        return Layout(strategy, ckpt, micro, accumulation, micro * accumulation * n, est(micro))
    smallest = estimate(cfg, seq_len, 1, hw.dtype, dp="fsdp" if n > 1 else "ddp", world=n,
                        activation_checkpointing=n > 1, device=hw.device)
    raise MemoryError(smallest.memory.peak)


# ---- the plan ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    law: ScalingLaw
    hardware: Hardware
    budget: Budget
    compute: float  # C: the laws' budget (M·D)
    available: float  # FLOPs the hardware delivers in the budget's hours
    config: ModelConfig
    m: float
    seq_len: int
    tokens: int
    steps: int
    lr: float
    warmup: int
    layout: Layout
    step_seconds: float
    country: str
    notes: list[str] = field(default_factory=list)

    @property
    def estimate(self) -> Estimate:
        return self.layout.estimate

    @property
    def d_opt(self) -> float:
        return self.law.d_opt(self.compute)

    @property
    def train_flops(self) -> float:
        return self.tokens * self.estimate.train_flops_per_token

    @property
    def hours(self) -> float:
        return self.steps * self.step_seconds / 3600

    @property
    def cost_usd(self) -> float:
        return self.hours * self.hardware.count * self.budget.price_per_hour

    @property
    def kwh(self) -> float:
        """Estimated: every device at its board power (TDP) for the whole run."""
        return self.hardware.watts * self.hardware.count * self.hours / 1000

    @property
    def co2_kg(self) -> float:
        return self.kwh * grid_intensity(self.country).g_per_kwh / 1000


# The share of the budget's hours the training steps are planned to fill: the rest is for start-up, evaluations,
# checkpoints and a speed below the estimate, so that the run ends its schedule before `train.max_time` stops it.
PLANNED_SHARE = 0.9
# Shorter than this, a run is mostly start-up, evaluations and checkpoints: not a plan worth writing.
MIN_MINUTES = 10


def _affordable(law: ScalingLaw, cands: tuple[Candidate, ...], available: float) -> float:
    """The largest C whose optimal run (D_opt(C) tokens of the shape closest to M_opt(C)) costs <= available
    FLOPs. The cost grows with C except where the closest shape changes to one with fewer FLOPs per token, so a
    bisection on log C finds *a* crossing; the largest one is then looked for on a fine grid above it."""
    ranking = _ranking(cands)  # once: the same numbers `closest` computes, so both pick the same shape

    def cost(log_c: float) -> float:
        c = math.exp(log_c)
        return law.d_opt(c) * cands[_closest_index(ranking, law.m_opt(c))].flops

    def bisect(lo: float, hi: float) -> float:  # from a lo that fits: the returned point always fits
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cost(mid) <= available else (lo, mid)
        return lo

    lo, hi = math.log(1.0), math.log(max(available, 2.0))
    if cost(hi) <= available:
        return math.exp(hi)
    found = bisect(lo, hi)
    # above it, C up to 1.5x (near-tied shapes differ by less in FLOPs per token): the last grid point that fits,
    # refined towards the next one
    step = math.log(1.5) / 200
    later = [x for x in (found + step * i for i in range(1, 201)) if x < hi and cost(x) <= available]
    if later:
        found = bisect(later[-1], min(later[-1] + step, hi))
    return math.exp(found)


def _largest_fitting(cands: tuple[Candidate, ...], hw: Hardware, seq_len: int, vocab_size: int) -> Candidate | None:
    """The largest shape (by M) that trains at micro-batch 1 on this hardware: memory grows with M, so bisect."""
    def fits(i: int) -> bool:
        try:
            fit_layout(cands[i].config(vocab_size, seq_len), hw, seq_len, 1)
        except MemoryError:
            return False
        return True

    if not fits(0):
        return None
    lo, hi = 0, len(cands) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return cands[lo]


def _fmt_flops(x: float) -> str:
    return f"{x:.3g} FLOPs"


def _hours_for(flops: float, hw: Hardware) -> float:
    return flops / hw.flops_per_second / 3600


def check_plan_args(seq_len: int, vocab_size: int, country: str) -> None:
    grid_intensity(country)  # an unknown country fails now, not after the plan
    if seq_len < 16:
        raise PlanError(f"--seq-len must be >= 16, got {seq_len}")
    if vocab_size < 256:
        raise PlanError(f"--vocab-size must be >= 256 (a byte-level tokenizer's 256 bytes), got {vocab_size}")


def make_plan(budget: Budget, hw: Hardware, seq_len: int, vocab_size: int, country: str = "world",
              law: ScalingLaw = DEEPSEEK_LLM) -> Plan:
    """The compute-optimal run for a budget on some hardware, or a PlanError saying why there is none."""
    check_plan_args(seq_len, vocab_size, country)
    cands = family(vocab_size, seq_len)
    delivered = hw.flops_per_second * budget.hours * 3600
    available = delivered * PLANNED_SHARE
    bought = f"{budget.hours:.3g} h of {hw.count} x {hw.name} = {_fmt_flops(delivered)}"
    afford = bought if budget.usd is None else f"{budget.why} buys {bought}"
    if budget.hours * 60 < MIN_MINUTES:
        price = f" (${MIN_MINUTES / 60 * hw.count * budget.price_per_hour:,.2f})" if budget.price_per_hour else ""
        raise PlanError(f"budget too small: {afford}. A run shorter than {MIN_MINUTES} minutes is mostly start-up, "
                        f"evaluation and checkpoints; the smallest plan on this hardware is {MIN_MINUTES} minutes"
                        f"{price}. What it can buy: {available / cands[0].flops:,.0f} tokens through the smallest "
                        f"model (hidden {cands[0].hidden}, {cands[0].layers} layers), at best.")
    c = _affordable(law, cands, available)
    smallest = cands[0]
    if law.m_opt(c) < smallest.m / 2:  # even the smallest shape would be far larger than compute-optimal
        c_min = law.c_for_model(smallest.m)
        need = law.d_opt(c_min) * smallest.flops
        hours = _hours_for(need, hw)
        price = f" (${hours * hw.count * budget.price_per_hour:,.2f})" if budget.price_per_hour else ""
        tokens = available / smallest.flops
        raise PlanError(
            f"budget too small: {afford} at {hw.mfu:.1%} utilisation. It cannot buy compute-optimal training of "
            f"any sensible model: the smallest (hidden {smallest.hidden}, {smallest.layers} layers, "
            f"M = {smallest.m:.3g} FLOPs/token) is optimal at C = {c_min:.3g} FLOPs, {law.d_opt(c_min):,.0f} tokens: "
            f"{hours:.3g} h{price} on this hardware. What it can buy: {tokens:,.0f} tokens through that model, "
            f"{law.d_opt(c_min) / max(tokens, 1):,.0f}x fewer than its optimum.")
    cand = closest(cands, law.m_opt(c))
    cfg = cand.config(vocab_size, seq_len)
    batch_seqs = max(1, round(law.b_opt(c) / seq_len))
    try:
        layout = fit_layout(cfg, hw, seq_len, batch_seqs)
    except MemoryError as e:
        need = e.args[0]
        fits = _largest_fitting(cands, hw, seq_len, vocab_size)
        can = "" if fits is None else (
            f" What it can buy: the largest model that fits, hidden {fits.hidden} x {fits.layers} layers "
            f"({count_params(fits.config(vocab_size, seq_len)).total / 1e9:.2f}B parameters), trained on "
            f"{available / fits.flops:.3g} tokens, {available / fits.flops / law.d_opt(law.c_for_model(fits.m)):.1f}x "
            f"its own compute-optimal count.")
        raise PlanError(
            f"does not fit: {afford}; its compute-optimal model (hidden {cand.hidden} x {cand.layers} layers, "
            f"{count_params(cfg).total / 1e9:.2f}B parameters) needs {need / 2**30:.1f} GiB per device even "
            f"{'with FSDP, activation checkpointing and ' if hw.count > 1 else 'at '}micro-batch 1, and a "
            f"{hw.name} has {hw.memory / 2**30:.1f} GiB usable: it takes more devices (--count) or a larger "
            f"accelerator.{can}") from None
    tokens_per_step = layout.global_batch * seq_len
    step_flops = tokens_per_step * layout.estimate.train_flops_per_token
    step_seconds = step_flops / hw.flops_per_second
    steps = round(law.d_opt(c) / tokens_per_step)
    if steps * step_flops > available:  # rounding must not overspend
        steps -= 1
    if steps < 1:
        raise PlanError(f"budget too small: {afford}, less than one optimizer step of the smallest model "
                        f"({step_flops:.3g} FLOPs for {tokens_per_step:,} tokens)")
    notes = []
    if not 1e17 <= c <= 3e20:
        notes.append(f"C = {c:.2g} FLOPs lies outside the 1e17-3e20 range the laws were fitted on: an extrapolation")
    warmup = min(2000, max(1, steps // 20))  # DeepSeek LLM warms up for 2000 steps; short runs for 5% of theirs
    return Plan(law=law, hardware=hw, budget=budget, compute=c, available=available, config=cfg, m=cand.m,
                seq_len=seq_len, tokens=steps * tokens_per_step, steps=steps, lr=law.lr_opt(c), warmup=warmup,
                layout=layout, step_seconds=step_seconds, country=country, notes=notes)


def make_cpu_plan(budget: Budget, hw: Hardware, seq_len: int, vocab_size: int, country: str = "world",
                  law: ScalingLaw = DEEPSEEK_LLM, rounds: int = 3) -> Plan:
    """A plan for this CPU. Small models reach a smaller share of the probe than the demo preset (narrow matmuls,
    per-op overheads), so the planned model's own step is measured and the plan redone at its utilisation, until
    the utilisation it was planned with is within 10% of the measured one (or `rounds` tries)."""
    plan = make_plan(budget, hw, seq_len, vocab_size, country, law)
    for _ in range(rounds):
        cal = measure_cpu_step(plan.config, hw.dtype, seq_len, plan.layout.micro_batch, "the planned model")
        if abs(cal.efficiency / hw.mfu - 1) <= 0.1:
            break
        hw = dataclasses.replace(hw, mfu=cal.efficiency,
                                 mfu_source=f"measured: {cal.what} at {cal.achieved / 1e9:.0f} GFLOP/s")
        plan = make_plan(budget, hw, seq_len, vocab_size, country, law)
    return plan


def run_config(plan: Plan, data_path: str = "", out_dir: str = "runs/planned") -> RunConfig:
    """The plan as a RunConfig that `nanoseek train` loads (`to_toml(cfg.to_dict())` writes it)."""
    cfg = RunConfig(model=plan.config)
    cfg.data.path, cfg.data.seq_len = data_path, plan.seq_len
    t = cfg.train
    t.out_dir, t.tokens, t.steps = out_dir, plan.tokens, 0
    t.batch_size, t.micro_batch_size = plan.layout.global_batch, plan.layout.micro_batch
    t.dtype = plan.hardware.dtype
    t.device = "cpu" if plan.hardware.device == "cpu" else "cuda"
    o = cfg.optim
    o.lr, o.schedule, o.unit, o.warmup = plan.lr, "multistep", "steps", plan.warmup  # DeepSeek LLM's schedule
    cfg.parallel.dp = "fsdp" if plan.layout.strategy == "fsdp" else "ddp"
    cfg.parallel.activation_checkpointing = plan.layout.activation_checkpointing
    cfg.eval.every = max(1, plan.steps // 10)
    cfg.checkpoint.every = max(1, plan.steps // 10)
    cfg.cost.country = plan.country  # the run's own cost columns use the same grid and price
    # the run counts machine-hours (x its machines); on GPUs, machines of up to GPUS_PER_MACHINE devices
    count = plan.hardware.count
    per_machine = 1 if plan.hardware.device == "cpu" else count / math.ceil(count / GPUS_PER_MACHINE)
    cfg.cost.price_per_hour = plan.budget.price_per_hour * per_machine
    # a hard stop for the training steps at the budget, whatever the real speed turns out to be (evaluations and
    # checkpoints come on top: the plan's steps fill at most 90% of it)
    t.max_time = plan.budget.hours * 3600
    cfg.validate()
    return cfg
