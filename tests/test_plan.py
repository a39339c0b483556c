"""`nanoseek plan`: plans keep their constraints (memory, budget, the law's tokens), impossible budgets are refused
with what they can and cannot buy, and the written config is one `nanoseek train` accepts."""

from __future__ import annotations

import math

import pytest

from nanoseek.cli import main
from nanoseek.cost.energy import grid_intensity
from nanoseek.cost.plan import (
    DEEPSEEK_LLM,
    GPU_MFU,
    PLANNED_SHARE,
    Budget,
    PlanError,
    _affordable,
    _closest_index,
    _ranking,
    cpu_hardware,
    family,
    gpu_hardware,
    make_cpu_plan,
    make_plan,
    run_config,
)
from nanoseek.train.config import load_run_config, run_config_from_dict
from tests.conftest import nanoseek


def test_law_constants_and_consistency():
    law = DEEPSEEK_LLM
    assert (law.model, law.data, law.batch, law.lr) == ((0.1715, 0.5243), (5.8316, 0.4757), (0.2920, 0.3271),
                                                        (0.3118, -0.1250))
    for c in (1e15, 1e18, 1e21):
        assert law.m_opt(c) * law.d_opt(c) == pytest.approx(c, rel=1e-3)  # C = M·D
        assert law.c_for_model(law.m_opt(c)) == pytest.approx(c)


def check_constraints(plan, budget: Budget) -> None:
    hw, lay = plan.hardware, plan.layout
    assert plan.estimate.memory.peak <= hw.memory  # fits each device
    assert plan.train_flops <= plan.available * (1 + 1e-9)  # the compute the hardware delivers in the budget
    assert plan.hours <= budget.hours * PLANNED_SHARE * (1 + 1e-9)  # the rest: start-up, evals, a slower speed
    if budget.usd is not None:
        assert plan.cost_usd <= budget.usd * (1 + 1e-9)
    assert plan.tokens == pytest.approx(plan.d_opt, rel=0.03)  # the law's optimum, up to whole steps
    assert abs(math.log(plan.m / plan.law.m_opt(plan.compute))) < math.log(1.5)  # the closest shape
    assert lay.global_batch == lay.micro_batch * lay.accumulation * hw.count
    assert plan.tokens == plan.steps * lay.global_batch * plan.seq_len
    assert plan.estimate.train_flops_per_token * lay.global_batch * plan.seq_len == pytest.approx(
        plan.step_seconds * hw.flops_per_second)
    assert plan.kwh == pytest.approx(hw.watts * hw.count * plan.hours / 1000)
    # every device of the job is paid for, and the grid's g/kWh turns energy into CO2
    assert plan.cost_usd == pytest.approx(plan.hours * hw.count * (budget.price_per_hour or 0))
    assert plan.co2_kg == pytest.approx(plan.kwh * grid_intensity(plan.country).g_per_kwh / 1000)


@pytest.mark.parametrize(("acc", "count", "usd", "price", "hours"), [
    ("A100-80GB", 8, 500, 1.2, None),  # the example
    ("H100-SXM", 1, 40, 2.5, None),
    ("RTX-4090", 2, None, None, 24),
    ("T4", 1, None, None, 3),  # no bf16 tensor cores: planned in fp32
    ("H200", 16, 20000, 3.5, 100),  # the hours bind before the dollars
])
def test_gpu_plans_satisfy_constraints(acc, count, usd, price, hours):
    hw = gpu_hardware(acc, count)
    budget = Budget.make(count, usd=usd, price_per_hour=price, hours=hours)
    plan = make_plan(budget, hw, seq_len=2048, vocab_size=32768, country="FRA")
    check_constraints(plan, budget)
    assert plan.hardware.dtype == ("fp32" if acc == "T4" else "bf16")
    cfg = run_config(plan)  # validates: batch a multiple of the micro-batch, seq_len within the positions
    assert run_config_from_dict(cfg.to_dict()).model == plan.config


def test_a_bigger_budget_buys_a_bigger_model_and_more_tokens():
    hw = gpu_hardware("A100-80GB", 8)
    small, big = (make_plan(Budget.make(8, hours=h), hw, 2048, 32768) for h in (2, 50))
    assert big.m > small.m and big.tokens > small.tokens and big.layout.global_batch >= small.layout.global_batch
    assert big.lr < small.lr  # η_opt falls with C


def test_memory_decides_the_parallel_strategy():
    budget = Budget.make(8, hours=10)
    # at a large model's utilisation (the default, nanoseek's small-model figure, buys a model that fits anywhere)
    roomy = make_plan(budget, gpu_hardware("H200", 8, mfu=0.35), 2048, 32768)
    tight = make_plan(budget, gpu_hardware("A100-40GB", 8, mfu=0.35), 2048, 32768)
    assert roomy.layout.strategy == "ddp"
    assert (tight.layout.strategy, tight.layout.activation_checkpointing) != ("ddp", False)
    assert tight.estimate.memory.peak <= tight.hardware.memory


def test_cpu_plan_is_measured_and_satisfies_constraints():
    hw = cpu_hardware("fp32", seq_len=64)  # short sequences: the measured steps stay short on a busy machine
    assert hw.peak_source == "CPU matmul probe fp32" and 0 < hw.mfu < 1
    # the hours that buy 1e14 FLOPs at the measured speed: a small model's optimum, however busy the machine is
    budget = Budget.make(1, hours=1e14 / hw.flops_per_second / 3600)
    plan = make_cpu_plan(budget, hw, seq_len=64, vocab_size=2048)
    check_constraints(plan, budget)
    assert plan.hardware.mfu_source.startswith("measured")


@pytest.mark.parametrize(("kw", "says"), [
    (dict(usd=0.01, price_per_hour=2.0), ["budget too small", "What it can buy", "$0.33"]),
    (dict(hours=0.5, mfu=1e-5), ["budget too small", "cannot buy compute-optimal training", "What it can buy"]),
])
def test_budgets_that_buy_nothing_sensible_are_refused(kw, says):
    mfu = kw.pop("mfu", 0.35)
    with pytest.raises(PlanError) as e:
        make_plan(Budget.make(1, **kw), gpu_hardware("H100-SXM", 1, mfu=mfu), 2048, 32768)
    for s in says:
        assert s in str(e.value)


def test_a_model_that_does_not_fit_is_refused_with_what_fits():
    with pytest.raises(PlanError) as e:
        make_plan(Budget.make(1, hours=1000), gpu_hardware("L4", 1), 2048, 32768)
    assert "does not fit" in str(e.value) and "the largest model that fits" in str(e.value)


@pytest.mark.parametrize(("kw", "says"), [
    (dict(usd=-5, price_per_hour=1.0), "positive"),
    (dict(usd=100), "--price-per-hour"),
    (dict(), "give a budget"),
    (dict(hours=float("inf")), "positive"),
])
def test_bad_budgets(kw, says):
    with pytest.raises(PlanError, match=says):
        Budget.make(1, **kw)


def test_bad_hardware():
    with pytest.raises(ValueError, match="unknown accelerator"):
        gpu_hardware("B200", 1)
    with pytest.raises(PlanError, match="--count"):
        gpu_hardware("L4", 0)
    for watts in (-100.0, 0.0, float("nan")):
        with pytest.raises(PlanError, match="--watts must be a positive"):
            gpu_hardware("L4", 1, watts=watts)
    assert gpu_hardware("L4", 1, watts=50.0).watts == 50.0
    assert gpu_hardware("L4", 1).watts_source.endswith("(datasheet)")
    with pytest.raises(PlanError, match="--vocab-size must be >= 256"):
        make_plan(Budget.make(1, hours=1), gpu_hardware("L4", 1), 2048, 0)
    r = nanoseek("plan", "--accelerator", "L4", "--hours", "1", "--seq-len", "0")  # 0 is not "the default"
    assert r.returncode == 2 and "--seq-len must be >= 16, got 0" in r.stdout


def test_cli_writes_a_config_that_train_accepts(tmp_path, capsys):
    out = tmp_path / "plan.toml"
    assert main(["plan", "--budget-usd", "500", "--accelerator", "A100-80GB", "--count", "8", "--price-per-hour",
                 "1.2", "--mfu", "0.35", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "DeepSeek LLM" in printed and "fsdp" in printed
    cfg = load_run_config(out)
    assert cfg.train.tokens > 0 and cfg.parallel.dp == "fsdp" and cfg.train.dtype == "bf16"
    # a hard stop at the budget's hours ($500 / ($1.2 x 8)), and the price of one machine of 8 devices
    assert cfg.train.max_time == pytest.approx(500 / 9.6 * 3600) and cfg.cost.price_per_hour == pytest.approx(9.6)
    assert "at MFU 35.0% (given (--mfu))" in out.read_text()
    assert main(["train", str(out), "--dry-run"]) == 0
    assert main(["plan", "--budget-usd", "0.01", "--accelerator", "H100-SXM", "--price-per-hour", "2",
                 "--out", str(tmp_path / "none.toml")]) == 2
    assert "budget too small" in capsys.readouterr().out and not (tmp_path / "none.toml").exists()


def test_default_gpu_utilisation_is_nanoseeks_own_measurement():
    """The default MFU is what nanoseek measured on a GPU (docs/LOG.md: 5.2-6.4%, small preset, H200), not a large
    model's 35-50%: a plan at the latter would run several times over its time and money."""
    hw = gpu_hardware("H100-SXM", 1)
    assert hw.mfu == GPU_MFU and 0.05 <= GPU_MFU <= 0.07 and hw.mfu_source.startswith("assumed: nanoseek's own")
    assert gpu_hardware("H100-SXM", 1, mfu=0.3).mfu_source == "given (--mfu)"


def test_affordable_compute_is_the_largest_that_fits():
    """The cost of C jumps down where the closest shape changes to a cheaper one: the largest C that fits is
    found, not merely one crossing (brute force over a fine grid as the reference)."""
    cands = family(32768, 2048)
    ranking = _ranking(cands)

    def cost(c: float) -> float:
        return DEEPSEEK_LLM.d_opt(c) * cands[_closest_index(ranking, DEEPSEEK_LLM.m_opt(c))].flops

    for available in (3e16, 2.49e17, 1e18, 4.4e18):
        c = _affordable(DEEPSEEK_LLM, cands, available)
        assert cost(c) <= available
        grid = (math.exp(math.log(available) * k / 4000) for k in range(1, 4001))
        assert c >= max(x for x in grid if cost(x) <= available)


def test_a_multi_machine_plan_prices_each_machine():
    """12 devices make 2 machines of 6: the run's 2 machines x the per-machine price = the plan's 12 devices."""
    plan = make_plan(Budget.make(12, usd=2000, price_per_hour=2.0), gpu_hardware("H100-SXM", 12), 2048, 32768)
    cfg = run_config(plan)
    assert cfg.cost.price_per_hour == pytest.approx(12.0) and cfg.train.max_time == pytest.approx(
        plan.budget.hours * 3600)


def test_plan_arguments_fail_before_measuring(capsys):

    assert main(["plan", "--cpu", "--hours", "1", "--seq-len", "0"]) == 2
    out = capsys.readouterr().out
    assert "--seq-len must be >= 16" in out and "measuring" not in out
    assert main(["plan", "--cpu", "--hours", "1", "--count", "4"]) == 2
    assert "--count and --mfu are for --accelerator" in capsys.readouterr().out
    for price in ("nan", "inf"):
        with pytest.raises(PlanError, match="--price-per-hour must be a number >= 0"):
            Budget.make(1, usd=10, price_per_hour=float(price))


def test_plan_for_prepared_data_takes_its_vocabulary_and_counts_its_passes(data_dir, tmp_path, capsys):

    out = tmp_path / "p.toml"
    assert main(["plan", "--accelerator", "H100-SXM", "--hours", "2", "--data", str(data_dir), "--out", str(out)]) == 0
    said = capsys.readouterr().out.replace("\n", " ")
    cfg = load_run_config(out)
    assert cfg.model.vocab_size == 512 and cfg.data.path == str(data_dir)  # the data's tokenizer's size
    assert "passes over the same text" in said and "set data.path" not in out.read_text()
    assert main(["plan", "--accelerator", "H100-SXM", "--hours", "2", "--data", str(data_dir), "--vocab-size",
                 "8192", "--out", str(out)]) == 2
    assert "the tokenizer of" in capsys.readouterr().out
