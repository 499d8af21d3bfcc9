"""No host synchronisation in the forward and backward passes of C+1, CAR, RCH, LALL and the
criterion when value checks are off (``pixreg.set_validation(False)``), so that a training
step can be captured in a CUDA graph / ``torch.compile(mode="reduce-overhead")``.

``torch.cuda.set_sync_debug_mode`` needs a GPU; on CPU a dispatch mode records every aten
operator run (forward and backward) and the test refuses those that copy a value to the
host (``_local_scalar_dense``: ``.item()``, ``bool()``, ``int()``, ``float()``) or whose
output size depends on the data (``nonzero``, boolean-mask indexing, ``unique``, ...) or copy a Python value from the host
(``torch.tensor(...)``).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pixreg
from pixreg.losses.car import CARLoss
from pixreg.losses.cplus1 import CPlus1Loss
from pixreg.losses.lall import LocallyAdaptiveLoss
from pixreg.losses.rch import RCHLoss

#: aten operators that synchronise with the host on CUDA
SYNCING = {
    "_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "unique", "_unique", "_unique2",
    "unique_consecutive", "unique_dim", "bincount", "histc", "equal", "is_nonzero", "allclose", "item",
    "repeat_interleave.Tensor", "_assert_async", "tolist",
    "lift_fresh",  # torch.tensor(python value): a host-to-device copy on CUDA (not capturable)
}


class SyncDetector(TorchDispatchMode):
    """Records the syncing aten operators run while active (boolean-mask indexing included)."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name, overload = func._schema.name.split("::")[-1], func._overloadname
        if name in SYNCING or f"{name}.{overload}" in SYNCING:
            self.found.append(f"{name}.{overload}")
        if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            indices = args[1] if len(args) > 1 else ()
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                self.found.append(f"{name} with a boolean mask")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_validation():
    pixreg.set_validation(False)
    yield
    pixreg.set_validation(True)


def _inputs(k=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, d, 8, 8, generator=g, requires_grad=True)
    logits = torch.randn(2, k, 16, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, k, (2, 16, 16), generator=g)
    labels[:, :2] = 255
    labels[labels == 3] = 1  # class 3 absent
    return feats, logits, labels


def _criterion(k=5, d=8, warmup=0):
    return pixreg.RegularizedCriterion({
        "cplus1": pixreg.Term(CPlus1Loss(k, d), warmup=warmup),
        "car": pixreg.Term(CARLoss(k), warmup=warmup),
        "rch": pixreg.Term(RCHLoss(k, d, embed_dim=6), warmup=warmup),
        "car_released": pixreg.Term(CARLoss(k, variant="released", ema_decay=0.9, feature_dim=d)),
        "lall": pixreg.Term(LocallyAdaptiveLoss(window=3)),
    })


def _step_syncs(crit, feats, logits, labels, steps=3, skip=0) -> list[str]:
    """Syncing operators of training steps ``skip..steps-1`` (forward and backward)."""
    crit.train()
    found = []
    for i in range(steps):
        with SyncDetector() as det:
            out = crit(logits, labels, features=feats)
            out.total.backward()
        found += det.found if i >= skip else []
    return found


def test_criterion_step_has_no_host_sync(no_validation):
    feats, logits, labels = _inputs()
    crit = _criterion()
    assert _step_syncs(crit, feats, logits, labels) == []
    assert int(crit.step) == 3


def test_warmup_reads_the_step_once(no_validation):
    feats, logits, labels = _inputs()
    crit = _criterion(warmup=2)
    assert _step_syncs(crit, feats, logits, labels, steps=1) == ["_local_scalar_dense.default"]
    assert _step_syncs(crit, feats, logits, labels, steps=3) == []  # in warm-up, then after it
    assert int(crit.step) == 4


@pytest.mark.parametrize("make", [
    lambda k, d: RCHLoss(k, d, embed_dim=6, sets="image", calibration="cosine_to_mean"),
    lambda k, d: RCHLoss(k, d, embed_dim=6, prototype_update="before", prototype_source="gt"),
    lambda k, d: CPlus1Loss(k, d, centres="learnable"),
    lambda k, d: CARLoss(k, variant="released"),
])
def test_options_have_no_host_sync(no_validation, make):
    feats, logits, labels = _inputs()
    crit = pixreg.RegularizedCriterion({"reg": make(5, 8)})
    assert _step_syncs(crit, feats, logits, labels, steps=2) == []


def test_detector_sees_syncs():
    # the detector can fail: value checks (on by default) read the labels' range on the host,
    # and the obvious syncing calls are seen
    feats, logits, labels = _inputs()
    assert "_local_scalar_dense.default" in _step_syncs(_criterion(), feats, logits, labels, steps=1)
    x = torch.randn(5)
    with SyncDetector() as det:
        x[x > 0].sum().item()
        torch.nonzero(x)
    assert det.found[:2] == ["index with a boolean mask", "_local_scalar_dense.default"]
    assert "nonzero.default" in det.found


def test_warmup_counter_follows_state_dict(no_validation):
    # the criterion keeps a host copy of its step counter (no read of the buffer per step);
    # it must follow load_state_dict, so that warm-ups resume where they were
    feats, logits, labels = _inputs()
    crit = _criterion(warmup=2)
    _step_syncs(crit, feats, logits, labels, steps=1)
    assert set(crit(logits, labels, features=feats).terms) >= {"cplus1", "car", "rch"}
    fresh = _criterion(warmup=2)
    fresh.load_state_dict(crit.state_dict())  # step 2: warm-up over
    out = fresh(logits, labels, features=feats)
    assert float(out.terms["car"]) > 0 and float(out.terms["rch"]) > 0
    restart = _criterion(warmup=2)
    restart.load_state_dict(_criterion(warmup=2).state_dict())  # step 0: warming up
    assert float(restart(logits, labels, features=feats).terms["car"]) == 0.0
