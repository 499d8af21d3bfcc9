"""CPU: can the box-filter decomposition make LALL's window pooling faster? (issue 20, item 4)

LALL pools, for every centre ``p``, ``sum_q w(p, q) [y_q = y_p] zhat_q`` over the window with
``w = 2^(1 - d8)``. Where the whole window shares the centre's label (or is ignored, zhat = 0
there), ``w = 1*box1 + 0.5*box3 + 0.5*box5`` (window 5; ``1, 0.5, 0.25, 0.25`` for window 7)
turns the pool into box filters of the z-scored logits, separable into shifted row and
column sums; near label boundaries an exact correction subtracts the other labels'
neighbours. This script times, in one run, on the same channel chunks:

* ``library``: the pooling the library runs (:func:`pixreg.losses.lall._pool_into`: one
  in-place multiply-add per window offset on cache-sized channel chunks);
* ``box``: the uniform part of the decomposition alone (separable shifted sums, one
  multiply-add per box), *without* the boundary correction: a lower bound on the cost of the
  decomposition. Its result is checked equal to the library's on an all-one-label map.

If ``box`` is not clearly faster than ``library``, the decomposition (which adds the
correction on top) cannot speed LALL up on this CPU.

Usage: ``python benchmarks/lall_cpu_pool.py [--classes 21,171] [--size 256] [--repeats 7]``
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
from pixreg.losses import lall  # noqa: E402


def box_pool_into(out: torch.Tensor, x: torch.Tensor, window: int, row: torch.Tensor, col: torch.Tensor
                  ) -> torch.Tensor:
    """``out = sum_r c_r box_(2r+1)(x)`` (zero outside the image) with the exponential-weight
    coefficients ``c_0 = 1``, ``c_r = 2^-r`` (``r < R``), ``c_R = 2^(1-R)``; ``row``/``col``: scratch
    of one channel chunk. Same channel chunks as the library."""
    radius = window // 2
    coef = [1.0] + [2.0 ** -r for r in range(1, radius)] + [2.0 ** (1 - radius)]
    starts, step = lall._channel_chunks(x)
    for k0 in starts:
        xs, o = x[:, k0:k0 + step], out[:, k0:k0 + step]
        r, c = row[:, :xs.shape[1]], col[:, :xs.shape[1]]
        torch.mul(xs, coef[0], out=o)
        r.copy_(xs)
        for rad in range(1, radius + 1):
            r[..., rad:].add_(xs[..., :-rad])
            r[..., :-rad].add_(xs[..., rad:])
            c.copy_(r)
            for d in range(1, rad + 1):
                c[..., d:, :].add_(r[..., :-d, :])
                c[..., :-d, :].add_(r[..., d:, :])
            o.add_(c, alpha=coef[rad])
    return out


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(k: int, size: int, window: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, k, size, size, generator=g)
    labels = torch.zeros(1, size, size, dtype=torch.int16)  # one label: the decomposition is exact everywhere
    offsets = lall._window_offsets(size, size, window, 1, True, False)
    coefs, _, _, _ = lall._group_setup(labels, 255, offsets, window // 2, 1, False, x.dtype)
    acc, out = torch.empty_like(x), torch.empty_like(x)
    _, step = lall._channel_chunks(x)
    row, col = x.new_empty(1, step, size, size), x.new_empty(1, step, size, size)
    lib = lambda: lall._pool_into(acc, x, coefs, offsets)  # noqa: E731
    box = lambda: box_pool_into(out, x, window, row, col)  # noqa: E731
    lib()
    box()
    err = float((acc - out).abs().max() / acc.abs().max())
    t_lib, t_box = timed(lib, repeats), timed(box, repeats)
    return {"library_s": t_lib, "box_s": t_box, "speedup": t_lib / t_box, "max_rel_diff": err}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classes", default="21,171")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--windows", default="5,7")
    p.add_argument("--repeats", type=int, default=7)
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
    lines = ["# LALL on CPU: window pooling vs its box-filter decomposition", "", f"Command: `{res['command']}`", "",
             f"Date: {res['date']}. Machine: {res['machine']}. torch {res['torch']}, {args.threads} thread(s). "
             f"One image {args.size}x{args.size}, one pooling pass (forward; the backward runs two more), "
             f"median of {args.repeats}.", "",
             "`box` = the uniform-window part of the decomposition only (no boundary correction): a lower "
             "bound on its cost.", "",
             "| case | library ms | box ms | library / box | max rel. diff |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['library_s'] * 1e3:.1f} | {r['box_s'] * 1e3:.1f} | {r['speedup']:.2f}x | "
                     f"{r['max_rel_diff']:.1e} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump(res, fh, indent=1)
    with open(args.out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return res


if __name__ == "__main__":
    main()
