"""benchmarks/released_gaps.py runs, and its released-behaviour simulations reduce to pixreg where they must."""
from __future__ import annotations

import json

from _scripts import load_script

gaps = load_script("released_gaps")


def test_simulations_agree_with_pixreg_on_one_process():
    # one GPU: the released TP-sum all-reduce drops nothing, per-replica squares are global squares
    assert gaps.rch_ddp_prototype_gradient(0, 1) < 1e-12
    assert gaps.car_per_replica_intra_check(0) < 1e-12
    assert gaps.car_per_replica_squares(0, 1, "intra_c2p") < 1e-12
    # and they do measure something with several processes
    assert gaps.rch_ddp_prototype_gradient(0, 2) > 1e-4
    assert gaps.car_per_replica_squares(1, 8, "intra_c2p") > 1e-5


def test_script_writes_tables(tmp_path):
    out = tmp_path / "gaps"
    assert gaps.main(["--seeds", "1", "--out", str(out)]) == 0
    md = (tmp_path / "gaps.md").read_text()
    assert "| RCH | option |" in md and "| CAR | remaining |" in md and "Command:" in md
    rows = json.loads((tmp_path / "gaps.json").read_text())["rows"]
    assert len(rows) == len(gaps.ROWS) and all(r["min"] >= 0 for r in rows)
