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
import math
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _machine import cpu_name  # noqa: E402
from pixreg.train.stats import mean_std, paired_interval, seeds_needed  # noqa: E402

_SCRATCH = ["model.name=fcn_resnet", "model.opts={width: 16, depth: 10, head_channels: 64}"]
_LITE0 = ["model.name=efficientnet_lite0", "model.opts={head_channels: 64}"]
REGULARIZERS = ("cplus1", "car", "lall", "rch")


class Protocol(NamedTuple):
    description: str
    config: str  # built-in configuration (pixreg/configs) or path
    overrides: List[str]
    methods: Tuple[str, ...]
    seeds: int


#: All at 90x120, batch 8, AdamW + poly, 50 warm-up steps (COMMON).
PROTOCOLS: Dict[str, Protocol] = {
    "scratch_800": Protocol("FCN-ResNet10 (width 16) from scratch, 800 steps", "camvid",
                            _SCRATCH + ["train.steps=800"], ("ce", "lall"), 3),
    "scratch_1600": Protocol("FCN-ResNet10 (width 16) from scratch, 1600 steps", "camvid",
                             _SCRATCH + ["train.steps=1600"], ("ce", "lall"), 3),
    "lite0_800": Protocol("EfficientNet-Lite0 ImageNet-pretrained, fine-tuned (OS 8), 800 steps", "camvid",
                          _LITE0 + ["train.steps=800"], ("ce", "lall"), 3),
    # the schedule of the first frozen verdicts (benchmarks/results/camvid_frozen_600.md, the losses'
    # settings before issue 13), rerun with CE and LALL (whose settings did not change) for the curves
    "frozen_600": Protocol("EfficientNet-Lite0 ImageNet-pretrained, frozen: cached stride-8/16/32 features "
                           "(6 views), FPN decoder width 64, 600 steps", "camvid_frozen",
                           ["data.cache_dir=runs/cache", "train.steps=600"], ("ce", "lall"), 8),
    "frozen_2400": Protocol("EfficientNet-Lite0 ImageNet-pretrained, frozen: cached stride-8/16/32 features "
                            "(6 views), FPN decoder width 64, 2400 steps", "camvid_frozen",
                            ["data.cache_dir=runs/cache", "train.steps=2400"], ("ce",) + REGULARIZERS, 8),
    # doubling 2400 added +0.97 [+0.44, +1.51] test mIoU to CE (8 seeds): the verdicts use 4800 (camvid_frozen.sh)
    "frozen_4800": Protocol("EfficientNet-Lite0 ImageNet-pretrained, frozen: cached stride-8/16/32 features "
                            "(6 views), FPN decoder width 64, 4800 steps", "camvid_frozen",
                            ["data.cache_dir=runs/cache", "train.steps=4800"], ("ce",) + REGULARIZERS, 8),
}
COMMON = ["data.size=[90, 120]", "train.eval_every=100", "train.warmup_steps=50", "train.ckpt_every=100"]
#: Effects the cost columns are computed for (mIoU points).
EFFECTS = (1.0, 0.5)


def compare_command(name: str, data_root: str, seeds: int, threads: int, jobs: int = 1) -> List[str]:
    p = PROTOCOLS[name]
    cmd = [sys.executable, "-m", "pixreg", "compare", "--config", p.config, "--data-root", data_root,
           "--methods", ",".join(p.methods), "--seeds", str(seeds), "--out", f"runs/protocols/{name}",
           "--threads", str(threads * jobs), "--jobs", str(jobs), "--no-progress"]
    for o in COMMON + p.overrides:
        cmd += ["--set", o]
    return cmd


def run_protocol(name: str, data_root: str, seeds: int, threads: int, jobs: int = 1) -> None:
    cmd = compare_command(name, data_root, seeds, threads, jobs)
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def measure_cpu(name: str, data_root: str) -> Dict[str, Any]:
    """CPU seconds (user + system, 1 thread) of one CE and one LALL run of ``name`` (seed 100, in
    ``runs/protocols/<name>_cpu``) and, for a cached-feature protocol, of building its caches
    from scratch: the cost on an idle core, whatever the machine's load."""
    import resource

    def cpu_of(cmd: List[str]) -> float:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 1)

    p = PROTOCOLS[name]
    out = f"runs/protocols/{name}_cpu"
    sets = [a for o in COMMON + p.overrides for a in ("--set", o)]
    result: Dict[str, Any] = {"protocol": name, "threads": 1}
    if p.config.endswith("frozen"):
        sets += ["--set", f"data.cache_dir={out}/cache"]
        result["cache_build_cpu_s"] = cpu_of([sys.executable, "-c", (
            "import sys, torch; torch.set_num_threads(1); from pixreg.train.config import resolve_config; "
            "from pixreg.train.features import prepare_feature_caches; "
            "prepare_feature_caches(resolve_config(sys.argv[1], sys.argv[2:]), progress=False)"),
            p.config, f"data.root={data_root}"] + sets[1::2])
    for method in ("ce", "lall"):
        result[f"{method}_run_cpu_s"] = cpu_of([sys.executable, "-m", "pixreg", "train", "--config", p.config,
                                                "--data-root", data_root, "--method", method, "--seed", "100",
                                                "--threads", "1", "--out", f"{out}/{method}", "--overwrite",
                                                "--no-progress"] + sets)
    os.makedirs(os.path.join(ROOT, "runs", "protocols", name), exist_ok=True)
    with open(os.path.join(ROOT, "runs", "protocols", name, "cpu_time.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def _curve(run_dir: str) -> List[tuple]:
    path = os.path.join(run_dir, "val.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [(int(r["step"]), float(r["mIoU"])) for r in csv.DictReader(f)]


def _median_pull(run_dirs: List[str]) -> Dict[str, float]:
    """Median over ``run_dirs`` of the gradient-balance measurements ``ratio/<term>`` in their
    ``log.csv`` (a term's gradient norm over CE's, at the features; at the logits for LALL;
    docs/balance.md)."""
    from pixreg.viz.diagnose import read_curves  # the one log.csv reader (NaN where not measured)

    merged: Dict[str, List[float]] = {}
    for d in run_dirs:
        for key, values in read_curves(d).items():
            if key.startswith("ratio/"):
                merged.setdefault(key[len("ratio/"):], []).extend(float(v) for v in values if not math.isnan(v))
    return {t: sorted(v)[len(v) // 2] for t, v in merged.items() if v}


def _mean_curve(curves: List[List[tuple]]) -> Tuple[List[int], List[float]]:
    curves = [c for c in curves if c]
    if not curves:
        return [], []
    steps = [s for s, _ in curves[0]]
    return steps, [sum(c[i][1] for c in curves) / len(curves) for i in range(len(steps))]


def _late_gain(steps: List[int], values: List[float]) -> Optional[float]:
    """Val mIoU gain over the last quarter of the schedule (end minus the point nearest 75 %)."""
    if len(steps) < 2:
        return None
    i75 = min(range(len(steps)), key=lambda i: abs(steps[i] - 0.75 * steps[-1]))
    return values[-1] - values[i75]


def collect(name: str, seeds: Optional[int] = None) -> Optional[Dict[str, Any]]:
    p = PROTOCOLS[name]
    seeds = p.seeds if seeds is None else seeds
    base = os.path.join(ROOT, "runs", "protocols", name)
    runs: Dict[str, List[Dict[str, Any]]] = {m: [] for m in p.methods}
    # the seeds finished for every method (a protocol still running is summarised on those)
    done = [s for s in range(seeds)
            if all(os.path.exists(os.path.join(base, m, f"seed{s}", "metrics.json")) for m in p.methods)]
    if len(done) < 2:
        return None
    seeds = len(done)
    for m in p.methods:
        for s in done:
            path = os.path.join(base, m, f"seed{s}", "metrics.json")
            with open(path) as f:
                metrics = json.load(f)
            metrics["curve"] = _curve(os.path.dirname(path))
            runs[m].append(metrics)
    test = {m: [r["splits"]["test"]["mIoU"] for r in runs[m]] for m in p.methods}
    regs = [m for m in p.methods if m != "ce"]
    diffs = {m: paired_interval(test[m], test["ce"]) for m in regs}
    sds = [d["sd"] for d in diffs.values() if d["sd"] is not None]
    pooled = math.sqrt(sum(v * v for v in sds) / len(sds)) if sds else None  # RMS of the regularizers' sd(Δ)
    secs = [r["train_time_s"] + r["eval_time_s"] for m in p.methods for r in runs[m]]
    s_run = sum(secs) / len(secs)
    steps, mean_curve = _mean_curve([r["curve"] for r in runs["ce"]])
    cpu = None
    cpu_path = os.path.join(base, "cpu_time.json")
    if os.path.exists(cpu_path):
        with open(cpu_path) as f:
            cpu = json.load(f)
    row = {
        "protocol": name, "description": p.description, "config": p.config, "overrides": COMMON + p.overrides,
        "methods": list(p.methods), "seeds": seeds, "seed_list": done, "threads": runs["ce"][0]["threads"],
        "seconds_per_run": s_run,
        "seconds_per_run_ce": sum(r["train_time_s"] + r["eval_time_s"] for r in runs["ce"]) / seeds,
        "cpu_time": cpu,
        "ce_test_mIoU": mean_std(test["ce"]), "test_mIoU": test,
        "test_mIoU_summary": {m: mean_std(test[m]) for m in p.methods},
        "diffs": diffs, "pooled_sd": pooled,
        "curve_steps": steps, "curve_ce_val_mIoU": mean_curve,
        "curves": {m: [r["curve"] for r in runs[m]] for m in p.methods},
        "late_gain_val_mIoU": _late_gain(steps, mean_curve),
        "late_gain_by_method": {m: _late_gain(*_mean_curve([r["curve"] for r in runs[m]])) for m in p.methods},
        "median_pull": {m: _median_pull([os.path.join(base, m, f"seed{s}") for s in done]) for m in regs},
    }
    if "lall" in diffs:  # the regularizer every protocol ran
        row["lall_test_mIoU"] = mean_std(test["lall"])
        row["diff_lall_minus_ce"] = diffs["lall"]
    for eff in EFFECTS:
        n = seeds_needed(pooled, eff) if pooled is not None else None
        key = "1pt" if eff == 1.0 else f"{eff:g}pt".replace(".", "")
        row[f"seeds_for_{key}"] = n
        row[f"cpu_hours_for_{key}"] = n * 2 * s_run / 3600 if n is not None else None
        run_cpu = (cpu["ce_run_cpu_s"] + cpu["lall_run_cpu_s"]) / 2 if cpu else None
        row[f"idle_cpu_hours_for_{key}"] = n * 2 * run_cpu / 3600 if (n is not None and run_cpu) else None
    return row


def _previous_rows() -> Dict[str, Dict[str, Any]]:
    """Rows of the committed ``benchmarks/results/protocols.json`` (older rows, which only had
    LALL, get the fields :func:`collect` now adds), marked ``from_committed_results``."""
    path = os.path.join(ROOT, "benchmarks", "results", "protocols.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = json.load(f).get("protocols", [])
    out = {}
    for r in rows:
        r = dict(r, from_committed_results=True)
        if "diffs" not in r and "diff_lall_minus_ce" in r:
            sd = r["diff_lall_minus_ce"]["sd"]
            r["diffs"], r["pooled_sd"] = {"lall": r["diff_lall_minus_ce"]}, sd
            r["seeds_for_05pt"] = seeds_needed(sd, 0.5) if sd is not None else None
            r["seeds_for_1pt"] = seeds_needed(sd, 1.0) if sd is not None else None
            r.setdefault("cpu_time", None)
        out[r["protocol"]] = r
    return out


def _f(v: Optional[float], fmt: str = "{:.2f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def report(rows: List[Dict[str, Any]], command: str) -> str:
    cpu = cpu_name()
    import torch

    lines = [
        "# CamVid protocol study: seed-to-seed noise and cost per protocol", "",
        f"Command: `{command}` (`python benchmarks/protocols.py` trains the runs that are missing; "
        "`--report-only` rebuilds this file from the finished runs; `--measure-cpu NAME` measures CPU seconds).", "",
        f"Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}. "
        f"Date: {datetime.date.today().isoformat()}.", "",
        "CamVid (SegNet layout, 11 classes) at 90x120, batch 8, AdamW lr 0.002 + poly, 50 warm-up steps; "
        "evaluated with the final model on the full test split (233 images). Every method of a seed starts from "
        "the same weights and sees the same data in the same order, so the differences to CE are paired. "
        "`sd(Δ)`: sample standard deviation of the per-seed regularizer - CE differences, the noise a comparison "
        "must beat (per regularizer, and `pooled`: the root mean square over the regularizers run). "
        "`detectable`: smallest true difference these seeds detect with 80 % power. `late gain`: mean CE "
        "validation mIoU at the end minus at 75 % of the schedule (about 0 when the curve has levelled off).", "",
        "Cost: `s/run` is the measured wall time per run (training + evaluation, mean over the runs, 1 thread); "
        "the scratch and fine-tuned runs had a core to themselves most of the time, the frozen-encoder runs "
        "were two one-thread processes on the 2 cores with little else running: wall ≈ CPU time. "
        "`CPU s/run` is measured on its own (user + system time of one CE and one LALL "
        "run, their mean; `--measure-cpu`), where available; for the others CPU time ≈ wall time. "
        "`seeds for ±x`: seeds a paired comparison needs to detect an x-point difference with 80 % power at the "
        "pooled sd(Δ); `CPU h for ±x`: those seeds x 2 runs x the per-run cost (CPU s/run where measured, else s/run).", "",
        "| protocol | seeds | s/run | CPU s/run | CE test mIoU | Δ vs CE [95% CI], sd(Δ) | pooled sd(Δ) | "
        "seeds for ±1 | seeds for ±0.5 | CPU h for ±1 | CPU h for ±0.5 | late gain (CE) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for m, d in r["diffs"].items():
            ci = f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]" if d["lo"] is not None else "n/a"
            cells.append(f"{m} {ci}, {_f(d['sd'])}")
        cpu_s = None
        if r.get("cpu_time"):
            cpu_s = (r["cpu_time"]["ce_run_cpu_s"] + r["cpu_time"]["lall_run_cpu_s"]) / 2
        per_run = cpu_s if cpu_s is not None else r["seconds_per_run"]
        hours = {k: (r[f"seeds_for_{k}"] * 2 * per_run / 3600 if r[f"seeds_for_{k}"] is not None else None)
                 for k in ("1pt", "05pt")}
        lines.append(
            f"| {r['protocol']}: {r['description']} | {r['seeds']} | {r['seconds_per_run']:.0f} | "
            f"{_f(cpu_s, '{:.0f}')} | {_f(r['ce_test_mIoU']['mean'])} ± {_f(r['ce_test_mIoU']['std'])} | "
            f"{'<br>'.join(cells)} | {_f(r['pooled_sd'])} | {_f(r['seeds_for_1pt'], '{}')} | "
            f"{_f(r['seeds_for_05pt'], '{}')} | {_f(hours['1pt'], '{:.2f}')} | {_f(hours['05pt'], '{:.2f}')} | "
            f"{_f(r['late_gain_val_mIoU'], '{:+.2f}')} |")
    lines += ["", "Validation mIoU curves (every 100 steps; mean over seeds): `protocols_curves.png`.", ""]
    for r in rows:
        pts = ", ".join(f"{s}: {v:.1f}" for s, v in zip(r["curve_steps"], r["curve_ce_val_mIoU"]))
        lines.append(f"- {r['protocol']} CE: {pts}")
        gains = r.get("late_gain_by_method") or {}
        if len(gains) > 1:
            lines.append("  late gain per method: " + ", ".join(f"{m} {_f(g, '{:+.2f}')}" for m, g in gains.items()))
        pulls = {m: p for m, p in (r.get("median_pull") or {}).items() if p}
        if pulls:
            lines.append("  gradient pull (median `ratio/<term>`: the term's gradient norm over CE's at the features, "
                         "at the logits for LALL): " + ", ".join(
                             f"{m} " + "/".join(f"{v:.3g}" for v in p.values()) for m, p in pulls.items()))
        if r.get("cpu_time", {}) and r["cpu_time"].get("cache_build_cpu_s") is not None:
            lines.append(f"  one-time feature-cache build (train 6 views, val, test): "
                         f"{r['cpu_time']['cache_build_cpu_s']:.0f} CPU s, shared by every run")
    return "\n".join(lines) + "\n"


def plot(rows: List[Dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(rows):
        for m, style in (("ce", "-"), ("lall", "--")):
            steps, mean = _mean_curve(r["curves"].get(m, []))
            if steps:
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
    p.add_argument("--data-root", default=os.environ.get("PIXREG_CAMVID"),
                   help="CamVid in the SegNet layout (default: $PIXREG_CAMVID)")
    p.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma-separated, of " + ", ".join(PROTOCOLS))
    p.add_argument("--seeds", type=int, default=None, help="seeds per protocol (default: the protocol's own)")
    p.add_argument("--threads", type=int, default=1, help="threads per run")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (pixreg compare --jobs)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--measure-cpu", action="store_true", help="measure the CPU seconds of one CE and one LALL run per protocol")
    args = p.parse_args(argv)
    names = [n for n in args.protocols.split(",") if n]
    for n in names:
        if n not in PROTOCOLS:
            p.error(f"unknown protocol {n!r}; choose from {', '.join(PROTOCOLS)}")
    if (args.measure_cpu or not args.report_only) and not args.data_root:
        p.error("--data-root /path/to/CamVid (SegNet layout) is required, or set PIXREG_CAMVID")
    if args.measure_cpu:
        for n in names:
            print(measure_cpu(n, args.data_root))
    elif not args.report_only:
        for n in names:
            run_protocol(n, args.data_root, args.seeds or PROTOCOLS[n].seeds, args.threads, args.jobs)
    previous = _previous_rows()
    rows = []
    for n in names:
        r = collect(n, args.seeds)
        if r is None and n in previous:  # runs not on this machine: the committed numbers
            r = previous[n]
        if r is not None:
            rows.append(r)
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
