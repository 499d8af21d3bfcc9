"""The fused Triton LALL kernels (pixreg/kernels/lall_triton.py), run on CPU tensors by
Triton's interpreter (``TRITON_INTERPRET=1``, set by the root conftest.py when CUDA is
unavailable), against the float64 loop reference of tests/test_lall.py (written from the
equations, never calling the code under test): values and gradients with ignore pixels,
image borders, windows 3/5/7, K up to 171, odd sizes, several tiles per image.

The interpreter is slow (numpy per tile and window offset): inputs are kept small; the
whole file runs in about a minute on one core.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install 'pixreg[triton]')", allow_module_level=True)

from test_lall import IGN, make_inputs, ref_loss  # noqa: E402

import pixreg.kernels.lall_triton as lall_triton  # noqa: E402
from pixreg.losses.lall import LocallyAdaptiveLoss, locally_adaptive_loss  # noqa: E402

pytestmark = pytest.mark.skipif(
    not lall_triton.INTERPRETED and not torch.cuda.is_available(),
    reason="triton was imported without TRITON_INTERPRET=1 and there is no GPU",
)
DEVICE = "cpu" if lall_triton.INTERPRETED else "cuda"


def _value_and_grad(fn, logits, labels, **kw):
    z = logits.clone().to(DEVICE).requires_grad_(True)
    loss = fn(z, labels.to(DEVICE), **kw)
    (grad,) = torch.autograd.grad(loss, z)
    return loss.detach().cpu(), grad.cpu()


def _triton_loss(z, labels, **kw):
    return locally_adaptive_loss(z, labels, backend="triton", **kw).loss


def _assert_matches_reference(logits, labels, rtol=1e-10, grad_rtol=1e-8, **kw):
    got, g_got = _value_and_grad(_triton_loss, logits, labels, **kw)
    want, g_want = _value_and_grad(ref_loss, logits.cpu(), labels.cpu(), **kw)
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * 1e-2)
    torch.testing.assert_close(g_got.double(), g_want.double(), rtol=grad_rtol, atol=grad_rtol * 1e-2)


@pytest.mark.parametrize(
    "window,kw",
    [
        (3, dict()),
        (5, dict()),
        (7, dict()),
        (5, dict(stride=2, xi="weight_sum", power=1)),
        (3, dict(stride=3, distance_weights="uniform")),
        (7, dict(normalize=None, power=2)),
        (5, dict(distance_weights="uniform", xi="weight_sum", normalize=None, stride=2)),
    ],
)
def test_matches_loop_reference(window, kw):
    # odd 7 x 9 images (every 5- and 7-window touches a border), ignore pixels, an absent class
    logits, labels = make_inputs(b=2, k=5, h=7, w=9, n_label=4, seed=window * 7 + len(kw))
    _assert_matches_reference(logits, labels, window=window, **kw)


@pytest.mark.parametrize("k,h,w", [(171, 5, 7), (19, 11, 13), (2, 12, 23)])
def test_many_classes_and_tiles(k, h, w):
    # K=171 (BLOCK_K=256, padded channels), and images spanning several pixel tiles whose
    # rows wrap inside a tile (BLOCK_P=16 at K=171, 128 at K<=32)
    logits, labels = make_inputs(b=2, k=k, h=h, w=w, n_label=min(k, 6), seed=k)
    block_p, _ = lall_triton.block_sizes(k)
    assert h * w > block_p
    _assert_matches_reference(logits, labels, window=5)


def test_float32_and_resized_logits():
    logits, labels = make_inputs(b=2, k=6, h=4, w=5, seed=31, dtype=torch.float32)
    _, labels = make_inputs(b=2, k=6, h=8, w=9, seed=32)  # logits resized bilinearly to 8 x 9
    _assert_matches_reference(logits, labels, rtol=2e-5, grad_rtol=1e-4, window=5, stride=2)


def test_same_as_torch_backend_on_a_larger_batch():
    logits, labels = make_inputs(b=2, k=21, h=13, w=16, n_label=8, seed=33)
    labels[:, 3:9, 4:13] = 2  # a large region: whole windows of one label
    got, g_got = _value_and_grad(_triton_loss, logits, labels, window=5)
    want, g_want = _value_and_grad(lambda z, y, **kw: locally_adaptive_loss(z, y, backend="torch", **kw).loss,
                                   logits, labels, window=5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-14)


def test_zero_std_single_class_and_all_ignored():
    logits, labels = make_inputs(b=2, k=4, h=5, w=6, seed=34)
    logits[0, :, 2, 3] = -1.25  # all-equal logits: std 0, finite zero gradient through the std
    logits[1, :, 4, :] = 0.5
    _assert_matches_reference(logits, labels, window=3)
    _assert_matches_reference(logits, torch.ones_like(labels), window=5)  # one class everywhere
    loss, grad = _value_and_grad(_triton_loss, logits, torch.full_like(labels, IGN), window=5)
    assert loss.item() == 0.0 and not grad.any()


def test_module_backend_and_errors(monkeypatch):
    logits, labels = make_inputs(b=1, k=3, h=4, w=5, seed=35)
    mod = LocallyAdaptiveLoss(window=3, backend="triton")
    torch.testing.assert_close(mod(logits.to(DEVICE), labels.to(DEVICE)).cpu(), ref_loss(logits, labels, window=3))
    with pytest.raises(ValueError, match="backend"):
        LocallyAdaptiveLoss(backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        locally_adaptive_loss(logits, labels, backend="fused")
    monkeypatch.setattr(lall_triton, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        locally_adaptive_loss(logits, labels, backend="triton")
    # CPU tensors under backend="auto" never reach the kernels
    torch.testing.assert_close(locally_adaptive_loss(logits, labels, window=3).loss, ref_loss(logits, labels, window=3))
