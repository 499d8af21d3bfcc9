"""``pixreg train`` under ``torchrun`` with 2 gloo processes equals one process.

A real ``python -m torch.distributed.run --nproc-per-node 2`` launch of ``pixreg train``
(the CLI entry point, through ``tests/_capture_train.py``, which saves each rank's
final model and criterion state) trains C+1 + CAR + LALL + RCH (RCH with its BatchNorm head) for a few
steps on the embedded scenes data, with ``train.sync_bn=true``. The test requires

* the final model parameters and buffers and the criterion state (C+1 centres, RCH
  prototypes and head, step counter) to be **bit-identical on both ranks**;
* the same to match a single-process run with the same global batch (4 images: each
  rank gets 2 of them, the union is the single-process batch; augmentation is a function
  of (seed, sample, epoch) only) to ``atol = rtol = 2e-5``, and the per-step losses in
  ``log.csv`` to agree to 2e-5 relative (measured: parameters 1.4e-6 to 3.1e-6, criterion
  state 1.3e-6 to 1.8e-6 over repeated runs).

Why not bit-identical to one process: training runs in float32, and a global sum
computed as (sum over rank 0's pixels) + (sum over rank 1's pixels) rounds differently
from one sum over all pixels (and DDP averages two half-gradients). These differences
are ~1e-7 relative per operation; after 4 SGD steps the parameters differ by a few 1e-6
(the maximum is printed). The run uses SGD because AdamW divides each update by the
gradient's running RMS, which turns float32 rounding in near-zero gradients into ~2e-5
differences after 4 steps; ``tests/test_distributed.py`` shows with the same model and
criterion under DDP in float64 that three AdamW steps agree to ~1e-14, i.e. the
difference is rounding, not a missing synchronisation. Exact equality *of the math*
needs:

* global statistics everywhere: the regularizers and the cross-entropy are global means
  (:mod:`pixreg.distributed`), and BatchNorm must be too -- per-process BatchNorm
  statistics would differ from the whole batch's by O(1) amounts, so the run uses
  ``train.sync_bn=true`` (on CPU: :class:`pixreg.distributed.GlobalBatchNorm`, since
  ``torch.nn.SyncBatchNorm`` refuses CPU tensors);
* no dropout (masks are drawn per process, so they cannot equal one process's masks).
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("yaml")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
TOL = 2e-5


def train_args(out: str, cache: str) -> list:
    overrides = [
        "data.size=[32,32]", "data.opts={digits: [0, 1, 2], num_images: 12}",
        "model.opts={width: 4, depth: 10, head_channels: 8, dropout: 0.0}", f"train.steps={STEPS}",
        "train.batch_size=4", "train.ckpt_every=100", "eval.batch_size=8", "threads=1", f"data.cache_dir={cache}",
        "train.sync_bn=true", "methods.rch.head_norm=true", "methods.rch.embed_dim=8", "train.optimizer=sgd",
        "train.lr=0.05",
    ]
    args = ["train", "--method", "cplus1+car+lall+rch", "--seed", "3", "--out", out, "--no-progress", "--device", "cpu"]
    for o in overrides:
        args += ["--set", o]
    return args


def _losses(run: str) -> list:
    with open(os.path.join(run, "log.csv"), newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def _max_diff(a: dict, b: dict) -> float:
    return max(((x.double() - b[k].double()).abs().max().item() if x.numel() else 0.0) for k, x in a.items())


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()  # runs set torch's thread count from their config
    yield
    torch.set_num_threads(n)


def test_two_process_train_equals_one_process(tmp_path, monkeypatch):
    from _capture_train import capture_builds

    from pixreg.cli import main

    cache = str(tmp_path / "cache")
    # single process, in this process (it also fills the data cache before the two ranks read it)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    built: dict = {}
    trainer, build_run = capture_builds(built)
    try:
        one = str(tmp_path / "one")
        assert main(train_args(one, cache)) == 0
    finally:
        trainer.build_run = build_run
    ref = {k: {n: t.clone() for n, t in m.state_dict().items()} for k, m in built.items()}

    # two processes under torchrun
    two, states = str(tmp_path / "two"), str(tmp_path / "states")
    os.makedirs(states)
    wrapper = os.path.join(ROOT, "tests", "_capture_train.py")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           wrapper, states] + train_args(two, cache)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(os.path.join(states, f"rank{r}.pt")) for r in range(2)]

    # the 2-process run really was distributed (with train.sync_bn=false, i.e. per-process
    # BatchNorm, the same run ends ~0.14 away in running means and ~1.5 in parameters)
    with open(os.path.join(two, "metrics.json")) as f:
        assert json.load(f)["world_size"] == 2
    assert not os.path.exists(os.path.join(states, "rank2.pt"))
    assert ranks[0]["model"].keys() == ref["model"].keys()  # GlobalBatchNorm keeps the state-dict keys

    # identical on both ranks, bit for bit
    for part in ("model", "criterion"):
        for k, v in ranks[0][part].items():
            assert torch.equal(v, ranks[1][part][k]), f"{part} {k} differs between ranks"

    # equal to one process, up to float32 summation order
    diffs = {part: _max_diff(ranks[0][part], ref[part]) for part in ("model", "criterion")}
    print(f"max |2 processes - 1 process| after {STEPS} steps: {diffs}")
    for part in ("model", "criterion"):
        for k, v in ref[part].items():
            torch.testing.assert_close(ranks[0][part][k], v, rtol=TOL, atol=TOL, msg=f"{part} {k}")
    assert int(ranks[0]["criterion"]["step"]) == STEPS
    assert any("prototypes" in k for k in ref["criterion"]) and any("centres" in k for k in ref["criterion"])

    # the logged global loss agrees step by step (log.csv: 6 significant digits)
    l1, l2 = _losses(one), _losses(two)
    assert len(l1) == len(l2) == STEPS
    for a, b in zip(l1, l2):
        assert abs(a - b) <= TOL * abs(a) + 1e-5, (l1, l2)
    # only rank 0 wrote the run folder
    assert os.path.exists(os.path.join(two, "checkpoints", "last.pt"))
