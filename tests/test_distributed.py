"""Two gloo processes on CPU give the same losses, gradients and state as one process.

Each rank holds half of the batch. The single-process reference sees the whole batch.
Convention (pixreg/distributed.py): every rank computes the global loss value; the
gradient a rank gets for its own inputs is ``world_size`` times the single-process
gradient, so that DDP's averaging of parameter gradients gives the single-process one.

Cases (float64, two steps so that moving state is used after an update): every
regularizer and variant, :class:`GlobalBatchNorm` and the full criterion (class-weighted
CE + the four regularizers); labels with a class present on rank 0 only and one on rank
1 only, each case also with an all-ignored image (``:ignored_rank``) and with rank 1
holding no valid pixel (``:empty_rank``). Checked to ``rtol=1e-6, atol=1e-9``: loss,
gradients w.r.t. features and logits, mean parameter gradients, state; the state and
the loss are bit-identical across ranks. Plus a few DDP steps of the trainer's
``TrainStep`` (model with global BatchNorm + criterion) against one process, to 1e-9.
"""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pixreg.distributed import GlobalBatchNorm
from pixreg.losses._common import global_mean
from pixreg.losses.base import Regularizer

WORLD = 2
B, D, K, H, W = 4, 6, 5, 6, 6


class _BNProbe(Regularizer):
    """Test-only regularizer: a nonlinear global mean of a :class:`GlobalBatchNorm` output."""

    uses_features = True
    uses_logits = False

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(D, 3, 1)
        self.bn = GlobalBatchNorm(3)  # the generic class (any input dimension)

    def compute(self, labels, features=None, logits=None):
        y = self.bn(self.conv(features))
        return global_mean((y.pow(3) + y.pow(2)).sum(), torch.tensor(float(y.numel()), dtype=y.dtype))


def make_case(name: str):
    """Module, extra modules (parameters outside it) and inputs (float64) for one case,
    identical on every process. ``name`` is ``base[:labels]``."""
    from pixreg.criterion import RegularizedCriterion, Term
    from pixreg.losses.car import CARLoss
    from pixreg.losses.cplus1 import CPlus1Loss
    from pixreg.losses.lall import LocallyAdaptiveLoss
    from pixreg.losses.rch import RCHLoss

    g = torch.Generator().manual_seed(1234)
    feats = torch.randn(B, D, H, W, generator=g, dtype=torch.float64)
    logits = torch.randn(B, K, H, W, generator=g, dtype=torch.float64)
    labels = torch.randint(0, K - 1, (B, H, W), generator=g)
    labels[:2][labels[:2] == 0] = K - 1  # class K-1 only on rank 0's half, class 0 only on rank 1's
    labels[2:][labels[2:] == K - 1] = 0
    labels[:, 0, :2] = 255
    variant = name.split(":")[1] if ":" in name else ""
    if variant == "ignored_rank":  # one of rank 1's images fully ignored
        labels[3] = 255
    elif variant == "empty_rank":  # rank 1 has no valid pixel at all
        labels[2:] = 255

    torch.manual_seed(7)
    base = name.split(":")[0]
    extra = {}
    if base == "cplus1":
        mod = CPlus1Loss(num_classes=K, feature_dim=D)
    elif base == "cplus1_euclid":
        mod = CPlus1Loss(num_classes=K, feature_dim=D, distance="euclidean", normalize=False, margin=3.0)
    elif base == "cplus1_learnable":
        mod = CPlus1Loss(num_classes=K, feature_dim=D, centres="learnable")
    elif base == "cplus1_classifier":
        extra["classifier"] = torch.nn.Conv2d(D, K, 1).double()
        mod = CPlus1Loss(num_classes=K, feature_dim=D, centres="classifier", classifier=extra["classifier"])
    elif base == "car":
        mod = CARLoss(num_classes=K)
    elif base == "car_released":
        mod = CARLoss(num_classes=K, variant="released")
    elif base == "car_released_ema":
        mod = CARLoss(num_classes=K, variant="released", ema_decay=0.9, feature_dim=D)
    elif base == "lall":
        mod = LocallyAdaptiveLoss(window=3)
    elif base == "lall_stride":
        mod = LocallyAdaptiveLoss(window=5, stride=2, xi="weight_sum", distance_weights="uniform", power=1.0)
    elif base == "rch":
        mod = RCHLoss(num_classes=K, feature_dim=D, embed_dim=4)
    elif base == "rch_image":
        mod = RCHLoss(num_classes=K, feature_dim=D, embed_dim=4, sets="image")
    elif base == "rch_variant":  # other calibration, update before the loss, BatchNorm in the head
        mod = RCHLoss(num_classes=K, feature_dim=D, embed_dim=4, calibration="cosine_to_mean",
                      prototype_update="before", head_norm=True)
    elif base == "rch_released":  # released-code options: gradient through the updated prototypes, mmseg mean
        mod = RCHLoss(num_classes=K, feature_dim=D, embed_dim=4, calibration="cosine_to_mean", sets="image",
                      prototype_grad=True, ce_resolution="label", reduction="all_pixels", head_norm=True)
    elif base == "globalbn":
        mod = _BNProbe()
    elif base == "criterion":  # CE (class-weighted) + the four regularizers, as pixreg train uses them
        mod = RegularizedCriterion({
            "cplus1": CPlus1Loss(num_classes=K, feature_dim=D), "car": CARLoss(num_classes=K),
            "lall": LocallyAdaptiveLoss(window=3), "rch": RCHLoss(num_classes=K, feature_dim=D, embed_dim=4),
        }, class_weight=torch.linspace(0.5, 1.5, K))
    else:  # pragma: no cover
        raise KeyError(name)
    return mod.double(), extra, feats, logits, labels


def run_steps(mod, extra, feats, logits, labels, steps: int = 2):
    """Two steps (so that moving state is used after an update); returns losses, grads, state."""
    from pixreg.criterion import RegularizedCriterion

    losses, fgrads, lgrads = [], [], []
    params = dict(mod.named_parameters())
    params.update({f"{k}.{n}": p for k, m in extra.items() for n, p in m.named_parameters()})
    for _ in range(steps):
        f = feats.clone().requires_grad_(True)
        z = logits.clone().requires_grad_(True)
        for p in params.values():
            p.grad = None
        if isinstance(mod, RegularizedCriterion):
            loss = mod(z, labels, features=f).total
        else:
            loss = mod.compute(labels, features=f if mod.uses_features else None, logits=z if mod.uses_logits else None)
        loss.backward()
        losses.append(loss.detach())
        fgrads.append(f.grad if f.grad is not None else torch.zeros_like(f))
        lgrads.append(z.grad if z.grad is not None else torch.zeros_like(z))
    pgrads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}
    state = {k: v.clone() for k, v in mod.state_dict().items()}
    return {"loss": torch.stack(losses), "fgrad": fgrads, "lgrad": lgrads, "pgrad": pgrads, "state": state}


def train_steps(ddp: bool, steps: int = 3) -> dict:
    """A few AdamW steps of ``pixreg train``'s ``TrainStep`` (FCN-ResNet with BatchNorm + CE + the
    four regularizers, RCH with its BatchNorm head) in float64. With ``ddp``: this rank's half
    of every batch, DistributedDataParallel as the trainer uses it, the model's BatchNorm
    converted to :class:`GlobalBatchNorm` (what ``train.sync_bn`` does on CPU)."""
    from torch.nn.parallel import DistributedDataParallel

    from pixreg.distributed import convert_global_batchnorm
    from pixreg.models import build_model
    from pixreg.train.methods import build_criterion
    from pixreg.train.trainer import TrainStep

    torch.manual_seed(0)
    model = build_model("fcn_resnet", K, width=4, depth=10, head_channels=8)
    torch.manual_seed(1)
    criterion, layers = build_criterion("cplus1+car+lall+rch", model, num_classes=K, ignore_index=255, background_index=0,
                                        options={"rch": {"head_norm": True, "embed_dim": 8}})
    if ddp:
        model = convert_global_batchnorm(model)
    step_module = TrainStep(model, criterion, layers).double()
    runner = DistributedDataParallel(step_module, find_unused_parameters=True) if ddp else step_module
    opt = torch.optim.AdamW([p for p in step_module.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(99)
    images = torch.randn(steps, B, 3, 24, 24, generator=g, dtype=torch.float64)
    labels = torch.randint(0, K - 1, (steps, B, 24, 24), generator=g)
    labels[:, :2][labels[:, :2] == 0] = K - 1  # as make_case: classes K-1 / 0 on one rank only
    labels[:, 2:][labels[:, 2:] == K - 1] = 0
    labels[:, :, :3] = 255
    labels[1, 3] = 255  # an image with no valid pixel
    half = slice(dist.get_rank() * B // WORLD, (dist.get_rank() + 1) * B // WORLD) if ddp else slice(None)
    losses = []
    for s in range(steps):
        _, total, _ = runner(images[s, half], labels[s, half])
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        losses.append(total.detach())
    return {"loss": torch.stack(losses), "model": {k: v.clone() for k, v in model.state_dict().items()},
            "criterion": {k: v.clone() for k, v in criterion.state_dict().items()}}


def _worker(rank: int, init_file: str, out_dir: str, names: list[str]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        results = {}
        for name in names:
            mod, extra, feats, logits, labels = make_case(name)
            half = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
            results[name] = run_steps(mod, extra, feats[half], logits[half], labels[half])
        results["train"] = train_steps(ddp=True)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


BASES = ["cplus1", "cplus1_euclid", "cplus1_learnable", "cplus1_classifier", "car", "car_released",
         "car_released_ema", "lall", "lall_stride", "rch", "rch_image", "rch_variant", "rch_released", "globalbn",
         "criterion"]
# every case also with one of rank 1's images fully ignored, and with rank 1 holding no valid pixel
CASES = BASES + [f"{b}:ignored_rank" for b in BASES if b != "globalbn"] + [f"{b}:empty_rank" for b in BASES if b != "globalbn"]


@pytest.fixture(scope="module")
def ranks():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp, CASES), nprocs=WORLD, join=True)
        yield [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.parametrize("name", CASES)
def test_two_processes_match_one(ranks, name):
    ref = run_steps(*make_case(name))
    assert len(ref["loss"]) == 2 and all(torch.isfinite(ref["loss"]))
    for r in range(WORLD):
        got = ranks[r][name]
        half = slice(r * B // WORLD, (r + 1) * B // WORLD)
        torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-6, atol=1e-9, msg=f"{name} loss, rank {r}")
        for step in range(len(ref["fgrad"])):
            torch.testing.assert_close(got["fgrad"][step] / WORLD, ref["fgrad"][step][half], rtol=1e-6, atol=1e-9,
                                       msg=f"{name} feature grad, rank {r}, step {step}")
            torch.testing.assert_close(got["lgrad"][step] / WORLD, ref["lgrad"][step][half], rtol=1e-6, atol=1e-9,
                                       msg=f"{name} logit grad, rank {r}, step {step}")
        for k, v in ref["state"].items():  # buffers identical on every rank and equal to one process
            torch.testing.assert_close(got["state"][k], v, rtol=1e-6, atol=1e-9, msg=f"{name} state {k}, rank {r}")
    for n, g in ref["pgrad"].items():  # DDP averages parameter gradients over ranks
        mean = sum(ranks[r][name]["pgrad"][n] for r in range(WORLD)) / WORLD
        torch.testing.assert_close(mean, g, rtol=1e-6, atol=1e-9, msg=f"{name} param grad {n}")
    for k, v in ranks[0][name]["state"].items():  # moving centres / prototypes: bit-identical across ranks
        assert torch.equal(v, ranks[1][name]["state"][k]), f"{name} state {k} differs between ranks"
    assert torch.equal(ranks[0][name]["loss"], ranks[1][name]["loss"]), f"{name}: loss differs between ranks"


def max_differences(ranks, name):
    """Largest |2 processes - 1 process| over loss, feature/logit grads, parameter grads, state."""
    ref = run_steps(*make_case(name))
    out = {"loss": 0.0, "grad": 0.0, "state": 0.0}
    for r in range(WORLD):
        got = ranks[r][name]
        half = slice(r * B // WORLD, (r + 1) * B // WORLD)
        out["loss"] = max(out["loss"], (got["loss"] - ref["loss"]).abs().max().item())
        for key in ("fgrad", "lgrad"):
            for a, b in zip(got[key], ref[key]):
                out["grad"] = max(out["grad"], (a / WORLD - b[half]).abs().max().item())
        for k, v in ref["state"].items():
            if v.is_floating_point():
                out["state"] = max(out["state"], (got["state"][k] - v).abs().max().item())
    for n, g in ref["pgrad"].items():
        mean = sum(ranks[r][name]["pgrad"][n] for r in range(WORLD)) / WORLD
        out["grad"] = max(out["grad"], (mean - g).abs().max().item())
    return out


def test_ddp_train_steps_match_one_process(ranks):
    """``TrainStep`` under DDP (global BatchNorm, CE and regularizers) equals one process after
    three AdamW steps, in float64 (so any difference is a missing synchronisation, not rounding);
    parameters, BatchNorm running statistics and criterion state are bit-identical across ranks."""
    ref = train_steps(ddp=False)
    for r in range(WORLD):
        got = ranks[r]["train"]
        torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-9, atol=1e-12, msg=f"loss, rank {r}")
        for part in ("model", "criterion"):
            for k, v in ref[part].items():
                torch.testing.assert_close(got[part][k], v, rtol=1e-9, atol=1e-12, msg=f"{part} {k}, rank {r}")
    for part in ("model", "criterion"):
        for k, v in ranks[0]["train"][part].items():
            assert torch.equal(v, ranks[1]["train"][part][k]), f"{part} {k} differs between ranks"
