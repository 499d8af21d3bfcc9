"""Cost of measuring the gradient balance (pixreg.balance) in a training step.

    python benchmarks/bench_balance.py                  # writes benchmarks/results/balance_cost.{md,json}
    python benchmarks/bench_balance.py --repeats 30 --threads 1

For each method, a full training step (forward, criterion, backward, AdamW step) of the
scenes model (``fcn_resnet`` width 16, depth 10, head 64; batch 8 of 96x96) is timed
without measuring (``balance_every=0``) and with a measurement in every step
(``balance_every=1``), interleaved, median of ``--repeats``. The measured step's extra
time divided by ``train.balance_every`` (50 by default) is the average cost.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _machine import cpu_name  # noqa: E402
from pixreg.criterion import RegularizedModel  # noqa: E402
from pixreg.models import build_model  # noqa: E402
from pixreg.train.methods import build_criterion  # noqa: E402

METHODS = ["cplus1", "car", "lall", "rch"]


def step_time(wrapped, opt, x, y, every: int) -> float:
    wrapped.criterion.balance_every = every
    wrapped.criterion.step.zero_()  # step 0: measured when every > 0
    t = time.perf_counter()
    out = wrapped.loss(wrapped(x), y)
    opt.zero_grad(set_to_none=True)
    out.total.backward()
    opt.step()
    return time.perf_counter() - t


def bench(method: str, repeats: int, every_default: int) -> dict:
    torch.manual_seed(0)
    model = build_model("fcn_resnet", 6, width=16, depth=10, head_channels=64)
    crit, layers = build_criterion(method, model, num_classes=6, background_index=0)
    wrapped = RegularizedModel(model, crit, layers)
    opt = torch.optim.AdamW(list(model.parameters()) + list(crit.parameters()), lr=1e-4)
    x, y = torch.randn(8, 3, 96, 96), torch.randint(0, 6, (8, 96, 96))
    for _ in range(3):
        step_time(wrapped, opt, x, y, 0)
        step_time(wrapped, opt, x, y, 1)
    plain, measured = [], []
    for _ in range(repeats):
        plain.append(step_time(wrapped, opt, x, y, 0))
        measured.append(step_time(wrapped, opt, x, y, 1))
    p, m = statistics.median(plain), statistics.median(measured)
    return {"method": method, "step_ms": 1e3 * p, "measured_step_ms": 1e3 * m, "extra_pct": 100 * (m - p) / p,
            "amortised_pct": 100 * (m - p) / p / every_default}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--every", type=int, default=50, help="train.balance_every for the amortised column")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [bench(m, args.repeats, args.every) for m in METHODS]
    cmd = "python benchmarks/bench_balance.py " + " ".join(sys.argv[1:])
    head = (f"Command: `{cmd.strip()}`\n\nMachine: {cpu_name()}, {os.cpu_count()} cores, {args.threads} thread(s), "
            f"torch {torch.__version__}, Python {platform.python_version()} (shared machine: other jobs ran)\n\n"
            f"Date: {datetime.date.today().isoformat()}\n\n")
    lines = [head, "Training step of the scenes model (batch 8, 96x96), median of "
             f"{args.repeats} interleaved repeats; a measured step runs one extra partial backward per term "
             "(losses -> hooked features) and one for CE.", "",
             f"| method | step (ms) | measured step (ms) | extra on a measured step | average at balance_every={args.every} |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['step_ms']:.1f} | {r['measured_step_ms']:.1f} | "
                     f"{r['extra_pct']:+.1f}% | {r['amortised_pct']:+.2f}% |")
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "results", "balance_cost.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(ROOT, "benchmarks", "results", "balance_cost.json"), "w") as f:
        json.dump({"command": cmd.strip(), "machine": cpu_name(), "threads": args.threads,
                   "date": datetime.date.today().isoformat(), "rows": rows}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
