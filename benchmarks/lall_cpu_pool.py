"""CPU: LALL's window pooling by box filters vs one multiply-add per offset (issue 20, item 4).

LALL pools, for every centre ``p``, ``sum_q w(p, q) [y_q = y_p] zhat_q`` over the window with
``w = 2^(1 - d8)``. Where the whole window shares the centre's label (or is ignored, zhat = 0
there), ``w = 1*box1 + 0.5*box3 + 0.5*box5`` (window 5; ``1, 0.5, 0.25, 0.25`` for window 7)
turns the pool into box filters of the z-scored logits, separable into shifted row and
column sums; near label boundaries an exact correction subtracts the other labels'
neighbours (:func:`box_setup`, :func:`box_pool_into` below: exact, tested against the library
in tests/test_benchmarks.py). This script times one pooling pass of one image, interleaved in
one run, against the library's per-offset pooling (:func:`pixreg.losses.lall._pool_into`), on
the benchmark's segmentation-like labels (16 x 16 blocks of random classes with one-pixel
ignore lines: about a quarter of the centres see another label within 2 pixels).

Measured (benchmarks/results/lall_cpu_pool.md): the box filters alone are about 2x faster than
the per-offset pooling, but the boundary correction (a gather and a scatter per window offset
over the affected centres) costs more than that gain, so the library keeps the per-offset
pooling. (With this path in the library, commit 2539dd5, LALL alone was 0.23-0.54x as fast.)

Usage: ``python benchmarks/lall_cpu_pool.py [--classes 21,171] [--size 256] [--repeats 5]``
(writes benchmarks/results/lall_cpu_pool.{md,json}).
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
from bench_losses import make_labels  # noqa: E402
from pixreg.losses import lall  # noqa: E402


def box_setup(labels: torch.Tensor, ignore_index: int, window: int, exponential: bool, xi_weight_sum: bool,
               dtype: torch.dtype):
    """Set-up of the box-filter decomposition of the pool of one image ``labels (1, H, W)``
    (stride 1; see :func:`box_pool_into`): ``(plan, xi, valid, target)`` with ``xi``,
    ``valid``, ``target`` as :func:`pixreg.losses.lall._group_setup`'s and ``plan = (coefs, pairs)``:

    * ``coefs[r]``: the weight of the ``(2r+1) x (2r+1)`` box sum: ``w_r - w_{r+1}``
      (``w_r = 2^(1-r)`` or 1), ``w_R`` for the whole window: ``2^(1 - d8) = 1*box1 +
      0.5*box3 + 0.5*box5`` at window 5;
    * ``pairs``: per window offset ``(di, dj)``, the flat indices of the valid centres whose
      neighbour at that offset is valid with another label, those neighbours' flat indices,
      and the offset's weight: what the box sums wrongly include (ignored neighbours are 0
      in what is pooled, and neighbours outside the image are the boxes' zero padding).
    """
    _, h, w = labels.shape
    radius = window // 2
    weights = [2.0 ** (1 - r) if exponential else 1.0 for r in range(radius + 1)]
    coefs = [weights[r] - weights[r + 1] for r in range(radius)] + [weights[radius]]
    valid = labels != ignore_index
    padded = F.pad(labels, (radius,) * 4, value=ignore_index)
    xi = torch.zeros(labels.shape, dtype=dtype)
    pairs = []
    for di in range(-radius, radius + 1):
        for dj in range(-radius, radius + 1):
            wt = weights[max(abs(di), abs(dj))]
            nb = padded[:, radius + di:radius + di + h, radius + dj:radius + dj + w]
            xi.add_(((nb == labels) & valid).to(dtype), alpha=wt if xi_weight_sum else 1.0)
            other = valid & (nb != labels) & (nb != ignore_index)
            centres = other.view(-1).nonzero()[:, 0]  # CPU only: the host copy costs nothing
            if centres.numel():
                pairs.append((centres, centres + (di * w + dj), wt))
    xi = torch.where(xi > 0, xi, torch.ones_like(xi))
    target = torch.where(valid, labels, torch.zeros_like(labels)).long()
    return (coefs, pairs), xi, valid, target


def box_pool_into(out: torch.Tensor, x: torch.Tensor, plan, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """The pool of :func:`pixreg.losses.lall._pool_into` for one image ``x (1, K, H, W)`` at stride 1, by box
    filters: ``out = sum_r coefs[r] * box_(2r+1)(x)`` (separable shifted row and column sums,
    zero outside the image, a cache-sized chunk of channels at a time; ``row``, ``col``:
    scratch of one chunk), minus ``w * x[q]`` for every centre ``p`` whose neighbour ``q``
    carries another valid label (``plan`` from :func:`box_setup`). Exact wherever ``x`` is 0
    at ignored pixels, up to the order of the additions. The operator is symmetric, so the
    same call is its adjoint (the backward), up to the rows of ignored pixels, which the
    caller zeroes or never uses."""
    coefs, pairs = plan
    starts, step = lall._channel_chunks(x)
    for k0 in starts:
        xs, o = x[:, k0:k0 + step], out[:, k0:k0 + step]
        r, c = row[:, :xs.shape[1]], col[:, :xs.shape[1]]
        torch.mul(xs, coefs[0], out=o)
        r.copy_(xs)
        for rad in range(1, len(coefs)):
            r[..., rad:].add_(xs[..., :-rad])
            r[..., :-rad].add_(xs[..., rad:])
            if coefs[rad] == 0:
                continue
            c.copy_(r)
            for d in range(1, rad + 1):
                c[..., d:, :].add_(r[..., :-d, :])
                c[..., :-d, :].add_(r[..., d:, :])
            o.add_(c, alpha=coefs[rad])
    flat_out, flat_x = out.view(out.shape[1], -1), x.view(x.shape[1], -1)
    for centres, neighbours, wt in pairs:
        flat_out[:, centres] -= wt * flat_x[:, neighbours]
    return out


def measure(k: int, size: int, window: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, k, size, size, generator=g)
    labels = make_labels(1, size, k, torch.device("cpu")).to(torch.int16)
    offsets = lall._window_offsets(size, size, window, 1, True, False)
    coefs, _, valid, _ = lall._group_setup(labels, 255, offsets, window // 2, 1, False, x.dtype)
    plan, _, _, _ = box_setup(labels, 255, window, True, False, x.dtype)
    x.masked_fill_((labels == 255).unsqueeze(1), 0.0)  # zhat is 0 at ignored pixels
    acc, out = torch.empty_like(x), torch.empty_like(x)
    _, step = lall._channel_chunks(x)
    row, col = x.new_empty(1, min(k, step), size, size), x.new_empty(1, min(k, step), size, size)
    pools = {"offsets": lambda: lall._pool_into(acc, x, coefs, offsets),
             "boxes": lambda: box_pool_into(out, x, plan, row, col),
             "boxes_without_correction": lambda: box_pool_into(out, x, (plan[0], []), row, col)}
    pools["boxes"]()
    pools["offsets"]()
    mask = valid.unsqueeze(1)
    err = float(((acc - out) * mask).abs().max() / (acc * mask).abs().max())
    t = interleaved(pools, repeats)
    return {"offsets_s": t["offsets"], "boxes_s": t["boxes"], "uniform_part_s": t["boxes_without_correction"],
            "speedup": t["offsets"] / t["boxes"], "max_rel_diff": err,
            "correction_pairs_per_pixel": sum(int(c.numel()) for c, _, _ in plan[1]) / size ** 2}


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
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(HERE, "results", "lall_cpu_pool"))
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        rows = {f"K={k} window={w}": measure(int(k), args.size, int(w), args.repeats)
                for k in args.classes.split(",") for w in args.windows.split(",")}
    finally:
        torch.set_num_threads(threads)
    res = {"command": "python benchmarks/lall_cpu_pool.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine(),
           "torch": torch.__version__, "threads": args.threads, "size": args.size, "rows": rows}
    lines = ["# LALL on CPU: window pooling by box filters vs one multiply-add per offset", "",
             f"Command: `{res['command']}`", "",
             f"Date: {res['date']}. Machine: {res['machine']}. torch {res['torch']}, {args.threads} thread(s). "
             f"One pooling pass over one {args.size}x{args.size} image (a loss call runs three), labels of "
             f"bench_losses.py (16 x 16 blocks, ignore lines); median of {args.repeats} interleaved runs. "
             "`uniform part` = the box filters without the boundary correction (a lower bound).", "",
             "| case | offsets (library) ms | boxes + correction ms | uniform part ms | library / boxes | "
             "correction pairs / pixel | max rel. diff |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['offsets_s'] * 1e3:.1f} | {r['boxes_s'] * 1e3:.1f} | {r['uniform_part_s'] * 1e3:.1f} | "
                     f"{r['speedup']:.2f}x | {r['correction_pairs_per_pixel']:.2f} | {r['max_rel_diff']:.1e} |")
    write_results(args.out, res, lines)
    return res


if __name__ == "__main__":
    main()
