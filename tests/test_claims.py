"""The claims scoreboard harness (benchmarks/claims.py) on a tiny protocol."""
from __future__ import annotations

import json
import os

import pytest
from _scripts import load_script
import torch

pytest.importorskip("yaml")
pytest.importorskip("sklearn")

def load():
    return load_script("claims")


def test_every_claim_names_known_variants():
    claims = load()
    for row in claims.CLAIMS:
        for v in row[3:5]:
            assert v == "" or v in claims.VARIANTS, v
        assert row[-1] in (1, -1)
    for variant, (method, opts) in claims.VARIANTS.items():  # every variant builds a valid config
        cfg = claims.variant_config(variant, 0, None, [])
        assert cfg["method"] == method


def test_collapsed_counts_one_class_runs(tmp_path):
    claims = load()
    for seed, ious in enumerate([{"background": 94.0, "0": 0.01, "1": 0.0}, {"background": 94.0, "0": 20.0, "1": 0.0}]):
        d = tmp_path / "v" / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"splits": {"test": {"per_class_iou": ious}}}))
    assert claims.collapsed(str(tmp_path), "v", [0, 1]) == 1
    assert claims.collapsed(str(tmp_path), "missing", [0, 1]) == 0


def test_judge_directions():
    claims = load()
    up = {"mean": 1.0, "lo": 0.5, "hi": 1.5}
    assert claims.judge(up, +1) == "supported"
    assert claims.judge(up, -1).startswith("not supported")
    assert claims.judge({"mean": 0.1, "lo": -1.0, "hi": 1.2}, +1) == "inconclusive at this power"
    assert claims.judge({"mean": None, "lo": None, "hi": None}, +1) == "not run"
    small = {"mean": 0.1, "lo": -0.1, "hi": 0.3}
    assert claims.judge(small, +1) == "inconclusive at this power"
    assert claims.judge(small, +1, 0.5).startswith("not supported at the claimed size")
    assert claims.judge({"mean": 0.3, "lo": -0.1, "hi": 0.7}, +1, 0.5) == "inconclusive at this power"
    assert claims.judge({"mean": 0.2, "lo": 0.05, "hi": 0.4}, +1, 0.5).startswith("supported, but smaller than claimed")
    assert claims.judge({"mean": 0.6, "lo": 0.05, "hi": 1.2}, +1, 0.5) == "supported"
    assert claims.judge({"mean": -0.1, "lo": -0.3, "hi": 0.1}, -1, 0.5).startswith("not supported at the claimed size")


def test_tiny_scoreboard_end_to_end(tmp_path):
    claims = load()
    n_threads = torch.get_num_threads()
    tiny = ["data.size=[32,32]", "data.opts={digits: [0, 1, 2], num_images: 12}",
            "model.opts={width: 4, depth: 10, head_channels: 8}", "train.steps=3", "train.batch_size=4",
            "train.ckpt_every=3", "eval.batch_size=8", "threads=1", f"data.cache_dir={tmp_path / 'cache'}"]
    args = ["--seeds", "0,1", "--out", str(tmp_path / "runs"), "--only", "ce,car", "--results",
            str(tmp_path / "claims.json"), "--markdown", str(tmp_path / "claims.md")]
    for o in tiny:
        args += ["--set", o]
    try:
        assert claims.main(args) == 0
    finally:
        torch.set_num_threads(n_threads)
    rows = json.load(open(tmp_path / "claims.json"))["rows"]
    by_claim = {(r["claim"], r["dataset"]): r for r in rows}
    sim = by_claim[("class-centre similarity between classes drops (Fig. 4)", "scenes")]
    assert sim["diff"]["n"] == 2 and -1.0 <= sim["mean_a"] <= 1.0 and sim["verdict"] != "not run"
    assert os.path.exists(tmp_path / "runs" / "car" / "seed1" / "centre_similarity.json")
    assert by_claim[("window 5 beats plain CE (Table 2)", "scenes")]["verdict"] == "not run"
    assert "not run: pixreg offers" in by_claim[("TP prototypes beat learnable prototypes (Table 1)", "scenes")]["verdict"]
    assert set(sim["collapsed"]) == {"car", "ce"} and all(0 <= n <= 2 for n in sim["collapsed"].values())
    md = open(tmp_path / "claims.md").read()
    assert "| CAR | class-centre similarity" in md and "Verdict counts" in md


def test_camvid_rows_take_each_method_from_the_first_file_that_has_it(tmp_path, monkeypatch):
    claims = load()

    def summary(methods):
        diff = {"mean": 0.5, "lo": 0.1, "hi": 0.9, "sd": 0.3, "n": 3}
        test = {m: {"mIoU": {"mean": 40.0 + i, "values": [40.0 + i] * 3, "diff": None if m == "ce" else diff}}
                for i, m in enumerate(methods)}
        return {"seeds": [0, 1, 2], "command": "cmd", "splits": {"test": {"methods": test}}}

    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "new.json").write_text(json.dumps(summary(["ce", "cplus1", "car"])))
    (results / "old.json").write_text(json.dumps(summary(["ce", "cplus1", "car", "lall", "rch"])))
    monkeypatch.setattr(claims, "ROOT", str(tmp_path))
    monkeypatch.setattr(claims, "CAMVID_RESULTS", (("camvid", "new", "p1"), ("camvid", "old", "p2"),
                                                   ("camvid (other)", "missing", "p3")))
    rows = claims.all_camvid_rows()
    assert [(r["a"], r["protocol"].split(":")[0]) for r in rows] == [
        ("cplus1", "p1"), ("car", "p1"), ("lall", "p2"), ("rch", "p2")]
    assert rows[0]["mean_a"] == 41.0 and rows[2]["mean_a"] == 43.0
