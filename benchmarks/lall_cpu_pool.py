"""CPU: LALL's window pooling by box filters vs one multiply-add per offset (issue 20, item 4).

LALL pools, for every centre ``p``, ``sum_q w(p, q) [y_q = y_p] zhat_q`` over the window with
``w = 2^(1 - d8)``. Where the whole window shares the centre's label (or is ignored, zhat = 0
there), ``w = 1*box1 + 0.5*box3 + 0.5*box5`` (window 5; ``1, 0.5, 0.25, 0.25`` for window 7)
turns the pool into box filters of the z-scored logits, separable into shifted row and
column sums; near label boundaries an exact correction subtracts the other labels'
neighbours. The library does this on CPU at stride 1 (:func:`pixreg.losses.lall._box_pool_into`);
the per-offset pooling (:func:`pixreg.losses.lall._pool_into`) is what it did before (and
what runs on CUDA and at strides > 1). This script times, in one run, interleaved:

* one pooling pass of one image (``offsets`` vs ``boxes``, the boundary correction
  included), on the benchmark's segmentation-like labels (16 x 16 blocks of random classes
  with one-pixel ignore lines: about a quarter of the centres see another label within 2
  pixels), and the largest relative difference of the two pools;
* LALL alone, forward + backward, batch ``--batch`` (``_BOX_FILTERS`` off vs on).

Usage: ``python benchmarks/lall_cpu_pool.py [--classes 21,171] [--size 256] [--repeats 5]``
(writes benchmarks/results/lall_cpu_pool.{md,json}).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from _machine import machine  # noqa: E402
from bench_losses import make_labels  # noqa: E402
from pixreg.losses import lall  # noqa: E402


def measure(k: int, size: int, window: int, batch: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, k, size, size, generator=g)
    labels = make_labels(batch, size, k, torch.device("cpu")).to(torch.int16)
    offsets = lall._window_offsets(size, size, window, 1, True, False)
    coefs, _, valid, _ = lall._group_setup(labels[:1], 255, offsets, window // 2, 1, False, x.dtype)
    plan, _, _, _ = lall._box_setup(labels[:1], 255, window, True, False, x.dtype)
    x.masked_fill_((labels[:1] == 255).unsqueeze(1), 0.0)  # zhat is 0 at ignored pixels
    acc, out = torch.empty_like(x), torch.empty_like(x)
    _, step = lall._channel_chunks(x)
    row, col = x.new_empty(1, min(k, step), size, size), x.new_empty(1, min(k, step), size, size)
    pools = {"offsets": lambda: lall._pool_into(acc, x, coefs, offsets),
             "boxes": lambda: lall._box_pool_into(out, x, plan, row, col)}
    for fn in pools.values():
        fn()
    mask = valid.unsqueeze(1)
    err = float(((acc - out) * mask).abs().max() / (acc * mask).abs().max())
    z = torch.randn(batch, k, size, size, generator=g, requires_grad=True)

    def loss(boxes: bool):
        def fn():
            lall._BOX_FILTERS = boxes
            value = lall.locally_adaptive_loss(z, labels.long(), window=window).loss
            torch.autograd.grad(value, z)
        return fn

    losses = {"offsets": loss(False), "boxes": loss(True)}
    try:
        t_pool = interleaved(pools, repeats)
        t_loss = interleaved(losses, max(1, repeats // 2))
    finally:
        lall._BOX_FILTERS = True
    pairs = sum(int(c.numel()) for c, _, _ in plan[1])
    return {"pool_offsets_s": t_pool["offsets"], "pool_boxes_s": t_pool["boxes"],
            "pool_speedup": t_pool["offsets"] / t_pool["boxes"], "pool_max_rel_diff": err,
            "correction_pairs_per_pixel": pairs / size ** 2,
            "loss_offsets_s": t_loss["offsets"], "loss_boxes_s": t_loss["boxes"],
            "loss_speedup": t_loss["offsets"] / t_loss["boxes"]}


def interleaved(fns: dict, repeats: int) -> dict:
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classes", default="21,171")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--windows", default="5,7")
    p.add_argument("--batch", type=int, default=8, help="batch of the loss-alone runs")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(HERE, "results", "lall_cpu_pool"))
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        rows = {f"K={k} window={w}": measure(int(k), args.size, int(w), args.batch, args.repeats)
                for k in args.classes.split(",") for w in args.windows.split(",")}
    finally:
        torch.set_num_threads(threads)
    res = {"command": "python benchmarks/lall_cpu_pool.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine(),
           "torch": torch.__version__, "threads": args.threads, "size": args.size, "rows": rows}
    lines = ["# LALL on CPU: window pooling by box filters vs one multiply-add per offset", "",
             f"Command: `{res['command']}`", "",
             f"Date: {res['date']}. Machine: {res['machine']}. torch {res['torch']}, {args.threads} thread(s). "
             f"{args.size}x{args.size}, labels of bench_losses.py (16 x 16 blocks, ignore lines). Pool: one pass "
             f"over one image (a loss call runs three), median of {args.repeats} interleaved runs; LALL: loss alone, "
             f"forward + backward, batch {args.batch}, median of {max(1, args.repeats // 2)}.", "",
             "| case | pool: offsets ms | pool: boxes ms | speed-up | correction pairs / pixel | max rel. diff | "
             "LALL: offsets s | LALL: boxes s | speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['pool_offsets_s'] * 1e3:.1f} | {r['pool_boxes_s'] * 1e3:.1f} | "
                     f"{r['pool_speedup']:.2f}x | {r['correction_pairs_per_pixel']:.2f} | {r['pool_max_rel_diff']:.1e} | "
                     f"{r['loss_offsets_s']:.2f} | {r['loss_boxes_s']:.2f} | {r['loss_speedup']:.2f}x |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump(res, fh, indent=1)
    with open(args.out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return res


if __name__ == "__main__":
    main()
