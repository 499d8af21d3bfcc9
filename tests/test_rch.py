"""RCH (METHODS.md section 4) against an independent float64 loop reference.

The reference below is written from the equations: explicit loops over pixels and
classes, explicit pairwise cosines for the FN/FP means, explicit nearest/bilinear
resizing. It never calls pixreg.losses.rch.
"""
from __future__ import annotations

import copy
import doctest
import math

import pytest
import torch
import torch.nn.functional as F

import pixreg.losses.rch as rch_mod
from pixreg.losses.rch import RCHLoss, rch_loss, rch_update_prototypes

IGN = 255
EPS = 1e-12
DT = torch.float64


# ------------------------------------------------------------------ slow reference


def _bilinear_src(i: int, in_size: int, out_size: int):
    """PyTorch's align_corners=False source index of output cell i."""
    s = (i + 0.5) * in_size / out_size - 0.5
    s = max(s, 0.0)
    i0 = min(int(math.floor(s)), in_size - 1)
    i1 = min(i0 + 1, in_size - 1)
    return i0, i1, s - i0


def ref_pixels(e, z, y):
    """List of pixels (emb vector, label, logit vector, image) at embedding resolution."""
    if e.dim() == 2:  # flat: one "image" of N x 1 pixels
        e, z, y = e.t()[None, :, :, None], z.t()[None, :, :, None], y[None, :, None]
    b_, _, h, w = e.shape
    hz, wz = z.shape[-2:]
    hy, wy = y.shape[-2:]
    out = []
    for b in range(b_):
        for i in range(h):
            for j in range(w):
                lab = int(y[b, (i * hy) // h, (j * wy) // w])  # nearest, floor rounding
                i0, i1, li = _bilinear_src(i, hz, h)
                j0, j1, lj = _bilinear_src(j, wz, w)
                zz = ((1 - li) * (1 - lj) * z[b, :, i0, j0] + (1 - li) * lj * z[b, :, i0, j1]
                      + li * (1 - lj) * z[b, :, i1, j0] + li * lj * z[b, :, i1, j1])
                out.append({"e": e[b, :, i, j], "y": lab, "z": zz.detach(), "img": b})
    return out


def ref_cos(u, v):
    return torch.dot(u, v) / (torch.clamp(u.norm(), min=EPS) * torch.clamp(v.norm(), min=EPS))


def ref_sets(pixels, k_count, image_sets):
    """TP/FN/FP member lists keyed by (scope, class)."""
    tp, fn, fp = {}, {}, {}
    for q in pixels:
        if q["y"] == IGN:
            continue
        pred = int(torch.argmax(q["z"]))
        scope = q["img"] if image_sets else 0
        if pred == q["y"]:
            tp.setdefault((scope, q["y"]), []).append(q)
        else:
            fn.setdefault((scope, q["y"]), []).append(q)
            fp.setdefault((scope, pred), []).append(q)
    return tp, fn, fp


def ref_sim(i, members, calibration):
    """FN/FP similarity of pixel ``i`` to a set: mean of cosines (paper) or cosine to the mean (released)."""
    if calibration == "mean_of_cosines":
        return sum(ref_cos(j["e"], i["e"]) for j in members) / len(members)
    mean = sum(j["e"] for j in members) / len(members)
    return ref_cos(i["e"], mean)


def ref_loss(e, z, y, protos, pvalid, *, tau=0.5, weight=0.1, hard_weight=1.0, use_fn=True, use_fp=True,
             sets="batch", calibration="mean_of_cosines", detach_calib=False):
    pixels = ref_pixels(e, z, y)
    k_count = protos.shape[0]
    _, fn, fp = ref_sets(pixels, k_count, sets == "image")

    def sim(i, members):
        return ref_sim(i, members, calibration)

    tot = {"fn": e.new_zeros(()), "fp": e.new_zeros(())}
    n_anchor = 0
    for i in pixels:
        k = i["y"]
        if k == IGN or not bool(pvalid[k]):
            continue
        n_anchor += 1
        scope = i["img"] if sets == "image" else 0
        fn_set, fp_set = fn.get((scope, k), []), fp.get((scope, k), [])
        phi = 1 - sim(i, fn_set) if (use_fn and fn_set) else e.new_zeros(())
        psi = 1 + sim(i, fp_set) if (use_fp and fp_set) else e.new_zeros(())
        if detach_calib:
            phi, psi = phi.detach(), psi.detach()
        p_k = torch.softmax(i["z"], 0)[k]
        logit = {l: ref_cos(i["e"], protos[l]) / tau for l in range(k_count) if bool(pvalid[l])}
        for name, c in (("fn", phi), ("fp", psi)):
            zt = logit[k] - hard_weight * (1 - p_k) * c
            denom = torch.exp(zt) + sum(torch.exp(v) for l, v in logit.items() if l != k)
            tot[name] = tot[name] + (torch.log(denom) - zt)
    if n_anchor == 0:
        return {n: weight * v for n, v in tot.items()}
    return {n: weight * v / n_anchor for n, v in tot.items()}


def ref_update(e, z, y, protos, init, rho, source="tp"):
    pixels = ref_pixels(e.detach(), z, y)
    tp, _, _ = ref_sets(pixels, protos.shape[0], False)
    new, new_init = protos.clone().to(DT), init.clone()
    for k in range(protos.shape[0]):
        if source == "gt":
            members = [q for q in pixels if q["y"] == k]
        else:
            members = tp.get((0, k), [])
        if not members:
            continue
        mean = sum(q["e"] for q in members) / len(members)
        new[k] = rho * protos[k].to(DT) + (1 - rho) * mean if bool(init[k]) else mean
        new_init[k] = True
    return new, new_init


# ------------------------------------------------------------------------- inputs


def make_inputs(seed=0, B=2, E=5, h=4, w=4, K=4, H=8, W=8):
    """Ignored pixels; class 2 never predicted (TP_2 = FP_2 = {}, all FN); class 3 absent
    from the labels but predicted (FP only); class 1 without prototype; logits at 2x."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(B, E, h, w, generator=g, dtype=DT)
    z = 2 * torch.randn(B, K, H, W, generator=g, dtype=DT)
    z[:, 2] -= 20.0
    y = torch.randint(0, 3, (B, H, W), generator=g)
    y[0, :2] = IGN
    y[1, 4:6, 2:4] = IGN
    protos = torch.randn(K, E, generator=g, dtype=DT)
    pvalid = torch.tensor([True, False, True, True])
    return e, z, y, protos, pvalid


def _check_sets_nontrivial(e, z, y, K):
    """Guard: the inputs exercise TP, FN, FP, empty FN and empty FP sets."""
    pixels = ref_pixels(e, z, y)
    tp, fn, fp = ref_sets(pixels, K, False)
    assert tp.get((0, 0)) and fn.get((0, 0)) and fp.get((0, 0))
    assert not fp.get((0, 2)) and fn.get((0, 2)) and fp.get((0, 3)) and not fn.get((0, 3))
    assert any(q["y"] == 1 and int(torch.argmax(q["z"])) == 0 for q in pixels)  # FP of 0, no prototype of 1


def _run(e, z, y, protos, pvalid, reference=None, lib_kw=None, **kw):
    """Loss and embedding gradient of rch_loss (``lib_kw``, default ``kw``) and of the reference (``kw``)."""
    ea = e.clone().requires_grad_(True)
    out = rch_loss(ea, z, y, protos, pvalid, **(kw if lib_kw is None else lib_kw))
    out.loss.backward()
    er = e.clone().requires_grad_(True)
    ref = (reference or ref_loss)(er, z, y, protos, pvalid, **kw)
    (ref["fn"] + ref["fp"]).backward()
    return out, ea.grad, ref, er.grad


# -------------------------------------------------------------------------- tests


def test_inputs_exercise_all_sets():
    e, z, y, protos, pvalid = make_inputs()
    _check_sets_nontrivial(e, z, y, 4)


@pytest.mark.parametrize("sets", ["batch", "image"])
@pytest.mark.parametrize("calibration", ["mean_of_cosines", "cosine_to_mean"])
@pytest.mark.parametrize("use_fn,use_fp", [(True, True), (True, False), (False, True), (False, False)])
def test_loss_and_grad_match_reference(sets, calibration, use_fn, use_fp):
    e, z, y, protos, pvalid = make_inputs(seed=1)
    kw = dict(tau=0.5, weight=0.1, hard_weight=0.7, use_fn=use_fn, use_fp=use_fp, sets=sets,
              calibration=calibration)
    out, g, ref, g_ref = _run(e, z, y, protos, pvalid, **kw)
    torch.testing.assert_close(out.terms["fn"], ref["fn"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.terms["fp"], ref["fp"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.loss, ref["fn"] + ref["fp"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-12)
    assert float(out.loss.detach()) > 0


def test_switches_and_modes_change_the_loss():
    """Guard that the parametrised comparisons above discriminate the options."""
    e, z, y, protos, pvalid = make_inputs(seed=1)
    vals = {}
    for sets in ("batch", "image"):
        for cal in ("mean_of_cosines", "cosine_to_mean"):
            for fnp in ((True, True), (True, False), (False, True), (False, False)):
                vals[(sets, cal, fnp)] = float(rch_loss(e, z, y, protos, pvalid, sets=sets, calibration=cal,
                                                       use_fn=fnp[0], use_fp=fnp[1]).loss)
    plain = vals[("batch", "mean_of_cosines", (False, False))]
    assert all(v == pytest.approx(plain, rel=1e-12) for k, v in vals.items() if k[2] == (False, False))
    distinct = {round(v, 9) for k, v in vals.items() if k[2] != (False, False)}
    assert len(distinct) == 12


def test_both_off_is_plain_cosine_softmax_ce():
    e, z, y, protos, pvalid = make_inputs(seed=2)
    out = rch_loss(e, z, y, protos, pvalid, use_fn=False, use_fp=False, tau=0.5, loss_weight=0.1)
    # plain CE to the valid prototypes via F.cross_entropy on explicit logits
    lab = F.interpolate(y[:, None].double(), size=(4, 4), mode="nearest")[:, 0].long().reshape(-1)
    ef = e.permute(0, 2, 3, 1).reshape(-1, 5)
    logits = F.normalize(ef, dim=1) @ F.normalize(protos, dim=1).t() / 0.5
    logits[:, ~pvalid] = -1e30
    keep = (lab != IGN) & pvalid[lab.clamp(max=3)]
    ce = F.cross_entropy(logits[keep], lab[keep])
    torch.testing.assert_close(out.terms["fn"], 0.1 * ce)
    torch.testing.assert_close(out.terms["fp"], 0.1 * ce)


def test_calibrations_carry_gradient_prototypes_and_logits_do_not():
    e, z, y, protos, pvalid = make_inputs(seed=3)
    ea = e.clone().requires_grad_(True)
    za = z.clone().requires_grad_(True)
    pa = protos.clone().requires_grad_(True)
    out = rch_loss(ea, za, y, pa, pvalid)
    g_e, g_z, g_p = torch.autograd.grad(out.loss, (ea, za, pa), allow_unused=True)
    assert g_z is None  # p_ik, the sets and the prediction come from logits.detach()
    assert g_p is None  # prototypes are an EMA state
    er = e.clone().requires_grad_(True)
    ref = ref_loss(er, z, y, protos, pvalid)
    g_full, = torch.autograd.grad(ref["fn"] + ref["fp"], er)
    er2 = e.clone().requires_grad_(True)
    ref_d = ref_loss(er2, z, y, protos, pvalid, detach_calib=True)
    g_det, = torch.autograd.grad(ref_d["fn"] + ref_d["fp"], er2)
    torch.testing.assert_close(g_e, g_full, rtol=1e-8, atol=1e-12)
    assert (g_e - g_det).abs().max() > 1e-4  # psi/phi are NOT detached


def test_fp_pixels_get_gradient_only_through_psi():
    """A pixel labelled 1 (no prototype: not an anchor) but predicted 0 is in FP_0 only."""
    e, z, y, protos, pvalid = make_inputs(seed=3)
    lab = F.interpolate(y[:, None].double(), size=(4, 4), mode="nearest")[:, 0].long()
    zr = F.interpolate(z, size=(4, 4), mode="bilinear", align_corners=False)
    fp_only = (lab == 1) & (zr.argmax(1) == 0)
    other_1 = (lab == 1) & (zr.argmax(1) != 0)
    assert fp_only.any() and other_1.any()
    grads = {}
    for use_fp in (True, False):
        ea = e.clone().requires_grad_(True)
        rch_loss(ea, z, y, protos, pvalid, use_fp=use_fp).loss.backward()
        grads[use_fp] = ea.grad.norm(dim=1)
    assert (grads[True][fp_only] > 1e-6).all()
    assert (grads[False][fp_only] == 0).all()
    assert (grads[True][other_1] == 0).all()  # FP of a class never predicted there / not an anchor
    assert (grads[True][lab == IGN] == 0).all()


def test_flat_inputs_match_reference():
    g = torch.Generator().manual_seed(5)
    n, E, K = 30, 4, 3
    e = torch.randn(n, E, generator=g, dtype=DT)
    z = torch.randn(n, K, generator=g, dtype=DT)
    y = torch.randint(0, K, (n,), generator=g)
    y[:4] = IGN
    protos = torch.randn(K, E, generator=g, dtype=DT)
    pvalid = torch.tensor([True, True, False])
    for cal in ("mean_of_cosines", "cosine_to_mean"):
        out, g_e, ref, g_ref = _run(e, z, y, protos, pvalid, calibration=cal)
        torch.testing.assert_close(out.loss, ref["fn"] + ref["fp"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_e, g_ref, rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="sets"):
        rch_loss(e, z, y, protos, sets="image")


def test_single_class_batch_matches_reference():
    e, z, y, protos, _ = make_inputs(seed=6)
    y = torch.where(y == IGN, y, torch.zeros_like(y))
    pvalid = torch.ones(4, dtype=torch.bool)
    for sets in ("batch", "image"):
        out, g_e, ref, g_ref = _run(e, z, y, protos, pvalid, sets=sets)
        assert torch.isfinite(out.loss) and torch.isfinite(g_e).all()
        torch.testing.assert_close(out.loss, ref["fn"] + ref["fp"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_e, g_ref, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("case", ["all_ignored", "no_prototype"])
def test_nothing_defined_gives_zero_and_finite_grad(case):
    e, z, y, protos, pvalid = make_inputs(seed=7)
    if case == "all_ignored":
        y = torch.full_like(y, IGN)
    else:
        pvalid = torch.zeros(4, dtype=torch.bool)
    for sets in ("batch", "image"):
        ea = e.clone().requires_grad_(True)
        out = rch_loss(ea, z, y, protos, pvalid, sets=sets)
        out.loss.backward()
        assert float(out.loss.detach()) == 0.0 and float(out.terms["fn"].detach()) == 0.0
        assert torch.isfinite(ea.grad).all() and (ea.grad == 0).all()


@pytest.mark.parametrize("sets,calibration", [("batch", "mean_of_cosines"), ("image", "cosine_to_mean")])
def test_gradcheck(sets, calibration):
    g = torch.Generator().manual_seed(8)
    e = torch.randn(2, 3, 3, 3, generator=g, dtype=DT, requires_grad=True)
    z = torch.randn(2, 3, 3, 3, generator=g, dtype=DT)
    y = torch.randint(0, 3, (2, 3, 3), generator=g)
    y[0, 0, 0] = IGN
    protos = torch.randn(3, 3, generator=g, dtype=DT)
    pvalid = torch.tensor([True, True, False])

    def f(x):
        return rch_loss(x, z, y, protos, pvalid, sets=sets, calibration=calibration, loss_weight=1.0).loss

    assert torch.autograd.gradcheck(f, (e,))


def test_prototype_update_matches_reference_and_is_pure():
    e, z, y, _, _ = make_inputs(seed=11)  # TP in classes 0 and 1
    protos = torch.randn(4, 5, dtype=DT)
    init = torch.tensor([True, False, False, True])
    p0, i0 = protos.clone(), init.clone()
    ea = e.clone().requires_grad_(True)
    new, new_init = rch_update_prototypes(ea, z, y, protos, init, rho=0.8)
    ref, ref_init = ref_update(e, z, y, protos, init, 0.8)
    torch.testing.assert_close(new, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(new_init, ref_init)
    assert not new.requires_grad
    assert torch.equal(protos, p0) and torch.equal(init, i0)  # pure
    # class 0 (initialised, TP): EMA; class 1 (first sighting): TP mean; 2 (never predicted), 3 (absent): untouched
    assert torch.equal(new_init, torch.tensor([True, True, False, True]))
    assert torch.equal(new[2], protos[2]) and torch.equal(new[3], protos[3])
    assert not torch.allclose(new[0], protos[0]) and not torch.allclose(new[1], protos[1])
    # float32 state with float64 embeddings keeps its dtype
    new32, _ = rch_update_prototypes(e, z, y, protos.float(), init)
    assert new32.dtype == torch.float32


def test_ground_truth_prototype_source_matches_reference():
    """``source="gt"``: every labelled pixel of the class, not only its true positives."""
    e, z, y, _, _ = make_inputs(seed=11)
    protos = torch.randn(4, 5, dtype=DT)
    init = torch.tensor([True, False, False, True])
    new, new_init = rch_update_prototypes(e, z, y, protos, init, rho=0.8, source="gt")
    ref, ref_init = ref_update(e, z, y, protos, init, 0.8, source="gt")
    torch.testing.assert_close(new, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(new_init, ref_init)
    tp_new, _ = rch_update_prototypes(e, z, y, protos, init, rho=0.8)
    assert not torch.allclose(new, tp_new)  # the inputs have FN pixels, so the sources differ
    with pytest.raises(ValueError, match="source"):
        rch_update_prototypes(e, z, y, protos, init, source="learned")
    mod = RCHLoss(4, 5, embed_dim=3, prototype_source="gt").double().train()
    assert "prototype_source='gt'" in repr(mod)
    mod(e, z, y)
    want, _ = rch_update_prototypes(mod.embed(e).detach(), z, y, torch.zeros(4, 3, dtype=DT),
                                    torch.zeros(4, dtype=torch.bool), source="gt")
    torch.testing.assert_close(mod.prototypes, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="prototype_source"):
        RCHLoss(4, 5, prototype_source="x")


def _module_and_inputs(prototype_update, seed=10, **kw):
    torch.manual_seed(seed)
    mod = RCHLoss(num_classes=4, feature_dim=6, embed_dim=5, prototype_update=prototype_update, **kw).double()
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, 6, 4, 4, generator=g, dtype=DT)
    _, z, y, protos, _ = make_inputs(seed=seed)
    mod.prototypes.copy_(protos)
    mod.initialized.copy_(torch.tensor([True, False, True, False]))
    return mod, feats, z, y


def _head(mod, feats):
    wt = mod.head.weight[:, :, 0, 0].detach()
    return torch.einsum("ec,bchw->behw", wt, feats) + mod.head.bias.detach()[None, :, None, None]


@pytest.mark.parametrize("order", ["before", "after"])
def test_module_matches_reference_and_updates_state(order):
    mod, feats, z, y = _module_and_inputs(order)
    p_old, i_old = mod.prototypes.clone(), mod.initialized.clone()
    f = feats.clone().requires_grad_(True)
    loss = mod(f, z, y)
    e = _head(mod, feats)
    p_new, i_new = ref_update(e, z, y, p_old, i_old, 0.9)
    used = (p_new, i_new) if order == "after" else (p_old, i_old)
    ref = ref_loss(e, z, y, used[0], used[1])
    torch.testing.assert_close(loss, ref["fn"] + ref["fp"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mod.terms["fn"], ref["fn"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mod.prototypes, p_new, rtol=1e-12, atol=1e-12)
    assert torch.equal(mod.initialized, i_new)
    assert torch.equal(mod.prototypes[3], p_old[3])  # class 3: no TP, left untouched
    loss.backward()
    assert mod.head.weight.grad is not None and torch.isfinite(f.grad).all()


def test_module_first_step_and_eval_mode():
    torch.manual_seed(0)
    feats = torch.randn(2, 6, 4, 4, dtype=DT)
    _, z, y, _, _ = make_inputs(seed=11)
    before = RCHLoss(4, 6, embed_dim=5, prototype_update="before").double()
    after = RCHLoss(4, 6, embed_dim=5, prototype_update="after").double()
    f = feats.clone().requires_grad_(True)
    lb = before(f, z, y)
    lb.backward()
    assert float(lb.detach()) == 0.0 and (f.grad == 0).all()  # empty state: no prototype yet
    assert float(after(feats, z, y).detach()) > 0
    assert before.initialized.any()
    after.eval()
    p, i = after.prototypes.clone(), after.initialized.clone()
    after(feats, z, y)
    assert torch.equal(after.prototypes, p) and torch.equal(after.initialized, i)


def test_state_dict_round_trip():
    mod, feats, z, y = _module_and_inputs("after")
    mod(feats, z, y)
    sd = mod.state_dict()
    assert {"prototypes", "initialized", "head.weight"} <= set(sd)
    fresh = RCHLoss(num_classes=4, feature_dim=6, embed_dim=5).double()
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.prototypes, mod.prototypes) and torch.equal(fresh.initialized, mod.initialized)
    mod.eval(), fresh.eval()
    torch.testing.assert_close(fresh(feats, z, y), mod(feats, z, y))


@pytest.mark.parametrize("head_norm", [False, True])
def test_head_flat_equals_spatial(head_norm):
    torch.manual_seed(0)
    mod = RCHLoss(4, 6, embed_dim=5, head_norm=head_norm)
    assert isinstance(mod.norm, torch.nn.BatchNorm2d) == head_norm
    assert (mod.head.bias is None) == head_norm
    x = torch.randn(10, 6)
    flat = mod.embed(x)
    spatial = mod.embed(x.t()[None, :, :, None])[0, :, :, 0].t()
    torch.testing.assert_close(flat, spatial)
    z = torch.randn(10, 4)
    y = torch.randint(0, 4, (10,))
    assert torch.isfinite(mod(x, z, y))


def test_compute_entry_point_and_terms():
    mod, feats, z, y = _module_and_inputs("before")
    assert RCHLoss.uses_features and RCHLoss.uses_logits
    mod2 = copy.deepcopy(mod)
    a = mod(feats, z, y)
    b = mod2.compute(y, features=feats, logits=z)
    torch.testing.assert_close(a, b)
    assert set(mod.terms) == {"fn", "fp"} and not any(t.requires_grad for t in mod.terms.values())
    torch.testing.assert_close(sum(mod.terms.values()), a.detach())
    with pytest.raises(ValueError, match="logits"):
        mod.compute(y, features=feats)


def test_autocast_bfloat16_close_to_float32():
    torch.manual_seed(0)
    mod = RCHLoss(4, 6, embed_dim=16)
    g = torch.Generator().manual_seed(12)
    feats = torch.randn(2, 6, 8, 8, generator=g)
    z = 2 * torch.randn(2, 4, 16, 16, generator=g)
    y = torch.randint(0, 4, (2, 16, 16), generator=g)
    y[0, :3] = IGN
    m32, m16 = copy.deepcopy(mod), copy.deepcopy(mod)
    m32(feats, z, y)
    m16(feats, z, y)  # one step each to have prototypes
    ref = m32(feats, z, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m16(feats, z, y)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert m16.prototypes.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(m16.prototypes, m32.prototypes, rtol=3e-2, atol=3e-2)


def test_bad_inputs_raise():
    e, z, y, protos, pvalid = make_inputs()
    with pytest.raises(ValueError, match="embeddings"):
        rch_loss(e[0], z, y, protos)  # 3-D
    with pytest.raises(TypeError, match="embeddings"):
        rch_loss(e.long(), z, y, protos)
    bad = e.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        rch_loss(bad, z, y, protos)
    with pytest.raises(ValueError, match="labels"):
        rch_loss(e, z, torch.full_like(y, 4), protos)
    with pytest.raises(TypeError, match="labels"):
        rch_loss(e, z, y.float(), protos)
    with pytest.raises(ValueError, match="classes"):
        rch_loss(e, z[:, :3], y, protos)
    with pytest.raises(ValueError, match="batch size"):
        rch_loss(e, z[:1], y, protos)
    with pytest.raises(ValueError, match="logits"):
        rch_loss(e, z[:, :, 0, 0], y, protos)
    with pytest.raises(ValueError, match="prototypes"):
        rch_loss(e, z, y, protos[:, :3])
    with pytest.raises(ValueError, match="prototype_valid"):
        rch_loss(e, z, y, protos, pvalid[:3])
    with pytest.raises(TypeError, match="prototype_valid"):
        rch_loss(e, z, y, protos, pvalid.long())
    with pytest.raises(ValueError, match="same device"):
        rch_loss(e, z.to("meta"), y, protos)
    with pytest.raises(ValueError, match="same device"):
        rch_loss(e, z, y, protos.to("meta"))
    with pytest.raises(ValueError, match="tau"):
        rch_loss(e, z, y, protos, tau=0.0)
    with pytest.raises(ValueError, match="sets"):
        rch_loss(e, z, y, protos, sets="pixel")
    with pytest.raises(ValueError, match="calibration"):
        rch_loss(e, z, y, protos, calibration="other")
    with pytest.raises(ValueError, match="rho"):
        rch_update_prototypes(e, z, y, protos, pvalid, rho=1.0)
    with pytest.raises(ValueError, match="prototype_update"):
        RCHLoss(4, 6, prototype_update="never")
    with pytest.raises(TypeError, match="num_classes"):
        RCHLoss(4.0, 6)
    mod = RCHLoss(4, 6, embed_dim=5)
    with pytest.raises(ValueError, match="feature_dim"):
        mod(torch.randn(2, 7, 4, 4), z.float(), y)
    with pytest.raises(ValueError, match="same device"):
        mod(torch.randn(2, 6, 4, 4, device="meta"), z.float(), y)
    with pytest.raises(ValueError, match="sets"):
        RCHLoss(4, 6, embed_dim=5, sets="image")(torch.randn(10, 6), torch.randn(10, 4), torch.randint(0, 4, (10,)))


def test_docstring_examples():
    res = doctest.testmod(rch_mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted >= 2 and res.failed == 0
