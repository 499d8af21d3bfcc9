"""Two gloo processes on CPU give the same losses, gradients and state as one process.

Each rank holds half of the batch. The single-process reference sees the whole batch.
Convention (pixreg/distributed.py): every rank computes the global loss value; the
gradient a rank gets for its own inputs is ``world_size`` times the single-process
gradient, so that DDP's averaging of parameter gradients gives the single-process one.
"""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
B, D, K, H, W = 4, 6, 5, 6, 6


def make_case(name: str):
    """Module factory and inputs (float64) for one regularizer, identical on every process."""
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
    labels[3] = 255 if name.endswith("ignored_rank") else labels[3]

    torch.manual_seed(7)
    base = name.split(":")[0]
    if base == "cplus1":
        mod = CPlus1Loss(num_classes=K, feat_dim=D)
    elif base == "cplus1_learnable":
        mod = CPlus1Loss(num_classes=K, feat_dim=D, centres="learnable")
    elif base == "car":
        mod = CARLoss(num_classes=K)
    elif base == "car_released":
        mod = CARLoss(num_classes=K, variant="released")
    elif base == "lall":
        mod = LocallyAdaptiveLoss(window=3)
    elif base == "rch":
        mod = RCHLoss(num_classes=K, in_channels=D, embed_dim=4)
    elif base == "rch_image":
        mod = RCHLoss(num_classes=K, in_channels=D, embed_dim=4, sets="image")
    else:  # pragma: no cover
        raise KeyError(name)
    return mod.double(), feats, logits, labels


def run_steps(mod, feats, logits, labels, steps: int = 2):
    """Two steps (so that moving state is used after an update); returns losses, grads, state."""
    losses, fgrads, lgrads = [], [], []
    for _ in range(steps):
        f = feats.clone().requires_grad_(True)
        z = logits.clone().requires_grad_(True)
        for p in mod.parameters():
            p.grad = None
        loss = mod.compute(labels, features=f if mod.uses_features else None, logits=z if mod.uses_logits else None)
        loss.backward()
        losses.append(loss.detach())
        fgrads.append(f.grad if f.grad is not None else torch.zeros_like(f))
        lgrads.append(z.grad if z.grad is not None else torch.zeros_like(z))
    pgrads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in mod.named_parameters()}
    state = {k: v.clone() for k, v in mod.state_dict().items()}
    return {"loss": torch.stack(losses), "fgrad": fgrads, "lgrad": lgrads, "pgrad": pgrads, "state": state}


def _worker(rank: int, init_file: str, out_dir: str, names: list[str]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        results = {}
        for name in names:
            mod, feats, logits, labels = make_case(name)
            half = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
            results[name] = run_steps(mod, feats[half], logits[half], labels[half])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


CASES = ["cplus1", "cplus1_learnable", "car", "car_released", "lall", "rch", "rch_image", "car:ignored_rank", "rch:ignored_rank"]


@pytest.fixture(scope="module")
def ranks():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp, CASES), nprocs=WORLD, join=True)
        yield [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.parametrize("name", CASES)
def test_two_processes_match_one(ranks, name):
    ref = run_steps(*make_case(name))
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
