"""DDP in a user's own training loop: ``DistributedDataParallel(RegularizedModel(...))``
called as ``ddp(images, labels)``.

1. The documented script (the ``<!-- ddp -->`` block of docs/integrations.md, run as it
   is written under ``torch.distributed.run``): 2 gloo processes for 4 steps across an
   RCH warm-up equal 1 process on the whole batch, with ``DDP(wrapped)`` as documented
   and with ``find_unused_parameters=True``.
2. Every regularizer at once, with warm-ups ending at different steps, a ``loss_weight``
   0 term, a projection, learnable C+1 centres and RCH's head, with and without
   ``find_unused_parameters``: 5 float64 SGD steps of 2 gloo processes equal one process
   on the whole batch (parameters, criterion state), and the pattern the issue reported
   (loss computed outside DDP's forward) is checked to fail as DDP says, so the docs'
   advice stays true.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
WORLD, B, K, D, HW, STEPS = 2, 4, 4, 6, 8, 5


def doc_block(marker: str) -> str:
    text = (ROOT / "docs" / "integrations.md").read_text()
    blocks = re.findall(rf"<!-- {marker} -->\n```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, f"docs/integrations.md must have exactly one <!-- {marker} --> block"
    return blocks[0]


def torchrun(script: Path, nproc: int, cwd: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), str(script)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def run_variants(tmp_path, variants: dict, script: str, result: str) -> dict:
    """Run each ``name -> (source, processes)`` under torchrun in its own folder; flat
    state dicts of what rank 0 saved in ``result``."""
    states = {}
    for name, (src, nproc) in variants.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / script).write_text(src)
        torchrun(folder / script, nproc, folder)
        saved = torch.load(folder / result, weights_only=False)
        flat = saved["state_dict"] if "state_dict" in saved else {f"{p}.{k}": v for p in saved for k, v in saved[p].items()}
        states[name] = flat
    return states


def assert_two_equal_one(states: dict) -> None:
    ref = states["one"]
    for name in ("two", "two_unused"):
        assert states[name].keys() == ref.keys()
        diff = max(float((states[name][k].double() - v.double()).abs().max()) for k, v in ref.items() if v.numel())
        print(f"max |{name} - one process| = {diff:.2e}")
        for k, v in ref.items():
            torch.testing.assert_close(states[name][k], v, rtol=1e-4, atol=2e-5, msg=f"{name} {k}")


def test_documented_ddp_script_two_processes_equal_one(tmp_path):
    code = doc_block("ddp")
    assert "DDP(wrapped)" in code and "warmup=2" in code and "ddp(images, labels)" in code
    states = run_variants(tmp_path, {
        "one": (code, 1), "two": (code, 2),
        "two_unused": (code.replace("DDP(wrapped)", "DDP(wrapped, find_unused_parameters=True)"), 2),
    }, "train_ddp.py", "ddp_ckpt.pt")
    assert int(states["one"]["criterion.step"]) == 4  # 4 steps, RCH on from step 3
    assert states["one"]["criterion.losses.rch.initialized"].any()  # RCH ran after its warm-up
    assert_two_equal_one(states)


@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="needs pixreg[lightning]")
def test_documented_lightning_ddp_script_two_processes_equal_one(tmp_path):
    code = doc_block("lightning-ddp")
    assert 'strategy="ddp"' in code and "devices=2" in code and "warmup=2" in code
    states = run_variants(tmp_path, {
        "one": (code.replace("devices=2", "devices=1"), 1), "two": (code, 2),
        "two_unused": (code.replace('strategy="ddp"', 'strategy="ddp_find_unused_parameters_true"'), 2),
    }, "train_lightning.py", "lightning_ddp.ckpt")
    assert int(states["one"]["pixreg_criterion.step"]) == 4
    assert states["one"]["pixreg_criterion.losses.rch.initialized"].any()
    assert_two_equal_one(states)


# ----------------------------------------------------------------------------- every regularizer
def build(seed: int = 0):
    from pixreg import CARLoss, CPlus1Loss, LocallyAdaptiveLoss, RCHLoss, RegularizedCriterion, RegularizedModel, Term

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, D, 3, padding=1), nn.Tanh(), nn.Conv2d(D, K, 1)).double()
    criterion = RegularizedCriterion({
        "cplus1": Term(CPlus1Loss(K, 5, centres="learnable"), 1.0, warmup=3, projection=nn.Conv2d(D, 5, 1)),
        "car": Term(CARLoss(K), 0.0),  # multiplier 0: computed, zero gradient
        "lall": Term(LocallyAdaptiveLoss(num_classes=K), 0.5, warmup=1),
        "rch": Term(RCHLoss(K, D, embed_dim=8), 1.0, warmup=2),
    }).double()
    return RegularizedModel(model, criterion, layers="1")


def batch():
    g = torch.Generator().manual_seed(3)
    images = torch.randn(B, 3, HW, HW, generator=g, dtype=torch.float64)
    labels = torch.randint(0, K, (B, HW, HW), generator=g)
    labels[:, 0] = 255
    labels[3, :4] = 255
    return images, labels


def state(wrapped) -> dict:
    return {k: v.detach().clone() for k, v in wrapped.state_dict().items()}


def train(wrapped, step_fn, steps: int = STEPS) -> dict:
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        step_fn().backward()
        opt.step()
    return state(wrapped)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    images, labels = (t[rank::WORLD] for t in batch())
    results = {}
    try:
        for unused in (False, True):
            wrapped = build()
            ddp = DDP(wrapped, find_unused_parameters=unused)
            results[f"inside:{unused}"] = train(wrapped, lambda: ddp(images, labels).total)
        for unused in (False, True):  # the pattern of the issue: the loss after DDP's forward
            wrapped = build()
            ddp = DDP(wrapped, find_unused_parameters=unused)
            try:
                train(wrapped, lambda: ddp.module.loss(ddp(images), labels).total)
                results[f"outside:{unused}"] = "ok"
            except RuntimeError as exc:
                results[f"outside:{unused}"] = str(exc).splitlines()[0]
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        yield [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]


def one_process() -> dict:
    wrapped = build()
    images, labels = batch()
    return train(wrapped, lambda: wrapped(images, labels).total)


@pytest.mark.parametrize("unused", [False, True])
def test_every_regularizer_under_ddp_equals_one_process(ranks, unused):
    ref = one_process()
    assert int(ref["criterion.step"]) == STEPS
    fresh = state(build())
    for name in ("criterion.losses.cplus1.centres", "criterion.projections.cplus1.weight",
                 "criterion.losses.rch.head.weight", "criterion.losses.rch.prototypes"):
        assert not torch.equal(ref[name], fresh[name]), f"{name} was never trained"
    for r in range(WORLD):
        got = ranks[r][f"inside:{unused}"]
        assert got.keys() == ref.keys()
        for k, v in ref.items():
            torch.testing.assert_close(got[k], v, rtol=1e-9, atol=1e-11, msg=f"rank {r} {k}")


def test_loss_outside_ddp_forward(ranks):
    """With every parameter touched each step, the loss may follow DDP's forward when
    ``find_unused_parameters=False``; with ``True`` DDP refuses it (documented)."""
    for r in range(WORLD):
        assert ranks[r]["outside:False"] == "ok"
        assert "mark a variable ready only once" in ranks[r]["outside:True"], ranks[r]["outside:True"]


def test_off_terms_touch_their_parameters_with_zero():
    wrapped = build()
    images, labels = batch()
    out = wrapped(images, labels)  # step 0: C+1, LALL and RCH are warming up
    assert float(out.terms["cplus1"]) == float(out.terms["rch"]) == float(out.terms["lall"]) == 0.0
    out.total.backward()
    crit = wrapped.criterion
    for name in ("cplus1", "rch"):
        params = list(crit.losses[name].parameters()) + list(crit.projections[name].parameters() if name in crit.projections else [])
        assert params and all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in params), name
    assert not crit.losses["rch"].initialized.any()  # state not updated during the warm-up
    assert all(p.grad is not None for p in wrapped.model.parameters())
    with torch.no_grad():  # evaluation under no_grad: no touch, no graph
        assert not wrapped(images, labels).total.requires_grad
    # eval mode: every term is computed, the step counter does not move
    wrapped.eval()
    step = int(crit.step)
    out = wrapped(images, labels)
    assert float(out.terms["lall"]) > 0 and int(crit.step) == step  # LALL was off in training
    assert out.output.shape == (B, K, HW, HW) and wrapped.capture.features == {}
    with pytest.raises(TypeError, match="RegularizedCriterion"):
        type(wrapped)(wrapped.model, nn.CrossEntropyLoss(), layers="1")
