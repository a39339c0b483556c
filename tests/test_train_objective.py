"""The training objective and optimiser settings, each against an independent reference: the gradient of the
DeepSeek-V3 loss written out by hand on the bare model, learning rates and batch sizes in closed form, one AdamW
step by hand, validation loss and bits per byte from F.cross_entropy and the tokenizer's bytes."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

import nanoseek
from nanoseek.data.tokenizer import SPECIAL_TOKENS, train_tokenizer
from nanoseek.model import NanoSeek
from nanoseek.model.moe import Router
from nanoseek.train import loop
from nanoseek.train.checkpoint import TrainState, latest_checkpoint, read_state
from nanoseek.train.config import RunConfig
from nanoseek.train.loop import BatchSource, StepResult, Trainer, evaluate_loss, make_optimizer
from nanoseek.train.run import MetricsLog, train
from tests.tasks import ReverseTask
from tests.test_train import _cfg

CPU = torch.device("cpu")
TASK = ReverseTask()  # vocab and sequence length for the configs; runs get their own instances


@pytest.fixture(autouse=True)
def _one_thread():
    """Models this small run as fast on one thread, and two threads crawl when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(tmp_path: Path, **sections) -> RunConfig:
    """test_train's tiny reverse-task config at 2 sequences a step: these tests check arithmetic, not learning."""
    small = {"train": {"steps": 10, "batch_size": 2, "micro_batch_size": 2}, "cost": {"energy": False}}
    return _cfg(tmp_path, TASK, **{k: {**small.get(k, {}), **sections.get(k, {})} for k in {*small, *sections}})


def _trainer(tmp_path: Path, cfg: RunConfig, source: BatchSource | None = None, planned: bool = False) -> Trainer:
    torch.manual_seed(0)
    model = NanoSeek(cfg.model)
    trainer = Trainer(cfg, model, source or ReverseTask(), tmp_path / "run", CPU, TrainState(),
                      make_optimizer(model, cfg, CPU))
    if planned:  # what fit() does before its first step
        trainer.state.total_steps, trainer.state.total_tokens = trainer.plan()
        trainer._make_schedule()
    return trainer


class Served(ReverseTask):
    """Hands out the given micro-batches in order, whatever size the loop asks for (unequal micro-batches)."""

    def __init__(self, micro: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.micro = micro

    def next(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.micro[self.cursor]
        self.cursor += 1
        return x, y


def _routers(model: torch.nn.Module) -> list[Router]:
    return [m for m in model.modules() if isinstance(m, Router)]


def _ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")


def _sequence_balance(indices: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3 eq. 17-20 for one MoE layer, averaged over sequences: Σ_i f_i·P_i with
    f_i = E/(K·T)·#tokens routed to i (a count, no gradient) and P_i = mean over tokens of s_i/Σ_j s_j."""
    _, T, K = indices.shape
    E = scores.shape[-1]
    f = F.one_hot(indices, E).sum(dim=(1, 2)).float() * E / (K * T)
    P = (scores / scores.sum(-1, keepdim=True)).mean(dim=1)
    return (f * P).sum(-1).mean()


def _objective(model: NanoSeek, x: torch.Tensor, y: torch.Tensor, lam: float, alpha: float) -> torch.Tensor:
    """The documented objective of one step over the whole global batch (x, y), written out on the bare model:
    (Σ main CE + λ/D·Σ_k Σ CE_k) / #targets + α·Σ over MoE layers (MTP's too) of the sequence-wise balance term.
    MTP depth k at position i predicts token i+k+1, i.e. the main label k positions on (V3 eq. 21-25)."""
    B, T = y.shape
    routed: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [r.register_forward_hook(lambda m, args, out: routed.append((out[1], out[2]))) for r in _routers(model)]
    try:
        out = model(x, labels=y)  # logits of every depth; the model's own loss fields are not used
    finally:
        for h in hooks:
            h.remove()
    depth = len(out.mtp_logits)
    mtp = sum(_ce_sum(logits[:, : T - k], y[:, k:]) for k, logits in enumerate(out.mtp_logits, start=1))
    loss = (_ce_sum(out.logits, y) + (lam / depth * mtp if depth else 0.0)) / (y != -100).sum()
    if alpha:
        loss = loss + alpha * sum(_sequence_balance(i.view(B, T, -1), s.view(B, T, -1)) for i, s in routed)
    return loss


def _reference_grads(model: NanoSeek, x, y, lam: float, alpha: float) -> dict[str, torch.Tensor | None]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(_objective(model, x, y, lam, alpha), [p for _, p in named], allow_unused=True)
    return {n: g for (n, _), g in zip(named, grads)}


def _grads_at_optimizer_step(trainer: Trainer, also_step: bool = False) -> tuple[dict[str, torch.Tensor | None],
                                                                                  StepResult]:
    """Run one Trainer step; the gradients the optimiser was given (after clipping), and the step's result."""
    got: dict[str, torch.Tensor | None] = {}
    real = trainer.opt.step

    def spy(*args, **kwargs):
        got.update({n: None if p.grad is None else p.grad.clone() for n, p in trainer.module.named_parameters()})
        return real(*args, **kwargs) if also_step else None

    trainer.opt.step = spy
    try:
        result = trainer.step()
    finally:
        trainer.opt.step = real
    return got, result


def _worst(got: dict[str, torch.Tensor | None], ref: dict[str, torch.Tensor | None]) -> float:
    """Largest per-tensor error relative to the tensor's largest reference entry (a missing gradient is zero)."""
    worst = 0.0
    for name, r in ref.items():
        r = torch.zeros(()) if r is None else r
        g = got[name] if got[name] is not None else torch.zeros_like(r)
        worst = max(worst, (g - r).abs().max().item() / (r.abs().max().item() + 1e-12))
    return worst


def _record_lr() -> tuple[list[list[float]], Callable[[], None]]:
    """Every optimiser step's learning rates, one per param group, as the optimiser sees them when it steps."""
    lrs: list[list[float]] = []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: lrs.append([g["lr"] for g in opt.param_groups]))
    return lrs, handle.remove


# ---- the objective ----------------------------------------------------------------------------------------------
def test_one_step_gradient_is_the_hand_written_objective(tmp_path):
    """MTP depth D = 2 (so λ/D matters), λ = 0.3, α = 0.1, and a global batch of 4 served as micro-batches of 3
    and 1 sequences with unequal target counts: the token normalisation, λ/D, and the balance term's
    x.shape[0]/global_batch weight (a mean over the global batch's sequences) must all be right."""
    cfg = _config(tmp_path, model={"num_nextn_predict_layers": 2},
                  train={"steps": 1, "batch_size": 4, "micro_batch_size": 2},
                  optim={"grad_clip": 0.0},  # the raw gradient; clipping has its own test
                  mtp={"weight": 0.3, "weight_after": 0.1, "switch_at": 0.5}, balance={"seq_aux_alpha": 0.1})
    x, y = TASK.batch(TASK.sequences(4, seed=7))
    y[:3, -3:] = -100  # fewer targets in the first micro-batch: a per-micro-batch mean would be wrong
    trainer = _trainer(tmp_path, cfg, Served([(x[:3], y[:3]), (x[3:], y[3:])]), planned=True)
    bare = copy.deepcopy(trainer.module)

    got, _ = _grads_at_optimizer_step(trainer)
    ref = _reference_grads(bare, x, y, lam=0.3, alpha=0.1)
    assert _worst(got, ref) < 1e-4
    # the balance term is large enough here that leaving it out (or weighting it wrongly) would show
    assert _worst(ref, _reference_grads(bare, x, y, lam=0.3, alpha=0.0)) > 1e-2


def test_mtp_weight_follows_its_schedule(tmp_path, monkeypatch):
    """λ = mtp.weight until mtp.switch_at of the run, then mtp.weight_after (V3 §4.2: 0.3, then 0.1): a 10-step
    run switching at 0.5 uses 0.3 for steps 0-4 and 0.1 for 5-9, and each step's loss is (CE + λ/D·Σ MTP)/N."""
    cfg = _config(tmp_path, model={"num_nextn_predict_layers": 2}, mtp={"weight": 0.3, "weight_after": 0.1,
                                                                          "switch_at": 0.5})
    seen: list[tuple[float, float, float]] = []  # (λ given, loss returned, (CE + λ_expected/D·Σ MTP)/N)
    real = Trainer.micro_loss
    expected = [0.3] * 5 + [0.1] * 5

    def spy(self, x, y, n_target, mtp_weight, global_batch):
        loss, out = real(self, x, y, n_target, mtp_weight, global_batch)
        lam, D = expected[self.state.step], 2
        by_hand = (out.ce_sum + lam / D * (out.mtp_ce_sums[0] + out.mtp_ce_sums[1])) / n_target
        seen.append((mtp_weight, loss.item(), by_hand.item()))
        return loss, out

    monkeypatch.setattr(Trainer, "micro_loss", spy)
    assert _trainer(tmp_path, cfg).fit() == "done"
    assert [s[0] for s in seen] == pytest.approx(expected)
    assert [s[1] for s in seen] == pytest.approx([s[2] for s in seen], rel=1e-6)


def test_model_mtp_loss_is_the_mean_of_per_depth_means():
    """ModelOutput.mtp_loss (V3 eq. 25 without λ) = mean over depths of each depth's mean CE, where depth k scores
    the main label k positions on; ModelOutput.loss = the main mean CE."""
    torch.manual_seed(0)
    model = NanoSeek(nanoseek.preset("tiny", num_nextn_predict_layers=2))
    x = torch.randint(0, 256, (3, 10))
    y = torch.randint(0, 256, (3, 10))
    y[0, 2:6] = -100
    y[2, -1] = -100  # unequal counts per depth: a pooled mean differs from the mean of means
    out = model(x, labels=y)
    T = y.shape[1]
    per_depth = [F.cross_entropy(logits[:, : T - k].flatten(0, 1), y[:, k:].flatten(), ignore_index=-100)
                 for k, logits in enumerate(out.mtp_logits, start=1)]
    assert len(per_depth) == 2
    assert out.mtp_loss.item() == pytest.approx(((per_depth[0] + per_depth[1]) / 2).item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(F.cross_entropy(out.logits.flatten(0, 1), y.flatten()).item(), rel=1e-5)


# ---- the learning rate ------------------------------------------------------------------------------------------
PEAK, LO_RATIO, WARMUP, STEPS = 1e-2, 0.1, 2, 10


def _warmup_then(shape: Callable[[int], float]) -> list[float]:
    """Linear warmup to the peak over WARMUP steps ((s+1)/(W+1): the first step learns), then `shape`."""
    return [PEAK * (s + 1) / (WARMUP + 1) if s < WARMUP else shape(s) for s in range(STEPS)]


def _cosine(t: float, total: float, warmup: float = 0) -> float:
    """From the peak at the end of warmup down to min_lr_ratio·peak at the end of the run (t = total)."""
    lo = PEAK * LO_RATIO
    return lo + (PEAK - lo) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


def _wsd(s: int, decay: float = 0.3) -> float:  # constant, then linear to min over the last 30% of the run
    start = 1 - decay
    return PEAK if s / STEPS <= start else PEAK + (PEAK * LO_RATIO - PEAK) * (s / STEPS - start) / decay


def _multistep(s: int) -> float:  # DeepSeek LLM §2.3 shape, with milestones 0.5 / 0.8 and factors 0.5 / 0.1
    return PEAK * (0.1 if s / STEPS >= 0.8 else 0.5 if s / STEPS >= 0.5 else 1.0)


SHAPES = {"cosine": (lambda s: _cosine(s, STEPS, WARMUP), PEAK * LO_RATIO), "wsd": (_wsd, PEAK * LO_RATIO),
          "multistep": (_multistep, PEAK * 0.1)}  # each schedule's lr from warmup's end on, and its final value


@pytest.mark.parametrize("kind", SHAPES)
def test_optimizer_steps_at_the_scheduled_learning_rate(tmp_path, kind):
    """The lr every param group holds when AdamW steps is the closed-form schedule at the steps done so far, and
    the schedule ends where the run does (the lr after the last step is the schedule's final value)."""
    cfg = _config(tmp_path, train={"steps": STEPS}, optim={
        "lr": PEAK, "schedule": kind, "warmup": WARMUP, "min_lr_ratio": LO_RATIO, "decay_fraction": 0.3,
        "milestones": [0.5, 0.8], "factors": [0.5, 0.1]})
    trainer = _trainer(tmp_path, cfg)
    shape, end = SHAPES[kind]
    lrs, stop = _record_lr()
    try:
        trainer.fit()
    finally:
        stop()
    assert all(len(set(groups)) == 1 for groups in lrs)  # decayed and undecayed groups alike
    assert [groups[0] for groups in lrs] == pytest.approx(_warmup_then(shape), rel=1e-9)
    assert trainer.state.step == STEPS and trainer.lr_now() == pytest.approx(end, rel=1e-9)


def test_resume_with_a_larger_batch_ends_the_lr_schedule_with_the_run(tmp_path):
    """A token budget of 8 steps' worth at 8 sequences: 4 steps at 8, then resumed at 16 sequences, 2 steps. The
    resumed steps follow a cosine over the new total, in tokens, so that it ends exactly where the run ends."""
    per_step = 8 * TASK.seq_len
    cfg = _config(tmp_path, train={"steps": 0, "tokens": 4 * per_step, "batch_size": 8, "micro_batch_size": 8},
                  optim={"lr": PEAK, "unit": "tokens", "warmup": 0, "min_lr_ratio": LO_RATIO})
    lrs, stop = _record_lr()
    try:
        train(cfg, batches=ReverseTask(), val=[], progress=False)
        train(resume=tmp_path / "run", overrides=[f"train.tokens={8 * per_step}", "train.batch_size=16"],
              batches=ReverseTask(), val=[], progress=False)
    finally:
        stop()
    expected = [_cosine(s * per_step, 4 * per_step) for s in range(4)] + [_cosine(t * per_step, 8 * per_step)
                                                                           for t in (4, 6)]
    # loading optimizer state (torch.distributed.checkpoint) first fills it with a step at lr 0: not training
    trained = [groups for groups in lrs if any(groups)]
    assert len(lrs) - len(trained) <= 1
    assert [groups[0] for groups in trained] == pytest.approx(expected, rel=1e-9)
    state = read_state(latest_checkpoint(tmp_path / "run"))["state"]
    assert state["tokens"] == state["total_tokens"] == 8 * per_step


# ---- validation loss and bits per byte --------------------------------------------------------------------------
def test_validation_loss_and_bits_per_byte(tmp_path):
    """val_loss = mean CE over all targets that are not -100 (pooled over batches of different shapes); val_bpb =
    Σ CE over targets with bytes / (ln 2 · Σ their UTF-8 bytes), special tokens (BOS, EOS, ...) left out."""
    texts = ["the quick brown fox jumps over the lazy dog", "größere Bäume, ça coûte 5 €", "東京の天気は晴れ 🙂",
             "def f(x):\n    return x * 2\n"] * 20
    tok = train_tokenizer(texts, 300, tmp_path / "tok")
    V = tok.vocab_size
    special = {tok.hf.token_to_id(t) for t in SPECIAL_TOKENS}
    nbytes = torch.tensor([0 if i in special else len(tok.token_bytes(i)) for i in range(V)])
    assert nbytes.max() > 2 and special == set(range(len(SPECIAL_TOKENS)))  # merged multi-byte tokens exist

    torch.manual_seed(0)
    model = NanoSeek(nanoseek.preset("tiny", vocab_size=V))
    g = torch.Generator().manual_seed(1)
    batches = []
    for shape in ((2, 9), (3, 5)):  # 15 and 12 targets: pooled, not a mean of batch means
        x = torch.randint(0, V, shape, generator=g)
        y = torch.randint(len(SPECIAL_TOKENS), V, shape, generator=g)
        batches.append((x, y))
    (_, y1), (_, y2) = batches
    y1[0, :3] = -100
    y1[1, 4], y1[1, 8], y1[0, 5] = 0, 1, 3  # BOS, EOS, <｜User｜> as targets
    y2[:, 0] = -100
    y2[2, 3], y2[1, 1] = 1, 2  # EOS, PAD

    model.train()
    got = evaluate_loss(model, batches, CPU, torch.as_tensor(tok.token_byte_lengths(), dtype=torch.long))
    assert model.training  # the mode it was in comes back

    with torch.no_grad():
        logits = torch.cat([model(x)[y != -100] for x, y in batches])
    targets = torch.cat([y[y != -100] for _, y in batches])
    ce = F.cross_entropy(logits, targets, reduction="none")
    b = nbytes[targets]
    assert (b == 0).sum() == 5 and got["val_loss"] == pytest.approx(ce.mean().item(), rel=1e-5)
    assert got["val_bpb"] == pytest.approx(ce[b > 0].sum().item() / (math.log(2) * b.sum().item()), rel=1e-5)


# ---- load balancing ---------------------------------------------------------------------------------------------
def test_routing_bias_moves_by_gamma_then_freezes(tmp_path, monkeypatch):
    """b_i += γ·sign(mean load − load_i) after every step while less than balance.bias_freeze_at of the run is done
    (V3 §2.1.2; V3 stops it for the last 500B tokens), then never again: with freeze at 0.5 over 10 steps, steps
    0-4 move the bias and steps 5-9 leave it exactly as it was."""
    gamma = 0.01
    cfg = _config(tmp_path, balance={"bias_update_speed": gamma, "bias_freeze_at": 0.5})
    trainer = _trainer(tmp_path, cfg)
    real = loop.update_routing_bias
    moves: list[tuple[torch.Tensor, torch.Tensor]] = []  # per step: (bias change, γ·sign(mean − load))

    def spy(model, g, world):
        rs = _routers(model)
        before = torch.stack([r.e_score_correction_bias.clone() for r in rs])
        load = torch.stack([r.expert_load.clone() for r in rs])
        out = real(model, g, world)
        after = torch.stack([r.e_score_correction_bias for r in rs])
        step_gamma = gamma if len(moves) < 5 else 0.0
        moves.append((after - before, step_gamma * torch.sign(load.mean(-1, keepdim=True) - load)))
        return out

    monkeypatch.setattr(loop, "update_routing_bias", spy)
    trainer.fit()
    assert len(moves) == 10
    for step, (moved, expected) in enumerate(moves):
        assert torch.allclose(moved, expected, atol=1e-7), step
        assert (moved.abs().sum() > 0) == (step < 5), step


# ---- the optimiser ----------------------------------------------------------------------------------------------
def test_weight_decay_on_matrices_only_and_the_configured_betas(tmp_path):
    """AdamW groups: every ≥2-D parameter (matrices, stacked experts, router) decays by optim.weight_decay, every 1-D
    one (norms) by nothing; each parameter is in exactly one group; betas and eps are the configured ones; the
    routing bias is no parameter at all (only the loop's γ update moves it)."""
    cfg = _config(tmp_path, model={"num_nextn_predict_layers": 2},
                  optim={"weight_decay": 0.05, "betas": [0.85, 0.99], "eps": 1e-7})
    model = NanoSeek(cfg.model)
    opt = make_optimizer(model, cfg, CPU)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    params = list(model.parameters())
    assert sum(len(g["params"]) for g in opt.param_groups) == len(decay) == len(params)
    assert any(p.dim() == 1 for p in params) and any(p.dim() == 3 for p in params)
    assert all(decay[id(p)] == (0.05 if p.dim() >= 2 else 0.0) for p in params)
    assert all(g["betas"] == (0.85, 0.99) and g["eps"] == 1e-7 for g in opt.param_groups)
    assert not {id(r.e_score_correction_bias) for r in _routers(model)} & set(decay)
    # and the defaults are DeepSeek-V3's (§4.2): β = (0.9, 0.95), weight decay 0.1
    opt = make_optimizer(model, _config(tmp_path), CPU)
    assert {(g["betas"], g["weight_decay"]) for g in opt.param_groups} == {((0.9, 0.95), 0.1), ((0.9, 0.95), 0.0)}


def test_clipped_gradient_and_one_adamw_step_by_hand(tmp_path):
    """grad_clip rescales the whole gradient to norm optim.grad_clip before AdamW; the logged grad_norm is the norm
    before clipping. AdamW's first step in closed form: p ← p·(1 − lr·wd) − lr·g/(|g| + eps) (bias corrections
    cancel), with wd = 0 for 1-D parameters. eps = 1e-3 ≫ |g_clipped| makes the step depend on the clipping."""
    clip, lr, wd, eps = 0.01, 1e-2, 0.1, 1e-3
    cfg = _config(tmp_path, train={"steps": 1}, optim={"lr": lr, "schedule": "constant", "warmup": 0,
                                                       "grad_clip": clip, "weight_decay": wd, "eps": eps})
    x, y = TASK.batch(TASK.sequences(2, seed=3))
    trainer = _trainer(tmp_path, cfg, Served([(x, y)]), planned=True)
    before = {n: p.detach().clone() for n, p in trainer.module.named_parameters()}
    ref = _reference_grads(copy.deepcopy(trainer.module), x, y, lam=cfg.mtp.weight, alpha=0.0)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in ref.values() if g is not None]))
    assert norm > 10 * clip  # clipping is active
    scale = clip / (norm + 1e-6)  # torch.nn.utils.clip_grad_norm_

    got, result = _grads_at_optimizer_step(trainer, also_step=True)
    assert result.grad_norm == pytest.approx(norm.item(), rel=1e-5)
    assert _worst(got, {n: None if g is None else g * scale for n, g in ref.items()}) < 1e-4
    for name, p in trainer.module.named_parameters():
        g = ref[name]
        if g is None:  # AdamW skips parameters without a gradient
            assert torch.equal(p, before[name]), name
            continue
        g = g * scale
        decay = wd if p.dim() >= 2 else 0.0
        expected = before[name] * (1 - lr * decay) - lr * g / (g.abs() + eps)
        assert torch.allclose(p.detach(), expected, rtol=1e-5, atol=1e-7), name


def test_batch_size_ramp_is_used_and_logged_every_step(tmp_path, monkeypatch):
    """train.batch_size_start → train.batch_size linearly over train.batch_ramp_tokens, rounded down to whole
    micro-batches (V3 ramps 3072 → 15360): each step draws and logs the ramp's size at the tokens seen so far, and
    a schedule in tokens (optim.unit, as DeepSeek states its own) follows the tokens, not the steps."""
    micro, seq = 2, TASK.seq_len
    cfg = _config(tmp_path, train={"steps": 8, "batch_size": 8, "micro_batch_size": micro, "batch_size_start": 2,
                                   "batch_ramp_tokens": 200},
                  optim={"lr": PEAK, "unit": "tokens", "warmup": 0, "min_lr_ratio": LO_RATIO})
    sizes, tokens = [], [0]
    for _ in range(8):  # the ramp in closed form: 2 + 6·t/200 sequences, down to a multiple of 2, then 8
        t = tokens[-1]
        sizes.append(8 if t >= 200 else max(micro, int(2 + 6 * t / 200) // micro * micro))
        tokens.append(t + sizes[-1] * seq)
    assert sizes == [2, 2, 2, 4, 6, 8, 8, 8]

    drawn: list[int] = []

    class Counting(ReverseTask):
        def next(self, batch_size: int):
            drawn.append(batch_size)
            return super().next(batch_size)

    per_step: list[int] = []
    real = Trainer.step

    def step(self):
        start = len(drawn)
        result = real(self)
        per_step.append(sum(drawn[start:]))
        return result

    monkeypatch.setattr(Trainer, "step", step)
    lrs, stop = _record_lr()
    try:
        train(cfg, batches=Counting(), val=[], progress=False)
    finally:
        stop()
    records = MetricsLog(tmp_path / "run" / "metrics.jsonl").records("train")
    assert per_step == sizes and set(drawn) == {micro}
    assert [r["batch_size"] for r in records] == sizes and [r["tokens"] for r in records] == tokens[1:]
    cosine = [_cosine(t, total=tokens[-1]) for t in tokens[:-1]]
    assert [groups[0] for groups in lrs] == pytest.approx(cosine, rel=1e-9)
    assert [r["lr"] for r in records] == pytest.approx(cosine, rel=1e-9)
