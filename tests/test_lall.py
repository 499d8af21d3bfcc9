"""Tests of the locally adaptive learning loss (METHODS.md section 3).

The reference below is written from the equations with explicit Python loops over
pixels and window offsets, in float64; it never calls the code under test. A second,
vectorised reference builds the pool from an unfolded (B, K*s*s, H*W) tensor.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import pixreg.losses._common as common
from pixreg.losses.base import LossOutput, Regularizer
from pixreg.losses.lall import LocallyAdaptiveLoss, locally_adaptive_loss

IGN = 255


# ----------------------------------------------------------------------------------
# independent references
# ----------------------------------------------------------------------------------
def ref_bilinear(z: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Bilinear resize, align_corners=False (half-pixel centres, clamped at 0), by loops."""
    b, k, h, w = z.shape

    def src(i: int, n_in: int, n_out: int) -> tuple[int, int, float]:
        s = (i + 0.5) * n_in / n_out - 0.5
        s = max(s, 0.0)
        i0 = min(int(math.floor(s)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        return i0, i1, s - i0

    rows = []
    for i in range(out_h):
        i0, i1, a = src(i, h, out_h)
        cols = []
        for j in range(out_w):
            j0, j1, c = src(j, w, out_w)
            v = (
                (1 - a) * (1 - c) * z[:, :, i0, j0]
                + (1 - a) * c * z[:, :, i0, j1]
                + a * (1 - c) * z[:, :, i1, j0]
                + a * c * z[:, :, i1, j1]
            )
            cols.append(v)
        rows.append(torch.stack(cols, dim=-1))
    return torch.stack(rows, dim=-2)


def ref_terms(
    logits: torch.Tensor,
    labels: torch.Tensor,
    window: int = 5,
    distance_weights: str = "exponential",
    normalize: str | None = "zscore",
    power: float = 3.0,
    stride: int = 1,
    xi: str = "count",
    eps: float = 1e-5,
) -> tuple[torch.Tensor, int]:
    """(sum_p L_p^k, number of centre pixels) by explicit loops, float64."""
    z = logits.double()
    b, k, h, w = z.shape
    H, W = labels.shape[-2:]
    if (h, w) != (H, W):
        z = ref_bilinear(z, H, W)
    lab = labels.tolist()
    # per-pixel normalised vectors
    zn = {}
    for bi in range(b):
        for i in range(H):
            for j in range(W):
                v = z[bi, :, i, j]
                if normalize == "zscore":
                    mu = v.sum() / k
                    sd = torch.sqrt(((v - mu) ** 2).sum() / k)
                    if float(sd.detach()) < eps:
                        sd = torch.tensor(eps, dtype=torch.float64)
                    v = (v - mu) / sd
                zn[bi, i, j] = v
    r = window // 2
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for bi in range(b):
        for i in range(0, H, stride):
            for j in range(0, W, stride):
                y = lab[bi][i][j]
                if y == IGN:
                    continue
                acc = torch.zeros(k, dtype=torch.float64)
                n_same, w_sum = 0, 0.0
                for di in range(-r, r + 1):
                    for dj in range(-r, r + 1):
                        qi, qj = i + di, j + dj
                        if not (0 <= qi < H and 0 <= qj < W):
                            continue  # outside the image: does not exist
                        yq = lab[bi][qi][qj]
                        if yq == IGN or yq != y:
                            continue
                        d8 = max(abs(di), abs(dj))
                        wt = 2.0 ** (1 - d8) if distance_weights == "exponential" else 1.0
                        acc = acc + wt * zn[bi, qi, qj]
                        n_same += 1
                        w_sum += wt
                pooled = acc / (n_same if xi == "count" else w_sum)
                lp = torch.log(torch.exp(pooled).sum()) - pooled[y]
                total = total + lp**power
                count += 1
    return total, count


def ref_loss(logits, labels, **kw) -> torch.Tensor:
    total, count = ref_terms(logits, labels, **kw)
    if count == 0:
        return torch.zeros((), dtype=torch.float64)
    return (total / count) ** (1.0 / kw.get("power", 3.0))


def unfold_loss(logits, labels, window=5, distance_weights="exponential", power=3.0, stride=1, xi="count", eps=1e-5):
    """Naive vectorised version through F.unfold (labels padded with the ignore value)."""
    z = logits.double()
    b, k, h, w = z.shape
    z = (z - z.mean(1, keepdim=True)) / z.std(1, unbiased=False, keepdim=True).clamp_min(eps)
    r = window // 2
    zu = F.unfold(z, window, padding=r).view(b, k, window * window, h * w)
    lab_pad = F.pad(labels.double()[:, None], (r, r, r, r), value=IGN)
    lu = F.unfold(lab_pad, window).view(b, window * window, h * w)
    centre = labels.double().view(b, 1, h * w)
    same = (lu == centre) & (centre != IGN)
    ii, jj = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    d8 = torch.maximum(ii.abs(), jj.abs()).reshape(-1).double()
    wts = 2.0 ** (1 - d8) if distance_weights == "exponential" else torch.ones_like(d8)
    ws = same.double() * wts.view(1, -1, 1)
    pooled = (zu * ws[:, None]).sum(2)
    den = (same.double().sum(1) if xi == "count" else ws.sum(1)).clamp_min(1e-12)
    pooled = (pooled / den[:, None]).view(b, k, h, w)[:, :, ::stride, ::stride]
    lab_c = labels[:, ::stride, ::stride]
    valid = lab_c != IGN
    ce = F.cross_entropy(pooled, lab_c.clamp(max=k - 1) * valid, reduction="none")[valid]
    return ce.pow(power).mean().pow(1.0 / power)


def make_inputs(b=2, k=4, h=6, w=7, n_label=3, p_ignore=0.2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (2.0 * torch.randn(b, k, h, w, generator=g)).to(dtype)
    labels = torch.randint(0, n_label, (b, h, w), generator=g)
    labels[torch.rand(b, h, w, generator=g) < p_ignore] = IGN
    return logits, labels


# ----------------------------------------------------------------------------------
# values against the loop reference
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [3, 5, 7])
@pytest.mark.parametrize("power", [1, 3])
@pytest.mark.parametrize("xi", ["count", "weight_sum"])
@pytest.mark.parametrize("stride", [1, 2])
def test_matches_loop_reference(window, power, xi, stride):
    # 6 x 7 images: every window touches a border; class 3 of K=4 is absent; ignore pixels.
    logits, labels = make_inputs(seed=window * 100 + power * 10 + stride)
    kw = dict(window=window, power=power, xi=xi, stride=stride)
    got = locally_adaptive_loss(logits, labels, **kw)
    want = ref_loss(logits, labels, **kw)
    assert isinstance(got, LossOutput) and set(got.terms) == {"lall"}
    torch.testing.assert_close(got.loss, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.terms["lall"], got.loss)


@pytest.mark.parametrize("distance_weights,normalize", [("uniform", "zscore"), ("exponential", None), ("uniform", None)])
def test_options_match_reference(distance_weights, normalize):
    logits, labels = make_inputs(seed=7)
    for xi in ("count", "weight_sum"):
        kw = dict(window=5, distance_weights=distance_weights, normalize=normalize, xi=xi)
        got = locally_adaptive_loss(logits, labels, **kw).loss
        torch.testing.assert_close(got, ref_loss(logits, labels, **kw), rtol=1e-10, atol=1e-12)


def test_float32_matches_reference():
    logits, labels = make_inputs(seed=3, dtype=torch.float32)
    got = locally_adaptive_loss(logits, labels)
    assert got.loss.dtype == torch.float32
    torch.testing.assert_close(got.loss.double(), ref_loss(logits, labels), rtol=1e-5, atol=1e-6)


def test_ignore_index_is_configurable():
    logits, labels = make_inputs(seed=4)
    other = labels.clone()
    other[labels == IGN] = -1
    a = locally_adaptive_loss(logits, labels).loss
    b = locally_adaptive_loss(logits, other, ignore_index=-1).loss
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # with the default ignore_index, -1 is out of range
    with pytest.raises(ValueError, match="labels"):
        locally_adaptive_loss(logits, other)


def test_matches_unfold_version():
    for seed, (window, stride, xi, dw) in enumerate(
        [(3, 1, "count", "exponential"), (5, 2, "weight_sum", "exponential"), (7, 1, "count", "uniform"), (5, 3, "count", "exponential")]
    ):
        logits, labels = make_inputs(b=2, k=5, h=9, w=11, seed=seed + 20)
        kw = dict(window=window, stride=stride, xi=xi, distance_weights=dw)
        got = locally_adaptive_loss(logits, labels, **kw).loss
        torch.testing.assert_close(got, unfold_loss(logits, labels, **kw), rtol=1e-10, atol=1e-12)


def test_isolated_pixel_pools_twice_its_vector():
    # paper's xi: a pixel with no same-label neighbour pools to 2 * its z-scored vector
    z = torch.tensor([1.0, -0.5, 2.5, 0.0], dtype=torch.float64).view(1, 4, 1, 1)
    y = torch.tensor([[[2]]])
    zn = (z - z.mean(1, keepdim=True)) / z.std(1, unbiased=False, keepdim=True)
    for xi, scale in (("count", 2.0), ("weight_sum", 1.0)):
        want = F.cross_entropy(scale * zn, y)
        got = locally_adaptive_loss(z, y, window=5, xi=xi).loss
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    # the same pixel surrounded by other labels and ignored pixels in a 3 x 3 image
    zz = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    zz[:, :, 1, 1] = z[:, :, 0, 0]
    yy = torch.tensor([[[0, IGN, 1], [0, 2, 1], [IGN, 3, 3]]])
    yy_only_centre = torch.full_like(yy, IGN)
    yy_only_centre[0, 1, 1] = 2
    got = locally_adaptive_loss(zz, yy_only_centre, window=3).loss
    torch.testing.assert_close(got, F.cross_entropy(2 * zn, y), rtol=1e-12, atol=0)
    # the loss of the full image still equals the reference
    torch.testing.assert_close(locally_adaptive_loss(zz, yy, window=3).loss, ref_loss(zz, yy, window=3))


def test_single_class_batch():
    logits, _ = make_inputs(seed=5)
    labels = torch.full((2, 6, 7), 1)
    labels[0, 0, :3] = IGN
    got = locally_adaptive_loss(logits, labels).loss
    assert torch.isfinite(got)
    torch.testing.assert_close(got, ref_loss(logits, labels), rtol=1e-10, atol=1e-12)


def test_upsampled_from_smaller_logits():
    logits, _ = make_inputs(b=2, k=4, h=3, w=4, seed=6)
    _, labels = make_inputs(b=2, k=4, h=6, w=7, seed=16)
    for stride in (1, 2):
        kw = dict(window=5, stride=stride)
        got = locally_adaptive_loss(logits, labels, **kw).loss
        torch.testing.assert_close(got, ref_loss(logits, labels, **kw), rtol=1e-10, atol=1e-12)
    # sanity of the bilinear reference itself against F.interpolate
    torch.testing.assert_close(
        ref_bilinear(logits, 6, 7), F.interpolate(logits, size=(6, 7), mode="bilinear", align_corners=False)
    )


def test_zero_std_pixels():
    logits, labels = make_inputs(seed=8)
    logits[0, :, 2, 3] = -1.25  # all-equal logits: std 0
    logits[1, :, 0, 0] = 3.0
    logits[1, :, 4, :] = 0.5
    logits.requires_grad_(True)
    got = locally_adaptive_loss(logits, labels).loss
    (g,) = torch.autograd.grad(got, logits)
    assert torch.isfinite(got) and torch.isfinite(g).all()
    ref_logits = logits.detach().clone().requires_grad_(True)
    want = ref_loss(ref_logits, labels)
    (g_ref,) = torch.autograd.grad(want, ref_logits)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10)


# ----------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("power,stride", [(3, 1), (1, 2)])
def test_gradcheck(power, stride):
    logits, labels = make_inputs(b=1, k=3, h=4, w=5, n_label=2, seed=9)
    logits.requires_grad_(True)
    fn = lambda z: locally_adaptive_loss(z, labels, window=3, power=power, stride=stride).loss  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-6)
    # gradcheck through the bilinear resize as well
    small = torch.randn(1, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    fn2 = lambda z: locally_adaptive_loss(z, labels, window=3, power=power, stride=stride).loss  # noqa: E731
    assert torch.autograd.gradcheck(fn2, (small,), eps=1e-6, atol=1e-6)


def test_gradient_matches_reference():
    logits, labels = make_inputs(seed=10)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(locally_adaptive_loss(a, labels, window=5, stride=2, xi="weight_sum").loss, a)
    (gb,) = torch.autograd.grad(ref_loss(b, labels, window=5, stride=2, xi="weight_sum"), b)
    torch.testing.assert_close(ga, gb, rtol=1e-8, atol=1e-10)


def _assert_value_and_grad_match_reference(logits, labels, **kw):
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    got = locally_adaptive_loss(a, labels, **kw).loss
    want = ref_loss(b, labels, **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    (ga,) = torch.autograd.grad(got, a)
    (gb,) = torch.autograd.grad(want, b)
    torch.testing.assert_close(ga, gb, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("stride,normalize", [(1, "zscore"), (2, "zscore"), (1, None)])
def test_channel_chunked_pooling_matches_reference(monkeypatch, stride, normalize):
    # On CPU the pooling runs over chunks of channels sized to stay in cache; test images
    # are small enough to fit in one chunk, so force one channel per chunk here.
    import pixreg.losses.lall as lall_mod

    monkeypatch.setattr(lall_mod, "_CHUNK_BYTES", 1)
    logits, labels = make_inputs(seed=12)
    assert logits.shape[0] > 1 and logits.shape[1] > 1  # several images and chunks share the buffers
    _assert_value_and_grad_match_reference(logits, labels, window=5, stride=stride, normalize=normalize)


@pytest.mark.parametrize("group", [2, 3])
def test_grouped_images_match_reference(monkeypatch, group):
    # On CUDA several images are pooled together (fewer kernel launches); on CPU one at a
    # time. Force groups here, including a last group that is not full.
    import pixreg.losses.lall as lall_mod

    monkeypatch.setattr(lall_mod, "_group_size", lambda z, n_offsets: group)
    logits, labels = make_inputs(b=5, seed=14)
    for kw in (dict(window=5), dict(window=3, stride=2, xi="weight_sum"), dict(window=5, normalize=None)):
        _assert_value_and_grad_match_reference(logits, labels, **kw)


def test_gradcheck_without_zscore():
    logits, labels = make_inputs(b=2, k=3, h=4, w=5, n_label=2, seed=13)
    logits.requires_grad_(True)
    fn = lambda z: locally_adaptive_loss(z, labels, window=3, normalize=None).loss  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-6)


def test_ignored_pixels_have_no_influence():
    # nothing is detached, but ignored pixels neither pool nor count: their logits get
    # exactly zero gradient and changing them leaves the loss unchanged.
    logits, labels = make_inputs(seed=11)
    assert (labels == IGN).any()
    z = logits.clone().requires_grad_(True)
    loss = locally_adaptive_loss(z, labels).loss
    (g,) = torch.autograd.grad(loss, z)
    ign = (labels == IGN).unsqueeze(1).expand_as(g)
    assert (g[ign] == 0).all()
    # every valid pixel is a centre with stride 1, so each gets a nonzero gradient
    per_pixel = g.abs().sum(1)
    assert (per_pixel[labels != IGN] > 0).all()
    moved = logits.clone()
    moved[ign] = 100.0 * torch.randn(int(ign.sum()), dtype=torch.float64)
    torch.testing.assert_close(locally_adaptive_loss(moved, labels).loss, loss.detach(), rtol=1e-12, atol=0)


def test_neighbours_receive_gradient_through_the_pool():
    # stride 4: centres are columns 0 (label 0) and 4 (label 2)
    logits = torch.randn(1, 3, 1, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[[0, 0, 1, 2, 2]]])
    (g,) = torch.autograd.grad(locally_adaptive_loss(logits, labels, window=3, stride=4).loss, logits)
    per_col = g[0, :, 0].abs().sum(0)
    assert per_col[0] > 0 and per_col[4] > 0  # centres
    assert per_col[1] > 0 and per_col[3] > 0  # same-label neighbours (not centres) pool
    assert per_col[2] == 0  # neither a centre nor a same-label neighbour of one
    (g1,) = torch.autograd.grad(locally_adaptive_loss(logits, labels, window=1, stride=4).loss, logits)
    per_col1 = g1[0, :, 0].abs().sum(0)
    assert per_col1[0] > 0 and per_col1[4] > 0 and (per_col1[1:4] == 0).all()


def test_all_ignored_batch_gives_zero_and_finite_gradient():
    logits, _ = make_inputs(seed=12)
    labels = torch.full((2, 6, 7), IGN)
    for power in (1, 3):
        z = logits.clone().requires_grad_(True)
        out = locally_adaptive_loss(z, labels, power=power)
        assert out.loss.item() == 0.0
        out.loss.backward()
        assert torch.isfinite(z.grad).all() and (z.grad == 0).all()


@pytest.mark.parametrize("margin", [5.0, 20.0, 40.0, 80.0, 200.0])
def test_tiny_mean_has_finite_gradient(margin):
    # raw logits (no z-score) with a huge margin make every L_p tiny or exactly 0 in float32
    labels = torch.randint(0, 3, (1, 5, 5), generator=torch.Generator().manual_seed(13))
    z = torch.where(F.one_hot(labels, 3).permute(0, 3, 1, 2).bool(), margin, -margin).float()
    z.requires_grad_(True)
    out = locally_adaptive_loss(z, labels, normalize=None, window=3)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.loss >= 0
    assert torch.isfinite(z.grad).all()


def test_minkowski_power_orders_the_means():
    logits, labels = make_inputs(seed=14)
    m1 = locally_adaptive_loss(logits, labels, power=1).loss
    m3 = locally_adaptive_loss(logits, labels, power=3).loss
    m6 = locally_adaptive_loss(logits, labels, power=6).loss
    assert m1 < m3 < m6


# ----------------------------------------------------------------------------------
# distributed reductions, memory, autocast
# ----------------------------------------------------------------------------------
def test_mean_goes_through_global_reductions(monkeypatch):
    # simulate a second rank holding `other`: the all-reduces add its numerator and count
    logits, labels = make_inputs(seed=15)
    o_logits, o_labels = make_inputs(seed=25)
    o_num, o_cnt = ref_terms(o_logits, o_labels)
    monkeypatch.setattr(common, "all_reduce_sum", lambda t: t + o_num.to(t.dtype))
    monkeypatch.setattr(common, "all_reduce_sum_no_grad", lambda t: t + o_cnt)
    z = logits.clone().requires_grad_(True)
    got = locally_adaptive_loss(z, labels).loss
    (g,) = torch.autograd.grad(got, z)
    both = torch.cat([logits, o_logits]).requires_grad_(True)
    want = ref_loss(both, torch.cat([labels, o_labels]))
    (g_ref,) = torch.autograd.grad(want, both)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref[:2], rtol=1e-8, atol=1e-10)


def _saved_bytes(window: int, k: int = 32) -> int:
    logits, labels = make_inputs(b=1, k=k, h=16, w=16, n_label=2, seed=17, dtype=torch.float32)
    logits.requires_grad_(True)
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        locally_adaptive_loss(logits, labels, window=window)
    return total


def test_memory_does_not_scale_with_window_times_classes():
    # tensors kept for backward: O(B*K*H*W) plus one bool (B,H,W) mask per offset,
    # never an unfolded (B, K*s*s, H*W) tensor.
    unit = 32 * 16 * 16 * 4  # bytes of one float32 (B, K, H, W) tensor
    s3, s7 = _saved_bytes(3), _saved_bytes(7)
    assert s7 < 12 * unit, (s7, unit)
    assert s7 - s3 < 0.5 * unit, (s3, s7, unit)


def test_autocast_bfloat16():
    g = torch.Generator().manual_seed(18)
    conv = torch.nn.Conv2d(6, 5, 1)
    x = torch.randn(2, 6, 4, 5, generator=g)
    labels = torch.randint(0, 5, (2, 8, 10), generator=g)
    labels[0, :2] = IGN
    l32 = conv(x)
    ref = locally_adaptive_loss(l32, labels).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(x)
        assert logits.dtype == torch.bfloat16
        out = locally_adaptive_loss(logits, labels).loss
        # float32 logits under autocast: identical to no autocast (autocast disabled inside)
        same = locally_adaptive_loss(l32, labels).loss
    assert out.dtype == torch.float32 and torch.isfinite(out)
    # stated tolerance vs float32: 3% relative (bf16 logits carry ~3 significant digits)
    torch.testing.assert_close(out, ref, rtol=3e-2, atol=1e-3)
    # the only loss of precision is the bf16 input itself: the statistics are float32
    torch.testing.assert_close(out, locally_adaptive_loss(logits.float(), labels).loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(same, ref, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------
# module
# ----------------------------------------------------------------------------------
def test_module_matches_functional_and_records_terms():
    logits, labels = make_inputs(seed=19)
    mod = LocallyAdaptiveLoss(window=3, power=1, stride=2, xi="weight_sum", loss_weight=0.5, num_classes=4)
    assert isinstance(mod, Regularizer) and mod.uses_logits and not mod.uses_features
    z = logits.clone().requires_grad_(True)
    loss = mod(z, labels)
    want = 0.5 * ref_loss(logits, labels, window=3, power=1, stride=2, xi="weight_sum")
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    assert set(mod.terms) == {"lall"} and not mod.terms["lall"].requires_grad
    torch.testing.assert_close(mod.terms["lall"], loss.detach())
    torch.testing.assert_close(mod.compute(labels, logits=z), loss)
    torch.testing.assert_close(mod.compute(labels, features=torch.randn(2, 3, 2, 2), logits=z), loss)
    with pytest.raises(ValueError, match="logits"):
        mod.compute(labels, features=torch.randn(2, 3, 2, 2))
    # stateless: empty state_dict that round-trips
    sd = mod.state_dict()
    assert len(sd) == 0
    other = LocallyAdaptiveLoss(window=3, power=1, stride=2, xi="weight_sum", loss_weight=0.5)
    other.load_state_dict(sd)
    torch.testing.assert_close(other(logits, labels), loss.detach())
    assert "window=3" in repr(mod)


# ----------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(window=4), "window"),
        (dict(window=0), "window"),
        (dict(window=3.0), "window"),
        (dict(distance_weights="gauss"), "distance_weights"),
        (dict(normalize="l2"), "normalize"),
        (dict(power=0.5), "power"),
        (dict(power=float("inf")), "power"),
        (dict(stride=0), "stride"),
        (dict(xi="sum"), "xi"),
        (dict(eps=0.0), "eps"),
        (dict(num_classes=0), "num_classes"),
        (dict(eps=float("nan")), "eps"),
        (dict(loss_weight=float("nan")), "loss_weight"),
        (dict(loss_weight=-1.0), "loss_weight"),
    ],
)
def test_bad_hyperparameters(kw, match):
    logits, labels = make_inputs(b=1, h=3, w=3, seed=21)
    with pytest.raises((TypeError, ValueError), match=match):  # TypeError: a float window
        locally_adaptive_loss(logits, labels, **kw)
    with pytest.raises((TypeError, ValueError), match=match):
        LocallyAdaptiveLoss(**kw)


def test_bad_inputs():
    logits, labels = make_inputs(b=2, k=4, h=3, w=3, seed=22)
    with pytest.raises(ValueError, match="logits"):
        locally_adaptive_loss(logits[0], labels)  # 3-D
    with pytest.raises(TypeError, match="logits"):
        locally_adaptive_loss(logits.long(), labels)
    with pytest.raises(TypeError, match="logits"):
        locally_adaptive_loss(logits.numpy(), labels)
    with pytest.raises(TypeError, match="labels"):
        locally_adaptive_loss(logits, labels.float())
    with pytest.raises(TypeError, match="labels"):
        locally_adaptive_loss(logits, labels.tolist())
    with pytest.raises(ValueError, match="labels"):
        locally_adaptive_loss(logits, labels[0])  # 2-D
    with pytest.raises(ValueError, match="labels"):
        locally_adaptive_loss(logits, labels[:1])  # batch mismatch
    bad = labels.clone()
    bad[0, 0, 0] = 4  # K = 4
    with pytest.raises(ValueError, match="labels"):
        locally_adaptive_loss(logits, bad)
    nan = logits.clone()
    nan[0, 1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        locally_adaptive_loss(nan, labels)
    with pytest.raises(ValueError, match="num_classes"):
        locally_adaptive_loss(logits, labels, num_classes=5)
    with pytest.raises(ValueError, match="num_classes"):
        LocallyAdaptiveLoss(num_classes=3)(logits, labels)
    with pytest.raises(ValueError, match="device"):
        locally_adaptive_loss(logits.to("meta"), labels)
    with pytest.raises(ValueError, match="device"):
        locally_adaptive_loss(logits, labels.to("meta"))
