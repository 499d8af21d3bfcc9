"""The criterion (CE + regularizers, weights, warm-up) and the feature hooks."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pixreg.criterion import RegularizedCriterion, RegularizedModel, Term
from pixreg.hooks import FeatureCapture
from pixreg.losses.base import LossOutput, Regularizer


class MeanSquare(Regularizer):
    """Toy regularizer: mean over valid pixels of ||f||^2, with two named terms."""

    def __init__(self, ignore_index=255):
        super().__init__()
        self.ignore_index = ignore_index
        self.calls = 0

    def compute(self, labels, features=None, logits=None):
        self.calls += 1
        lab = F.interpolate(labels[:, None].float(), size=features.shape[-2:], mode="nearest")[:, 0]
        valid = (lab != self.ignore_index).float()
        sq = (features ** 2).sum(1)
        a = (sq * valid).sum() / valid.sum().clamp(min=1)
        return self._record(LossOutput(a + 1.0, {"sq": a, "one": a.new_ones(())}))


def toy_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))


def test_total_is_ce_plus_weighted_terms_and_terms_named():
    model = toy_model()
    crit = RegularizedCriterion({"m": Term(MeanSquare(), loss_weight=0.5)})
    wrapped = RegularizedModel(model, crit, layers="1")
    x = torch.randn(2, 3, 8, 8)
    y = torch.randint(0, 4, (2, 8, 8))
    y[0, :2] = 255
    logits = wrapped(x)
    out = wrapped.loss(logits, y)
    feats = model[1](model[0](x))
    valid = (y != 255).float()
    sq = ((feats ** 2).sum(1) * valid).sum() / valid.sum()
    ce = F.cross_entropy(logits, y, ignore_index=255)
    torch.testing.assert_close(out.total, ce + 0.5 * (sq + 1.0))
    assert set(out.terms) == {"ce", "m", "m/sq", "m/one"}
    torch.testing.assert_close(out.terms["m/sq"], 0.5 * sq.detach())
    assert all(not t.requires_grad for t in out.terms.values())


def test_warmup_skips_term_for_n_training_steps_and_step_is_saved():
    reg = MeanSquare()
    crit = RegularizedCriterion({"m": Term(reg, warmup=2)}).train()
    logits = torch.randn(1, 4, 4, 4)
    y = torch.randint(0, 4, (1, 4, 4))
    feats = torch.randn(1, 3, 4, 4)
    totals = [crit(logits, y, feats).terms["m"].item() for _ in range(3)]
    assert totals[0] == 0 and totals[1] == 0 and totals[2] > 0
    assert reg.calls == 1
    crit2 = RegularizedCriterion({"m": Term(MeanSquare(), warmup=2)})
    crit2.load_state_dict(crit.state_dict())
    assert int(crit2.step) == 3


def test_all_ignored_batch_gives_zero_ce_with_finite_grad():
    crit = RegularizedCriterion()
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = torch.full((2, 4, 4), 255)
    out = crit(logits, y)
    out.total.backward()
    assert out.total.item() == 0 and torch.isfinite(logits.grad).all()


def test_class_weighted_ce_matches_torch():
    w = torch.tensor([1.0, 2.0, 0.5])
    crit = RegularizedCriterion(class_weight=w)
    logits = torch.randn(2, 3, 5, 5)
    y = torch.randint(0, 3, (2, 5, 5))
    y[:, 0] = 255
    torch.testing.assert_close(crit(logits, y).total, F.cross_entropy(logits, y, weight=w, ignore_index=255))


def test_logits_upsampled_to_label_size():
    crit = RegularizedCriterion()
    logits = torch.randn(1, 3, 4, 4)
    y = torch.randint(0, 3, (1, 8, 8))
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(crit(logits, y).total, F.cross_entropy(up, y))


def test_errors_name_the_argument():
    crit = RegularizedCriterion({"m": MeanSquare()})
    with pytest.raises(ValueError, match="labels"):
        crit(torch.randn(1, 3, 4, 4), torch.full((1, 4, 4), 7))
    with pytest.raises(TypeError, match="labels"):
        crit(torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="features"):
        crit(torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="logits"):
        crit(torch.randn(3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="ignore_index"):
        RegularizedCriterion({"m": MeanSquare(ignore_index=0)})
    with pytest.raises(ValueError, match="layers"):
        FeatureCapture(toy_model(), "nope")


def test_hooks_leave_no_trace_on_the_model():
    model = toy_model()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    wrapped = RegularizedModel(model, RegularizedCriterion({"m": MeanSquare()}), layers=["1"])
    wrapped(x)
    assert "1" in wrapped.capture.features
    inference = wrapped.unwrap()
    assert inference is model
    assert not any(m._forward_hooks for m in inference.modules())
    assert model.state_dict().keys() == reference.state_dict().keys()
    torch.testing.assert_close(inference(x), reference(x), rtol=0, atol=0)


def _peak_live_bytes(fn) -> int:
    """High-water mark of CPU tensor bytes allocated during ``fn`` (torch.profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    return peak


def test_logits_regularizer_adds_no_logits_sized_tensor_to_the_backward_peak():
    # CE's backward holds ~3 logits-sized tensors at its peak; LALL's backward makes one
    # more. Evaluated before CE, LALL's backward runs after CE's buffers are freed, so the
    # peak of CE + LALL stays at CE's (LALL's own scratch is 3 images, 3/8 of the logits).
    from pixreg.losses.lall import LocallyAdaptiveLoss

    torch.manual_seed(0)
    b, k, s = 8, 16, 48
    small = torch.randn(b, k, s // 8, s // 8, requires_grad=True)
    labels = torch.randint(0, k, (b, s, s))
    full = b * k * s * s * 4

    def peak(crit):
        def fn():
            logits = F.interpolate(small * 1.0, size=(s, s), mode="bilinear", align_corners=False)
            crit(logits, labels).total.backward()
        fn()
        return _peak_live_bytes(fn)

    ce_peak = peak(RegularizedCriterion({}))
    lall_peak = peak(RegularizedCriterion({"lall": LocallyAdaptiveLoss()}))
    assert lall_peak <= ce_peak + 0.5 * full, (ce_peak / full, lall_peak / full)


def test_all_finite_is_exact_also_when_the_sum_overflows():
    from pixreg.losses._common import _all_finite

    x = torch.full((4, 3), 3e38)  # finite, but the float32 sum overflows to inf
    assert _all_finite(x)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = torch.zeros(5)
        y[2] = bad
        assert not _all_finite(y)
    assert _all_finite(torch.zeros(0))
