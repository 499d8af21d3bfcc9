"""Tests of CAR (pixreg/losses/car.py) against independent float64 references.

The references below are written from METHODS.md section 2 (and, for the released
variant, from the released-code facts listed there), with explicit Python loops over
pixels and classes; they never call the code under test.
"""
from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pixreg.losses.base import LossOutput, Regularizer
from pixreg.losses.car import CARLoss, car_loss

IGN = 255
TERMS = ("intra_c2p", "inter_c2c", "inter_c2p")


# --------------------------------------------------------------------------- references
def floor_src(i, in_size, out_size):
    """Nearest source index, floor rounding: floor(i * in / out)."""
    return (i * in_size) // out_size


def tf_align_corners_src(i, in_size, out_size):
    """TensorFlow's nearest resize with align_corners=True (the released CAR code):
    roundf(i * ((in - 1) / (out - 1))) in float32 arithmetic, half away from zero."""
    if out_size == 1:
        return 0
    v = float(np.float32(i) * (np.float32(in_size - 1) / np.float32(out_size - 1)))
    return min(math.floor(v + 0.5), in_size - 1)


def ref_pixels(features, labels, src=floor_src):
    """List of per-pixel feature vectors and labels (labels nearest-sampled with ``src``)."""
    xs, ys = [], []
    if features.dim() == 2:
        for i in range(features.shape[0]):
            xs.append(features[i])
            ys.append(int(labels[i]))
        return xs, ys
    b, _, h, w = features.shape
    hh, ww = labels.shape[-2:]
    for bi in range(b):
        for i in range(h):
            for j in range(w):
                xs.append(features[bi, :, i, j])
                ys.append(int(labels[bi, src(i, hh, h), src(j, ww, w)]))
    return xs, ys


def _softmax(vals):
    v = torch.stack(vals)
    e = torch.exp(v - v.max())
    return e / e.sum()


def _relu(v):
    return torch.where(v > 0, v, torch.zeros_like(v))


def ref_paper(features, labels, k, *, eps0=0.5, eps1=0.25, thr="present", w=(1.0, 1.0, 1.0), detach_centres=False):
    xs, ys = ref_pixels(features, labels)
    d = xs[0].numel()
    zero = features.sum() * 0
    valid = [i for i in range(len(xs)) if ys[i] != IGN]
    present = sorted({ys[i] for i in valid})
    mu = {}
    for c in present:
        members = [xs[i] for i in valid if ys[i] == c]
        m = sum(members) / len(members)
        mu[c] = m.detach() if detach_centres else m
    p = len(present)
    kp = p if thr == "present" else k

    intra = zero
    if valid:
        acc = 0
        for i in valid:
            for dd in range(d):
                acc = acc + (mu[ys[i]][dd] - xs[i][dd]) ** 2
        intra = acc / (len(valid) * d)

    c2c = zero
    if p >= 2:
        t = eps0 / (kp - 1)
        acc = 0
        for c in present:
            a = _softmax([torch.dot(mu[c], mu[l]) / math.sqrt(d) for l in present])
            r = 0
            for j, l in enumerate(present):
                if l != c:
                    r = r + _relu(a[j] - t)
            acc = acc + r ** 2
        c2c = acc / p

    c2p = zero
    if valid:
        t = eps1 / max(kp - 1, 1)
        acc = 0
        for i in valid:
            a = _softmax([torch.dot(mu[l], mu[l]) if l == ys[i] else torch.dot(xs[i], mu[l]) for l in present])
            s = zero
            for j, l in enumerate(present):
                if l != ys[i]:
                    s = s + _relu(a[j] - t)
            acc = acc + s ** 2
        c2p = acc / len(valid)
    return {"intra_c2p": w[0] * intra, "inter_c2c": w[1] * c2c, "inter_c2p": w[2] * c2p}


def ref_released(features, labels, k, *, eps0=0.5, eps1=0.25, thr="all", w=(1.0, 1.0, 1.0), sg=True, centres=None,
                 src=tf_align_corners_src):
    """Released TF code: squares of means, zero centres for absent classes, clips, stop-gradients,
    labels resized with TensorFlow's align-corners nearest rule; thresholds eps/(K'-1) infinite
    when K' = 1 (no penalty).

    sg=False lets gradient flow through every use of the centres (to show the difference).
    centres: optional (K, D) centres to use instead of batch centres (EMA), no gradient.
    """
    xs, ys = ref_pixels(features, labels, src)
    n, d = len(xs), xs[0].numel()
    eps = 1e-7
    valid = [ys[i] != IGN for i in range(n)]
    q = []
    for c in range(k):
        members = [xs[i] for i in range(n) if valid[i] and ys[i] == c]
        if centres is not None:
            q.append(centres[c].detach().to(features.dtype))
        elif members:
            q.append(sum(members) / len(members))
        else:
            q.append(torch.zeros(d, dtype=features.dtype))
    kk = [m.detach() for m in q] if sg else q
    p = len({ys[i] for i in range(n) if valid[i]})
    kp = k if thr == "all" else p

    acc = 0
    for i in range(n):
        if valid[i]:
            for dd in range(d):
                acc = acc + torch.abs(kk[ys[i]][dd] - xs[i][dd])
    m = acc / (n * d)
    intra = torch.clamp(torch.as_tensor(m) ** 2 + features.sum() * 0, min=1e-5)

    t0 = eps0 / (kp - 1) if kp > 1 else math.inf
    rows = []
    for c in range(k):
        a = _softmax([torch.dot(q[c], kk[l]) / math.sqrt(d) for l in range(k)])
        r = features.sum() * 0
        for l in range(k):
            if l != c:
                r = r + _relu(a[l] - t0)
        rows.append(torch.clamp(r, eps, 1 - eps))
    c2c = (sum(rows) / k) ** 2

    t1 = eps1 / (kp - 1) if kp > 1 else math.inf
    acc = 0
    for i in range(n):
        own = ys[i] if valid[i] else None
        e = [(torch.dot(kk[l], kk[l]) if l == own else torch.dot(xs[i], kk[l])) / math.sqrt(d) for l in range(k)]
        a = _softmax(e)
        s = features.sum() * 0
        for l in range(k):
            if l != own:
                s = s + _relu(a[l] - t1)
        acc = acc + torch.clamp(s, eps, 1 - eps)
    c2p = (acc / n) ** 2
    return {"intra_c2p": w[0] * intra, "inter_c2c": w[1] * c2c, "inter_c2p": w[2] * c2p}


# --------------------------------------------------------------------------- data
K = 5  # class 4 never drawn: absent


def make_data(seed=0, b=2, d=6, h=5, w=4, hh=11, ww=9, ignore_frac=0.2, classes=(0, 1, 2, 3), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, h, w, generator=g, dtype=dtype)
    cls = torch.tensor(classes)
    y = cls[torch.randint(0, len(classes), (b, hh, ww), generator=g)]
    y[torch.rand(b, hh, ww, generator=g) < ignore_frac] = IGN
    return x, y


def grad_of(fn, x):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    loss = out if torch.is_tensor(out) else sum(out.values())
    (g,) = torch.autograd.grad(loss, x, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def check_against(out, ref, x, fn_impl, fn_ref, atol=1e-10):
    for t in TERMS:
        assert torch.allclose(out.terms[t].double(), torch.as_tensor(ref[t]).double(), atol=atol, rtol=1e-8), t
    g_impl = grad_of(lambda z: fn_impl(z).loss, x)
    g_ref = grad_of(fn_ref, x)
    assert torch.isfinite(g_impl).all()
    assert torch.allclose(g_impl, g_ref, atol=1e-10, rtol=1e-7)


# --------------------------------------------------------------------------- paper variant
@pytest.mark.parametrize("thr", ["present", "all"])
def test_paper_matches_reference_4d(thr):
    x, y = make_data(0)
    w = (0.7, 1.3, 2.0)
    kw = dict(intra_weight=w[0], c2c_weight=w[1], c2p_weight=w[2], threshold_classes=thr)
    out = car_loss(x, y, K, **kw)
    ref = ref_paper(x, y, K, thr=thr, w=w)
    assert all(float(ref[t]) > 1e-4 for t in TERMS)  # every term active: the test can fail
    assert torch.allclose(out.loss, sum(out.terms.values()))
    check_against(out, ref, x, lambda z: car_loss(z, y, K, **kw), lambda z: ref_paper(z, y, K, thr=thr, w=w))


def test_paper_default_threshold_is_present_classes():
    x, y = make_data(1)
    default = car_loss(x, y, K).terms
    present = car_loss(x, y, K, threshold_classes="present").terms
    alls = car_loss(x, y, K, threshold_classes="all").terms
    for t in ("inter_c2c", "inter_c2p"):
        assert torch.equal(default[t], present[t])
        assert not torch.allclose(default[t], alls[t])  # class 4 absent: K-1 != P-1


def test_paper_flat_input():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    y[::7] = IGN
    out = car_loss(x, y, 4)
    ref = ref_paper(x, y, 4)
    check_against(out, ref, x, lambda z: car_loss(z, y, 4), lambda z: ref_paper(z, y, 4))


@pytest.mark.parametrize("term", range(3))
def test_paper_gradient_flows_through_centres(term):
    x, y = make_data(2)
    w = tuple(1.0 if i == term else 0.0 for i in range(3))
    kw = dict(intra_weight=w[0], c2c_weight=w[1], c2p_weight=w[2])
    g_impl = grad_of(lambda z: car_loss(z, y, K, **kw).loss, x)
    g_flow = grad_of(lambda z: ref_paper(z, y, K, w=w), x)
    g_stop = grad_of(lambda z: ref_paper(z, y, K, w=w, detach_centres=True), x)
    assert torch.allclose(g_impl, g_flow, atol=1e-10, rtol=1e-7)
    if term == 0:
        # MSE to the class mean: the centre path contributes sum_i 2 (mu - x_i) = 0 exactly
        assert torch.allclose(g_impl, g_stop, atol=1e-12)
    else:
        assert (g_impl - g_stop).abs().max() > 1e-4


def test_paper_single_class_batch():
    x, y = make_data(4, classes=(2,))
    x.requires_grad_(True)
    out = car_loss(x, y, K)
    assert out.terms["inter_c2c"] == 0 and out.terms["inter_c2p"] == 0
    ref = ref_paper(x, y, K)
    assert torch.allclose(out.terms["intra_c2p"], ref["intra_c2p"])
    assert out.terms["intra_c2p"] > 0
    out.loss.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_all_ignored_batch(variant):
    x, _ = make_data(5)
    y = torch.full((2, 11, 9), IGN)
    xr = x.clone().requires_grad_(True)
    out = car_loss(xr, y, K, variant=variant)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(xr.grad).all()
    if variant == "paper":
        assert out.loss == 0 and all(v == 0 for v in out.terms.values())
        assert (xr.grad == 0).all()
    else:
        # released: all centres are zero, ignored pixels still enter c2p, intra is floored.
        ref = ref_released(x, y, K)
        for t in TERMS:
            assert torch.allclose(out.terms[t], ref[t], atol=1e-12), t
        assert float(out.terms["intra_c2p"].detach()) == pytest.approx(1e-5)


def test_flat_all_ignored_and_empty_class_set_paper():
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y = torch.full((6,), IGN)
    out = car_loss(x, y, 3)
    out.loss.backward()
    assert out.loss == 0 and torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------- released variant
@pytest.mark.parametrize("thr", ["all", "present"])
def test_released_matches_reference_4d(thr):
    x, y = make_data(6)
    w = (1.5, 0.8, 1.2)
    kw = dict(intra_weight=w[0], c2c_weight=w[1], c2p_weight=w[2], variant="released", threshold_classes=thr)
    out = car_loss(x, y, K, **kw)
    ref = ref_released(x, y, K, thr=thr, w=w)
    assert all(float(ref[t]) > 1e-4 for t in TERMS)
    check_against(out, ref, x, lambda z: car_loss(z, y, K, **kw), lambda z: ref_released(z, y, K, thr=thr, w=w))


def test_released_default_threshold_is_all_classes():
    x, y = make_data(7)
    a = car_loss(x, y, K, variant="released").terms
    b = car_loss(x, y, K, variant="released", threshold_classes="all").terms
    assert all(torch.equal(a[t], b[t]) for t in TERMS)


def test_released_flat_and_single_class():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.full((30,), 1)
    y[::5] = IGN
    kw = dict(variant="released")
    out = car_loss(x, y, 3, **kw)
    ref = ref_released(x, y, 3)
    check_against(out, ref, x, lambda z: car_loss(z, y, 3, **kw), lambda z: ref_released(z, y, 3))


@pytest.mark.parametrize("term", range(3))
def test_released_stop_gradients(term):
    x, y = make_data(9)
    w = tuple(1.0 if i == term else 0.0 for i in range(3))
    kw = dict(intra_weight=w[0], c2c_weight=w[1], c2p_weight=w[2], variant="released")
    g_impl = grad_of(lambda z: car_loss(z, y, K, **kw).loss, x)
    g_sg = grad_of(lambda z: ref_released(z, y, K, w=w, sg=True), x)
    g_flow = grad_of(lambda z: ref_released(z, y, K, w=w, sg=False), x)
    assert torch.allclose(g_impl, g_sg, atol=1e-10, rtol=1e-7)
    assert (g_impl - g_flow).abs().max() > 1e-6
    assert g_impl.abs().max() > 1e-6  # c2c: gradient through the query centres


def test_released_differs_from_paper():
    x, y = make_data(10)
    p = car_loss(x, y, K).terms
    r = car_loss(x, y, K, variant="released").terms
    assert all(not torch.allclose(p[t], r[t]) for t in TERMS)


# --------------------------------------------------------------------------- gradcheck
def test_gradcheck_paper():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(14, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1, 2, IGN, 0, 1, 1, 2, IGN, 0, 2])
    assert torch.autograd.gradcheck(lambda z: car_loss(z, y, 4).loss, (x,))
    x4 = torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y4 = torch.tensor([[[0, 1, 2], [1, IGN, 0], [2, 2, 1]]])
    assert torch.autograd.gradcheck(lambda z: car_loss(z, y4, 3).loss, (x4,))


def test_gradcheck_released_fixed_centres():
    # The released variant stop-gradients batch centres, so finite differences (which move
    # the centres) cannot match by design; with fixed (EMA, not updated) centres the
    # function of x is exactly what autograd differentiates.
    g = torch.Generator().manual_seed(12)
    x = torch.randn(14, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1, 2, IGN, 0, 1, 1, 2, IGN, 0, 2])
    c = torch.randn(4, 3, generator=g, dtype=torch.float64)
    fn = lambda z: car_loss(z, y, 4, variant="released", ema_centres=c.clone(), ema_update=False).loss  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))


# --------------------------------------------------------------------------- weights / terms
@pytest.mark.parametrize("variant", ["paper", "released"])
def test_weights_and_zero_weight_terms(variant):
    x, y = make_data(12)
    x.requires_grad_(True)
    one = car_loss(x, y, K, variant=variant)
    two = car_loss(x, y, K, variant=variant, intra_weight=2.0, c2c_weight=3.0, c2p_weight=0.5)
    for t, s in zip(TERMS, (2.0, 3.0, 0.5)):
        assert torch.allclose(two.terms[t], s * one.terms[t])
    off = car_loss(x, y, K, variant=variant, c2c_weight=0.0)
    assert set(off.terms) == set(TERMS)
    assert off.terms["inter_c2c"] == 0 and off.terms["inter_c2c"].grad_fn is None
    assert torch.allclose(off.loss, off.terms["intra_c2p"] + off.terms["inter_c2p"])
    assert torch.allclose(off.terms["intra_c2p"], one.terms["intra_c2p"])


# --------------------------------------------------------------------------- module
def test_module_matches_functional_and_records_terms():
    x, y = make_data(13, dtype=torch.float32)
    m = CARLoss(num_classes=K, c2p_weight=0.5)
    assert isinstance(m, Regularizer) and m.uses_features and not m.uses_logits
    assert len(list(m.buffers())) == 0 and len(list(m.parameters())) == 0
    loss = m.compute(y, features=x)
    ref = car_loss(x, y, K, c2p_weight=0.5)
    assert isinstance(ref, LossOutput)
    assert torch.equal(loss, ref.loss)
    assert set(m.terms) == set(TERMS)
    assert all(not v.requires_grad for v in m.terms.values())
    assert torch.equal(m(x, y), loss)
    with pytest.raises(ValueError, match="features"):
        m.compute(y)


def test_ema_update_absent_untouched_and_used_centres():
    torch.manual_seed(0)
    x, y = make_data(14)
    d = x.shape[1]
    m = CARLoss(num_classes=K, variant="released", ema_decay=0.9, feature_dim=d).double()
    bound = math.sqrt(6.0 / (K + d))
    assert m.ema_centres.shape == (K, d) and m.ema_centres.abs().max() <= bound
    init = m.ema_centres.clone()
    # expected update from the batch centres (loops)
    xs, ys = ref_pixels(x, y, tf_align_corners_src)
    expected = init.clone()
    for c in range(K):
        members = [xs[i] for i in range(len(xs)) if ys[i] == c]
        if members:
            expected[c] = init[c] + 0.1 * (sum(members) / len(members) - init[c])
    m.train()
    loss = m(x, y)
    assert torch.allclose(m.ema_centres, expected, atol=1e-12)
    assert torch.equal(m.ema_centres[4], init[4])  # class 4 absent: untouched
    ref = ref_released(x, y, K, centres=expected)
    for t in TERMS:
        assert torch.allclose(m.terms[t], ref[t], atol=1e-12), t
    assert torch.allclose(loss, sum(ref.values()))
    # eval mode: no update, the buffer is used as is
    m.eval()
    before = m.ema_centres.clone()
    m(x * 2, y)
    assert torch.equal(m.ema_centres, before)
    ref2 = ref_released(x * 2, y, K, centres=before)
    assert torch.allclose(m.terms["inter_c2p"], ref2["inter_c2p"], atol=1e-12)


def test_ema_centres_carry_no_gradient():
    x, y = make_data(15)
    m = CARLoss(num_classes=K, variant="released", ema_decay=0.9, feature_dim=x.shape[1],
                intra_weight=0.0, c2p_weight=0.0).double()
    xr = x.clone().requires_grad_(True)
    assert not m(xr, y).requires_grad  # c2c depends on the centres only: no gradient at all
    m2 = CARLoss(num_classes=K, variant="released", ema_decay=0.9, feature_dim=x.shape[1]).double()
    cent = m2.ema_centres.clone()
    g = grad_of(lambda z: m2.eval()(z, y), x)
    g_ref = grad_of(lambda z: ref_released(z, y, K, centres=cent), x)
    assert torch.allclose(g, g_ref, atol=1e-10)


def test_ema_state_dict_round_trip():
    x, y = make_data(16, dtype=torch.float32)
    torch.manual_seed(1)
    a = CARLoss(num_classes=K, variant="released", ema_decay=0.9, feature_dim=x.shape[1])
    a.train()
    a(x, y)
    sd = a.state_dict()
    assert set(sd) == {"ema_centres"}
    torch.manual_seed(2)
    b = CARLoss(num_classes=K, variant="released", ema_decay=0.9, feature_dim=x.shape[1])
    assert not torch.equal(a.ema_centres, b.ema_centres)
    b.load_state_dict(sd)
    assert torch.equal(a.ema_centres, b.ema_centres)
    a.eval(), b.eval()
    assert torch.equal(a(x, y), b(x, y))
    assert CARLoss(num_classes=K).state_dict() == {}


# --------------------------------------------------------------------------- errors
def test_bad_inputs():
    x, y = make_data(17, dtype=torch.float32)
    with pytest.raises(ValueError, match="features"):
        car_loss(x[0], y, K)  # 3-D
    with pytest.raises(ValueError, match="labels"):
        car_loss(x, y[:1], K)  # batch mismatch
    with pytest.raises(ValueError, match="labels"):
        car_loss(x.flatten(2).transpose(1, 2).reshape(-1, x.shape[1]), y[:, :5, :4].reshape(-1)[:-1], K)
    bad = y.clone()
    bad[0, 0, 0] = K
    with pytest.raises(ValueError, match="labels"):
        car_loss(x, bad, K)
    bad[0, 0, 0] = -1
    with pytest.raises(ValueError, match="labels"):
        car_loss(x, bad, K)
    with pytest.raises(TypeError, match="features"):
        car_loss(x.long(), y, K)
    with pytest.raises(TypeError, match="labels"):
        car_loss(x, y.float(), K)
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        car_loss(nan, y, K)
    with pytest.raises(ValueError, match="device"):
        car_loss(x, y.to("meta"), K)
    with pytest.raises(ValueError, match="device"):
        car_loss(x.to("meta"), y, K)
    with pytest.raises(ValueError, match="ema_centres"):
        car_loss(x, y, K, variant="released", ema_centres=torch.zeros(K, x.shape[1] + 1))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(variant="foo"), ValueError, "variant"),
        (dict(threshold_classes="some"), ValueError, "threshold_classes"),
        (dict(eps0=-0.1), ValueError, "eps0"),
        (dict(eps1=float("inf")), ValueError, "eps1"),
        (dict(c2p_weight=float("nan")), ValueError, "c2p_weight"),
        (dict(intra_weight="1"), TypeError, "intra_weight"),
        (dict(num_classes=0), ValueError, "num_classes"),
        (dict(num_classes=2.0), TypeError, "num_classes"),
        (dict(ignore_index=1), ValueError, "ignore_index"),
        (dict(ema_decay=0.9, feature_dim=4), ValueError, "ema_decay"),  # paper variant
        (dict(variant="released", ema_decay=0.9), ValueError, "feature_dim"),
        (dict(variant="released", ema_decay=1.0, feature_dim=4), ValueError, "ema_decay"),
    ],
)
def test_bad_hyper_parameters(kwargs, exc, match):
    kwargs = {"num_classes": K, **kwargs}
    with pytest.raises(exc, match=match):
        CARLoss(**kwargs)


# --------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("variant", ["paper", "released"])
def test_autocast_bfloat16(variant):
    torch.manual_seed(18)
    conv = nn.Conv2d(4, 8, 1)
    inp = torch.randn(2, 4, 6, 6)
    y = torch.randint(0, 4, (2, 12, 12))
    y[:, :2] = IGN
    ref = car_loss(conv(inp), y, 4, variant=variant)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f = conv(inp)
        assert f.dtype == torch.bfloat16
        out = car_loss(f, y, 4, variant=variant)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    # bf16 features carry ~3 significant digits: 5% relative tolerance on every term
    for t in TERMS:
        assert torch.allclose(out.terms[t], ref.terms[t], rtol=5e-2, atol=1e-4), t
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in conv.parameters())


# --------------------------------------------------------------------------- distributed
def _ddp_worker(rank, world, port, path):
    torch.set_num_threads(1)  # forked child: stay out of the parent's OpenMP pool
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y = make_data(19, b=4)
        per = x.shape[0] // world
        res = {}
        for variant in ("paper", "released"):
            xr = x[rank * per:(rank + 1) * per].clone().requires_grad_(True)
            out = car_loss(xr, y[rank * per:(rank + 1) * per], K, variant=variant)
            out.loss.backward()
            res[variant] = (out.loss.detach(), {t: v.detach() for t, v in out.terms.items()}, xr.grad)
        torch.save(res, os.path.join(path, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_global_batch(tmp_path):
    """Two gloo ranks holding half a batch each give the single-process loss of the whole
    batch, and each rank's feature gradient is world_size x the single-process one."""
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = 2
    # fork (no re-import of torch in the children: seconds faster than spawn on a busy CPU),
    # unless CUDA is initialised: its autograd threads do not survive a fork
    fork_ok = "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized()
    method = "fork" if fork_ok else "spawn"
    mp.start_processes(_ddp_worker, args=(world, port, str(tmp_path)), nprocs=world, join=True,
                       start_method=method)
    x, y = make_data(19, b=4)
    per = x.shape[0] // world
    for variant in ("paper", "released"):
        full = car_loss(x, y, K, variant=variant)
        g = grad_of(lambda z: car_loss(z, y, K, variant=variant).loss, x)
        for rank in range(world):
            loss, terms, grad = torch.load(os.path.join(tmp_path, f"rank{rank}.pt"))[variant]
            assert torch.allclose(loss, full.loss, atol=1e-12), (variant, rank)
            for t in TERMS:
                assert torch.allclose(terms[t], full.terms[t], atol=1e-12), (variant, t)
            assert torch.allclose(grad, world * g[rank * per:(rank + 1) * per], atol=1e-10), (variant, rank)
