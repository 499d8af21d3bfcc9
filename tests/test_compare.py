"""``pixreg compare``: paired runs over seeds, summary statistics, t-intervals, outputs."""
from __future__ import annotations

import csv
import json
import math
import os

import pytest

pytest.importorskip("yaml")

from pixreg.cli import main  # noqa: E402
from pixreg.train.compare import render_markdown, summarize  # noqa: E402
from pixreg.train.stats import paired_interval, t_quantile  # noqa: E402


def tiny(cache: str) -> list:
    return [
        "data.size=[32,32]", "data.opts={digits: [0, 1, 2], num_images: 12}",
        "model.opts={width: 4, depth: 10, head_channels: 8}", "train.steps=5", "train.batch_size=4",
        "train.ckpt_every=5", "eval.batch_size=8", "threads=1", f"data.cache_dir={cache}",
    ]


# ----------------------------------------------------------------------------- statistics
def test_t_quantile_known_values():
    # Student-t 0.975 quantiles (printed tables): df 1, 2, 4, 10, 30
    for df, q in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423)]:
        assert t_quantile(0.975, df) == pytest.approx(q, abs=1e-4)
    assert t_quantile(0.8, 1) == pytest.approx(1.3764, abs=1e-4)
    with pytest.raises(ValueError, match="p must"):
        t_quantile(1.5, 3)


def _power_by_quadrature(effect, sd, n, alpha=0.05):
    """Independent float64 reference of the two-sided paired t-test power, from the definition
    T' = (Z + nc) / sqrt(V / df), V ~ chi2(df): integrate the normal tail over the chi2 density."""
    from scipy import integrate, stats

    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)
    nc = effect * math.sqrt(n) / sd

    def integrand(v):
        s = crit * math.sqrt(v / df)
        return (stats.norm.sf(s - nc) + stats.norm.cdf(-s - nc)) * stats.chi2.pdf(v, df)

    return integrate.quad(integrand, 0, math.inf, epsabs=1e-12, limit=200)[0]


def test_exact_power_known_values():
    from pixreg.train.stats import detectable_effect, power

    # R: power.t.test(n = 20, delta = 1) (two-sample, sd 1) -> 0.8689528 (upper tail; the
    # lower tail adds ~2e-7): the same noncentral t with df 38, ncp sqrt(10)
    from scipy import stats

    crit = stats.t.ppf(0.975, 38)
    upper = stats.nct.sf(crit, 38, math.sqrt(10))
    assert upper == pytest.approx(0.8689528, abs=2e-7)
    for effect, sd, n in [(1.0, 1.0, 3), (3.0965, 1.0, 3), (0.5, 1.3, 10), (2.0, 0.7, 2), (0.0, 1.0, 5)]:
        assert power(effect, sd, n) == pytest.approx(_power_by_quadrature(effect, sd, n), abs=1e-7)
    assert power(0.0, 1.0, 7) == pytest.approx(0.05)  # no effect: the test's level
    # the (t_.975 + t_.80) * sd / sqrt(n) shortcut is optimistic at 3 seeds: ~77 %, not 80 %
    shortcut = (t_quantile(0.975, 2) + t_quantile(0.8, 2)) / math.sqrt(3)
    assert power(shortcut, 1.0, 3) == pytest.approx(0.766, abs=1e-3)
    for n in (2, 3, 5, 20):
        mde = detectable_effect(1.7, n)
        assert _power_by_quadrature(mde, 1.7, n) == pytest.approx(0.8, abs=1e-6)
    assert detectable_effect(1.7, 3) > 1.7 * shortcut
    with pytest.raises(ValueError, match="n >= 2"):
        power(1.0, 1.0, 1)


def test_paired_interval_formula():
    a, b = [3.0, 5.0, 4.5, 6.0], [1.0, 2.0, 2.5, 2.0]
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 3)
    half = 3.182446 * sd / 2  # t(0.975, 3) = 3.182446
    r = paired_interval(a, b)
    assert r["mean"] == pytest.approx(mean) and r["lo"] == pytest.approx(mean - half, rel=1e-5)
    assert r["hi"] == pytest.approx(mean + half, rel=1e-5) and r["n"] == 4
    one = paired_interval([1.0], [0.5])
    assert one["mean"] == 0.5 and one["lo"] is None  # no interval from one seed
    assert paired_interval([1.0, None], [0.0, 2.0])["n"] == 1  # missing values drop the pair


def test_summarize_and_markdown_on_synthetic_runs():
    def run(miou, bg):
        return {"class_names": ["bg", "a"], "train_time_s": 1.0,
                "splits": {"test": {"mIoU": miou, "mAcc": 50.0, "aAcc": 90.0, "bg_to_coi": bg,
                                    "per_class_iou": {"bg": 90.0, "a": miou}}}}

    runs = {"ce": {0: run(40.0, 5.0), 1: run(42.0, 6.0)}, "car": {0: run(43.0, 4.0), 1: run(46.0, 4.0)}}
    s = summarize(runs, [0, 1], ["ce", "car"])
    t = s["splits"]["test"]
    assert s["baseline"] == "ce" and t["metrics"] == ["mIoU", "mAcc", "aAcc", "bg_to_coi"]
    assert t["methods"]["car"]["mIoU"]["mean"] == 44.5
    assert t["methods"]["car"]["mIoU"]["std"] == pytest.approx(math.sqrt(4.5))
    diff = t["methods"]["car"]["mIoU"]["diff"]  # d = (3, 4): mean 3.5, sd 0.7071, t(0.975, 1) = 12.706
    assert diff["mean"] == 3.5 and diff["hi"] - 3.5 == pytest.approx(12.7062 * math.sqrt(0.5) / math.sqrt(2), rel=1e-4)
    assert "diff" not in t["methods"]["ce"]["mIoU"]
    md = render_markdown(s)
    assert "| method | mIoU | mAcc | aAcc | bg→CoI | train s |" in md
    assert "| car | 44.50 ± 2.12 |" in md and "+3.50 [" in md


# ----------------------------------------------------------------------------- end to end
def test_compare_end_to_end_paired_and_resumable(tmp_path, cache, capsys):
    out = str(tmp_path / "cmp")
    args = ["compare", "--methods", "ce,car", "--seeds", "2", "--out", out, "--no-progress"]
    for o in tiny(cache):
        args += ["--set", o]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "## test_openset" in printed and "Paired difference to `ce`" in printed
    assert "smallest detectable" in printed and "| car |" in printed
    for f in ("compare.md", "compare.json", "per_class_iou.png", "per_class_iou_test.png", "per_class_iou_val.png"):
        assert os.path.exists(os.path.join(out, f)), f
    summary = json.load(open(os.path.join(out, "compare.json")))
    assert summary["methods"] == ["ce", "car"] and summary["seeds"] == [0, 1]
    assert "paired Student-t" in summary["interval"]

    # pairing: with one seed, both methods start from the same weights and see the same
    # first batch (same CE at step 1); another seed differs
    def first_ce(method, seed):
        with open(os.path.join(out, method, f"seed{seed}", "log.csv")) as f:
            return next(csv.DictReader(f))["ce"]

    assert first_ce("ce", 0) == first_ce("car", 0) and first_ce("ce", 1) == first_ce("car", 1)
    assert first_ce("ce", 0) != first_ce("ce", 1)

    # the table is computed from the runs' own metrics.json
    per_run = {(m, s): json.load(open(os.path.join(out, m, f"seed{s}", "metrics.json"))) for m in ("ce", "car") for s in (0, 1)}
    d = [per_run[("car", s)]["splits"]["test"]["mIoU"] - per_run[("ce", s)]["splits"]["test"]["mIoU"] for s in (0, 1)]
    got = summary["splits"]["test"]["methods"]["car"]["mIoU"]["diff"]
    assert got["mean"] == pytest.approx(sum(d) / 2)
    assert got["hi"] - got["mean"] == pytest.approx(12.7062 * abs(d[0] - d[1]) / math.sqrt(2) / math.sqrt(2), rel=1e-4)
    assert _power_by_quadrature(got["mde"], got["sd"], 2) == pytest.approx(0.8, abs=1e-6)  # exact 80 % power
    assert got["verdict"]

    # running it again skips finished runs (nothing retrained) and gives the same table
    mtimes = {k: os.path.getmtime(os.path.join(out, k[0], f"seed{k[1]}", "metrics.json")) for k in per_run}
    md = open(os.path.join(out, "compare.md")).read()
    assert main(args) == 0
    assert all(os.path.getmtime(os.path.join(out, k[0], f"seed{k[1]}", "metrics.json")) == t for k, t in mtimes.items())
    assert open(os.path.join(out, "compare.md")).read() == md


def test_compare_rejects_duplicates(tmp_path, capsys):
    assert main(["compare", "--methods", "car,ce+car", "--seeds", "1", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "twice" in capsys.readouterr().err


def test_detectable_effect_has_the_stated_power():
    """Simulated paired differences whose true mean is the detectable effect are found
    by the two-sided 5 % t-test 80 % of the time (independent Monte Carlo check)."""
    import numpy as np

    from pixreg.train.stats import detectable_effect, seeds_needed, t_quantile

    rng = np.random.default_rng(0)
    for n in (3, 5, 10):
        sd = 2.0
        mde = detectable_effect(sd, n)
        d = rng.normal(mde, sd, size=(20000, n))
        t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
        power = float(np.mean(np.abs(t) > t_quantile(0.975, n - 1)))
        assert abs(power - 0.8) < 0.012, (n, power)  # 20000 draws: sd 0.003
    # more seeds detect smaller effects; seeds_needed is the first n that reaches the target
    assert detectable_effect(2.0, 20) < detectable_effect(2.0, 5)
    n = seeds_needed(2.3, 1.0)
    assert detectable_effect(2.3, n) <= 1.0 < detectable_effect(2.3, n - 1)
    assert detectable_effect(None, 5) is None and detectable_effect(1.0, 1) is None


def test_verdict_words():
    from pixreg.train.stats import verdict

    assert verdict(paired_interval([2.0, 2.1, 2.2], [1.0, 1.0, 1.0])).startswith("higher than ce")
    assert verdict(paired_interval([0.0, 0.1, 0.2], [1.0, 1.0, 1.0])).startswith("lower than ce")
    v = verdict(paired_interval([1.0, -1.0, 0.5], [0.0, 0.0, 0.0]))
    assert v.startswith("not distinguishable from zero") and "3 seeds" in v
    assert "cannot tell" in verdict(paired_interval([1.0], [0.0]))


def test_degenerate_runs_are_flagged():
    def run(ious, guard=None):
        m = {"class_names": ["bg", "a", "b"], "train_time_s": 1.0,
             "splits": {"test": {"mIoU": sum(ious) / 3, "per_class_iou": dict(zip(["bg", "a", "b"], ious))}}}
        if guard is not None:
            m["collapse_guard"] = guard
        return m

    ratio = {"degenerate": False, "warnings": [{"kind": "ratio", "term": "car", "step": 50, "ratio": 7.0}]}
    runs = {"ce": {0: run([90.0, 40.0, 30.0]), 1: run([91.0, 41.0, 35.0])},
            "car": {0: run([80.0, 0.5, 0.0]), 1: run([85.0, 20.0, 10.0], ratio)}}
    s = summarize(runs, [0, 1], ["ce", "car"])
    assert s["degenerate"] == {"car": ["0"]}
    assert s["flags"]["car"]["0"] == ["predicts one class on test"] and "gradient ratio 7" in s["flags"]["car"]["1"][0]
    md = render_markdown(s)
    assert "- `car` seed 0 (**degenerate**): predicts one class on test" in md
    assert "- `car` seed 1 (warning):" in md
    healthy = summarize({"ce": runs["ce"]}, [0, 1], ["ce"])
    assert healthy["degenerate"] == {} and "Degenerate runs: none" in render_markdown(healthy)


def test_train_warns_and_records_an_overpowering_term(tmp_path, cache, capsys):
    # CAR at weight 50: its gradient at the features is far above 0.5x CE's at the first
    # measured step; pixreg train says so (once), metrics.json keeps it, compare lists it
    run = tmp_path / "car"
    assert main(["train", "--method", "car", "--out", str(run), "--no-progress", "--set", "methods.car.loss_weight=50",
                 "--set", "methods.car.variant=paper", "--set", "methods.car.projection=null",
                 "--set", "train.balance_every=2"] + [a for o in tiny(cache) for a in ("--set", o)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("warning: regularizer 'car'") == 1 and "cross-entropy's" in printed
    metrics = json.load(open(run / "metrics.json"))
    events = metrics["collapse_guard"]["warnings"]
    assert events[0]["kind"] == "ratio" and events[0]["term"] == "car" and events[0]["ratio"] > 0.5
    rows = list(csv.DictReader(open(run / "log.csv")))
    measured = [r["step"] for r in rows if r.get("ratio/car")]
    assert measured == ["1", "3", "5"]  # criterion steps 0, 2, 4
    from pixreg.train.compare import degenerate_reasons
    assert any("gradient ratio" in r for r in degenerate_reasons(metrics))
