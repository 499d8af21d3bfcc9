"""Speed and memory of the regularizers, against cross-entropy alone (issue 4).

For each method (``ce``: cross-entropy alone; ``cplus1``, ``car``, ``lall`` (window 5),
``rch``, each at its defaults and *added* to CE) it measures forward + backward time and
peak memory of

(a) the loss alone, on random features ``(B, 256, H/8, W/8)`` and logits ``(B, K, H, W)``;
(b) a whole training step (forward, loss, backward, SGD step) of the reference model:
    FCN head (256 channels, stride-8 features) on a ResNet-18 backbone at output
    stride 8 (:class:`pixreg.models.FCNResNet`), batch 8, input ``3 x H x W``; the
    regularizer reads the head's features (and the upsampled logits) through
    :class:`pixreg.RegularizedCriterion`, as in training;

at ``K`` in ``--classes`` and ``H = W`` in ``--sizes``. Methods are interleaved round robin
inside every repetition (so that machine noise hits them equally); times are medians of
``--repeats`` (``--step-repeats``) timed runs after ``--warmup`` untimed ones. Overheads
are ratios to the CE-only median of the same run. The naive implementations of
``benchmarks/naive.py`` (per-class loops, unfolded LALL, LALL under plain autograd) are
timed side by side with the library at ``--naive-classes`` x ``--naive-sizes``.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` minus the memory allocated
before the call; on CPU, the high-water mark of live tensor bytes allocated by torch's
CPU allocator during the call, from the allocation/free events of
``torch.profiler.profile(profile_memory=True)`` (one extra, untimed run per method;
tensors alive before the call, such as parameters and inputs, are not counted).

Labels are segmentation-like: 16 x 16 blocks of random classes with one-pixel ignore
(255) borders.

Usage::

    python benchmarks/bench_losses.py                 # default grid (about 15 min on 2 cores)
    python benchmarks/bench_losses.py --full          # the whole-step grid at every K and size
    python benchmarks/bench_losses.py --compile-check # torch.compile / graph-break report only
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import naive  # noqa: E402
from _machine import machine  # noqa: E402
import pixreg  # noqa: E402
from pixreg.losses.car import car_loss  # noqa: E402
from pixreg.losses.cplus1 import cplus1_loss  # noqa: E402
from pixreg.losses.lall import locally_adaptive_loss  # noqa: E402
from pixreg.losses.rch import rch_loss  # noqa: E402
from reference_models import REFERENCES  # noqa: E402

METHODS = ("ce", "cplus1", "car", "lall", "rch")
FEAT_DIM = 256


# --------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak of live bytes allocated during ``fn`` above what was live before it."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def make_labels(b: int, size: int, k: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cells = -(-size // 16)
    y = torch.randint(0, k, (b, cells, cells), generator=g)
    y = y.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, :size, :size].clone()
    y[:, ::16, :] = 255
    y[:, :, ::16] = 255
    return y.to(device)


def make_regularizer(method: str, k: int, feat_dim: int = FEAT_DIM) -> pixreg.Regularizer:
    if method == "cplus1":
        return pixreg.CPlus1Loss(k, feat_dim)
    if method == "car":
        return pixreg.CARLoss(k)
    if method == "lall":
        return pixreg.LocallyAdaptiveLoss(window=5)
    if method == "rch":
        return pixreg.RCHLoss(k, feat_dim)
    raise ValueError(method)


def make_criterion(method: str, k: int, device: torch.device, feat_dim: int = FEAT_DIM) -> pixreg.RegularizedCriterion:
    regs = {} if method == "ce" else {method: make_regularizer(method, k, feat_dim)}
    return pixreg.RegularizedCriterion(regs).to(device).train()


def round_robin(fns: Dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device
                ) -> Dict[str, List[float]]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return times


def summary(times: List[float]) -> Dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def measure(fns: Dict[str, Callable[[], None]], repeats: int, args, device: torch.device) -> dict:
    """Round-robin timings of every method, then (``args.memory``) one profiled run each."""
    times = round_robin(fns, repeats, args.warmup, device)
    out = {m: summary(t) for m, t in times.items()}
    if args.memory:
        peak_bytes(fns["ce"], device)  # the first profiled call carries the profiler's own set-up
        for m, fn in fns.items():
            out[m]["peak_bytes"] = peak_bytes(fn, device)
    return out


def maybe_compile(fn: Callable, args) -> Callable:
    """``fn`` compiled with ``torch.compile(backend=args.compile_backend)`` under ``--compile``
    (the losses only: the model runs eager in both cases)."""
    if not args.compile:
        return fn
    import torch._dynamo

    torch._dynamo.config.recompile_limit = 256  # one compilation per loss instance and shape
    return torch.compile(fn, backend=args.compile_backend, dynamic=False)


def compile_losses(crit: pixreg.RegularizedCriterion, args) -> pixreg.RegularizedCriterion:
    """Under ``--compile``: the criterion's CE and each regularizer's ``compute`` compiled
    (the criterion's own bookkeeping, a host read of its warm-up step counter, stays eager)."""
    if args.compile:
        crit._cross_entropy = maybe_compile(crit._cross_entropy, args)
        for mod in crit.losses.values():
            mod.compute = maybe_compile(mod.compute, args)
    return crit


# --------------------------------------------------------------------- (a) loss alone
def loss_inputs(k: int, size: int, batch: int, device: torch.device, seed: int):
    """Generator (for further draws), stride-8 features, full-size logits (both requiring grad), labels."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, FEAT_DIM, -(-size // 8), -(-size // 8), generator=g).to(device).requires_grad_(True)
    logits = torch.randn(batch, k, size, size, generator=g).to(device).requires_grad_(True)
    return g, feats, logits, make_labels(batch, size, k, device)


#: Loss-alone extra: LALL with a 1x1 window, i.e. its z-score and softmax CE without the
#: neighbourhood pooling: the floor under LALL's cost that no pooling scheme can go below.
LALL_FLOOR = "lall_w1"
#: Loss-alone extra on CUDA: LALL's PyTorch implementation (``backend="torch"``), next to
#: ``lall`` (``backend="auto"``: the fused Triton kernels when Triton is installed).
LALL_TORCH = "lall_torch"


def extra_columns(device: torch.device) -> List[str]:
    """Loss-alone columns besides METHODS on ``device``."""
    return [LALL_FLOOR] + ([LALL_TORCH] if device.type == "cuda" else [])


def loss_alone(k: int, size: int, args, device: torch.device) -> dict:
    _, feats, logits, labels = loss_inputs(k, size, args.batch, device, seed=1)
    crits = {m: make_criterion(m, k, device) for m in METHODS}
    crits[LALL_FLOOR] = pixreg.RegularizedCriterion({"lall": pixreg.LocallyAdaptiveLoss(window=1)}).to(device)
    if LALL_TORCH in extra_columns(device):
        crits[LALL_TORCH] = pixreg.RegularizedCriterion({"lall": pixreg.LocallyAdaptiveLoss(backend="torch")}).to(device)

    def run(m: str) -> Callable[[], None]:
        crit = crits[m]
        loss_fn = crit._cross_entropy if m == "ce" else next(iter(crit.losses.values())).compute
        loss_fn = maybe_compile(loss_fn, args)

        def fn() -> None:
            if m == "ce":
                value = loss_fn(logits, labels)
            else:
                value = loss_fn(labels, features=feats, logits=logits)
            # gradients returned (and dropped), not accumulated in .grad: every call starts equal
            torch.autograd.grad(value, (feats, logits), allow_unused=True)

        return fn

    return measure({m: run(m) for m in crits}, args.repeats, args, device)


# ----------------------------------------------------------------- (b) training step
def train_step(reference: str, k: int, size: int, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = REFERENCES[reference](k, args.width).to(device).train()
    crits = {m: make_criterion(m, k, device, model.feature_dim) for m in METHODS}
    params = list(model.parameters()) + [p for c in crits.values() for p in c.parameters()]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(2)
    batch = args.step_batch or args.batch
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    labels = make_labels(batch, size, k, device)

    def run(m: str) -> Callable[[], None]:
        crit = compile_losses(crits[m], args)

        def fn() -> None:
            feats = model.features(x)
            logits = F.interpolate(model.classifier(feats), size=x.shape[-2:], mode="bilinear", align_corners=False)
            crit(logits, labels, features=feats).total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)  # freed here, so each call starts with no gradients

        return fn

    return measure({m: run(m) for m in METHODS}, args.step_repeats, args, device)


# ------------------------------------------------------------------ naive vs library
def naive_vs_library(k: int, size: int, args, device: torch.device) -> dict:
    g, feats, logits, labels = loss_inputs(k, size, args.batch, device, seed=3)
    centres = F.normalize(torch.randn(k - 1, FEAT_DIM, generator=g), dim=1).to(device)
    protos = torch.randn(k, FEAT_DIM, generator=g).to(device)
    pairs = {
        "cplus1": (lambda: cplus1_loss(feats, labels, centres).loss, lambda: naive.naive_cplus1(feats, labels, centres)),
        "car": (lambda: car_loss(feats, labels, k).loss, lambda: naive.naive_car(feats, labels, k)),
        "rch": (lambda: rch_loss(feats, logits, labels, protos).loss, lambda: naive.naive_rch(feats, logits, labels, protos)),
        "lall": (lambda: locally_adaptive_loss(logits, labels).loss, lambda: naive.naive_lall_unfold(logits, labels)),
        "lall_views": (lambda: locally_adaptive_loss(logits, labels).loss, lambda: naive.naive_lall_views(logits, labels)),
    }
    fns: Dict[str, Callable[[], None]] = {}
    values = {}
    for name, (lib, nai) in pairs.items():
        for tag, f in (("library", lib), ("naive", nai)):
            def fn(f=f) -> None:
                torch.autograd.grad(f(), (feats, logits), allow_unused=True)
            fns[f"{name}/{tag}"] = fn
        with torch.no_grad():
            values[name] = (float(lib()), float(nai()))
    times = round_robin(fns, args.naive_repeats, 1, device)
    out = {}
    for name in pairs:
        lib_t = statistics.median(times[f"{name}/library"])
        nai_t = statistics.median(times[f"{name}/naive"])
        out[name] = {"library_s": lib_t, "naive_s": nai_t, "speedup": nai_t / lib_t,
                     "library_value": values[name][0], "naive_value": values[name][1]}
        if args.memory:
            for tag in ("library", "naive"):
                out[name][f"{tag}_peak_bytes"] = peak_bytes(fns[f"{name}/{tag}"], device)
    return out


# ------------------------------------------------------------------- torch.compile
def compile_check(device: torch.device, backend: str = "aot_eager") -> dict:
    """Trace each loss with TorchDynamo (``fullgraph=True``, value checks off), compile it with
    ``backend`` and report graph breaks and agreement with eager."""
    import torch._dynamo as dynamo

    k, b = 5, 2
    feats = torch.randn(b, 16, 4, 4, device=device, requires_grad=True)
    logits = torch.randn(b, k, 32, 32, device=device, requires_grad=True)
    labels = make_labels(b, 32, k, device)
    mods = {"cplus1": pixreg.CPlus1Loss(k, 16), "car": pixreg.CARLoss(k),
            "lall": pixreg.LocallyAdaptiveLoss(), "rch": pixreg.RCHLoss(k, 16)}
    pixreg.set_validation(False)
    report = {}
    try:
        for name, mod in mods.items():
            mod = mod.to(device).train()

            def fn(feats, logits, labels, mod=mod):
                return mod.compute(labels, features=feats, logits=logits)

            dynamo.reset()
            entry: dict = {}
            try:
                ex = dynamo.explain(fn)(feats, logits, labels)
                entry["graphs"] = ex.graph_count
                entry["graph_breaks"] = ex.graph_break_count
                entry["break_reasons"] = sorted({str(r.reason).splitlines()[0] for r in ex.break_reasons})
            except Exception as exc:  # pragma: no cover - reported, not raised
                entry["explain_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            dynamo.reset()
            try:
                compiled = torch.compile(fn, fullgraph=True, backend=backend)
                out = compiled(feats, logits, labels)
                out.backward()
                ref = fn(feats, logits, labels)
                entry["fullgraph"] = True
                entry["matches_eager"] = bool(torch.allclose(out.detach(), ref.detach(), rtol=1e-4, atol=1e-6))
            except Exception as exc:
                entry["fullgraph"] = False
                entry["fullgraph_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            report[name] = entry
    finally:
        pixreg.set_validation(True)
        dynamo.reset()
    return report


# ------------------------------------------------------------------------- reporting
def exponent(x0: float, y0: float, x1: float, y1: float) -> float:
    return math.log(y1 / y0) / math.log(x1 / x0) if min(x0, y0, x1, y1) > 0 else float("nan")


def exponents(loss: dict, classes: List[int], sizes: List[int], key: str) -> dict:
    """Growth exponents of the loss-alone ``key`` (median_s or peak_bytes): in pixels
    (smallest to largest size, at each K) and in K (smallest to largest K, at each size)."""
    out: dict = {"pixels": {}, "classes": {}}
    for m in METHODS:
        if len(sizes) > 1:
            out["pixels"][m] = {
                k: exponent(sizes[0] ** 2, loss[f"{k}x{sizes[0]}"][m].get(key, 0),
                            sizes[-1] ** 2, loss[f"{k}x{sizes[-1]}"][m].get(key, 0)) for k in classes}
        if len(classes) > 1:
            out["classes"][m] = {
                s: exponent(classes[0], loss[f"{classes[0]}x{s}"][m].get(key, 0),
                            classes[-1], loss[f"{classes[-1]}x{s}"][m].get(key, 0)) for s in sizes}
    return out


def mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def ratio_table(loss: dict) -> List[str]:
    """Loss-alone times as multiples of CE's, against the targets of issue 20, with LALL's
    PyTorch implementation next to the default (Triton on CUDA) where it was measured."""
    torch_col = any(LALL_TORCH in row for row in loss.values())
    lines = ["Loss alone in multiples of CE alone (targets on a GPU: C+1, CAR, RCH <= 2x; LALL <= 3x)"
             + (f"; `{LALL_TORCH}`: LALL's PyTorch implementation (`backend=\"torch\"`), `lall` the default "
                "(the fused Triton kernels where Triton is installed)" if torch_col else "") + ".", "",
             "| K x size | " + " | ".join(f"{m} / ce" for m in METHODS[1:])
             + (f" | {LALL_TORCH} / ce | Triton speed-up |" if torch_col else " |"),
             "|---|" + "---|" * (len(METHODS) - 1 + 2 * torch_col)]
    for key, row in loss.items():
        ce = row["ce"]["median_s"]
        cells = [f"{row[m]['median_s'] / ce:.2f}x" for m in METHODS[1:]]
        if torch_col and LALL_TORCH in row:
            cells += [f"{row[LALL_TORCH]['median_s'] / ce:.2f}x",
                      f"{row[LALL_TORCH]['median_s'] / row['lall']['median_s']:.2f}x"]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines + [""]


def loss_tables(res: dict) -> List[str]:
    lines = ["## Loss alone (forward + backward)", "",
             f"`{LALL_FLOOR}`: LALL with a 1x1 window (its z-score and softmax CE, no neighbours): the floor "
             "under LALL's cost; `lall/floor` = LALL (window 5) time over that floor.", "",
              "| K x size | " + " | ".join(f"{m} ms" for m in METHODS) + f" | {LALL_FLOOR} ms | lall/floor | "
              + " | ".join(f"{m} MiB" for m in METHODS) + " |",
              "|---|" + "---|" * (2 * len(METHODS) + 2)]
    for key, row in res["loss"].items():
        floor = row.get(LALL_FLOOR)
        fl = (f"{floor['median_s'] * 1e3:.0f} | {row['lall']['median_s'] / floor['median_s']:.2f}x"
              if floor else " | ")
        lines.append(f"| {key} | " + " | ".join(f"{row[m]['median_s'] * 1e3:.0f}" for m in METHODS) + f" | {fl} | "
                     + " | ".join(mib(row[m].get("peak_bytes", 0)) for m in METHODS) + " |")
    lines += [""] + ratio_table(res["loss"])
    for what, key in (("time", "median_s"), ("peak memory", "peak_bytes")):
        ex = res["exponents"][key]
        lines += [f"Exponents of loss-alone {what}: `t ~ pixels^a` (size {res['sizes'][0]} -> "
                  f"{res['sizes'][-1]}) and `t ~ K^b` (K {res['classes'][0]} -> {res['classes'][-1]}).", "",
                  "| method | " + " | ".join(f"a (K={k})" for k in res["classes"]) + " | "
                  + " | ".join(f"b ({s}px)" for s in res["sizes"]) + " |",
                  "|---|" + "---|" * (len(res["classes"]) + len(res["sizes"]))]
        for m in METHODS:
            a = ex["pixels"].get(m, {})
            b = ex["classes"].get(m, {})
            lines.append(f"| {m} | " + " | ".join(f"{a.get(k, float('nan')):.2f}" for k in res["classes"])
                         + " | " + " | ".join(f"{b.get(s, float('nan')):.2f}" for s in res["sizes"]) + " |")
        lines.append("")
    return lines


def markdown(res: dict) -> str:
    lines = ["# Regularizer speed and memory", "", f"Command: `{res['command']}`", "",
             f"Date: {res['date']}. Machine: {res['machine']}. torch {res['torch']}, "
             f"{res['threads']} thread(s), device {res['device']}. Code: {res.get('code', 'unknown')}. "
             f"Losses compiled: {res.get('compiled') or 'no (eager)'}.", "",
             f"Memory method: {res['memory_method']}", ""]
    if res.get("step"):
        lines += ["## Whole training step (reference networks, batch %d)" % res.get("step_batch", res["batch"]), "",
                  "Networks (benchmarks/reference_models.py, random weights): `fcn18` (K x size keys without a "
                  "prefix): FCN head on ResNet-18 at output stride 8; `deeplabv3plus_r50`: DeepLabV3+ on a "
                  "ResNet-50 layout (OS 16, features 256 x H/4); `segformer_b2`: SegFormer-B2 sized from a "
                  "`transformers` config (features 768 x H/4).", "",
                  "Time: median seconds of the step; overhead = median / CE median (same run, "
                  "interleaved). `loss/CE step` = the loss-alone median divided by the CE step median "
                  "(a low-noise estimate of the same overhead). Memory: peak MiB of the step.", "",
                  "| K x size | method | step s | overhead | loss/CE step | peak MiB | memory overhead |",
                  "|---|---|---|---|---|---|---|"]
        for key, row in res["step"].items():
            ce = row["ce"]
            for m in METHODS:
                r = row[m]
                est = ""
                la = res["loss"].get(key.split()[-1], {}).get(m)
                if la and m != "ce":
                    est = f"{la['median_s'] / ce['median_s'] * 100:+.1f}%"
                mem = r.get("peak_bytes")
                memo = f"{(mem / ce['peak_bytes'] - 1) * 100:+.1f}%" if mem and m != "ce" else ""
                over = "" if m == "ce" else f"{(r['median_s'] / ce['median_s'] - 1) * 100:+.1f}%"
                lines.append(f"| {key} | {m} | {r['median_s']:.2f} | {over} | "
                             f"{est} | {mib(mem) if mem else ''} | {memo} |")
        lines.append("")
    if res.get("loss"):
        lines += loss_tables(res)
    if res.get("naive"):
        lines += ["## Naive implementations (benchmarks/naive.py) vs the library, loss alone", "",
                  "| K x size | loss | naive | library ms | naive ms | speed-up | library MiB | naive MiB | values |",
                  "|---|---|---|---|---|---|---|---|---|"]
        desc = {"cplus1": "per-class loops", "car": "per-class loops", "rch": "per-class FN/FP indexing",
                "lall": "unfolded (B, K*25, H*W)", "lall_views": "shifted views, plain autograd"}
        for key, row in res["naive"].items():
            for name, r in row.items():
                lines.append(
                    f"| {key} | {name.split('_')[0]} | {desc[name]} | {r['library_s'] * 1e3:.0f} | "
                    f"{r['naive_s'] * 1e3:.0f} | {r['speedup']:.1f}x | {mib(r.get('library_peak_bytes', 0))} | "
                    f"{mib(r.get('naive_peak_bytes', 0))} | {r['library_value']:.6g} / {r['naive_value']:.6g} |")
        lines.append("")
    if res.get("compile"):
        lines += [f"## torch.compile (TorchDynamo, fullgraph=True, value checks off, backend "
                  f"{res.get('compile_backend', 'aot_eager')})", "",
                  "| loss | graphs | graph breaks | fullgraph | matches eager | notes |", "|---|---|---|---|---|---|"]
        for name, e in res["compile"].items():
            notes = "; ".join(e.get("break_reasons", [])) or e.get("fullgraph_error", "") or e.get("explain_error", "")
            lines.append(f"| {name} | {e.get('graphs', '')} | {e.get('graph_breaks', '')} | {e.get('fullgraph')} | "
                         f"{e.get('matches_eager', '')} | {notes} |")
        lines.append("")
    return "\n".join(lines)


def code_version() -> str:
    """``git describe`` of the checkout the benchmark ran from (``-dirty`` with local edits)."""
    import subprocess

    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=os.path.dirname(HERE),
                              capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def step_key(reference: str, k: int, size: int) -> str:
    """Results key of a whole-step run (the fcn18 keys are those of earlier results files)."""
    return f"{k}x{size}" if reference == "fcn18" else f"{reference} {k}x{size}"


def ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: stable on a shared machine)")
    p.add_argument("--classes", type=ints, default=[21, 150, 171])
    p.add_argument("--sizes", type=ints, default=[256, 512])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--width", type=int, default=64,
                   help="width of the reference networks (64 = their real sizes; smaller for tests)")
    p.add_argument("--references", default="fcn18",
                   help=f"reference networks of the whole-step runs, comma-separated: {', '.join(REFERENCES)} "
                        "(benchmarks/reference_models.py)")
    p.add_argument("--step-batch", type=int, default=0, help="batch of the whole-step runs (default: --batch)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of the loss alone")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--step-classes", type=ints, default=[21], help="K of the whole-step runs")
    p.add_argument("--step-sizes", type=ints, default=[256], help="sizes of the whole-step runs")
    p.add_argument("--step-repeats", type=int, default=3)
    p.add_argument("--full", action="store_true", help="whole-step runs at every --classes x --sizes")
    p.add_argument("--naive-classes", type=ints, default=[21])
    p.add_argument("--naive-sizes", type=ints, default=[256])
    p.add_argument("--naive-repeats", type=int, default=3)
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--compile-check", action="store_true", help="only the torch.compile report")
    p.add_argument("--compile-backend", default="aot_eager",
                   help="torch.compile backend of --compile-check and --compile (aot_eager needs no compiler; "
                        "inductor does)")
    p.add_argument("--compile", action="store_true",
                   help="time the losses compiled with --compile-backend (alone, and inside the criterion in the step)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "losses_{device}"),
                   help="results path without extension (.md and .json are written)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    try:
        return run(args, device, argv)
    finally:  # leave the process as it was (the test suite calls main())
        torch.set_num_threads(threads)
        pixreg.set_validation(True)


def run(args, device: torch.device, argv) -> dict:
    if args.full:
        args.step_classes, args.step_sizes = args.classes, args.sizes
    res: dict = {
        "command": "python benchmarks/bench_losses.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
        "code": code_version(), "compiled": args.compile and args.compile_backend,
        "batch": args.batch, "step_batch": args.step_batch or args.batch, "references": args.references,
        "classes": args.classes, "sizes": args.sizes,
        "memory_method": (
            "torch.cuda.max_memory_allocated above the memory allocated before the call" if device.type == "cuda"
            else "high-water mark of live bytes from the CPU allocator's allocation/free events recorded by "
                 "torch.profiler (profile_memory=True), above what was live before the call (parameters, "
                 "inputs and optimizer state that exist before the step are not counted)"),
    }
    path = args.out.format(device=device.type)
    if args.compile_check:
        res["compile"] = compile_check(device, args.compile_backend)
        res["compile_backend"] = args.compile_backend
        path += "_compile"
    else:
        pixreg.set_validation(False)  # host-synchronising value checks off, as in tuned training
        res["loss"], res["step"], res["naive"] = {}, {}, {}
        for size in args.sizes:
            for k in args.classes:
                print(f"loss alone K={k} size={size}", flush=True)
                res["loss"][f"{k}x{size}"] = loss_alone(k, size, args, device)
        res["exponents"] = {key: exponents(res["loss"], args.classes, args.sizes, key)
                            for key in ("median_s", "peak_bytes")}
        for size in args.naive_sizes:
            for k in args.naive_classes:
                print(f"naive K={k} size={size}", flush=True)
                res["naive"][f"{k}x{size}"] = naive_vs_library(k, size, args, device)
        for reference in args.references.split(","):
            for size in args.step_sizes:
                for k in args.step_classes:
                    print(f"train step {reference} K={k} size={size}", flush=True)
                    res["step"][step_key(reference, k, size)] = train_step(reference, k, size, args, device)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".json", "w") as fh:
        json.dump(res, fh, indent=1, default=str)
    with open(path + ".md", "w") as fh:
        fh.write(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
