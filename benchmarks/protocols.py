"""Protocol study for the CamVid benchmark: which training protocol gives the lowest
seed-to-seed noise per CPU second?

    python benchmarks/protocols.py                       # train what is missing, then report
    python benchmarks/protocols.py --report-only         # rebuild the report from finished runs
    python benchmarks/protocols.py --protocols lite0_800 --threads 1

Each protocol trains CE and LALL (the one regularizer with a consistent effect in the
CamVid comparison) over the same paired seeds with ``pixreg compare`` (runs in
``runs/protocols/<protocol>``; finished runs are skipped and interrupted ones resumed),
validating every 100 steps (``val.csv`` of each run: the learning curve). The report gives,
per protocol: seconds per run on this machine, CE test mIoU, the paired LALL - CE
difference with its 95 % interval, the *standard deviation of the paired differences*
(the noise a comparison has to beat), the smallest effect its seeds detect (80 % power),
the seeds a ±1 mIoU effect needs, and how much validation mIoU still rose over the last
quarter of the schedule (a levelled-off curve gains ~0). Written to
``benchmarks/results/protocols.{md,json}`` and ``protocols_curves.png`` with the command,
machine and date.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import subprocess
import sys
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _machine import cpu_name  # noqa: E402
from pixreg.train.stats import mean_std, paired_interval, seeds_needed  # noqa: E402

_SCRATCH = ["model.name=fcn_resnet", "model.opts={width: 16, depth: 10, head_channels: 64}"]
_LITE0 = ["model.name=efficientnet_lite0", "model.opts={head_channels: 64}"]

#: protocol -> (description, overrides). All at 90x120, batch 8, AdamW + poly, 50 warm-up steps.
PROTOCOLS: Dict[str, tuple] = {
    "scratch_800": ("FCN-ResNet10 (width 16) from scratch, 800 steps", _SCRATCH + ["train.steps=800"]),
    "scratch_1600": ("FCN-ResNet10 (width 16) from scratch, 1600 steps", _SCRATCH + ["train.steps=1600"]),
    "lite0_800": ("EfficientNet-Lite0 ImageNet-pretrained (OS 8), 800 steps", _LITE0 + ["train.steps=800"]),
}
COMMON = ["data.size=[90, 120]", "train.eval_every=100", "train.warmup_steps=50", "train.ckpt_every=100"]
METHODS = ("ce", "lall")


def run_protocol(name: str, data_root: str, seeds: int, threads: int) -> None:
    cmd = [sys.executable, "-m", "pixreg", "compare", "--config", "camvid", "--data-root", data_root,
           "--methods", ",".join(METHODS), "--seeds", str(seeds), "--out", f"runs/protocols/{name}",
           "--threads", str(threads), "--no-progress"]
    for o in COMMON + PROTOCOLS[name][1]:
        cmd += ["--set", o]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def _curve(run_dir: str) -> List[tuple]:
    path = os.path.join(run_dir, "val.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [(int(r["step"]), float(r["mIoU"])) for r in csv.DictReader(f)]


def collect(name: str, seeds: int) -> Optional[Dict[str, Any]]:
    base = os.path.join(ROOT, "runs", "protocols", name)
    runs: Dict[str, List[Dict[str, Any]]] = {m: [] for m in METHODS}
    for m in METHODS:
        for s in range(seeds):
            p = os.path.join(base, m, f"seed{s}", "metrics.json")
            if not os.path.exists(p):
                return None
            with open(p) as f:
                metrics = json.load(f)
            metrics["curve"] = _curve(os.path.dirname(p))
            runs[m].append(metrics)
    test = {m: [r["splits"]["test"]["mIoU"] for r in runs[m]] for m in METHODS}
    diff = paired_interval(test["lall"], test["ce"])
    secs = [r["train_time_s"] + r["eval_time_s"] for m in METHODS for r in runs[m]]
    ce_curves = [r["curve"] for r in runs["ce"] if r["curve"]]
    steps = [s for s, _ in ce_curves[0]] if ce_curves else []
    mean_curve = [sum(c[i][1] for c in ce_curves) / len(ce_curves) for i in range(len(steps))] if steps else []
    late_gain = None
    if len(steps) >= 2:  # val mIoU gain over the last quarter of the schedule (mean CE curve)
        i75 = min(range(len(steps)), key=lambda i: abs(steps[i] - 0.75 * steps[-1]))
        late_gain = mean_curve[-1] - mean_curve[i75]
    return {
        "protocol": name, "description": PROTOCOLS[name][0], "overrides": COMMON + PROTOCOLS[name][1],
        "seeds": seeds, "threads": runs["ce"][0]["threads"],
        "seconds_per_run": sum(secs) / len(secs),
        "seconds_per_run_ce": sum(r["train_time_s"] + r["eval_time_s"] for r in runs["ce"]) / seeds,
        "ce_test_mIoU": mean_std(test["ce"]), "lall_test_mIoU": mean_std(test["lall"]),
        "test_mIoU": test, "diff_lall_minus_ce": diff,
        "seeds_for_1pt": seeds_needed(diff["sd"], 1.0) if diff["sd"] is not None else None,
        "cpu_hours_for_1pt": (seeds_needed(diff["sd"], 1.0) * 2 * sum(secs) / len(secs) / 3600
                              if diff["sd"] is not None else None),
        "curve_steps": steps, "curve_ce_val_mIoU": mean_curve,
        "curves": {m: [r["curve"] for r in runs[m]] for m in METHODS},
        "late_gain_val_mIoU": late_gain,
    }


def _f(v: Optional[float], fmt: str = "{:.2f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def report(rows: List[Dict[str, Any]], command: str) -> str:
    cpu = cpu_name()
    import torch

    lines = [
        "# CamVid protocol study: seed-to-seed noise and cost per protocol", "",
        f"Command: `{command}` (`python benchmarks/protocols.py` trains the runs that are missing; "
        "`--report-only` rebuilds this file from the finished runs).", "",
        f"Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}. "
        f"Date: {datetime.date.today().isoformat()}.", "",
        "CamVid (SegNet layout, 11 classes) at 90x120, batch 8, AdamW lr 0.002 + poly, 50 warm-up steps, "
        "augmentation on; evaluated with the final model on the full test split (233 images). "
        "CE and LALL (window 5, power 3) trained with the same seeds (same initial weights and data order), "
        "so their differences are paired. `sd(Δ)`: sample standard deviation of the per-seed LALL - CE "
        "differences, the noise a comparison must beat. `detectable`: smallest true difference these seeds "
        "detect with 80 % power. `late gain`: mean CE validation mIoU at the end minus at 75 % of the schedule "
        "(about 0 when the curve has levelled off). Seconds per run: training + evaluation, "
        "mean over the runs, on the thread count shown, with another job on the second core "
        "most of the time.", "",
        "`CPU h for ±1`: hours of training and evaluation that a paired comparison of two methods "
        "needs to detect a 1-point difference with 80 % power at this protocol's sd(Δ) "
        "(seeds for ±1 x 2 runs x s/run): the cost-aware measure the default is chosen by.", "",
        "| protocol | seeds | s/run | threads | CE test mIoU | LALL test mIoU | Δ LALL-CE [95% CI] | sd(Δ) | "
        "detectable | seeds for ±1 | CPU h for ±1 | late gain |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = r["diff_lall_minus_ce"]
        ci = f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]" if d["lo"] is not None else "n/a"
        lines.append(
            f"| {r['protocol']}: {r['description']} | {r['seeds']} | {r['seconds_per_run']:.0f} | {r['threads']} | "
            f"{_f(r['ce_test_mIoU']['mean'])} ± {_f(r['ce_test_mIoU']['std'])} | "
            f"{_f(r['lall_test_mIoU']['mean'])} ± {_f(r['lall_test_mIoU']['std'])} | {ci} | {_f(d['sd'])} | "
            f"{_f(d['mde'])} | {_f(r['seeds_for_1pt'], '{}')} | {_f(r['cpu_hours_for_1pt'], '{:.1f}')} | "
            f"{_f(r['late_gain_val_mIoU'], '{:+.2f}')} |")
    lines += ["", "Validation mIoU curves (every 100 steps; mean over seeds): `protocols_curves.png`.", ""]
    for r in rows:
        pts = ", ".join(f"{s}: {v:.1f}" for s, v in zip(r["curve_steps"], r["curve_ce_val_mIoU"]))
        lines.append(f"- {r['protocol']} CE: {pts}")
    return "\n".join(lines) + "\n"


def plot(rows: List[Dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(rows):
        for m, style in (("ce", "-"), ("lall", "--")):
            curves = [c for c in r["curves"][m] if c]
            if not curves:
                continue
            steps = [s for s, _ in curves[0]]
            mean = [sum(c[j][1] for c in curves) / len(curves) for j in range(len(steps))]
            ax.plot(steps, mean, style, color=f"C{i}", label=f"{r['protocol']} {m}")
    ax.set_xlabel("training step")
    ax.set_ylabel("val mIoU (%)")
    ax.set_title("CamVid 90x120: validation mIoU during training (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default="../shared/data/camvid")
    p.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma-separated, of " + ", ".join(PROTOCOLS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    names = [n for n in args.protocols.split(",") if n]
    for n in names:
        if n not in PROTOCOLS:
            p.error(f"unknown protocol {n!r}; choose from {', '.join(PROTOCOLS)}")
    if not args.report_only:
        for n in names:
            run_protocol(n, args.data_root, args.seeds, args.threads)
    rows = [r for r in (collect(n, args.seeds) for n in names) if r is not None]
    missing = [n for n in names if n not in {r["protocol"] for r in rows}]
    command = "python benchmarks/protocols.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out, exist_ok=True)
    text = report(rows, command.strip())
    if missing:
        text += f"\nNot run (no finished runs): {', '.join(missing)}\n"
    with open(os.path.join(out, "protocols.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "protocols.json"), "w") as f:
        json.dump({"command": command, "date": datetime.date.today().isoformat(), "protocols": rows}, f, indent=1)
    if rows:
        plot(rows, os.path.join(out, "protocols_curves.png"))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
