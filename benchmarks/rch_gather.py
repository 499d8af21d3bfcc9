"""RCH: FN/FP set vectors formed on the set table before the gather (issue 20, item 2).

The FN/FP calibration of an anchor ``i`` is ``m_i = ê_i . t_{S(i)}`` where ``t_S`` is the mean
of the unit vectors of set ``S`` (``calibration="mean_of_cosines"``) or the unit vector of
its sum (``"cosine_to_mean"``). The library forms ``t_S`` on the ``(K+1, E)`` table of set
sums, then gathers it to the ``N`` pixels; before this change the sums were gathered to
``(N, E)`` first and divided / normalised there (an ``(N, E)`` temporary per set kind,
kept for backward). This script times both orders of the loss alone (forward + backward)
in one run, interleaved, and records the peak memory and the largest difference of values
and gradients.

Usage: ``python benchmarks/rch_gather.py`` (B=8, K=19, E=96, 64x64 embeddings; writes
benchmarks/results/rch_gather.{md,json}).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from _machine import machine, write_results  # noqa: E402
from bench_losses import make_labels, peak_bytes  # noqa: E402
from pixreg.losses import rch  # noqa: E402


def gather_first_calibration(emb, emb_hat, members, prep, sets, calibration, sign):
    """The previous order: set sums gathered to ``(N, E)``, then divided / normalised per pixel."""
    if calibration == "mean_of_cosines":
        sums, counts, row = rch._set_table(emb_hat, members, prep, sets)
        s, c = sums[row], counts[row]
        m = (emb_hat * s).sum(1) / c.clamp(min=1)
    else:
        sums, counts, row = rch._set_table(emb, members, prep, sets)
        s, c = sums[row], counts[row]
        m = (emb_hat * F.normalize(s, dim=1, eps=rch._NORM_EPS)).sum(1)
    return torch.where(c > 0, 1.0 + sign * m, torch.zeros_like(m))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(HERE, "results", "rch_gather"))
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    library = rch._calibration
    g = torch.Generator().manual_seed(0)
    k, dev = args.classes, torch.device("cpu")
    emb = torch.randn(args.batch, args.dim, args.size, args.size, generator=g, requires_grad=True)
    logits = torch.randn(args.batch, k, args.size, args.size, generator=g)
    labels = make_labels(args.batch, args.size, k, dev)
    protos = torch.randn(k, args.dim, generator=g)
    rows = {}
    try:
        for calibration in ("mean_of_cosines", "cosine_to_mean"):
            variants = {"table first (library)": library, "gather first (before)": gather_first_calibration}
            results = {}

            def run(fn, keep=results, calibration=calibration):
                rch._calibration = fn
                loss = rch.rch_loss(emb, logits, labels, protos, calibration=calibration).loss
                (grad,) = torch.autograd.grad(loss, emb)
                keep[fn] = (loss.detach(), grad)

            times = {name: [] for name in variants}
            for _ in range(args.repeats + 1):
                for name, fn in variants.items():
                    t0 = time.perf_counter()
                    run(fn)
                    times[name].append(time.perf_counter() - t0)
            peaks = {name: peak_bytes(lambda fn=fn: run(fn), dev) for name, fn in variants.items()}
            (l0, g0), (l1, g1) = results[library], results[gather_first_calibration]
            rows[calibration] = {
                name: {"median_s": statistics.median(times[name][1:]), "peak_bytes": peaks[name]} for name in variants}
            rows[calibration]["value_diff"] = float((l0 - l1).abs())
            rows[calibration]["grad_max_diff"] = float((g0 - g1).abs().max())
    finally:
        rch._calibration = library
        torch.set_num_threads(threads)
    res = {"command": "python benchmarks/rch_gather.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine(),
           "torch": torch.__version__, "threads": args.threads, "config": vars(args) | {"out": None}, "rows": rows}
    lines = ["# RCH: set vectors normalised before the gather", "", f"Command: `{res['command']}`", "",
             f"Date: {res['date']}. Machine: {res['machine']}. torch {res['torch']}, {args.threads} thread(s). "
             f"Loss alone (forward + backward), B={args.batch}, K={k}, E={args.dim}, {args.size}x{args.size} "
             f"embeddings; median of {args.repeats} interleaved runs; peak = high-water mark of live bytes "
             "(torch.profiler) during one call.", "",
             "| calibration | order | ms | peak MiB | |value diff| | max |grad diff| |", "|---|---|---|---|---|---|"]
    for calibration, r in rows.items():
        for name in ("gather first (before)", "table first (library)"):
            lines.append(f"| {calibration} | {name} | {r[name]['median_s'] * 1e3:.0f} | "
                         f"{r[name]['peak_bytes'] / 2**20:.0f} | {r['value_diff']:.1e} | {r['grad_max_diff']:.1e} |")
    write_results(args.out, res, lines)
    return res


if __name__ == "__main__":
    main()
