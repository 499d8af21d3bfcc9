"""The shared structure of the regularizers: the Regularizer base, the one input-check
vocabulary (every constructor refuses NaN/inf/negative/out-of-range hyper-parameters and an
ignore_index equal to a class index), the renamed keywords (loss_weight, feature_dim), the
moving average of class means, the one method registry and the effective weight per term."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import pixreg
from pixreg import CARLoss, CPlus1Loss, LocallyAdaptiveLoss, RCHLoss, RegularizedCriterion, Term
from pixreg.functional import car_loss, cplus1_loss, locally_adaptive_loss, rch_loss
from pixreg.losses._common import ema_class_means
from pixreg.losses.registry import REGULARIZERS, make_regularizer

K, D = 4, 6
NAN, INF = float("nan"), float("inf")

# (class, positional args, hyper-parameter, bad values): every numeric hyper-parameter
BAD_HPARAMS = [
    (CPlus1Loss, (K, D), "alpha", [NAN, INF, -0.1]),
    (CPlus1Loss, (K, D), "beta", [NAN, -1.0]),
    (CPlus1Loss, (K, D), "margin", [NAN, -1.0]),
    (CPlus1Loss, (K, D), "momentum", [NAN, -0.1, 1.0]),
    (CPlus1Loss, (K, D), "background_index", [-1, K, 1.5]),
    (CARLoss, (K,), "intra_weight", [NAN, -1.0]),
    (CARLoss, (K,), "c2c_weight", [INF, -1.0]),
    (CARLoss, (K,), "c2p_weight", [NAN]),
    (CARLoss, (K,), "eps0", [NAN, -0.5]),
    (CARLoss, (K,), "eps1", [NAN, -0.5]),
    (LocallyAdaptiveLoss, (), "loss_weight", [NAN, -1.0, INF]),
    (LocallyAdaptiveLoss, (), "power", [NAN, 0.5]),
    (LocallyAdaptiveLoss, (), "eps", [NAN, 0.0, -1.0]),
    (LocallyAdaptiveLoss, (), "window", [0, 4, -3]),
    (LocallyAdaptiveLoss, (), "stride", [0, -1]),
    (RCHLoss, (K, D), "loss_weight", [NAN, -0.1]),
    (RCHLoss, (K, D), "tau", [NAN, 0.0, -0.5]),
    (RCHLoss, (K, D), "rho", [NAN, -0.1, 1.0]),
    (RCHLoss, (K, D), "hard_weight", [NAN, -1.0]),
    (RCHLoss, (K, D), "embed_dim", [0, -2]),
]


@pytest.mark.parametrize("cls,args,name,values", BAD_HPARAMS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_every_constructor_refuses_bad_numbers_naming_the_argument(cls, args, name, values):
    for value in values:
        with pytest.raises((TypeError, ValueError), match=f"`{name}`"):
            cls(*args, **{name: value})
    cls(*args)  # the defaults are valid


@pytest.mark.parametrize("build", [
    lambda ii: CPlus1Loss(K, D, ignore_index=ii),
    lambda ii: CARLoss(K, ignore_index=ii),
    lambda ii: LocallyAdaptiveLoss(num_classes=K, ignore_index=ii),
    lambda ii: RCHLoss(K, D, ignore_index=ii),
], ids=["cplus1", "car", "lall", "rch"])
def test_ignore_index_equal_to_a_class_is_refused(build):
    for ii in (0, K - 1):
        with pytest.raises(ValueError, match="ignore_index"):
            build(ii)
    for ii in (K, 255, -1):
        assert build(ii).ignore_index == ii


def test_functionals_refuse_ignore_index_equal_to_a_class():
    x, y = torch.randn(2, D, 4, 4), torch.randint(0, K, (2, 4, 4))
    z = torch.randn(2, K, 4, 4)
    with pytest.raises(ValueError, match="ignore_index"):
        cplus1_loss(x, y, torch.randn(K - 1, D), ignore_index=1)
    with pytest.raises(ValueError, match="ignore_index"):
        car_loss(x, y, K, ignore_index=2)
    with pytest.raises(ValueError, match="ignore_index"):
        locally_adaptive_loss(z, y, ignore_index=0)  # K read from the logits
    with pytest.raises(ValueError, match="ignore_index"):
        rch_loss(x, z, y, torch.randn(K, D), ignore_index=3)
    with pytest.raises(ValueError, match="alpha"):
        cplus1_loss(x, y, torch.randn(K - 1, D), alpha=NAN)


def test_flags_must_be_bools():
    with pytest.raises(TypeError, match="normalize"):
        CPlus1Loss(K, D, normalize="no")
    with pytest.raises(TypeError, match="use_fn"):
        RCHLoss(K, D, use_fn=1)


def test_hyper_parameters_are_keyword_only():
    with pytest.raises(TypeError):
        CARLoss(K, D, 1.0)  # intra_weight given by position
    with pytest.raises(TypeError):
        RCHLoss(K, D, 16)  # embed_dim given by position
    with pytest.raises(TypeError):
        LocallyAdaptiveLoss(5)  # window (or num_classes?) by position: ambiguous, refused


def test_one_name_for_the_feature_width():
    for name in ("cplus1", "car", "rch"):
        assert make_regularizer(name, K, D).feature_dim == D
    assert make_regularizer("lall", K, D).feature_dim is None  # logits only
    for cls, old in ((CPlus1Loss, "feat_dim"), (RCHLoss, "in_channels")):
        with pytest.warns(DeprecationWarning, match=f"`{old}` is deprecated"):
            reg = cls(K, **{old: D})
        assert reg.feature_dim == D
        with pytest.raises(TypeError, match="not both"), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            cls(K, D + 1, **{old: D})
        with pytest.raises(TypeError, match="feature_dim"):
            cls(K)


def test_loss_weight_rename_keeps_the_old_keyword_for_one_version():
    z, y = torch.randn(2, K, 6, 6), torch.randint(0, K, (2, 6, 6))
    with pytest.warns(DeprecationWarning, match="`weight` is deprecated"):
        old = LocallyAdaptiveLoss(weight=0.5)
    assert old.loss_weight == 0.5
    torch.testing.assert_close(old(z, y), LocallyAdaptiveLoss(loss_weight=0.5)(z, y))
    torch.testing.assert_close(old(z, y), 0.5 * LocallyAdaptiveLoss()(z, y))
    with pytest.warns(DeprecationWarning):
        assert RCHLoss(K, D, weight=0.3).loss_weight == 0.3
    with pytest.warns(DeprecationWarning):
        term = Term(CARLoss(K), weight=0.25)
    assert term.loss_weight == 0.25
    with pytest.warns(DeprecationWarning):
        assert term.weight == 0.25
    with pytest.warns(DeprecationWarning):
        out = locally_adaptive_loss(z, y, weight=2.0)
    torch.testing.assert_close(out.loss, locally_adaptive_loss(z, y, loss_weight=2.0).loss)


def test_a_per_class_weight_tensor_is_refused_with_the_argument_named():
    # torch's `weight` is a per-class tensor; ours is one number (the old message was
    # "only one element tensors can be converted to Python scalars")
    with pytest.raises(TypeError, match="`loss_weight` must be a real number"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        LocallyAdaptiveLoss(weight=torch.ones(3))


def test_term_and_criterion_refuse_bad_numbers():
    for bad in (NAN, -1.0, INF):
        with pytest.raises(ValueError, match="loss_weight"):
            Term(CARLoss(K), loss_weight=bad)
        with pytest.raises(ValueError, match="ce_weight"):
            RegularizedCriterion({}, ce_weight=bad)
    for bad in (-1, -5):
        with pytest.raises(ValueError, match="warmup"):
            Term(CARLoss(K), warmup=bad)
    with pytest.raises(TypeError, match="warmup"):
        Term(CARLoss(K), warmup=1.5)
    for bad in ([1.0, NAN, 1.0, 1.0], [1.0, -1.0, 1.0, 1.0], [0.0] * K, [[1.0]]):
        with pytest.raises(ValueError, match="class_weight"):
            RegularizedCriterion({}, class_weight=bad)


@pytest.mark.parametrize("name", sorted(REGULARIZERS))
def test_logits_with_another_number_of_classes_are_refused(name):
    reg = make_regularizer(name, K, D, **({"background_index": 0} if name == "cplus1" else {}))
    crit = RegularizedCriterion({name: reg})
    y = torch.randint(0, K, (2, 8, 8))
    with pytest.raises(ValueError, match=f"5 classes.*num_classes={K}"):
        crit(torch.randn(2, K + 1, 8, 8), y, features=torch.randn(2, D, 8, 8))
    assert torch.isfinite(crit(torch.randn(2, K, 8, 8), y, features=torch.randn(2, D, 8, 8)).total)


def test_compute_dispatch_names_the_missing_input():
    y = torch.randint(0, K, (1, 4, 4))
    with pytest.raises(ValueError, match="CARLoss needs `features`"):
        CARLoss(K).compute(y, logits=torch.randn(1, K, 4, 4))
    with pytest.raises(ValueError, match="LocallyAdaptiveLoss needs `logits`"):
        LocallyAdaptiveLoss().compute(y, features=torch.randn(1, D, 4, 4))
    with pytest.raises(ValueError, match="RCHLoss needs `logits`"):
        RCHLoss(K, D).compute(y, features=torch.randn(1, D, 4, 4))


def test_a_custom_regularizer_needs_only_forward():
    class Mean(pixreg.Regularizer):
        def forward(self, features, labels):
            return self._record(pixreg.LossOutput(features.mean(), {"mean": features.mean()}))

    reg = Mean()
    assert reg.num_classes is None and reg.ignore_index == 255
    crit = RegularizedCriterion({"m": Term(reg, loss_weight=2.0)})
    out = crit(torch.zeros(1, K, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), features=torch.ones(1, 3, 2, 2))
    assert float(out.terms["m"]) == 2.0 and float(out.terms["m/mean"]) == 2.0


# -------------------------------------------------------------- moving average of class means
def _ema_reference(feats, index, means, initialized, momentum):
    """Float64 loop over classes, written from the equation."""
    means, init = means.double().clone(), initialized.clone()
    for k in range(means.shape[0]):
        rows = [feats[i].double() for i in range(len(index)) if int(index[i]) == k]
        if not rows:
            continue
        batch = torch.stack(rows).mean(0)
        means[k] = momentum * means[k] + (1 - momentum) * batch if init[k] else batch
        init[k] = True
    return means, init


@pytest.mark.parametrize("momentum", [0.0, 0.7, 0.9])
def test_ema_class_means_matches_a_loop_reference(momentum):
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(40, 5, generator=g, dtype=torch.float64)
    index = torch.randint(0, 4, (40,), generator=g)  # 3 classes + dump class 3
    index[index == 1] = 3  # class 1 absent
    means = torch.randn(3, 5, generator=g, dtype=torch.float64)
    init = torch.tensor([True, True, False])
    new, new_init = ema_class_means(feats, index, means, init, momentum)
    ref, ref_init = _ema_reference(feats, index, means, init, momentum)
    torch.testing.assert_close(new, ref)
    assert new_init.tolist() == ref_init.tolist() == [True, True, True]
    assert torch.equal(new[1], means[1])  # absent: untouched


def test_car_ema_centres_follow_the_equation():
    """CAR's released-variant EMA (the helper, with every centre initialised) against the loop."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, D, 4, 4, generator=g), torch.randint(0, K, (2, 4, 4), generator=g)
    y[y == 2] = 255  # an absent class, and ignored pixels
    car = CARLoss(K, D, variant="released", ema_decay=0.8)
    before = car.ema_centres.clone()
    car(x, y)
    flat = x.permute(0, 2, 3, 1).reshape(-1, D)
    want, _ = _ema_reference(flat, y.reshape(-1), before, torch.ones(K, dtype=torch.bool), 0.8)
    torch.testing.assert_close(car.ema_centres, want.float())
    assert torch.equal(car.ema_centres[2], before[2])
    car.eval()
    car(x, y)  # no update in eval mode
    torch.testing.assert_close(car.ema_centres, want.float())


# ----------------------------------------------------------------------- registry and config
def test_one_method_registry():
    from pixreg import integrations
    from pixreg.train import methods

    assert methods.METHODS is REGULARIZERS
    assert integrations.make_regularizer is make_regularizer
    assert list(REGULARIZERS) == ["cplus1", "car", "lall", "rch"]
    for name, cls in REGULARIZERS.items():
        assert methods.loss_class(name) is cls
        assert isinstance(make_regularizer(name, K, D), cls)
    with pytest.raises(ValueError, match="`name` must be one of"):
        make_regularizer("focal", K, D)


def test_config_shows_one_effective_weight_per_term():
    from pixreg.train.config import resolve_config
    from pixreg.train.methods import build_criterion
    from pixreg.models import build_model

    cfg = resolve_config(None)
    assert {n: o["loss_weight"] for n, o in cfg["methods"].items()} == {
        "cplus1": 1.0, "car": 1.0, "lall": 1.0, "rch": 0.1}
    assert not any("weight" in o for o in cfg["methods"].values())
    model = build_model("fcn_resnet", num_classes=K, width=8, depth=10, head_channels=16)
    crit, _ = build_criterion("rch+lall", model, num_classes=K, options=cfg["methods"])
    assert crit.specs["rch"].loss_weight == 0.1 and crit.losses["rch"].loss_weight == 1.0
    assert crit.specs["lall"].loss_weight == 1.0 and crit.losses["lall"].loss_weight == 1.0
    # without options the class's own default is the term's weight (RCH: the paper's lambda)
    crit, _ = build_criterion("rch", model, num_classes=K)
    assert crit.specs["rch"].loss_weight == 0.1 and crit.losses["rch"].loss_weight == 1.0


def test_config_folds_the_deprecated_weight_key_into_loss_weight():
    from pixreg.train.config import resolve_config

    with pytest.warns(DeprecationWarning, match="methods.rch.weight is deprecated"):
        cfg = resolve_config(None, ["methods.rch.weight=2"])
    assert cfg["methods"]["rch"] == {"loss_weight": pytest.approx(0.2), "warmup": 0}
    with pytest.warns(DeprecationWarning):
        cfg = resolve_config(None, ["methods.lall.weight=0.5", "methods.lall.loss_weight=3"])
    assert cfg["methods"]["lall"]["loss_weight"] == 1.5
    cfg = resolve_config(None, ["methods.car.loss_weight=0.5"])
    assert cfg["methods"]["car"]["loss_weight"] == 0.5
    assert math.isclose(resolve_config(None)["methods"]["rch"]["loss_weight"], 0.1)
