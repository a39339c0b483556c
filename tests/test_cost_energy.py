"""Energy, money and CO2: closed-form arithmetic, labelled meter fields, no network, a real run's totals."""

from __future__ import annotations

import json
import socket
import time
from types import SimpleNamespace

import pytest
import torch

from nanoseek.config import ConfigError
from nanoseek.cost import energy
from nanoseek.cost.energy import EnergyMeter, GridIntensity, Tariff, grid_intensity
from nanoseek.cost.flops import train_flops_per_token
from nanoseek.train.config import load_run_config
from nanoseek.train.run import MetricsLog, train
from tests.conftest import ROOT

RECORD_FIELDS = ("mfu", "flops_per_token", "peak_flops", "peak_source", "energy_kwh", "energy_source", "cost_usd",
                 "co2_kg")


def test_money_and_co2_arithmetic():
    grid = GridIntensity(300.0, "test")
    per_kwh = Tariff(price_per_kwh=0.2, price_per_hour=0.0, grid=grid)
    assert per_kwh.cost_usd(2.5, seconds=7200) == pytest.approx(0.5)
    assert per_kwh.co2_kg(2.5) == pytest.approx(0.75)
    rented = Tariff(price_per_kwh=0.2, price_per_hour=3.0, grid=grid)
    assert rented.cost_usd(2.5, seconds=1800) == pytest.approx(1.5)  # the hourly price replaces the per-kWh one
    assert rented.cost_usd(None, seconds=1800) == pytest.approx(1.5)
    assert per_kwh.cost_usd(None, seconds=1800) is None and per_kwh.co2_kg(None) is None
    assert per_kwh.basis == "0.2 USD per kWh" and rented.basis == "3 USD per machine-hour"
    two = Tariff(price_per_kwh=0.2, price_per_hour=3.0, grid=grid, machines=2)  # a job on two rented machines
    assert two.cost_usd(None, seconds=1800) == pytest.approx(3.0) and two.basis == "3 USD per machine-hour x 2 machines"
    with pytest.raises(ConfigError, match="must be numbers >= 0"):
        load_run_config(ROOT / "configs" / "tiny.toml", ["cost.price_per_kwh=nan"])
    with pytest.raises(ConfigError, match="must be numbers >= 0"):
        load_run_config(ROOT / "configs" / "tiny.toml", ["cost.carbon_intensity=inf"])


def codecarbon_tables() -> dict[str, dict]:
    """codecarbon's own tables, read independently of nanoseek.cost.energy."""
    from codecarbon.input import DataSource

    ds = DataSource()
    return {"global_energy_mix.json": ds.get_global_energy_mix_data(),
            "carbon_intensity_per_source.json": ds.get_carbon_intensity_per_source_data()}


def test_grid_intensity_comes_from_codecarbon_tables():
    tables = codecarbon_tables()
    fra = grid_intensity("fra")
    assert fra.g_per_kwh == tables["global_energy_mix.json"]["FRA"]["carbon_intensity"] and "France" in fra.source
    assert grid_intensity("world").g_per_kwh == tables["carbon_intensity_per_source.json"]["world_average"]
    assert grid_intensity("FRA", 123.0) == GridIntensity(123.0, "given (cost.carbon_intensity)")
    with pytest.raises(ConfigError, match=r"cost\.country='Mars'.*cost\.carbon_intensity"):
        grid_intensity("Mars")
    cfg = load_run_config(ROOT / "configs" / "tiny.toml", ["cost.country=DEU", "cost.price_per_hour=2.5"])
    assert cfg.cost.country == "DEU" and cfg.cost.price_per_hour == 2.5 and cfg.cost.energy
    with pytest.raises(ConfigError, match=r"cost\.country='Mars'"):  # a typo fails before any training
        load_run_config(ROOT / "configs" / "tiny.toml", ["cost.country=Mars"])


def test_meter_is_offline_and_labelled(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the energy meter opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.chdir(tmp_path)
    meter = EnergyMeter(Tariff(0.2, 0.0, GridIntensity(400.0, "test")), "cpu")
    try:
        a = torch.randn(256, 256)
        t = time.perf_counter()
        while time.perf_counter() - t < 0.3:
            a = torch.tanh(a @ a)
        r = meter.interval()
    finally:
        meter.close()
    assert r["energy_kwh"] > 0 and r["energy_method"].startswith("codecarbon")
    # a CPU run is "measured" exactly when the CPU is read from counters (RAPL), whatever this machine offers
    assert r["energy_source"] == ("measured" if "CPU read from" in r["energy_method"] else "estimated")
    assert r["cost_usd"] == pytest.approx(0.2 * r["energy_kwh"]) and r["co2_kg"] == pytest.approx(0.4 * r["energy_kwh"])
    assert list(tmp_path.iterdir()) == []  # no emissions.csv, no lock file


def test_meter_falls_back_to_constant_power_and_can_be_off(monkeypatch):
    import codecarbon

    def broken(*args, **kwargs):
        raise RuntimeError("no sensors")

    clock = [100.0]
    monkeypatch.setattr(energy, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(codecarbon, "OfflineEmissionsTracker", broken)
    tariff = Tariff(0.5, 0.0, GridIntensity(200.0, "test"))
    meter = EnergyMeter(tariff, "cpu")
    clock[0] += 36.0
    r = meter.interval()
    assert r["energy_source"] == "estimated" and "constant" in r["energy_method"] and "no sensors" in r["energy_method"]
    watts, source = energy.machine_power()  # the same power model as `nanoseek plan --cpu`
    assert r["energy_kwh"] == pytest.approx(watts * 36 / 3.6e6) and source in r["energy_method"]
    assert r["cost_usd"] == pytest.approx(0.5 * r["energy_kwh"]) and r["co2_kg"] == pytest.approx(0.2 * r["energy_kwh"])

    off = EnergyMeter(Tariff(0.5, 3.6, GridIntensity(200.0, "test")), "cpu", measure=False)
    clock[0] += 36.0
    r = off.interval()
    assert r["energy_source"] == "off" and r["energy_kwh"] is None and r["co2_kg"] is None
    assert r["cost_usd"] == pytest.approx(0.036)  # 36 s of a 3.6 USD machine-hour


def test_run_logs_costs_per_interval_and_sums_them(data_dir, tmp_path):
    cfg = load_run_config(ROOT / "configs" / "tiny.toml", [
        f"data.path={data_dir}", f"train.out_dir={tmp_path / 'run'}", "model.vocab_size=512", "train.steps=5",
        "data.seq_len=32", "train.batch_size=4", "train.micro_batch_size=4", "train.log_every=2", "eval.every=0",
        "eval.batches=1", "eval.samples=0", "cost.country=FRA", "cost.price_per_kwh=0.25"])
    train(cfg, progress=False)
    log = MetricsLog(tmp_path / "run" / "metrics.jsonl")
    records, final = log.records("train"), log.records("final")
    # every 2 steps and the last one; "final": what came after it (the final evaluation and checkpoint)
    assert [r["step"] for r in records] == [2, 4, 5] and [r["step"] for r in final] == [5]
    fpt = train_flops_per_token(cfg.model, 32, mtp=True)
    fra = grid_intensity("FRA").g_per_kwh
    for r in records:
        assert all(r.get(k) is not None for k in RECORD_FIELDS), r
        assert r["flops_per_token"] == fpt and 0 < r["mfu"] < 1 and r["peak_source"].startswith("CPU matmul probe")
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * fpt / r["peak_flops"])
    for r in records + final:
        assert r["energy_kwh"] > 0 and r["energy_source"] in ("measured", "estimated") and r["energy_method"]
        assert r["cost_usd"] == pytest.approx(0.25 * r["energy_kwh"])
        assert r["co2_kg"] == pytest.approx(fra / 1000 * r["energy_kwh"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("energy_kwh", "cost_usd", "co2_kg"):
        assert summary[key] == pytest.approx(sum(r[key] for r in records + final))
    assert summary["energy_source"] == records[0]["energy_source"] and summary["energy_scope"] == "this machine"
    assert summary["total_flops"] == summary["tokens"] * fpt == 5 * 4 * 32 * fpt
    # the run's MFU: FLOPs done over what the peak allows in the training time (intervals weighted by time)
    done = [(r["tokens"] - before) * fpt / r["peak_flops"] for r, before in zip(records, [0, 256, 512])]
    assert summary["mfu_mean"] == pytest.approx(sum(done) / summary["train_seconds"], rel=1e-6)
    assert records[-1]["elapsed"] == pytest.approx(summary["train_seconds"])
    assert summary["cost_basis"] == "0.25 USD per kWh" and summary["carbon_intensity_g_per_kwh"] == fra
