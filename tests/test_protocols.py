"""benchmarks/protocols.py: the protocol study's summary from finished runs (no training)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from _scripts import load_script

def load():
    return load_script("protocols")


def fake_runs(root: Path, name: str, test_miou: dict, curves: dict, secs: float = 100.0) -> None:
    for method, values in test_miou.items():
        for seed, v in enumerate(values):
            run = root / "runs" / "protocols" / name / method / f"seed{seed}"
            run.mkdir(parents=True)
            metrics = {"splits": {"test": {"mIoU": v}}, "train_time_s": secs - 10, "eval_time_s": 10.0, "threads": 1}
            (run / "metrics.json").write_text(json.dumps(metrics))
            rows = "".join(f"{s},{m},0,0\n" for s, m in curves[method][seed])
            (run / "val.csv").write_text("step,mIoU,mAcc,aAcc\n" + rows)


def test_summary_pairs_seeds_and_reads_the_curves(tmp_path, monkeypatch):
    mod = load()
    monkeypatch.setattr(mod, "ROOT", str(tmp_path))
    ce, lall = [30.0, 32.0, 31.0], [31.0, 32.5, 32.5]  # differences 1.0, 0.5, 1.5
    curve = [[(100, 10.0), (200, 20.0), (300, 24.0), (400, 25.0)]] * 3
    fake_runs(tmp_path, "scratch_800", {"ce": ce, "lall": lall}, {"ce": curve, "lall": curve})
    r = mod.collect("scratch_800", 3)
    d = r["diff_lall_minus_ce"]
    assert math.isclose(d["mean"], 1.0) and math.isclose(d["sd"], 0.5)
    assert r["seconds_per_run"] == 100.0
    # late gain: mean CE val mIoU at the end (400) minus at 75 % of the schedule (300)
    assert math.isclose(r["late_gain_val_mIoU"], 1.0)
    assert r["cpu_hours_for_1pt"] == pytest.approx(r["seeds_for_1pt"] * 2 * 100.0 / 3600)
    assert r["pooled_sd"] == pytest.approx(0.5) and r["seeds_for_05pt"] > r["seeds_for_1pt"]
    text = mod.report([r], "python benchmarks/protocols.py --report-only")
    assert "| scratch_800:" in text and "+1.00 [" in text
    # a protocol with a missing run is not summarised
    assert mod.collect("lite0_800", 3) is None


def test_median_pull_reads_the_balance_ratios_of_every_seed(tmp_path):
    mod = load()
    dirs = []
    for seed, ratios in enumerate([["0.1", "", "0.3"], ["0.2", "0.5", ""]]):
        d = tmp_path / f"seed{seed}"
        d.mkdir()
        rows = "".join(f"{i},1.0,{r}\n" for i, r in enumerate(ratios))
        (d / "log.csv").write_text("step,ce,ratio/lall\n" + rows)
        dirs.append(str(d))
    dirs.append(str(tmp_path / "no_log"))  # a run without a log adds nothing
    assert mod._median_pull(dirs) == {"lall": 0.3}  # of 0.1, 0.3, 0.2, 0.5 (upper median)
    assert mod._median_pull([str(tmp_path / "no_log")]) == {}
