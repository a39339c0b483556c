"""The training loop: micro-batches -> token-normalised loss -> accumulate -> clip -> AdamW -> routing-bias update.

One optimizer step:
  1. the batch-size ramp gives this step's global batch; it is split into micro-batches,
  2. the loss of each micro-batch is its *summed* token cross-entropy (+ λ/D·Σ MTP sums) divided by the number
     of target tokens in the whole step, so k micro-batches of n give the gradient of one batch of k·n,
  3. after the step, every MoE layer's routing bias moves by γ towards balance: b_i += γ·sign(mean load -
     load_i) (DeepSeek-V3's auxiliary-loss-free balancing); an optional α·sequence-wise balance loss joins (2).
A non-finite loss skips its step; too many in a row stop the run. SIGINT/SIGTERM save a checkpoint, then stop.
"""

from __future__ import annotations

import math
import signal
import time
import warnings
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from nanoseek.model import NanoSeek
from nanoseek.model.moe import Router
from nanoseek.train.checkpoint import TrainState, save_checkpoint
from nanoseek.train.config import RunConfig
from nanoseek.train.schedule import BatchRamp, LRSchedule, lr_schedule, piecewise, plan_length

# A time-budgeted run plans its steps from the time a token took (train.max_time): for this fraction of the time
# left, as the speed varies; and checks the plan against the steps' time halfway through what is left of it, while
# that is at least 2 x REPLAN_MIN_STEPS steps.
PLAN_MARGIN = 0.95
REPLAN_MIN_STEPS = 10


class BatchSource(Protocol):
    """What the loop reads training batches from (nanoseek.data.loader.Batches, or a synthetic task)."""

    def next(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class World:
    """This process's place among data-parallel ranks; a single process is rank 0 of 1, and its hooks do
    nothing (train/parallel.py's DistWorld implements them for torchrun)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def loss_scale(self) -> float:
        return 1.0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def max_int(self, n: int) -> int:
        """The largest of the ranks' values: decisions that must be unanimous (stop, plan)."""
        return n

    def micro_batch(self, last: bool) -> AbstractContextManager:
        return nullcontext()

    def finish_grads(self, model: torch.nn.Module) -> None:
        pass

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")).item()


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class StepResult:
    loss: float  # main cross-entropy per target token
    mtp_loss: float | None
    balance_loss: float | None
    grad_norm: float
    batch_size: int
    lr: float
    skipped: bool
    expert_load: list[float] = field(default_factory=list)  # per MoE layer: max load / mean load


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices, not norms and biases (1-D). Sharded weights on different device meshes (FSDP vs expert
    parallel) go to different groups: the fused AdamW kernel runs once per group and wants one mesh."""
    groups: dict[tuple[bool, int], list[torch.nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            mesh = getattr(p, "device_mesh", None)
            groups.setdefault((p.dim() >= 2, id(mesh) if mesh is not None else 0), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0} for (decay, _), ps in groups.items()]


def make_optimizer(model: torch.nn.Module, cfg: RunConfig, device: torch.device) -> torch.optim.AdamW:
    o = cfg.optim
    # the fused kernel is one pass over the parameters (CPU and CUDA); same numbers as the loop version
    fused = device.type in ("cpu", "cuda") and hasattr(torch, "_fused_adamw_")
    return torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             fused=fused or None)


def batch_ramp(cfg: RunConfig, world_size: int = 1) -> BatchRamp:
    t = cfg.train
    return BatchRamp(end=t.batch_size, start=t.batch_size_start, ramp_tokens=t.batch_ramp_tokens,
                     multiple=t.micro_batch_size * world_size)


def routers(model: torch.nn.Module) -> list[Router]:
    return [m for m in model.modules() if isinstance(m, Router)]


@torch.no_grad()
def update_routing_bias(model: torch.nn.Module, gamma: float, world: World) -> list[float]:
    """b_i += γ·sign(mean load − load_i) for every MoE layer, from the load of the whole step on all ranks.
    Returns max/mean load per layer (1.0 = perfectly balanced) and resets the counters."""
    stats = []
    for r in routers(model):
        load = world.all_reduce_sum(r.expert_load.clone())
        mean = load.mean()
        if gamma > 0 and mean > 0:
            r.e_score_correction_bias.add_(gamma * torch.sign(mean - load))
        stats.append((load.max() / mean).item() if mean > 0 else 1.0)
        r.expert_load.zero_()
    return stats


class Trainer:
    def __init__(self, cfg: RunConfig, model: NanoSeek, batches: BatchSource, run_dir: Path, device: torch.device,
                 state: TrainState, opt: torch.optim.Optimizer, world: World | None = None,
                 evaluate: Callable[[NanoSeek, TrainState], dict[str, Any]] | None = None,
                 log: Callable[[dict[str, Any]], None] | None = None, tokenizer_dir: Path | None = None,
                 wrapped: torch.nn.Module | None = None):
        """`model` is the bare NanoSeek; `wrapped` what training calls when parallelised (DDP/FSDP)."""
        self.cfg, self.module, self.batches, self.run_dir = cfg, model, batches, Path(run_dir)
        self.model = wrapped if wrapped is not None else model
        self.device, self.state, self.opt = device, state, opt
        self.world = world or World()
        self.evaluate = evaluate
        self.log = log or (lambda record: None)
        self.tokenizer_dir = tokenizer_dir
        self.micro = cfg.train.micro_batch_size
        self.ramp = batch_ramp(cfg, self.world.size)
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.train.dtype == "bf16"
                         else nullcontext())
        self.stop_reason: str | None = None
        self.lr_schedule: LRSchedule | None = None
        if state.total_steps:
            self._make_schedule()

    # ---- planning ----------------------------------------------------------------------------------------
    def plan(self) -> tuple[int, int]:
        """(steps, tokens) of the whole run, following the batch ramp from where the run is (a resume may change
        the batch size); (0, 0) for a time-budgeted run."""
        t = self.cfg.train
        if not (t.steps or t.tokens):
            return 0, 0
        return plan_length(self.ramp, self.cfg.data.seq_len, t.steps, t.tokens,
                           start=(self.state.step, self.state.tokens))

    def _make_schedule(self) -> None:
        self.lr_schedule = lr_schedule(self.cfg.optim, self.state.total_steps, self.state.total_tokens)

    def progress(self) -> float:
        return self.state.step if self.cfg.optim.unit == "steps" else self.state.tokens

    def lr_now(self) -> float:
        if self.lr_schedule is not None:
            return self.lr_schedule(self.progress())
        o = self.cfg.optim  # time-budgeted run before calibration: the warmup ramp needs no total
        return o.lr * (self.progress() + 1) / (o.warmup + 1) if self.progress() < o.warmup else o.lr

    def fraction(self) -> float:
        """How much of the run is done, in optim.unit (V3 states its MTP and bias-freeze switches in tokens)."""
        s = self.state
        if self.cfg.optim.unit == "tokens":
            return s.tokens / s.total_tokens if s.total_tokens else 0.0
        return s.step / s.total_steps if s.total_steps else 0.0

    # ---- one step ------------------------------------------------------------------------------------------
    def micro_loss(self, x: torch.Tensor, y: torch.Tensor, n_target: torch.Tensor, mtp_weight: float,
                   global_batch: int) -> tuple[torch.Tensor, Any]:
        cfg = self.cfg
        alpha = cfg.balance.seq_aux_alpha
        with self.autocast:
            out = self.model(x, labels=y, return_logits=False, balance_loss=alpha > 0)
        loss = out.ce_sum
        if out.mtp_ce_sums:
            loss = loss + mtp_weight / len(out.mtp_ce_sums) * torch.stack(out.mtp_ce_sums).sum()
        loss = loss / n_target
        if alpha > 0 and out.balance_loss is not None:
            # the model averages over its micro-batch's sequences; weight it to a mean over the global batch. The
            # ranks' gradients are summed (loss_scale undoes DDP's average), so no factor for the world size here
            loss = loss + alpha * out.balance_loss * (x.shape[0] / global_batch)
        return loss, out

    def step(self) -> StepResult:
        cfg, state = self.cfg, self.state
        batch = self.ramp(state.tokens)
        accum = batch // (self.micro * self.world.size)
        micro = [self.batches.next(self.micro) for _ in range(accum)]
        micro = [(x.to(self.device), y.to(self.device)) for x, y in micro]
        n_target = self.world.all_reduce_sum(sum((y != -100).sum() for _, y in micro).to(self.device))
        n_target_f = n_target.clamp(min=1).float()
        lr = self.lr_now()
        for g in self.opt.param_groups:
            g["lr"] = lr
        mtp_weight = piecewise(self.fraction(), 1.0, [cfg.mtp.weight, cfg.mtp.weight_after], [cfg.mtp.switch_at])

        self.model.train()
        ce, mtp_ce, mtp_n, bal = torch.zeros(()), None, None, None
        for i, (x, y) in enumerate(micro):
            with self.world.micro_batch(last=i == accum - 1):
                loss, out = self.micro_loss(x, y, n_target_f, mtp_weight, batch)
                (loss * self.world.loss_scale).backward()
            ce = ce + out.ce_sum.detach().float().cpu()
            if out.mtp_ce_sums:
                sums = torch.stack([s.detach().float().cpu() for s in out.mtp_ce_sums])
                ns = torch.stack([n.detach().cpu() for n in out.mtp_n_tokens])
                mtp_ce = sums if mtp_ce is None else mtp_ce + sums
                mtp_n = ns if mtp_n is None else mtp_n + ns
            if out.balance_loss is not None:
                b = out.balance_loss.detach().float().cpu() / (accum * self.world.size)
                bal = b if bal is None else bal + b
        ce = self.world.all_reduce_sum(ce)
        if bal is not None:
            bal = self.world.all_reduce_sum(bal)  # the mean over every rank's micro-batches, as logged
        main = (ce / n_target_f.cpu()).item()
        mtp = None
        if mtp_ce is not None:
            mtp_ce, mtp_n = self.world.all_reduce_sum(mtp_ce), self.world.all_reduce_sum(mtp_n)
            mtp = (mtp_ce / mtp_n.clamp(min=1)).mean().item()

        self.world.finish_grads(self.module)
        params = [p for g in self.opt.param_groups for p in g["params"]]
        grad_norm = self.world.clip_grad_norm(params, cfg.optim.grad_clip)
        skipped = not (math.isfinite(main) and math.isfinite(grad_norm))
        if skipped:
            self.opt.zero_grad(set_to_none=True)
            for r in routers(self.module):
                r.expert_load.zero_()
            state.nonfinite_streak += 1
            load_stats: list[float] = []
            warnings.warn(f"step {state.step}: non-finite loss ({main}) or gradient norm ({grad_norm}); "
                          f"step skipped ({state.nonfinite_streak} in a row)", stacklevel=2)
        else:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            gamma = cfg.balance.bias_update_speed if self.fraction() < cfg.balance.bias_freeze_at else 0.0
            load_stats = update_routing_bias(self.module, gamma, self.world)
            state.nonfinite_streak = 0
        state.step += 1
        state.tokens += batch * cfg.data.seq_len
        return StepResult(loss=main, mtp_loss=mtp, balance_loss=None if bal is None else bal.item(),
                          grad_norm=grad_norm, batch_size=batch, lr=lr, skipped=skipped, expert_load=load_stats)

    # ---- the run ---------------------------------------------------------------------------------------------
    def done(self) -> bool:
        s, t = self.state, self.cfg.train
        if s.total_steps and s.step >= s.total_steps:
            return True
        return bool(t.max_time and s.elapsed >= t.max_time)

    def checkpoint(self, final: bool = False) -> Path:
        """Every rank takes part (sharded state); the final one of a distributed run also exports the model."""
        return save_checkpoint(self.run_dir, self.module, self.model, self.opt, self.state, self.cfg.checkpoint.keep,
                               self.tokenizer_dir, export=True if final else None)

    def calibrate(self, step_seconds: list[float], step_tokens: list[int]) -> None:
        """Time-budgeted run: fix the plan from the measured time per token, once (then it is saved and reused).
        Per token, not per step: with a batch-size ramp the timed steps are the ramp's smallest, and a plan of
        steps that long overran the budget several times over, its schedule never reaching its end."""
        per_token = sorted(dt / n for dt, n in zip(step_seconds, step_tokens))[len(step_seconds) // 2]
        self._plan_for_time(per_token / PLAN_MARGIN)

    def recheck_plan(self, step_seconds: list[float], step_tokens: list[int]) -> None:
        """Halfway through what is left of a time-budgeted run's plan: if its steps since the plan took longer a
        token than the plan assumed (margin included), plan the rest again at that speed, so that the schedule
        still ends within the budget. A `make demo` of 538 planned steps ran 5-9% slower than its first steps
        and stopped on time at step 514, its cosine short of its end (docs/LOG.md, 2026-12-01)."""
        per_token = sum(step_seconds) / sum(step_tokens)  # all of them: a slow step spends the budget too
        if self.world.max_int(int(per_token > self.state.seconds_per_token)):  # every rank, or none, re-plans
            self._plan_for_time(per_token / PLAN_MARGIN)
        else:  # on plan: look again halfway through the rest
            self._set_replan_step()

    def _set_replan_step(self) -> None:
        s = self.state
        left = s.total_steps - s.step
        s.replan_step = s.step + left // 2 if left >= 2 * REPLAN_MIN_STEPS else 0

    def _plan_for_time(self, per_token: float) -> None:
        """The steps that train.max_time leaves at `per_token` seconds a token (following the batch ramp), and the
        schedule over them."""
        s, t, seq_len = self.state, self.cfg.train, self.cfg.data.seq_len
        budget = s.tokens + int(max(t.max_time - s.elapsed, 0.0) / per_token)
        steps, tokens = plan_length(self.ramp, seq_len, tokens=budget, start=(s.step, s.tokens))
        steps -= tokens > budget  # whole steps within the time left (the last one would pass it) ...
        # ... at least one; every rank must follow the same plan (their clocks differ a little): take the largest
        s.total_steps = self.world.max_int(max(steps, s.step + 1))
        _, s.total_tokens = plan_length(self.ramp, seq_len, s.total_steps, start=(s.step, s.tokens))
        s.planned_max_time, s.seconds_per_token = t.max_time, per_token
        self._set_replan_step()
        self._make_schedule()
        self.log({"kind": "plan", "step": s.step, "total_steps": s.total_steps, "total_tokens": s.total_tokens,
                  "seconds_per_token": per_token})

    def _log_eval(self) -> None:
        s = self.state
        assert self.evaluate is not None
        self.log({"kind": "eval", "step": s.step, "tokens": s.tokens, **self.evaluate(self.module, s)})
        s.last_eval_step = s.step

    def fit(self, on_step: Callable[[StepResult, float], None] | None = None) -> str:
        """Train until the plan, the time budget, a signal or too many non-finite losses stop it. Returns why."""
        cfg, state = self.cfg, self.state
        if cfg.train.steps or cfg.train.tokens:  # (again on resume: a run can be extended) else calibrated below
            state.total_steps, state.total_tokens = self.plan()
            self._make_schedule()
        elif state.seconds_per_token and cfg.train.max_time != state.planned_max_time:
            self._plan_for_time(state.seconds_per_token)  # resumed with another train.max_time: re-plan at once
        received: list[int] = []

        def handler(signum: int, frame: Any) -> None:
            received.append(signum)
            signal.signal(signum, previous[signum])  # a second signal acts at once

        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for s in previous:
                signal.signal(s, handler)
        except ValueError:  # not the main thread: no signal handling
            previous = {}
        step_times: list[float] = []
        step_tokens: list[int] = []
        finished = self.world.max_int(int(self.done()))  # decisions are unanimous: clocks and signals differ
        every = cfg.eval.every
        if self.evaluate is not None and every and state.step and state.step % every == 0 and \
                state.last_eval_step != state.step and not finished:
            self._log_eval()  # the one due where a signal stopped the run, before it could evaluate
        try:
            while not finished:
                t0, tokens = time.perf_counter(), state.tokens
                result = self.step()
                dt = time.perf_counter() - t0
                state.elapsed += dt
                step_times.append(dt)
                step_tokens.append(state.tokens - tokens)
                if not state.total_steps and len(step_times) == 6:
                    self.calibrate(step_times[1:], step_tokens[1:])  # the first step pays one-time costs
                    step_times.clear()
                    step_tokens.clear()
                elif state.replan_step and state.step >= state.replan_step and len(step_times) >= REPLAN_MIN_STEPS:
                    self.recheck_plan(step_times, step_tokens)  # the steps since the plan (or this session's start)
                    step_times.clear()
                    step_tokens.clear()
                if on_step is not None:
                    on_step(result, dt)
                if state.nonfinite_streak >= cfg.train.max_nonfinite:
                    self.stop_reason = "non-finite"
                    raise NonFiniteLossError(f"{state.nonfinite_streak} non-finite losses in a row at step "
                                             f"{state.step}: lower optim.lr, or check the data")
                if self.world.max_int(int(bool(received))):
                    self.stop_reason = "signal"
                    break
                finished = self.world.max_int(int(self.done()))
                if finished:
                    break
                if self.evaluate is not None and cfg.eval.every and state.step % cfg.eval.every == 0:
                    self._log_eval()
                if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0:
                    self.checkpoint()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        if self.stop_reason is None:  # no plan yet: a time budget spent before the steps were timed
            short = not state.total_steps or state.step < state.total_steps
            self.stop_reason = "time" if short else "done"
        if self.evaluate is not None and self.stop_reason != "signal" and state.last_eval_step != state.step:
            self._log_eval()  # (a finished run resumed as it was has its final evaluation already)
        self.checkpoint(final=True)
        return self.stop_reason


def evaluate_loss(model: NanoSeek, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                  token_bytes: torch.Tensor | None = None, autocast: Any = None) -> dict[str, float]:
    """Mean validation cross-entropy per token, and bits per byte when token byte lengths are known:
    bpb = Σ CE (nats) / (ln 2 · Σ bytes of the target tokens); special tokens (0 bytes) are left out."""
    was_training = model.training
    model.eval()
    nats, n, nats_b, nbytes = 0.0, 0, 0.0, 0
    with torch.no_grad(), autocast or nullcontext():
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            logits = model(x).float()
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none",
                                                   ignore_index=-100)
            valid = y.flatten() != -100
            nats += ce[valid].sum().item()
            n += int(valid.sum())
            if token_bytes is not None:
                b = token_bytes.to(device)[y.flatten().clamp(min=0)] * valid
                keep = b > 0
                nats_b += ce[keep].sum().item()
                nbytes += int(b.sum())
    model.train(was_training)
    out = {"val_loss": nats / max(n, 1)}
    if token_bytes is not None and nbytes:
        out["val_bpb"] = nats_b / (math.log(2) * nbytes)
    return out
