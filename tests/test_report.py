"""`nanoseek report` on a short real run: report.md with the key figures, and every plot as a real PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nanoseek.cli import main
from nanoseek.report import _co2, _energy, _usd
from nanoseek.train.config import load_run_config
from nanoseek.train.run import data_folder, train
from tests.conftest import ROOT

PNG = b"\x89PNG\r\n\x1a\n"


def test_report_card_from_a_short_run(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = load_run_config(ROOT / "configs" / "tiny.toml", [
        f"data.path={data_dir}", f"train.out_dir={run}", "model.vocab_size=512", "train.steps=5", "data.seq_len=32",
        "train.batch_size=4", "train.micro_batch_size=4", "train.log_every=1", "eval.every=3", "eval.batches=1",
        "eval.samples=1", "eval.sample_tokens=8", "cost.country=FRA"])
    train(cfg, progress=False)
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    report = run / "report" / "report.md"
    assert f"report: {report}" in out.replace("\n", "")

    for name in ("loss", "schedule", "throughput", "expert_load", "energy"):
        png = run / "report" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000, name
    s = json.loads((run / "summary.json").read_text())
    card = report.read_text()
    for figure in (f"{s['tokens']:,}", f"{_energy(s['energy_kwh'])} ({s['energy_source']})", s["energy_method"],
                   _usd(s["cost_usd"]), _co2(s["co2_kg"]), s["carbon_intensity_source"], f"{s['val_bpb']:.4g}",
                   f"{s['total_flops']:.3g}", f"{100 * s['mfu_mean']:.2f}%", "France", "## Model card", "### Data",
                   "chatterbot", "routed experts", "Sample for the prompt",
                   f"nanoseek train {run}/run.toml train.out_dir=NEW_RUN_DIR", "expert_load.png", "energy.png"):
        assert figure in card, figure
    assert f"energy {_energy(s['energy_kwh'])} ({s['energy_source']})" in out
    # MFU of the run: the FLOPs done over what the peak allows in the training time (intervals weighted by time)
    records = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    done = [(r["tokens"] - before) * r["flops_per_token"] / r["peak_flops"]
            for r, before in zip(records, [0] + [r["tokens"] for r in records])]
    assert s["mfu_mean"] == pytest.approx(sum(done) / s["train_seconds"], rel=1e-6)
    assert s["tokens_per_s"] == pytest.approx(s["tokens"] / s["train_seconds"])

    # a run without summary.json (killed, or still going): its figures from the records, for the whole run so far
    (run / "summary.json").unlink()
    assert main(["report", str(run)]) == 0
    card = report.read_text()
    assert f"({records[-1]['tokens'] / records[-1]['elapsed']:,.0f} tokens/s, MFU {100 * s['mfu_mean']:.2f}%" in card
    assert "scope: this machine" in card
    # killed mid-write (a cut last line), or a summary.json damaged by hand: reported from what can be read
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 6, "lo')
    (run / "summary.json").write_text("[1, 2]")
    with pytest.warns(UserWarning) as caught:
        assert main(["report", str(run)]) == 0
    said = " ".join(str(w.message) for w in caught)
    assert "not a JSON record, skipped" in said and "summary.json is not a JSON object" in said
    assert "scope: this machine" in report.read_text()
    # an earlier session's summary.json, the run resumed and then killed: the records win, the card says so
    (run / "summary.json").write_text(json.dumps({**s, "steps": 3, "stop_reason": "time"}))
    with pytest.warns(UserWarning, match="summary.json is from step 3 but the records go to step 5"):
        assert main(["report", str(run)]) == 0
    card = report.read_text()
    assert "The run has not finished" in card and "| stop reason | time |" not in card and "None" not in card


def test_data_folder_is_found_from_the_run_when_not_from_the_working_directory(tmp_path, monkeypatch):
    """`nanoseek demo` writes data.path relative to where it ran; a report or resume from elsewhere finds it."""
    (tmp_path / "proj" / "runs" / "demo" / "data").mkdir(parents=True)
    (tmp_path / "proj" / "runs" / "demo" / "data" / "index.json").write_text("{}")
    run_dir = tmp_path / "proj" / "runs" / "demo" / "run-1"
    cfg = load_run_config(ROOT / "configs" / "tiny.toml", ["data.path=runs/demo/data"])
    monkeypatch.chdir(tmp_path / "proj")
    assert data_folder(cfg, run_dir) == Path("runs/demo/data")  # as given, when it is there
    monkeypatch.chdir(tmp_path)
    assert data_folder(cfg, run_dir) == tmp_path / "proj" / "runs" / "demo" / "data"
    cfg.data.path = "elsewhere/data"
    assert data_folder(cfg, run_dir) == Path("elsewhere/data")  # not found anywhere: as given, for the error


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a training run folder" in capsys.readouterr().out


def test_report_units_written_out():
    """The card's units, literally (the card test above formats its expectations with these same helpers)."""
    assert [_energy(k) for k in (None, 2.5e-4, 0.0123, 0.9996, 1.0, 1234.6)] == \
        ["not measured", "0.25 Wh", "12.3 Wh", "1,000 Wh", "1 kWh", "1,235 kWh"]  # a large run: no e-notation
    assert [_co2(k) for k in (None, 0.0042, 0.5, 3.21, 45_678.9)] == \
        ["not computed (no energy)", "4.2 g CO2e", "500 g CO2e", "3.21 kg CO2e", "45,679 kg CO2e"]
    assert [_usd(x) for x in (None, 0.0123, 0.999, 1.0, 1234.567)] == \
        ["not computed", "0.012 USD", "1 USD", "1.00 USD", "1,234.57 USD"]
