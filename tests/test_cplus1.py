"""C+1 loss (METHODS.md section 1) against an independent float64 loop reference.

The reference below is written from the equations only: explicit Python loops over
pixels and classes, float64, never calling pixreg.
"""
import copy
import doctest
import math

import pytest
import torch
from torch import nn

import pixreg.losses.cplus1 as cplus1_mod
from pixreg.losses.cplus1 import CPlus1Loss, cplus1_loss, update_moving_average_centres

IGN = 255


# --------------------------------------------------------------------------- reference
def ref_resize(labels, h, w):
    """Nearest, floor rounding: out[b, i, j] = labels[b, floor(i * H / h), floor(j * W / w)]."""
    B, H, W = labels.shape
    out = torch.empty(B, h, w, dtype=labels.dtype)
    for b in range(B):
        for i in range(h):
            for j in range(w):
                out[b, i, j] = labels[b, (i * H) // h, (j * W) // w]
    return out


def ref_pixels(features, labels):
    """List of (feature vector, label) over all pixels, labels at feature resolution."""
    pix = []
    if features.dim() == 2:
        for n in range(features.shape[0]):
            pix.append((features[n], int(labels[n])))
        return pix
    B, D, h, w = features.shape
    lab = ref_resize(labels, h, w)
    for b in range(B):
        for i in range(h):
            for j in range(w):
                pix.append((features[b, :, i, j], int(lab[b, i, j])))
    return pix


def ref_norm(v, normalize):
    if not normalize:
        return v
    n = torch.sqrt((v * v).sum())
    return v / max(n, torch.tensor(1e-12, dtype=v.dtype))


def ref_dist(a, b, distance):
    s = ((a - b) ** 2).sum()
    return s if distance == "squared_euclidean" else torch.sqrt(s)


def coi_list(K, bg):
    return [k for k in range(K) if k != bg]


def ref_loss(features, labels, centres, mask, *, bg=0, alpha=0.1, beta=1e-4, margin=1.0,
             distance="squared_euclidean", normalize=True):
    """Returns (alpha * L_compact, beta * L_background) in float64, differentiable."""
    K = centres.shape[0] + 1
    cois = coi_list(K, bg)
    n_centres = sum(1 for j in range(len(cois)) if mask[j])
    comp_sum, comp_n, bg_sum, bg_n = 0.0, 0, 0.0, 0
    for v, y in ref_pixels(features.double(), labels):
        if y == IGN:
            continue
        f = ref_norm(v, normalize)
        if y == bg:
            s = 0.0
            for j in range(len(cois)):
                if mask[j]:
                    h = margin - ref_dist(f, centres[j].double(), distance)
                    if h > 0:
                        s = s + h
            bg_sum = bg_sum + (s / n_centres if n_centres > 0 else 0.0)
            bg_n += 1
        else:
            j = cois.index(y)
            if mask[j]:
                comp_sum = comp_sum + ref_dist(f, centres[j].double(), distance)
                comp_n += 1
    compact = comp_sum / comp_n if comp_n else torch.zeros((), dtype=torch.float64)
    background = bg_sum / bg_n if bg_n else torch.zeros((), dtype=torch.float64)
    return alpha * torch.as_tensor(compact, dtype=torch.float64), beta * torch.as_tensor(background, dtype=torch.float64)


def ref_ema(features, labels, centres, init, *, bg=0, momentum=0.9, normalize=True):
    K = centres.shape[0] + 1
    cois = coi_list(K, bg)
    new = centres.detach().double().clone()
    new_init = init.clone()
    pix = ref_pixels(features.detach().double(), labels)
    for j, k in enumerate(cois):
        members = [ref_norm(v, normalize) for v, y in pix if y == k]
        if not members:
            continue
        batch = sum(members) / len(members)
        new[j] = momentum * new[j] + (1 - momentum) * batch if init[j] else batch
        new_init[j] = True
    return new, new_init


# --------------------------------------------------------------------------- data
def make_batch(B=2, D=5, h=4, w=5, K=4, absent=(), seed=0, ignore_frac=0.2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, D, h, w, generator=g, dtype=dtype)
    present = [k for k in range(K) if k not in absent]
    labels = torch.tensor(present)[torch.randint(0, len(present), (B, h, w), generator=g)]
    labels[torch.rand(B, h, w, generator=g) < ignore_frac] = IGN
    return feats, labels


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def close(a, b, tol=1e-10):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               rtol=tol, atol=tol)


# --------------------------------------------------------------------------- functional
@pytest.mark.parametrize("distance,margin", [("squared_euclidean", 1.5), ("euclidean", 1.3)])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("bg", [0, 2])
def test_functional_matches_reference(distance, margin, normalize, bg):
    K = 5
    feats, labels = make_batch(K=K, absent=(3,), seed=1 + bg)
    if not normalize:
        margin *= 4.0  # raw features have larger distances
    feats.requires_grad_(True)
    centres = torch.randn(K - 1, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    centres = (centres / centres.norm(dim=1, keepdim=True) * 0.8).requires_grad_(True)
    mask = torch.tensor([True, False, True, True])  # one CoI without a centre
    kw = dict(alpha=0.3, beta=0.7, margin=margin, distance=distance, normalize=normalize)
    out = cplus1_loss(feats, labels, centres, centre_mask=mask, background_index=bg, **kw)
    rc, rb = ref_loss(feats, labels, centres, mask, bg=bg, **kw)
    assert set(out.terms) == {"compact", "background"}
    close(out.terms["compact"], rc)
    close(out.terms["background"], rb)
    close(out.loss, rc + rb)
    assert rc > 0 and rb > 0  # both terms exercised
    for a, b in zip(grads(out.loss, feats, centres), grads(rc + rb, feats, centres)):
        close(a, b)


def test_flat_features_match_reference():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(30, 6, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 3, (30,), generator=g)
    labels[::7] = IGN
    centres = torch.randn(2, 6, dtype=torch.float64, generator=g) * 0.5
    out = cplus1_loss(feats, labels, centres, margin=1.5)
    rc, rb = ref_loss(feats, labels, centres, [True, True], margin=1.5)
    close(out.terms["compact"], rc)
    close(out.terms["background"], rb)
    close(grads(out.loss, feats)[0], grads(rc + rb, feats)[0])


def test_labels_resized_by_nearest_floor():
    feats, _ = make_batch(h=3, w=4, seed=4)
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 4, (2, 7, 9), generator=g)  # non-integer ratios
    labels[0, :2] = IGN
    centres = torch.randn(3, 5, dtype=torch.float64, generator=g) * 0.5
    out = cplus1_loss(feats, labels, centres, margin=1.5, alpha=1.0, beta=1.0)
    rc, rb = ref_loss(feats, labels, centres, [True] * 3, margin=1.5, alpha=1.0, beta=1.0)
    close(out.terms["compact"], rc)
    close(out.terms["background"], rb)


@pytest.mark.parametrize("distance", ["squared_euclidean", "euclidean"])
def test_gradcheck_functional(distance):
    g = torch.Generator().manual_seed(6)
    feats = torch.randn(1, 3, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.tensor([[[0, 1, 2], [0, IGN, 1], [0, 2, 0]]])
    centres = (torch.randn(2, 3, dtype=torch.float64, generator=g) * 0.6).requires_grad_(True)

    def fn(f, c):
        return cplus1_loss(f, labels, c, alpha=1.0, beta=1.0, margin=1.6, distance=distance).loss

    assert torch.autograd.gradcheck(fn, (feats, centres))


def test_update_moving_average_centres_functional():
    feats, labels = make_batch(K=4, absent=(2,), seed=8)
    c0 = torch.randn(3, 5, dtype=torch.float64)
    init0 = torch.tensor([True, False, False])
    c1, init1 = update_moving_average_centres(feats, labels, c0, init0, momentum=0.7)
    rc, rinit = ref_ema(feats, labels, c0, init0, momentum=0.7)
    close(c1, rc)
    assert init1.tolist() == rinit.tolist() == [True, False, True]
    assert torch.equal(c1[1], c0[1])  # absent class untouched
    assert init0.tolist() == [True, False, False]  # inputs not modified


# --------------------------------------------------------------------------- module: moving average
def test_moving_average_module_sequence_matches_reference():
    K, bg = 4, 1
    crit = CPlus1Loss(K, 5, background_index=bg, alpha=0.5, beta=0.25, margin=1.5, momentum=0.8).double()
    assert crit.centres.shape == (3, 5) and crit.initialized.tolist() == [False] * 3
    ref_c, ref_init = crit.centres.clone(), crit.initialized.clone()
    # batch 1: classes {0, 1, 2}; batch 2: {1, 2, 3}; batch 3: {1, 3} (CoI rows: 0 -> 0, 2 -> 1, 3 -> 2)
    for step, absent in enumerate([(3,), (0,), (0, 2)]):
        feats, labels = make_batch(K=K, absent=absent, seed=20 + step)
        feats.requires_grad_(True)
        before = crit.centres.clone()
        loss = crit(feats, labels)
        ref_c, ref_init = ref_ema(feats, labels, ref_c, ref_init, bg=bg, momentum=0.8)
        close(crit.centres, ref_c)
        assert crit.initialized.tolist() == ref_init.tolist()
        for k in absent:  # absent classes: exactly untouched
            if k != bg:
                j = coi_list(K, bg).index(k)
                assert torch.equal(crit.centres[j], before[j])
        # loss uses the centres after this step's update, as constants
        rc, rb = ref_loss(feats, labels, ref_c, ref_init.tolist(), bg=bg, alpha=0.5, beta=0.25, margin=1.5)
        close(crit.terms["compact"], rc)
        close(crit.terms["background"], rb)
        close(loss, rc + rb)
        close(grads(loss, feats)[0], grads(rc + rb, feats)[0])
    assert ref_init.tolist() == [True, True, True]


def test_moving_average_first_sighting_is_batch_centre_and_absent_class_excluded():
    crit = CPlus1Loss(4, 5, margin=1.5, alpha=1.0, beta=1.0).double()
    feats, labels = make_batch(K=4, absent=(3,), seed=30)
    crit(feats, labels)
    f = [(ref_norm(v, True), y) for v, y in ref_pixels(feats, labels)]
    for j, k in enumerate([1, 2]):
        members = [v for v, y in f if y == k]
        close(crit.centres[j], sum(members) / len(members))
    assert crit.initialized.tolist() == [True, True, False]
    assert torch.equal(crit.centres[2], torch.zeros(5, dtype=torch.float64))
    # 1/C counts the 2 CoIs with a centre (not 3): background term with mask [T, T, F]
    _, rb = ref_loss(feats, labels, crit.centres, [True, True, False], margin=1.5, alpha=1.0, beta=1.0)
    _, rb_wrong = ref_loss(feats, labels, crit.centres, [True, True, True], margin=1.5, alpha=1.0, beta=1.0)
    close(crit.terms["background"], rb)
    assert not torch.isclose(rb, rb_wrong)


def test_moving_average_centres_detached_in_loss():
    """Gradient reaches features only through the pixel side; centres are constants."""
    crit = CPlus1Loss(3, 5, margin=1.5, alpha=1.0, beta=1.0).double()
    feats, labels = make_batch(K=3, seed=31, ignore_frac=0.1)
    feats.requires_grad_(True)
    loss = crit(feats, labels)
    g = grads(loss, feats)[0]
    assert not crit.centres.requires_grad and crit.centres.grad is None
    const_c = crit.centres.clone()
    rc, rb = ref_loss(feats, labels, const_c, [True, True], margin=1.5, alpha=1.0, beta=1.0)
    close(g, grads(rc + rb, feats)[0])
    # power check: had the centres (= batch centres at the first step) kept their graph,
    # the gradient would differ
    live_c, _ = ref_ema(feats, labels, torch.zeros(2, 5), torch.zeros(2, dtype=torch.bool))
    pix = [(ref_norm(v, True), y) for v, y in ref_pixels(feats, labels)]
    live_c = torch.stack([sum(v for v, y in pix if y == k) / sum(1 for _, y in pix if y == k) for k in (1, 2)])
    close(live_c.detach(), const_c)
    lc, lb = ref_loss(feats, labels, live_c, [True, True], margin=1.5, alpha=1.0, beta=1.0)
    assert (grads(lc + lb, feats)[0] - g).abs().max() > 1e-3


def test_eval_mode_does_not_update_and_uses_stored_centres():
    crit = CPlus1Loss(4, 5, margin=1.5).double()
    crit(*make_batch(seed=40))
    c, init = crit.centres.clone(), crit.initialized.clone()
    crit.eval()
    feats, labels = make_batch(seed=41)
    loss = crit(feats, labels)
    assert torch.equal(crit.centres, c) and torch.equal(crit.initialized, init)
    rc, rb = ref_loss(feats, labels, c, init.tolist(), margin=1.5)
    close(loss, rc + rb)


def test_two_forwards_then_one_backward():
    """Gradient accumulation: a later in-place EMA update must not break the earlier graph."""
    crit = CPlus1Loss(4, 5)
    f1, l1 = make_batch(seed=42, dtype=torch.float32)
    f2, l2 = make_batch(seed=43, dtype=torch.float32)
    f1.requires_grad_(True)
    f2.requires_grad_(True)
    (crit(f1, l1) + crit(f2, l2)).backward()
    assert torch.isfinite(f1.grad).all() and f1.grad.abs().sum() > 0


def test_state_dict_roundtrip_moving_average():
    crit = CPlus1Loss(4, 5, margin=1.5)
    for s in range(2):
        crit(*make_batch(absent=(2,), seed=50 + s, dtype=torch.float32))
    sd = crit.state_dict()
    assert set(sd) == {"centres", "initialized"}
    fresh = CPlus1Loss(4, 5, margin=1.5)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.centres, crit.centres) and torch.equal(fresh.initialized, crit.initialized)
    assert fresh.initialized.tolist() == [True, False, True]
    crit.eval()
    fresh.eval()
    feats, labels = make_batch(seed=52, dtype=torch.float32)
    assert torch.equal(crit(feats, labels), fresh(feats, labels))


# --------------------------------------------------------------------------- module: learnable
def test_learnable_module_matches_reference_and_learns():
    torch.manual_seed(0)
    crit = CPlus1Loss(4, 5, background_index=3, centres="learnable", margin=1.5, alpha=0.4, beta=0.6).double()
    assert isinstance(crit.centres, nn.Parameter) and crit.centres.shape == (3, 5)
    assert [n for n, _ in crit.named_parameters()] == ["centres"]
    feats, labels = make_batch(K=4, absent=(1,), seed=60)
    feats.requires_grad_(True)
    loss = crit(feats, labels)
    c = crit.centres.detach().clone().requires_grad_(True)
    rc, rb = ref_loss(feats, labels, c, [True] * 3, bg=3, margin=1.5, alpha=0.4, beta=0.6)
    close(loss, rc + rb)
    gf, gc = grads(loss, feats, crit.centres)
    rgf, rgc = grads(rc + rb, feats, c)
    close(gf, rgf)
    close(gc, rgc)
    assert gc.abs().sum() > 0
    fresh = CPlus1Loss(4, 5, background_index=3, centres="learnable").double()
    fresh.load_state_dict(crit.state_dict())
    assert torch.equal(fresh.centres, crit.centres)


def test_learnable_gradcheck_module():
    torch.manual_seed(1)
    crit = CPlus1Loss(3, 3, centres="learnable", margin=1.6, alpha=1.0, beta=1.0, distance="euclidean").double()
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(8, 3, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, IGN, 0, 2])
    assert torch.autograd.gradcheck(lambda f, c: crit(f, labels), (feats, crit.centres))


# --------------------------------------------------------------------------- module: classifier
def _classifiers(K, D):
    torch.manual_seed(3)
    conv = nn.Conv2d(D, K, 1).double()
    lin = nn.Linear(D, K).double()
    param = nn.Parameter(torch.randn(K, D, dtype=torch.float64))
    return {
        "conv": (conv, lambda: conv.weight),
        "linear": (lin, lambda: lin.weight),
        "callable": (lambda: conv.weight, lambda: conv.weight),
        "tensor": (param, lambda: param),
    }


@pytest.mark.parametrize("kind", ["conv", "linear", "callable", "tensor"])
def test_classifier_module_matches_reference(kind):
    K, D, bg = 4, 5, 1
    clf, weight = _classifiers(K, D)[kind]
    crit = CPlus1Loss(K, D, background_index=bg, centres="classifier", classifier=clf, margin=1.5,
                      alpha=0.5, beta=0.5)
    # not registered: nothing of the model's classifier in the criterion
    assert crit.state_dict() == {} and list(crit.parameters()) == [] and list(crit.children()) == []
    crit.float()  # must not convert the model's classifier
    assert weight().dtype == torch.float64
    w = weight()
    feats, labels = make_batch(K=K, seed=70)
    feats.requires_grad_(True)
    loss = crit(feats, labels)
    assert loss.dtype == torch.float64
    w_ref = w.detach().clone().requires_grad_(True)
    rows = w_ref.reshape(K, D)[[0, 2, 3]]  # CoI rows, background row 1 unused
    rc, rb = ref_loss(feats, labels, rows, [True] * 3, bg=bg, margin=1.5, alpha=0.5, beta=0.5)
    close(loss, rc + rb)
    gf, gw = grads(loss, feats, w)
    rgf, rgw = grads(rc + rb, feats, w_ref)
    close(gf, rgf)
    close(gw.reshape(K, D), rgw.reshape(K, D))
    assert torch.equal(gw.reshape(K, D)[bg], torch.zeros(D, dtype=torch.float64))
    assert gw.abs().sum() > 0


def test_classifier_weight_is_read_at_each_call():
    conv = nn.Conv2d(5, 3, 1)
    crit = CPlus1Loss(3, 5, centres="classifier", classifier=conv)
    feats, labels = make_batch(K=3, seed=71, dtype=torch.float32)
    a = crit(feats, labels)
    with torch.no_grad():
        conv.weight.mul_(2.0)
    assert not torch.equal(a, crit(feats, labels))


# --------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("mode", ["moving_average", "learnable", "classifier"])
def test_all_ignored_batch(mode):
    lin = nn.Linear(5, 4)
    crit = CPlus1Loss(4, 5, centres=mode, classifier=lin if mode == "classifier" else None)
    if mode == "moving_average":
        crit(*make_batch(seed=80, dtype=torch.float32))
    state = copy.deepcopy(crit.state_dict())
    feats = torch.randn(2, 5, 3, 3, requires_grad=True)
    labels = torch.full((2, 3, 3), IGN)
    loss = crit(feats, labels)
    assert loss.item() == 0.0 and all(t.item() == 0.0 for t in crit.terms.values())
    loss.backward()
    assert torch.isfinite(feats.grad).all() and feats.grad.abs().sum() == 0
    for k, v in state.items():
        assert torch.equal(crit.state_dict()[k], v)


def test_background_only_batch():
    feats = torch.randn(1, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.zeros(1, 3, 3, dtype=torch.long)
    # fresh moving average: no CoI has a centre yet -> both terms 0, finite gradient
    ema = CPlus1Loss(4, 5).double()
    loss = ema(feats, labels)
    assert loss.item() == 0.0 and ema.initialized.tolist() == [False] * 3
    assert torch.isfinite(grads(loss, feats)[0]).all()
    # learnable: compact 0, background defined
    torch.manual_seed(4)
    lrn = CPlus1Loss(4, 5, centres="learnable", margin=2.0, alpha=1.0, beta=1.0).double()
    loss = lrn(feats, labels)
    rc, rb = ref_loss(feats, labels, lrn.centres.detach(), [True] * 3, margin=2.0, alpha=1.0, beta=1.0)
    assert lrn.terms["compact"].item() == 0.0 and rb > 0
    close(loss, rb)


def test_single_coi_batch_has_zero_background_term():
    feats, _ = make_batch(seed=81)
    feats.requires_grad_(True)
    labels = torch.full((2, 4, 5), 2)
    labels[0, 0] = IGN
    crit = CPlus1Loss(4, 5, alpha=1.0, beta=1.0).double()
    loss = crit(feats, labels)
    assert crit.terms["background"].item() == 0.0
    assert crit.initialized.tolist() == [False, True, False]
    rc, _ = ref_loss(feats, labels, crit.centres, crit.initialized.tolist(), alpha=1.0, beta=1.0)
    assert rc > 0
    close(loss, rc)
    g = grads(loss, feats)[0]
    assert torch.isfinite(g).all()


def test_zero_feature_vector_gives_finite_gradient():
    feats = torch.randn(6, 4, dtype=torch.float64)
    feats[0] = 0.0
    feats[3] = 0.0
    feats.requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    for distance in ("squared_euclidean", "euclidean"):
        out = cplus1_loss(feats, labels, torch.randn(2, 4, dtype=torch.float64), distance=distance, margin=2.0)
        assert torch.isfinite(out.loss) and torch.isfinite(grads(out.loss, feats)[0]).all()


def test_euclidean_at_centre_is_finite():
    """A pixel exactly at its centre (single-pixel class, first step): sqrt guarded."""
    crit = CPlus1Loss(3, 4, distance="euclidean").double()
    feats = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 2])
    loss = crit(feats, labels)
    assert torch.isfinite(grads(loss, feats)[0]).all()


def test_autocast_bfloat16_close_to_float32():
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 8, 1)
    x = torch.randn(2, 3, 6, 6)
    labels = torch.randint(0, 4, (2, 12, 12))
    labels[:, :3] = IGN
    kw = dict(alpha=1.0, beta=1.0, margin=1.5)
    ref_crit, amp_crit = CPlus1Loss(4, 8, **kw), CPlus1Loss(4, 8, **kw)
    ref = ref_crit(conv(x), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f = conv(x)
        assert f.dtype == torch.bfloat16
        out = amp_crit(f, labels)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert amp_crit.centres.dtype == torch.float32
    # bf16 features (8-bit mantissa): 3% relative on each term and on the centres
    for k in ("compact", "background"):
        torch.testing.assert_close(amp_crit.terms[k], ref_crit.terms[k], rtol=3e-2, atol=1e-3)
    torch.testing.assert_close(amp_crit.centres, ref_crit.centres, rtol=3e-2, atol=1e-2)


def test_compute_entry_point_and_flags():
    crit = CPlus1Loss(4, 5)
    assert crit.uses_features and not crit.uses_logits
    feats, labels = make_batch(seed=90, dtype=torch.float32)
    crit.eval()
    assert torch.equal(crit.compute(labels, features=feats), crit(feats, labels))
    with pytest.raises(ValueError, match="features"):
        crit.compute(labels)
    assert set(crit.terms) == {"compact", "background"} and not crit.terms["compact"].requires_grad


# --------------------------------------------------------------------------- errors
def test_bad_inputs_raise():
    feats, labels = make_batch(seed=91, dtype=torch.float32)
    c = torch.randn(3, 5)
    crit = CPlus1Loss(4, 5)
    with pytest.raises(ValueError, match="features"):
        crit(feats[0], labels)  # 3-D features
    with pytest.raises(ValueError, match="labels"):
        crit(feats, labels[0])  # labels (H, W)
    with pytest.raises(ValueError, match="D=5"):
        crit(torch.randn(2, 6, 4, 5), labels)  # feat_dim mismatch
    with pytest.raises(ValueError, match="labels"):
        crit(feats, torch.full_like(labels, 4))  # out of range (K = 4)
    with pytest.raises(ValueError, match="labels"):
        crit(feats, labels - 1)  # negative
    with pytest.raises(TypeError, match="features"):
        crit(feats.long(), labels)
    with pytest.raises(TypeError, match="labels"):
        crit(feats, labels.float())
    bad = feats.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        crit(bad, labels)
    with pytest.raises(ValueError, match="device"):
        crit(feats.to("meta"), labels)
    with pytest.raises(ValueError, match="device"):
        cplus1_loss(feats, labels, c.to("meta"))
    with pytest.raises(ValueError, match="labels"):
        cplus1_loss(torch.randn(10, 5), torch.zeros(9, dtype=torch.long), c)  # flat N mismatch
    with pytest.raises(ValueError, match="centres"):
        cplus1_loss(feats, labels, torch.randn(3, 4))  # D mismatch
    with pytest.raises(ValueError, match="labels"):
        cplus1_loss(feats, labels, torch.randn(2, 5))  # K = 3 but labels reach 3
    with pytest.raises(TypeError, match="centre_mask"):
        cplus1_loss(feats, labels, c, centre_mask=torch.ones(3))
    with pytest.raises(ValueError, match="centre_mask"):
        cplus1_loss(feats, labels, c, centre_mask=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="distance"):
        cplus1_loss(feats, labels, c, distance="cosine")
    with pytest.raises(ValueError, match="momentum"):
        update_moving_average_centres(feats, labels, c, torch.zeros(3, dtype=torch.bool), momentum=1.0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_classes=1), "num_classes"),
    (dict(feature_dim=0), "feature_dim"),
    (dict(background_index=4), "background_index"),
    (dict(distance="l1"), "distance"),
    (dict(centres="shared"), "centres"),
    (dict(momentum=1.5), "momentum"),
    (dict(margin=-1.0), "margin"),
    (dict(classifier=nn.Linear(5, 4)), "classifier"),  # classifier with moving average
])
def test_bad_constructor_arguments(kwargs, match):
    args = dict(num_classes=4, feature_dim=5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        CPlus1Loss(**args)


def test_classifier_mode_errors():
    feats, labels = make_batch(seed=92, dtype=torch.float32)
    crit = CPlus1Loss(4, 5, centres="classifier")
    with pytest.raises(ValueError, match="classifier"):
        crit(feats, labels)  # no classifier given
    crit.set_classifier(nn.Conv2d(5, 3, 1))  # K mismatch
    with pytest.raises(ValueError, match=r"\(4, 5\)"):
        crit(feats, labels)
    with pytest.raises(TypeError, match="classifier"):
        crit.set_classifier(3)
    crit.set_classifier(nn.Conv2d(5, 4, 1))
    assert torch.isfinite(crit(feats, labels))


def test_docstring_examples():
    res = doctest.testmod(cplus1_mod, verbose=False)
    assert res.attempted > 0 and res.failed == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["moving_average", "learnable"])
def test_cuda_matches_cpu(mode):
    torch.manual_seed(6)
    cpu = CPlus1Loss(4, 5, centres=mode, margin=1.5, alpha=1.0, beta=1.0)
    gpu = copy.deepcopy(cpu).cuda()
    feats, labels = make_batch(seed=93, dtype=torch.float32)
    for _ in range(2):
        a = cpu(feats, labels)
        b = gpu(feats.cuda(), labels.cuda())
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gpu.centres.detach().cpu(), cpu.centres.detach(), rtol=1e-5, atol=1e-6)
    with torch.autocast("cuda", dtype=torch.float16):
        out = gpu(feats.cuda().half(), labels.cuda())
    assert out.dtype == torch.float32 and torch.isfinite(out)
