"""RCH options that reproduce the released (mmsegmentation) code, against float64 loop references.

Written from the descriptions (issue 19, METHODS.md section 4), never from pixreg's code:

* ``prototype_grad``: the loss uses the prototypes after this step's EMA update, and the
  gradient flows into this batch's TP mean inside them;
* ``ce_resolution="label"``: the two score maps (cosine logits with the lowered
  true-class entry) are computed at embedding resolution, upsampled bilinearly
  (``align_corners=False``) to the labels and both CEs are taken there;
* ``ohem_thresh``: mmseg's OHEM rule on each metric CE: sort the true-class
  probabilities of the valid pixels, ``t = max(p_sorted[min(min_kept * B, n - 1)], thresh)``,
  keep ``p < t``;
* ``reduction="all_pixels"``: mmseg's mean over every pixel (ignored and unselected count 0).
"""
from __future__ import annotations

import math

import pytest
import torch

from pixreg.losses.rch import RCHLoss, rch_loss, rch_update_prototypes
from test_rch import DT, IGN, _bilinear_src, make_inputs, ref_cos, ref_loss, ref_pixels, ref_sets, ref_sim
from test_rch import _module_and_inputs
from test_rch import _run as run_both


# ------------------------------------------------------------------ slow reference


def ref_update_with_grad(e, z, y, protos, init, rho):
    """TP-mean EMA update, the TP mean keeping its gradient (the released ``f_mem``)."""
    pixels = ref_pixels(e, z, y)
    tp, _, _ = ref_sets(pixels, protos.shape[0], False)
    rows, new_init = [], init.clone()
    for k in range(protos.shape[0]):
        members = tp.get((0, k), [])
        if not members:
            rows.append(protos[k].to(DT))
            continue
        mean = sum(q["e"] for q in members) / len(members)
        rows.append(rho * protos[k].to(DT) + (1 - rho) * mean if bool(init[k]) else mean)
        new_init[k] = True
    return torch.stack(rows), new_init


def ref_scores(e, z, y, protos, pvalid, *, tau, hard_weight, sets, calibration):
    """Per embedding pixel: ``{"fn": [K scores], "fp": [K scores]}`` and the pixel record."""
    pixels = ref_pixels(e, z, y)
    k_count = protos.shape[0]
    _, fn, fp = ref_sets(pixels, k_count, sets == "image")

    out = []
    for i in pixels:
        k = i["y"]
        cos = [ref_cos(i["e"], protos[l]) / tau for l in range(k_count)]
        maps = {}
        for name, sets_k, sign in (("fn", fn, -1.0), ("fp", fp, 1.0)):
            scores = list(cos)
            if k != IGN:
                scope = i["img"] if sets == "image" else 0
                members = sets_k.get((scope, k), [])
                if members:
                    c = 1 + sign * ref_sim(i, members, calibration)
                    p_k = torch.softmax(i["z"], 0)[k]
                    scores[k] = scores[k] - hard_weight * (1 - p_k) * c
            maps[name] = scores
        out.append(maps)
    return out


def ref_metric_ce(e, z, y, protos, pvalid, *, tau=0.5, weight=0.1, hard_weight=1.0, sets="batch",
                  calibration="mean_of_cosines", ce_resolution="embedding", ohem=None, min_kept=0,
                  reduction="anchors"):
    b_, _, h, w = e.shape
    k_count = protos.shape[0]
    maps = ref_scores(e, z, y, protos, pvalid, tau=tau, hard_weight=hard_weight, sets=sets,
                      calibration=calibration)
    hy, wy = y.shape[-2:]
    if ce_resolution == "label":
        out_h, out_w = hy, wy
    else:
        out_h, out_w = h, w

    def score_at(name, b, i, j):
        if ce_resolution == "embedding":
            return maps[(b * h + i) * w + j][name]
        i0, i1, li = _bilinear_src(i, h, out_h)
        j0, j1, lj = _bilinear_src(j, w, out_w)
        at = lambda a, c: maps[(b * h + a) * w + c][name]  # noqa: E731
        return [(1 - li) * (1 - lj) * at(i0, j0)[l] + (1 - li) * lj * at(i0, j1)[l]
                + li * (1 - lj) * at(i1, j0)[l] + li * lj * at(i1, j1)[l] for l in range(k_count)]

    def label_at(b, i, j):
        if ce_resolution == "label":
            return int(y[b, i, j])
        return int(y[b, (i * hy) // h, (j * wy) // w])

    terms = {}
    for name in ("fn", "fp"):
        entries = []  # (CE, true-class probability) of every anchor
        for b in range(b_):
            for i in range(out_h):
                for j in range(out_w):
                    k = label_at(b, i, j)
                    if k == IGN or not bool(pvalid[k]):
                        continue
                    s = score_at(name, b, i, j)
                    valid = [l for l in range(k_count) if bool(pvalid[l])]
                    lse = torch.log(sum(torch.exp(s[l]) for l in valid))
                    prob = torch.exp(s[k]) / sum(torch.exp(s[l]) for l in valid)
                    entries.append((lse - s[k], float(prob.detach())))
        if ohem is not None and entries:
            ranked = sorted(p for _, p in entries)
            t = max(ranked[min(min_kept * b_, len(ranked) - 1)], ohem)
            entries = [(c, p) for c, p in entries if p < t]
        total = sum((c for c, _ in entries), e.new_zeros(()))
        denom = len(entries) if reduction == "anchors" else b_ * out_h * out_w
        terms[name] = weight * total / max(denom, 1)
    return terms


# ------------------------------------------------------------------------- inputs


def _run(e, z, y, protos, pvalid, **kw):
    lib = {k: v for k, v in kw.items() if k not in ("ohem", "min_kept")}
    if "ohem" in kw:
        lib.update(ohem_thresh=kw["ohem"], ohem_min_kept=kw.get("min_kept", 0))
    return run_both(e, z, y, protos, pvalid, reference=ref_metric_ce, lib_kw=lib, **kw)


def _assert_match(out, g, ref, g_ref):
    torch.testing.assert_close(out.terms["fn"], ref["fn"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.terms["fp"], ref["fp"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-12)


# -------------------------------------------------------------------------- tests


def test_extended_reference_agrees_with_the_plain_reference():
    """The new reference, at embedding resolution without OHEM, is the existing one."""
    e, z, y, protos, pvalid = make_inputs(seed=1)
    a = ref_metric_ce(e, z, y, protos, pvalid, hard_weight=0.7)
    b = ref_loss(e, z, y, protos, pvalid, hard_weight=0.7)
    torch.testing.assert_close(a["fn"], b["fn"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a["fp"], b["fp"], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("sets", ["batch", "image"])
@pytest.mark.parametrize("calibration", ["mean_of_cosines", "cosine_to_mean"])
@pytest.mark.parametrize("reduction", ["anchors", "all_pixels"])
def test_ce_at_label_resolution_matches_reference(sets, calibration, reduction):
    e, z, y, protos, pvalid = make_inputs(seed=2)
    out, g, ref, g_ref = _run(e, z, y, protos, pvalid, hard_weight=0.7, sets=sets, calibration=calibration,
                              ce_resolution="label", reduction=reduction)
    _assert_match(out, g, ref, g_ref)
    emb = rch_loss(e, z, y, protos, pvalid, hard_weight=0.7, sets=sets, calibration=calibration,
                   reduction=reduction)
    assert abs(float(out.loss.detach() - emb.loss)) > 1e-4  # labels at 2x: the resolutions differ


@pytest.mark.parametrize("ce_resolution", ["embedding", "label"])
@pytest.mark.parametrize("thresh,min_kept", [(0.7, 0), (0.7, 20), (0.05, 10), (1.0, 0), (0.0, 100000)])
def test_ohem_matches_reference(ce_resolution, thresh, min_kept):
    e, z, y, protos, pvalid = make_inputs(seed=3)
    kw = dict(ce_resolution=ce_resolution, ohem=thresh, min_kept=min_kept)
    out, g, ref, g_ref = _run(e, z, y, protos, pvalid, **kw)
    _assert_match(out, g, ref, g_ref)
    out_all, g_all, ref_all, g_ref_all = _run(e, z, y, protos, pvalid, reduction="all_pixels", **kw)
    _assert_match(out_all, g_all, ref_all, g_ref_all)


def test_ohem_selects_a_strict_subset_and_changes_the_loss():
    """Guard that the OHEM comparisons above discriminate: some anchors dropped, not all."""
    e, z, y, protos, pvalid = make_inputs(seed=3)
    plain = rch_loss(e, z, y, protos, pvalid).loss
    for thresh, min_kept in ((0.7, 0), (0.05, 10)):
        sel = rch_loss(e, z, y, protos, pvalid, ohem_thresh=thresh, ohem_min_kept=min_kept).loss
        assert abs(float(sel - plain)) > 1e-3
    # threshold 1 keeps every anchor (p < 1 strictly, p is never exactly 1 here)
    keep_all = rch_loss(e, z, y, protos, pvalid, ohem_thresh=1.0, ohem_min_kept=0).loss
    torch.testing.assert_close(keep_all, plain, rtol=1e-12, atol=1e-14)


def test_label_resolution_equal_sizes_is_embedding_resolution():
    e, z, y, protos, pvalid = make_inputs(seed=4, H=4, W=4)
    a = rch_loss(e, z, y, protos, pvalid, ce_resolution="label").loss
    b = rch_loss(e, z, y, protos, pvalid).loss
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _tiny(seed, label_hw):
    """3 classes, 3-channel 3x3 embeddings of 2 images, labels at ``label_hw``, one ignored row."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(2, 3, 3, 3, generator=g, dtype=DT, requires_grad=True)
    z = torch.randn(2, 3, label_hw, label_hw, generator=g, dtype=DT)
    y = torch.randint(0, 3, (2, label_hw, label_hw), generator=g)
    y[0, 0] = IGN
    return e, z, y, torch.randn(3, 3, generator=g, dtype=DT)


@pytest.mark.parametrize("kw", [dict(ce_resolution="label"), dict(ohem_thresh=0.7, ohem_min_kept=4),
                                dict(ce_resolution="label", ohem_thresh=0.7, reduction="all_pixels")])
def test_gradcheck_released_options(kw):
    e, z, y, protos = _tiny(8, 6)

    def f(x):
        return rch_loss(x, z, y, protos, loss_weight=1.0, **kw).loss

    assert torch.autograd.gradcheck(f, (e,))


# --------------------------------------------------------------- prototype gradient


def test_differentiable_update_matches_reference_and_carries_gradient():
    e, z, y, _, _ = make_inputs(seed=11)
    protos = torch.randn(4, 5, dtype=DT)
    init = torch.tensor([True, False, False, True])
    ea = e.clone().requires_grad_(True)
    new, new_init = rch_update_prototypes(ea, z, y, protos, init, rho=0.8, differentiable=True)
    er = e.clone().requires_grad_(True)
    ref, ref_init = ref_update_with_grad(er, z, y, protos, init, 0.8)
    torch.testing.assert_close(new, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(new_init, ref_init) and new.requires_grad
    w = torch.randn(4, 5, dtype=DT)
    g, = torch.autograd.grad((new * w).sum(), ea)
    g_ref, = torch.autograd.grad((ref * w).sum(), er)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    assert g.abs().sum() > 0
    detached, _ = rch_update_prototypes(e, z, y, protos, init, rho=0.8)
    torch.testing.assert_close(new.detach(), detached, rtol=1e-12, atol=1e-12)


def test_gradcheck_loss_through_the_updated_prototypes():
    e, z, y, protos = _tiny(9, 3)
    init = torch.tensor([True, True, False])

    def f(x):
        p, i = rch_update_prototypes(x, z, y, protos, init, differentiable=True)
        return rch_loss(x, z, y, p, i, loss_weight=1.0, prototype_grad=True).loss

    assert torch.autograd.gradcheck(f, (e,))


def _module(seed=10, **kw):
    return _module_and_inputs(kw.pop("prototype_update", "after"), seed=seed, **kw)


def test_module_prototype_grad_matches_reference():
    mod, feats, z, y = _module(prototype_grad=True)
    p_old, i_old = mod.prototypes.clone(), mod.initialized.clone()
    f = feats.clone().requires_grad_(True)
    loss = mod(f, z, y)
    loss.backward()
    fr = feats.clone().requires_grad_(True)
    wt = mod.head.weight[:, :, 0, 0].detach()
    e = torch.einsum("ec,bchw->behw", wt, fr) + mod.head.bias.detach()[None, :, None, None]
    p_new, i_new = ref_update_with_grad(e, z, y, p_old, i_old, 0.9)
    ref = ref_loss(e, z, y, p_new, i_new)
    (ref["fn"] + ref["fp"]).backward()
    torch.testing.assert_close(loss, ref["fn"] + ref["fp"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f.grad, fr.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(mod.prototypes, p_new.detach(), rtol=1e-12, atol=1e-12)
    assert not mod.prototypes.requires_grad
    # the paper's default (constant prototypes) has the same value and a different gradient
    plain, feats2, _, _ = _module(prototype_grad=False)
    f2 = feats2.clone().requires_grad_(True)
    loss2 = plain(f2, z, y)
    loss2.backward()
    torch.testing.assert_close(loss2, loss, rtol=1e-12, atol=1e-14)
    assert (f2.grad - f.grad).abs().max() > 1e-5
    # eval mode: no update, no gradient path into the prototypes
    mod.eval()
    f3 = feats.clone().requires_grad_(True)
    mod(f3, z, y).backward()
    assert torch.isfinite(f3.grad).all()


def test_module_options_repr_and_validation():
    mod = RCHLoss(4, 6, embed_dim=5, prototype_grad=True, ce_resolution="label", ohem_thresh=0.7, ohem_min_kept=10,
                  reduction="all_pixels")
    r = repr(mod)
    for s in ("prototype_grad=True", "ce_resolution='label'", "ohem_thresh=0.7", "ohem_min_kept=10",
              "reduction='all_pixels'"):
        assert s in r
    with pytest.raises(ValueError, match="prototype_update"):
        RCHLoss(4, 6, prototype_grad=True, prototype_update="before")
    with pytest.raises(ValueError, match="ce_resolution"):
        RCHLoss(4, 6, ce_resolution="full")
    with pytest.raises(ValueError, match="ohem_thresh"):
        RCHLoss(4, 6, ohem_thresh=1.5)
    with pytest.raises(ValueError, match="ohem_thresh"):
        RCHLoss(4, 6, ohem_thresh=float("nan"))
    with pytest.raises(ValueError, match="ohem_min_kept"):
        RCHLoss(4, 6, ohem_min_kept=-1)
    with pytest.raises(TypeError, match="ohem_min_kept"):
        RCHLoss(4, 6, ohem_min_kept=1.5)
    with pytest.raises(ValueError, match="reduction"):
        RCHLoss(4, 6, reduction="sum")
    e, z, y, protos, _ = make_inputs()
    with pytest.raises(ValueError, match="reduction"):
        rch_loss(e, z, y, protos, reduction="mean")


def test_module_label_resolution_ohem_matches_functional():
    mod, feats, z, y = _module(ce_resolution="label", ohem_thresh=0.7, ohem_min_kept=5, reduction="all_pixels")
    p_old, i_old = mod.prototypes.clone(), mod.initialized.clone()
    loss = mod(feats, z, y)
    e = mod.embed(feats).detach()
    p_new, i_new = rch_update_prototypes(e, z, y, p_old, i_old)
    want = rch_loss(e, z, y, p_new, i_new, ce_resolution="label", ohem_thresh=0.7, ohem_min_kept=5,
                    reduction="all_pixels").loss
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------ nothing to compute


@pytest.mark.parametrize("kw", [dict(ce_resolution="label"), dict(ohem_thresh=0.7, ohem_min_kept=3),
                                dict(ce_resolution="label", ohem_thresh=0.7, reduction="all_pixels"),
                                dict(sets="image", reduction="all_pixels")])
def test_all_ignored_gives_zero_with_every_option(kw):
    e, z, y, protos, pvalid = make_inputs(seed=7)
    y = torch.full_like(y, IGN)
    ea = e.clone().requires_grad_(True)
    out = rch_loss(ea, z, y, protos, pvalid, **kw)
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and (ea.grad == 0).all()


def test_all_ignored_image_stays_zero_over_training_steps():
    """One image all ignored (the released loss is NaN there): its share is 0, the loss and the
    state stay finite over steps with every released option on."""
    mod, feats, z, y = _module(prototype_grad=True, ce_resolution="label", ohem_thresh=0.7, ohem_min_kept=4,
                               sets="image", calibration="cosine_to_mean")
    y = y.clone()
    y[0] = IGN
    opt = torch.optim.SGD(mod.parameters(), lr=0.1)
    for _ in range(4):
        opt.zero_grad()
        f = feats.clone().requires_grad_(True)
        loss = mod(f, z, y)
        loss.backward()
        opt.step()
        assert math.isfinite(float(loss.detach())) and torch.isfinite(f.grad).all()
        assert (f.grad[0] == 0).all()  # the all-ignored image contributes nothing
        assert torch.isfinite(mod.prototypes).all()
    y_all = torch.full_like(y, IGN)
    f = feats.clone().requires_grad_(True)
    loss = mod(f, z, y_all)
    loss.backward()
    assert float(loss.detach()) == 0.0 and (f.grad == 0).all()
