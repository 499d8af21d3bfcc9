"""Scoreboard of the four papers' central claims, reproduced at a scale a CPU can run.

    python benchmarks/claims.py                      # train what is missing, then write the scoreboard
    python benchmarks/claims.py --report-only        # rebuild the scoreboard from finished runs
    python benchmarks/claims.py --seeds 0,1,2 --set train.steps=800

Every claim is a paired comparison of two *variants* (a method plus option overrides)
trained with the same seeds: same initial weights and data order per seed, so the
per-seed differences are paired (as in ``pixreg compare``). Runs go to
``runs/claims/<variant>/seed<s>`` and are resumed/skipped when they exist, so the script
can be stopped and started again. The scoreboard is written to ``benchmarks/claims.md``
and ``benchmarks/results/claims.json``, with the command, machine and date.

Verdicts (95 % paired Student-t interval of the difference in the claimed direction):
``supported`` (interval above 0), ``not supported`` (interval below 0: the opposite
holds), ``inconclusive at this power`` otherwise, with the smallest effect the seeds
could have detected (80 % power; :func:`pixreg.train.stats.detectable_effect`).
Rows whose runs are missing say ``not run``.

CamVid rows come from the CamVid comparisons when their results exist: from scratch
(``benchmarks/camvid_compare.sh``, ``benchmarks/results/camvid_compare.json``) and on the
frozen-encoder protocol (``benchmarks/camvid_frozen.sh``, ``benchmarks/results/camvid_frozen.json``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _machine import cpu_name  # noqa: E402
from pixreg.train.config import resolve_config  # noqa: E402
from pixreg.train.stats import detectable_effect, paired_interval  # noqa: E402

#: variant -> (method, option overrides). Defaults are the papers' (see the loss docstrings).
VARIANTS: Dict[str, Tuple[str, List[str]]] = {
    "ce": ("ce", []),
    # C+1 (Table 1: compact / background terms; Table 2: centre representation)
    "cplus1": ("cplus1", []),
    "cplus1_compact": ("cplus1", ["methods.cplus1.beta=0"]),
    "cplus1_learnable": ("cplus1", ["methods.cplus1.centres=learnable"]),
    "cplus1_classifier": ("cplus1", ["methods.cplus1.centres=classifier"]),
    # CAR (Table 1 ablation, incremental; features after a 1x1 vs a 3x3 conv)
    "car_intra": ("car", ["methods.car.c2c_weight=0", "methods.car.c2p_weight=0", "methods.car.projection=conv1x1"]),
    "car_intra_c2c": ("car", ["methods.car.c2p_weight=0", "methods.car.projection=conv1x1"]),
    "car": ("car", ["methods.car.projection=conv1x1"]),
    "car_3x3": ("car", ["methods.car.projection=conv3x3"]),
    # LALL (Table 2 windows; Table 1 Minkowski power)
    "lall": ("lall", []),
    "lall_w3": ("lall", ["methods.lall.window=3"]),
    "lall_w7": ("lall", ["methods.lall.window=7"]),
    "lall_p1": ("lall", ["methods.lall.power=1"]),
    "lall_p2": ("lall", ["methods.lall.power=2"]),
    "lall_p5": ("lall", ["methods.lall.power=5"]),
    # RCH (Table 1: prototypes, FN and FP terms; tau and rho)
    "rch": ("rch", []),
    "rch_gt": ("rch", ["methods.rch.prototype_source=gt"]),
    "rch_no_fn": ("rch", ["methods.rch.use_fn=false"]),
    "rch_no_fp": ("rch", ["methods.rch.use_fp=false"]),
    "rch_tau025": ("rch", ["methods.rch.tau=0.25"]),
    "rch_tau1": ("rch", ["methods.rch.tau=1.0"]),
    "rch_rho05": ("rch", ["methods.rch.rho=0.5"]),
    # not a paper claim: does a warm-up (regularizer off for the first half) avoid the collapse?
    "cplus1_warmup": ("cplus1", ["methods.cplus1.warmup=250"]),
    "car_warmup": ("car", ["methods.car.projection=conv1x1", "methods.car.warmup=250"]),
}

OPEN = "test_openset"
#: One row per claim: (paper, claim, paper's number, variant a, variant b, metric, split, direction).
#: The claim is "a is better than b"; direction +1: higher metric is better, -1: lower is.
CLAIMS: List[Tuple[str, str, str, str, str, str, str, int]] = [
    ("C+1", "compact term adds over CE (Table 1)", "gain reported", "cplus1_compact", "ce", "mIoU", "test", +1),
    ("C+1", "background term adds over compact (Table 1)", "gain reported", "cplus1", "cplus1_compact", "mIoU", "test", +1),
    ("C+1", "C+1 (both terms) beats CE", "gain reported", "cplus1", "ce", "mIoU", "test", +1),
    ("C+1", "moving-average centres beat learnable (Table 2)", "77.35 vs 76.68", "cplus1", "cplus1_learnable", "mIoU", "test", +1),
    ("C+1", "moving-average centres beat classifier-shared (Table 2)", "77.35 vs 76.99", "cplus1", "cplus1_classifier", "mIoU", "test", +1),
    ("C+1", "background margin lowers background predicted as a CoI on unseen distractors", "argued, no number",
     "cplus1", "cplus1_compact", "distractor_to_coi", OPEN, -1),
    ("C+1", "C+1 lowers background predicted as a CoI on unseen distractors vs CE", "argued, no number",
     "cplus1", "ce", "distractor_to_coi", OPEN, -1),
    ("CAR", "intra-c2p adds over CE (Table 1)", "gain reported", "car_intra", "ce", "mIoU", "test", +1),
    ("CAR", "inter-c2c adds over intra-c2p (Table 1)", "gain reported", "car_intra_c2c", "car_intra", "mIoU", "test", +1),
    ("CAR", "inter-c2p adds over intra-c2p + inter-c2c (Table 1)", "gain reported", "car", "car_intra_c2c", "mIoU", "test", +1),
    ("CAR", "features after a 1x1 conv beat a 3x3 conv", "gain reported", "car", "car_3x3", "mIoU", "test", +1),
    ("CAR", "class-centre similarity between classes drops (Fig. 4)", "figure", "car", "ce", "centre_similarity", "val", -1),
    ("LALL", "window 5 beats plain CE (Table 2)", "76.1 vs 74.6", "lall", "ce", "mIoU", "test", +1),
    ("LALL", "window 5 beats window 3 (Table 2)", "reported", "lall", "lall_w3", "mIoU", "test", +1),
    ("LALL", "window 5 beats window 7 (Table 2)", "reported", "lall", "lall_w7", "mIoU", "test", +1),
    ("LALL", "Minkowski power 3 beats 1 (Table 1)", "reported", "lall", "lall_p1", "mIoU", "test", +1),
    ("LALL", "Minkowski power 3 beats 2 (Table 1)", "reported", "lall", "lall_p2", "mIoU", "test", +1),
    ("LALL", "Minkowski power 3 beats 5 (Table 1)", "reported", "lall", "lall_p5", "mIoU", "test", +1),
    ("RCH", "RCH beats CE", "gain reported", "rch", "ce", "mIoU", "test", +1),
    ("RCH", "TP prototypes beat ground-truth prototypes (Table 1)", "reported", "rch", "rch_gt", "mIoU", "test", +1),
    ("RCH", "TP prototypes beat learnable prototypes (Table 1)", "reported", "", "", "mIoU", "test", +1),
    ("RCH", "the FN term adds (Table 1)", "reported", "rch", "rch_no_fn", "mIoU", "test", +1),
    ("RCH", "the FP term adds (Table 1)", "reported", "rch", "rch_no_fp", "mIoU", "test", +1),
    ("RCH", "tau 0.5 beats tau 1.0", "tau in [0.25, 0.5] best", "rch", "rch_tau1", "mIoU", "test", +1),
    ("RCH", "tau 0.25 beats tau 1.0", "tau in [0.25, 0.5] best", "rch_tau025", "rch_tau1", "mIoU", "test", +1),
    ("RCH", "rho 0.9 beats rho 0.5", "rho 0.9 best", "rch", "rch_rho05", "mIoU", "test", +1),
    ("C+1", "(pixreg check) C+1 after a 250-step warm-up beats CE", "–", "cplus1_warmup", "ce", "mIoU", "test", +1),
    ("CAR", "(pixreg check) CAR after a 250-step warm-up beats CE", "–", "car_warmup", "ce", "mIoU", "test", +1),
]
NOT_OFFERED = {"TP prototypes beat learnable prototypes (Table 1)":
               "not run: pixreg offers TP (default) and ground-truth prototypes, not learnable ones"}
CAMVID = [("C+1", "cplus1"), ("CAR", "car"), ("LALL", "lall"), ("RCH", "rch")]


def run_dir(out: str, variant: str, seed: int) -> str:
    return os.path.join(out, variant, f"seed{seed}")


def variant_config(variant: str, seed: int, config: Optional[str], overrides: Sequence[str]) -> Dict[str, Any]:
    method, opts = VARIANTS[variant]
    return resolve_config(config, list(overrides) + opts, method=method, seed=seed)


def needed_variants(only: Optional[Sequence[str]] = None) -> List[str]:
    names = []
    for row in CLAIMS:
        for v in row[3:5]:
            if v and v not in names and (not only or v in only):
                names.append(v)
    return names


def train_all(out: str, seeds: Sequence[int], config: Optional[str], overrides: Sequence[str], progress: bool,
              only: Optional[Sequence[str]] = None) -> None:
    from pixreg.train.trainer import train

    jobs = [(s, v) for s in seeds for v in needed_variants(only)]  # seed-major: every variant gets seed 0 first
    for i, (seed, variant) in enumerate(jobs):
        cfg = variant_config(variant, seed, config, overrides)
        d = run_dir(out, variant, seed)
        print(f"[{i + 1}/{len(jobs)}] {variant} seed {seed} -> {d}", flush=True)
        train(cfg, d, resume=True, progress=progress, log=lambda *_: None)
        centre_similarity(d)


def centre_similarity(d: str) -> Optional[float]:
    """Mean cosine similarity between the class centres of the model's features on the
    validation split (off-diagonal mean of the centre cosine matrix); cached in the run."""
    path = os.path.join(d, "centre_similarity.json")
    if os.path.exists(path):
        return json.load(open(path))["mean_offdiag"]
    if not os.path.exists(os.path.join(d, "metrics.json")):
        return None
    import numpy as np

    from pixreg.train.trainer import make_dataset
    from pixreg.viz.extract import extract_split, load_run

    run = load_run(d)
    split = run.cfg["data"]["val_split"]
    res = extract_split(run, make_dataset(run.cfg, split), split=split, feature_capacity=1, logit_capacity=1,
                        progress=False)
    cos = res.stats.centre_cosine()
    off = cos[~np.eye(len(cos), dtype=bool)]
    value = float(np.nanmean(off))
    json.dump({"mean_offdiag": value, "split": "val"}, open(path, "w"))
    return value


def metric_values(out: str, variant: str, seeds: Sequence[int], metric: str, split: str) -> List[Optional[float]]:
    vals: List[Optional[float]] = []
    for s in seeds:
        d = run_dir(out, variant, s)
        mpath = os.path.join(d, "metrics.json")
        if not os.path.exists(mpath):
            vals.append(None)
        elif metric == "centre_similarity":
            vals.append(centre_similarity(d))
        else:
            v = json.load(open(mpath))["splits"].get(split, {}).get(metric)
            vals.append(None if v is None else float(v))
    return vals


def collapsed(out: str, variant: str, seeds: Sequence[int], split: str = "test") -> int:
    """Seeds in which the model predicts (almost) nothing but one class: every other class
    has an IoU below 1 % on ``split``. Such a run says nothing about the finer claims."""
    n = 0
    for s in seeds:
        mpath = os.path.join(run_dir(out, variant, s), "metrics.json")
        if not variant or not os.path.exists(mpath):
            continue
        ious = sorted(json.load(open(mpath))["splits"].get(split, {}).get("per_class_iou", {}).values())
        if len(ious) > 1 and ious[-2] < 1.0:
            n += 1
    return n


#: The smallest gain the papers report (mIoU points): a CamVid interval entirely below it rules out
#: a gain of the papers' size even when it includes 0.
PAPER_GAIN = 0.5


def judge(diff: Dict[str, Any], direction: int, smallest_claimed: Optional[float] = None) -> str:
    """Verdict of a claim from the 95 % interval of its paired difference (``direction`` +1: a
    higher ``a`` supports it). With ``smallest_claimed``, an interval whose upper end (in the
    claimed direction) is below it says that a gain that large is excluded (supported but smaller
    than claimed, or not supported at the claimed size)."""
    if diff["mean"] is None:
        return "not run"
    if diff["lo"] is None:
        return "inconclusive (one seed)"
    lo, hi = (diff["lo"], diff["hi"]) if direction > 0 else (-diff["hi"], -diff["lo"])
    if lo > 0:
        if smallest_claimed is not None and hi < smallest_claimed:
            return f"supported, but smaller than claimed (a gain of {smallest_claimed:g} or more is excluded)"
        return "supported"
    if hi < 0:
        return "not supported (opposite holds)"
    if smallest_claimed is not None and hi < smallest_claimed:
        return f"not supported at the claimed size (a gain of {smallest_claimed:g} or more is excluded)"
    return "inconclusive at this power"


def fmt(v: Optional[float], nd: int = 2) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def scoreboard(out: str, seeds: Sequence[int]) -> List[Dict[str, Any]]:
    rows = []
    for paper, claim, paper_num, a, b, metric, split, direction in CLAIMS:
        row: Dict[str, Any] = dict(paper=paper, claim=claim, paper_number=paper_num, dataset="scenes", a=a, b=b,
                                   metric=metric, split=split, direction=direction)
        if claim in NOT_OFFERED:
            row.update(verdict=NOT_OFFERED[claim], diff=None)
            rows.append(row)
            continue
        va, vb = metric_values(out, a, seeds, metric, split), metric_values(out, b, seeds, metric, split)
        diff = paired_interval(va, vb)
        row.update(values_a=va, values_b=vb, diff=diff, verdict=judge(diff, direction),
                   mean_a=_mean(va), mean_b=_mean(vb))
        bad = {v: collapsed(out, v, seeds) for v in (a, b)}
        row["collapsed"] = bad
        notes = [f"`{v}` predicts one class only in {n}/{len(seeds)} seeds" for v, n in bad.items() if n]
        if notes:
            row["verdict"] += " — degenerate: " + ", ".join(notes)
        rows.append(row)
    return rows + all_camvid_rows()


#: CamVid comparisons the scoreboard reads: (data label, results file stem, protocol words). For one
#: data label the first file that has a method gives its row (the 0.2.0 rerun of C+1 and CAR from
#: scratch before the 0.1.0 table, whose LALL and RCH settings did not change).
CAMVID_RESULTS = (
    ("camvid", "camvid_compare_v020", "FCN-ResNet10 from scratch, 3 seeds, 0.2.0 defaults"),
    ("camvid", "camvid_compare", "FCN-ResNet10 from scratch, 3 seeds"),
    ("camvid (frozen Lite0)", "camvid_frozen", "frozen ImageNet EfficientNet-Lite0 + FPN decoder, 4800 steps (benchmarks/camvid_frozen.sh)"),
)


def all_camvid_rows() -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    for dataset, name, protocol in CAMVID_RESULTS:
        done = {r["a"] for r in rows if r["dataset"] == dataset}
        rows += camvid_rows(os.path.join(ROOT, "benchmarks", "results", f"{name}.json"), dataset, protocol, skip=done)
    return rows


def camvid_rows(path: str, dataset: str, protocol: str, skip: Sequence[str] = ()) -> List[Dict[str, Any]]:
    """The "<regularizer> beats CE on CamVid" rows of one ``pixreg compare`` result file
    (none when the file is absent; none for the methods in ``skip``); a side with single-class
    seeds is flagged."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        summ = json.load(f)
    test = summ["splits"].get("test", {}).get("methods", {})
    rows = []
    for paper, m in CAMVID:
        if m not in test or "ce" not in test or m in skip:
            continue
        d = test[m]["mIoU"]["diff"]
        row = dict(paper=paper, claim=f"{m} beats CE on CamVid", paper_number="gain reported", dataset=dataset,
                   a=m, b="ce", metric="mIoU", split="test", direction=1, diff=d, verdict=judge(d, 1, PAPER_GAIN),
                   mean_a=test[m]["mIoU"]["mean"], mean_b=test["ce"]["mIoU"]["mean"],
                   values_a=test[m]["mIoU"]["values"], values_b=test["ce"]["mIoU"]["values"],
                   protocol=f"{protocol}: {summ.get('command', '')}")
        notes = [f"`{v}` predicts one class only in {len(test[v].get('single_class_seeds') or [])}/{len(summ['seeds'])} seeds"
                 for v in (m, "ce") if test[v].get("single_class_seeds")]
        if notes:
            row["verdict"] += " — degenerate: " + ", ".join(notes)
        rows.append(row)
    return rows


def _mean(v: Sequence[Optional[float]]) -> Optional[float]:
    x = [float(a) for a in v if a is not None]
    return sum(x) / len(x) if x else None


def render(rows: List[Dict[str, Any]], header: str) -> str:
    lines = [header, "",
             "| paper | claim | paper's number | data | a vs b | metric (split) | a | b | Δ (a − b) [95% CI] | detectable | n | verdict |",
             "|---|---|---|---|---|---|---:|---:|---|---:|---:|---|"]
    for r in rows:
        d = r.get("diff") or {}
        ci = "–" if d.get("mean") is None else (f"{d['mean']:+.2f}" if d.get("lo") is None
                                                else f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]")
        mde = detectable_effect(d.get("sd"), d.get("n", 0) or 0) if d else None
        better = "higher" if r["direction"] > 0 else "lower"
        lines.append(f"| {r['paper']} | {r['claim']} | {r['paper_number']} | {r['dataset']} | "
                     f"`{r['a'] or '–'}` vs `{r['b'] or '–'}` | {r['metric']} ({r['split']}, {better} is better) | "
                     f"{fmt(r.get('mean_a'), 3 if r['metric'] == 'centre_similarity' else 2)} | "
                     f"{fmt(r.get('mean_b'), 3 if r['metric'] == 'centre_similarity' else 2)} | {ci} | {fmt(mde)} | "
                     f"{d.get('n', 0) if d else 0} | {r['verdict']} |")
    counts: Dict[str, int] = {}
    for r in rows:
        key = r["verdict"].split(" —")[0].split(" (")[0].split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    degenerate = sum(" — degenerate" in r["verdict"] for r in rows)
    lines += ["", "Verdict counts: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
              + f"; rows with a degenerate side (a model that predicts one class only): {degenerate}", ""]
    return "\n".join(lines)


def refresh_camvid_rows(results: str, markdown: str) -> int:
    """Replace the CamVid rows of the recorded scoreboard (``results`` JSON) by rows computed
    from the CamVid result files now present, and rewrite ``markdown`` with the recorded header."""
    with open(results) as f:
        recorded = json.load(f)
    rows = [r for r in recorded["rows"] if not str(r.get("dataset", "")).startswith("camvid")]
    rows += all_camvid_rows()
    with open(markdown) as f:
        header = f.read().split("\n\n| paper |")[0]
    md = render(rows, header)
    with open(markdown, "w") as f:
        f.write(md)
    recorded["rows"] = rows
    with open(results, "w") as f:
        json.dump(recorded, f, indent=1, default=str)
    print(md)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="YAML config (default: built-in scenes defaults)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "claims"))
    p.add_argument("--report-only", action="store_true", help="do not train; tabulate the finished runs")
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "claims.json"))
    p.add_argument("--markdown", default=os.path.join(ROOT, "benchmarks", "claims.md"))
    p.add_argument("--progress", action="store_true")
    p.add_argument("--only", default=None, help="comma-separated variants to train (default: all of them)")
    p.add_argument("--camvid-only", action="store_true",
                   help="train nothing; only refresh the CamVid rows of the recorded scoreboard from the "
                        "CamVid result files (the scenes rows are kept as recorded)")
    args = p.parse_args(argv)
    if args.camvid_only:
        return refresh_camvid_rows(args.results, args.markdown)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not args.report_only:
        only = [v.strip() for v in args.only.split(",")] if args.only else None
        unknown = sorted(set(only or ()) - set(VARIANTS))
        if unknown:
            p.error(f"--only: unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
        train_all(args.out, seeds, args.config, args.overrides, args.progress, only)
    rows = scoreboard(args.out, seeds)
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--report-only"]
    cmd = "python benchmarks/claims.py " + " ".join(given)  # the command that trains and tabulates
    cpu = cpu_name()
    cfg = variant_config("ce", seeds[0], args.config, args.overrides)
    proto = (f"scenes protocol: {cfg['data']['name']} {cfg['data']['size'][0]}x{cfg['data']['size'][1]}, "
             f"model {cfg['model']['name']} {cfg['model']['opts']}, {cfg['train']['steps']} steps of batch "
             f"{cfg['train']['batch_size']}, {cfg['train']['optimizer']} lr {cfg['train']['lr']}, seeds {seeds}; "
             "metrics of the final model")
    header = (f"# Scoreboard: the papers' claims at CPU scale\n\nCommand: `{cmd}`  \nMachine: {cpu}, "
              f"{os.cpu_count()} cores  \nDate: {datetime.date.today().isoformat()}  \n{proto}.  \n"
              "Verdict: 95% paired t-interval of a − b in the claimed direction above 0 = supported, below 0 = "
              "not supported, else inconclusive at this power (CamVid mIoU rows: 'not supported at the claimed "
              "size' or 'supported, but smaller than claimed' when the interval's upper end lies below +0.5, "
              "the papers' smallest gain); 'detectable' = smallest "
              "difference these seeds detect with 80% power.")
    md = render(rows, header)
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.markdown, "w") as f:
        f.write(md)
    with open(args.results, "w") as f:
        json.dump({"command": cmd, "machine": cpu, "date": datetime.date.today().isoformat(), "protocol": proto,
                   "rows": rows}, f, indent=1, default=str)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
