"""CAR details of the released TensorFlow code: label sampling and the one-class threshold.

References are written from the descriptions (issue 19, METHODS.md), in numpy float32 /
float64 loops; they never call pixreg's resizing code.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pixreg.losses import resize_labels
from pixreg.losses.car import CARLoss, car_loss
from test_car import IGN, TERMS, check_against, floor_src, make_data, ref_released, tf_align_corners_src

SIZES = [(513, 65), (26, 22), (11, 5), (9, 4), (64, 8), (7, 7), (5, 1), (97, 13), (33, 17), (100, 3), (4, 6)]


def torch_nearest_src(i, in_size, out_size):
    """torch's ``nearest``: floor(i * (in / out)) with the scale and the product in float32."""
    v = float(np.float32(i) * (np.float32(in_size) / np.float32(out_size)))
    return min(math.floor(v), in_size - 1)


def _index_map(rule, in_size, out_size):
    y = torch.arange(in_size)[None, :, None].expand(1, in_size, 1)
    return resize_labels(y, (out_size, 1), rule)[0, :, 0].tolist()


@pytest.mark.parametrize("in_size,out_size", SIZES)
def test_label_sampling_rules_match_their_descriptions(in_size, out_size):
    assert _index_map("torch", in_size, out_size) == [torch_nearest_src(i, in_size, out_size) for i in range(out_size)]
    assert _index_map("align_corners", in_size, out_size) == [
        tf_align_corners_src(i, in_size, out_size) for i in range(out_size)]
    # columns follow the same rule
    y = torch.arange(in_size)[None, None, :].expand(1, 1, in_size)
    cols = resize_labels(y, (1, out_size), "align_corners")[0, 0].tolist()
    assert cols == [tf_align_corners_src(j, in_size, out_size) for j in range(out_size)]


def test_documented_examples_of_the_rules():
    assert _index_map("align_corners", 513, 65) == list(range(0, 513, 8))
    floor_rows = [floor_src(i, 513, 65) for i in range(65)]
    assert sum(a != b for a, b in zip(floor_rows, range(0, 513, 8))) == 64  # the count
    assert _index_map("torch", 26, 22)[11] == 12 and floor_src(11, 26, 22) == 13  # float32 vs exact
    with pytest.raises(ValueError, match="label_sampling"):
        resize_labels(torch.zeros(1, 4, 4, dtype=torch.long), (2, 2), "half_pixel")


def test_released_variant_samples_labels_with_align_corners():
    x, y = make_data(6, h=5, w=4, hh=17, ww=13)
    out = car_loss(x, y, 5, variant="released")
    ref = ref_released(x, y, 5)  # TF rule
    check_against(out, ref, x, lambda z: car_loss(z, y, 5, variant="released"), lambda z: ref_released(z, y, 5))
    floor_ref = ref_released(x, y, 5, src=floor_src)
    assert any(abs(float(floor_ref[t]) - float(ref[t])) > 1e-6 for t in TERMS)  # the rules differ here
    torch_rule = car_loss(x, y, 5, variant="released", label_sampling="torch")
    for t in TERMS:  # floor == torch's float32 rule at these sizes
        torch.testing.assert_close(torch_rule.terms[t], floor_ref[t], rtol=1e-8, atol=1e-12)


def test_paper_variant_keeps_torch_sampling_and_accepts_the_option():
    x, y = make_data(3, hh=17, ww=13)
    rows = torch.tensor([tf_align_corners_src(i, 17, 5) for i in range(5)])
    cols = torch.tensor([tf_align_corners_src(j, 13, 4) for j in range(4)])
    pre = y[:, rows][:, :, cols]
    a = car_loss(x, y, 5, label_sampling="align_corners").loss
    torch.testing.assert_close(a, car_loss(x, pre, 5).loss, rtol=0, atol=0)
    assert abs(float(a - car_loss(x, y, 5).loss)) > 1e-6
    assert CARLoss(5).label_sampling == "torch" and CARLoss(5, variant="released").label_sampling == "align_corners"
    assert "label_sampling='align_corners'" in repr(CARLoss(5, variant="released"))
    with pytest.raises(ValueError, match="label_sampling"):
        CARLoss(5, label_sampling="nearest")
    with pytest.raises(ValueError, match="label_sampling"):
        car_loss(x, y, 5, label_sampling="floor")


@pytest.mark.parametrize("thr", ["all", "present"])
def test_released_one_class_threshold_is_infinite(thr):
    """K = 1 with ignored pixels: eps/(K-1) is infinite, the inter terms sit at the clip floor."""
    x, y = make_data(9, classes=(0,), ignore_frac=0.3)
    assert (y == IGN).any()
    kw = dict(variant="released", threshold_classes=thr)
    out = car_loss(x, y, 1, **kw)
    ref = ref_released(x, y, 1, thr=thr)
    check_against(out, ref, x, lambda z: car_loss(z, y, 1, **kw), lambda z: ref_released(z, y, 1, thr=thr))
    floor = (1e-7) ** 2
    assert float(out.terms["inter_c2c"]) == pytest.approx(floor, rel=1e-9)
    assert float(out.terms["inter_c2p"]) == pytest.approx(floor, rel=1e-9)


def test_released_one_present_class_of_several():
    """threshold_classes="present" with one class present: infinite threshold too; "all" is finite."""
    x, y = make_data(10, classes=(2,), ignore_frac=0.3)
    out = car_loss(x, y, 4, variant="released", threshold_classes="present")
    assert float(out.terms["inter_c2p"]) == pytest.approx((1e-7) ** 2, rel=1e-9)
    ref = ref_released(x, y, 4, thr="present")
    for t in TERMS:
        torch.testing.assert_close(out.terms[t], ref[t], rtol=1e-8, atol=1e-14)
    finite = car_loss(x, y, 4, variant="released", threshold_classes="all")
    assert float(finite.terms["inter_c2p"]) > 1e-6


def test_paper_one_class_unchanged_and_zero():
    x, y = make_data(11, classes=(0,), ignore_frac=0.3)
    for thr in ("present", "all"):
        xr = x.clone().requires_grad_(True)
        out = car_loss(xr, y, 1, threshold_classes=thr)
        out.loss.backward()
        assert float(out.terms["inter_c2c"].detach()) == 0 and float(out.terms["inter_c2p"].detach()) == 0
        assert torch.isfinite(xr.grad).all()
