"""Acceptance run of issue 13: every method with the shipped defaults, paired seeds, on scenes.

    python benchmarks/acceptance.py                      # train what is missing (pixreg compare), then report
    python benchmarks/acceptance.py --report-only        # rebuild the report from finished runs
    python benchmarks/acceptance.py --methods lall,rch   # train a subset (e.g. in a second process)

Criteria (issue 13): no method predicts a single class in any seed (the final model: every
class but one below 1 % IoU on a split; collapse-guard events are listed too), and every
method's mean paired difference to CE is above -1.0 mIoU (test split). The report goes to
``benchmarks/results/acceptance_scenes.{md,json}`` with the command, machine and date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _machine import cpu_name  # noqa: E402
from pixreg.train.compare import render_markdown, summarize  # noqa: E402

ALL = ["ce", "cplus1", "car", "lall", "rch"]
THRESHOLD = -1.0


def check(summary: dict, split: str = "test") -> dict:
    """The two acceptance criteria on ``summary`` (:func:`pixreg.train.compare.summarize`)."""
    methods = summary["splits"][split]["methods"]
    deltas = {m: e["mIoU"]["diff"]["mean"] for m, e in methods.items() if "diff" in e["mIoU"]}
    single = {m: [s for s, r in per_seed.items() if any(x.startswith("predicts one class") for x in r)]
              for m, per_seed in (summary.get("flags") or {}).items()}
    single = {m: v for m, v in single.items() if v}
    return {
        "single_class_final_model": single,
        "guard_flags": summary.get("flags", {}),
        "no_single_class": not single,
        "delta_miou": deltas,
        "all_above_threshold": all(d is not None and d > THRESHOLD for d in deltas.values()),
        "threshold": THRESHOLD,
    }


def report(out: str, methods, seeds, command: str) -> dict:
    runs = {m: {s: json.load(open(os.path.join(out, m, f"seed{s}", "metrics.json"))) for s in seeds} for m in methods}
    summary = summarize(runs, list(seeds), list(methods))
    verdict = check(summary)
    summary["acceptance"] = verdict
    date = datetime.date.today().isoformat()
    head = (f"Command: `{command}`\n\nMachine: {cpu_name()}, {os.cpu_count()} cores (shared with other jobs), "
            f"Python {platform.python_version()}\n\nDate: {date}\n\n")
    lines = ["## Acceptance (issue 13)", "",
             f"- no method predicts a single class in any seed: **{'yes' if verdict['no_single_class'] else 'no'}**"
             + ("" if verdict["no_single_class"] else f" ({verdict['single_class_final_model']})")
             + " (final models: no class but one below 1 % IoU on any split)",
             f"- every method's mean Δ mIoU vs CE (test) above {THRESHOLD}: "
             f"**{'yes' if verdict['all_above_threshold'] else 'no'}** ("
             + ", ".join(f"{m} {d:+.2f}" for m, d in verdict["delta_miou"].items()) + ")", ""]
    res = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(res, exist_ok=True)
    with open(os.path.join(res, "acceptance_scenes.md"), "w") as f:
        f.write(head + "\n".join(lines) + "\n" + render_markdown(summary) + "\n")
    summary.update(command=command, machine=cpu_name(), date=date)
    with open(os.path.join(res, "acceptance_scenes.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    print("\n".join(lines))
    return verdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/accept_scenes")
    ap.add_argument("--methods", default=",".join(ALL), help="methods to train (the report always uses all five)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    seeds = list(range(args.seeds))
    command = f"pixreg compare --config scenes --methods {','.join(ALL)} --seeds {args.seeds} --threads {args.threads} --out {args.out}"
    if not args.report_only:
        from pixreg.train.compare import compare

        compare(None, args.methods.split(","), seeds, args.out, threads=args.threads, progress=False)
    report(args.out, ALL, seeds, command)


if __name__ == "__main__":
    main()
