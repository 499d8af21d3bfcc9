"""The speed/memory benchmark keeps working, and its naive implementations agree with the library.

The naive versions (benchmarks/naive.py: per-class loops, unfolded LALL, LALL under plain
autograd) are written independently of pixreg's vectorised code, so agreeing values and
gradients in float64 are a real cross-check of the library.
"""
from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import bench_losses  # noqa: E402
import naive  # noqa: E402

from pixreg.losses.car import car_loss  # noqa: E402
from pixreg.losses.cplus1 import cplus1_loss  # noqa: E402
from pixreg.losses.lall import locally_adaptive_loss  # noqa: E402
from pixreg.losses.rch import rch_loss  # noqa: E402


def _inputs(seed: int, k: int = 6):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, 8, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    logits = (2 * torch.randn(2, k, 20, 24, generator=g, dtype=torch.float64)).requires_grad_(True)
    labels = torch.randint(0, k - 1, (2, 20, 24), generator=g)  # class k-1 absent
    labels[torch.rand(2, 20, 24, generator=g) < 0.15] = 255
    return feats, logits, labels, g


def _agree(lib, nai, inputs):
    a, b = lib(), nai()
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    ga = torch.autograd.grad(a, inputs, allow_unused=True)
    gb = torch.autograd.grad(b, inputs, allow_unused=True)
    for x, y in zip(ga, gb):
        if x is None or y is None:
            assert x is None or not x.abs().any()
            assert y is None or not y.abs().any()
        else:
            torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("seed", [0, 1])
def test_naive_versions_agree_with_library(seed):
    feats, logits, labels, g = _inputs(seed)
    k = logits.shape[1]
    centres = 0.8 * F.normalize(torch.randn(k - 1, 8, generator=g, dtype=torch.float64), dim=1)
    protos = torch.randn(k, 8, generator=g, dtype=torch.float64)
    _agree(lambda: cplus1_loss(feats, labels, centres).loss, lambda: naive.naive_cplus1(feats, labels, centres), (feats,))
    _agree(lambda: car_loss(feats, labels, k).loss, lambda: naive.naive_car(feats, labels, k), (feats,))
    _agree(lambda: rch_loss(feats, logits, labels, protos).loss,
           lambda: naive.naive_rch(feats, logits, labels, protos), (feats, logits))
    for nai in (naive.naive_lall_unfold, naive.naive_lall_views):
        _agree(lambda: locally_adaptive_loss(logits, labels).loss, lambda nai=nai: nai(logits, labels), (logits,))


def test_benchmark_runs_on_a_tiny_configuration(tmp_path):
    out = tmp_path / "res"
    res = bench_losses.main([
        "--classes", "4,5", "--sizes", "16,32", "--batch", "2", "--width", "4", "--repeats", "1",
        "--step-repeats", "1", "--naive-repeats", "1", "--naive-classes", "4", "--naive-sizes", "16",
        "--step-classes", "4", "--step-sizes", "16", "--out", str(out),
    ])
    saved = json.loads((tmp_path / "res.json").read_text())
    md = (tmp_path / "res.md").read_text()
    assert "Whole training step" in md and "Naive implementations" in md and "Exponents" in md
    for key in ("command", "machine", "torch", "date", "memory_method"):
        assert saved[key]
    assert set(saved["loss"]) == {"4x16", "5x16", "4x32", "5x32"}
    for row in list(res["loss"].values()) + list(res["step"].values()):
        for m in bench_losses.METHODS:
            assert row[m]["median_s"] > 0 and row[m]["peak_bytes"] > 0
    for name, r in res["naive"]["4x16"].items():
        assert math.isclose(r["library_value"], r["naive_value"], rel_tol=1e-4), name
    assert math.isfinite(res["exponents"]["peak_bytes"]["pixels"]["lall"][4])
    assert all(row[bench_losses.LALL_FLOOR]["median_s"] > 0 for row in res["loss"].values())
    assert "lall/floor" in md


def test_reference_networks_step(tmp_path):
    # the DeepLabV3+ (ResNet-50 layout) and SegFormer-B2-sized references, at tiny widths
    res = bench_losses.main([
        "--classes", "4", "--sizes", "16", "--batch", "2", "--width", "8", "--repeats", "1", "--warmup", "0",
        "--step-repeats", "1", "--naive-classes", "", "--step-classes", "4", "--step-sizes", "32",
        "--references", "deeplabv3plus_r50,segformer_b2", "--no-memory", "--out", str(tmp_path / "res"),
    ])
    assert set(res["step"]) == {"deeplabv3plus_r50 4x32", "segformer_b2 4x32"}
    for row in res["step"].values():
        assert all(row[m]["median_s"] > 0 for m in bench_losses.METHODS)
    md = (tmp_path / "res.md").read_text()
    assert "deeplabv3plus_r50 4x32 | lall" in md and "lall / ce" in md
    from reference_models import REFERENCES, ResNet50Trunk

    trunk = ResNet50Trunk()  # the real ResNet-50 sizes: 23.5M parameters without the classifier
    assert abs(sum(p.numel() for p in trunk.parameters()) / 1e6 - 23.5) < 0.1
    assert set(REFERENCES) == {"fcn18", "deeplabv3plus_r50", "segformer_b2"}


def test_lall_pool_and_rch_gather_scripts(tmp_path):
    import lall_cpu_pool
    import rch_gather

    res = lall_cpu_pool.main(["--classes", "5", "--size", "24", "--windows", "5", "--repeats", "1",
                              "--out", str(tmp_path / "pool")])
    row = res["rows"]["K=5 window=5"]
    assert row["max_rel_diff"] < 1e-5 and row["correction_pairs_per_pixel"] > 0
    res = rch_gather.main(["--batch", "1", "--size", "8", "--repeats", "1", "--out", str(tmp_path / "rch")])
    for r in res["rows"].values():
        assert r["value_diff"] < 1e-5 and r["grad_max_diff"] < 1e-6
    assert (tmp_path / "pool.md").exists() and (tmp_path / "rch.md").exists()


def test_cuda_grid_script_is_valid_bash():
    import subprocess

    script = os.path.join(BENCH, "cuda_grid.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    text = open(script).read()
    assert "--device cuda" in text and "--compile" in text and "deeplabv3plus_r50" in text


@pytest.mark.parametrize("window,exponential,xi_weight_sum", [(3, True, False), (5, True, True), (7, True, False),
                                                             (5, False, False), (1, True, False)])
def test_box_decomposition_of_the_pool_is_exact(window, exponential, xi_weight_sum):
    # the measured alternative of lall_cpu_pool.py (box filters + boundary correction) equals
    # the library's per-offset pooling, forward and adjoint, on block labels with ignore lines
    import lall_cpu_pool
    from pixreg.losses import lall

    g = torch.Generator().manual_seed(window)
    labels = torch.randint(0, 4, (1, 5, 6), generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2)[:, :37, :41]
    labels = labels.clone()
    labels[:, ::8] = 255
    labels[0, 20:23, 5:30] = 3
    x = torch.randn(1, 6, 37, 41, generator=g, dtype=torch.float64).masked_fill_((labels == 255).unsqueeze(1), 0.0)
    offsets = lall._window_offsets(37, 41, window, 1, exponential, xi_weight_sum)
    coefs, xi, valid, target = lall._group_setup(labels, 255, offsets, window // 2, 1, xi_weight_sum, x.dtype)
    plan, xi_box, valid_box, target_box = lall_cpu_pool.box_setup(labels, 255, window, exponential, xi_weight_sum,
                                                                  x.dtype)
    torch.testing.assert_close(xi_box, xi, rtol=0, atol=0)
    assert torch.equal(valid_box, valid) and torch.equal(target_box, target)
    row, col = torch.empty_like(x), torch.empty_like(x)
    for transpose in (False, True):
        want = lall._pool_into(torch.empty_like(x), x, coefs, offsets, transpose=transpose)
        got = lall_cpu_pool.box_pool_into(torch.empty_like(x), x, plan, row, col)
        rows = valid if not transpose else labels != 255  # centres, or pooled pixels
        torch.testing.assert_close(got * rows, want * rows, rtol=1e-12, atol=1e-12)
