"""Checkpoints: atomic writes, RNG round trip, and kill-and-resume equality.

The main test SIGKILLs a real ``python -m pixreg train`` process once it has written a
checkpoint mid-run, resumes it with ``--resume``, and requires the final metrics, the
parameters, the criterion state (C+1 centres, RCH prototypes), the optimiser state and
the per-step log to equal those of an uninterrupted run exactly (CPU, one thread, fixed
seed; the model has dropout and the data is augmented, so RNG and data-order state are
exercised too).
"""
from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("yaml")

from pixreg.train.checkpoint import atomic_save, load_checkpoint, rng_state, set_rng_state  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12


def tiny(cache: str) -> list:
    return [
        "data.size=[32,32]", "data.opts={digits: [0, 1, 2], num_images: 12}",
        "model.opts={width: 4, depth: 10, head_channels: 8, dropout: 0.2}", f"train.steps={STEPS}", "train.batch_size=4",
        "train.ckpt_every=2", "eval.batch_size=8", "threads=1", f"data.cache_dir={cache}",
        "data.test_splits=[test_openset]",
    ]


def command(run: str, cache: str, *extra: str) -> list:
    args = [sys.executable, "-m", "pixreg", "train", "--method", "cplus1+rch", "--seed", "2", "--out", run, "--no-progress"]
    for o in tiny(cache) + list(extra):
        args += ["--set", o]
    return args


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _ckpt_step(path: str) -> int:
    try:
        return int(load_checkpoint(path)["step"])
    except (FileNotFoundError, RuntimeError, EOFError):  # pragma: no cover - not there yet
        return -1


def test_killed_run_resumes_to_identical_results(tmp_path, cache):
    from pixreg.cli import main

    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    # the uninterrupted reference runs in this process (so the comparison is also across processes)
    assert main(command(full, cache)[3:]) == 0

    # the same run, slowed down (sleep after each step) so that it can be killed mid-way
    proc = subprocess.Popen(command(killed, cache, "train.step_delay_s=0.15"), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = os.path.join(killed, "checkpoints", "last.pt")
    deadline = time.time() + 90
    try:
        while time.time() < deadline and proc.poll() is None and _ckpt_step(last) < 4:
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {err[-2000:]}"
    k = _ckpt_step(last)
    assert 4 <= k < STEPS
    assert not os.path.exists(os.path.join(killed, "metrics.json"))

    res = subprocess.run(command(killed, cache) + ["--resume"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]

    m_full = json.load(open(os.path.join(full, "metrics.json")))
    m_res = json.load(open(os.path.join(killed, "metrics.json")))
    assert m_res["resumed_from"] == k and m_full["resumed_from"] is None
    assert m_res["splits"] == m_full["splits"]  # exact equality of every metric, per class too

    a = load_checkpoint(os.path.join(full, "checkpoints", "last.pt"))
    b = load_checkpoint(last)
    for part in ("model", "criterion"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), f"{part}.{name} differs after resuming"
    assert any("centres" in n for n in a["criterion"]) and any("proto" in n for n in a["criterion"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key]))
    rows_a = list(csv.DictReader(open(os.path.join(full, "log.csv"))))
    rows_b = list(csv.DictReader(open(os.path.join(killed, "log.csv"))))
    assert [r["step"] for r in rows_b] == [str(s) for s in range(1, STEPS + 1)]  # rows after the checkpoint were replaced
    drop = {"time_s"}
    assert [{c: v for c, v in r.items() if c not in drop} for r in rows_a] == [{c: v for c, v in r.items() if c not in drop} for r in rows_b]


def test_resume_refuses_a_different_config_and_skips_finished_runs(tmp_path, cache):
    from pixreg.train.config import resolve_config
    from pixreg.train.trainer import train

    run = str(tmp_path / "run")
    cfg = resolve_config(None, tiny(cache) + ["train.steps=3"], method="car")
    m1 = train(cfg, run, progress=False, log=lambda s: None)
    changed = resolve_config(None, tiny(cache) + ["train.steps=3", "train.lr=0.5"], method="car")
    with pytest.raises(ValueError, match="train.lr"):
        train(changed, run, resume=True, progress=False, log=lambda s: None)
    # keys that do not change the computation may differ
    same = resolve_config(None, tiny(cache) + ["train.steps=3", "train.log_every=2", "train.ckpt_every=1"], method="car")
    mtime = os.path.getmtime(os.path.join(run, "metrics.json"))
    m2 = train(same, run, resume=True, progress=False, log=lambda s: None)
    assert m2 == json.loads(json.dumps(m1)) and os.path.getmtime(os.path.join(run, "metrics.json")) == mtime


def test_atomic_save_never_leaves_a_truncated_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    atomic_save({"step": 1, "w": torch.arange(5.0)}, path)

    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        f.write(b"\x00" * 100)  # a partial write, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"step": 2, "w": torch.zeros(5)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    ck = load_checkpoint(path)
    assert ck["step"] == 1 and torch.equal(ck["w"], torch.arange(5.0))
    assert os.listdir(tmp_path) == ["last.pt"]  # the temporary file was removed
    atomic_save({"step": 3}, path)
    assert load_checkpoint(path)["step"] == 3


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.randn(), torch.rand(2)
    path = str(tmp_path / "rng.pt")
    atomic_save({"rng": rng_state()}, path)
    expected = (random.random(), float(np.random.randn()), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_checkpoint(path)["rng"])  # loads with weights_only=True
    got = (random.random(), float(np.random.randn()), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


class _Killed(BaseException):
    """Stands for a SIGKILL at a chosen moment of a checkpoint write (in-process: deterministic)."""


@pytest.mark.parametrize("moment", ["after_last", "after_best"])
def test_a_run_killed_around_a_validation_keeps_the_right_best_model(tmp_path, cache, monkeypatch, moment):
    """At a step with a validation and a checkpoint, the validation comes first and last.pt is
    written after it, so a run killed right after that write (or between the best.pt and the
    last.pt write) resumes to the same best.pt, val.csv and metrics as an uninterrupted run.
    The kill point comes from a reference run: the last validation before the end that set
    a new best (so the test stays meaningful when the numbers change)."""
    from pixreg.train import run as run_mod
    from pixreg.train.config import resolve_config
    from pixreg.train.trainer import train

    cfg = resolve_config(None, tiny(cache) + ["train.eval_every=2"], method="car", seed=1)
    quiet = dict(progress=False, log=lambda s: None)
    ref = str(tmp_path / "ref")
    m_ref = train(cfg, ref, **quiet)
    val_ref = list(csv.DictReader(open(os.path.join(ref, "val.csv"))))
    best_so_far, kill = -1.0, None
    for row in val_ref:
        if float(row["mIoU"]) > best_so_far:
            best_so_far = float(row["mIoU"])
            kill = int(row["step"]) if int(row["step"]) < STEPS else kill
    assert kill is not None and kill % 2 == 0

    real_save = run_mod.atomic_save
    target = "last.pt" if moment == "after_last" else "best.pt"

    def save_then_die(obj, path):
        real_save(obj, path)
        if os.path.basename(path) == target and obj["step"] == kill:
            raise _Killed

    killed = str(tmp_path / "killed")
    monkeypatch.setattr(run_mod, "atomic_save", save_then_die)
    with pytest.raises(_Killed):
        train(cfg, killed, **quiet)
    monkeypatch.setattr(run_mod, "atomic_save", real_save)
    assert not os.path.exists(os.path.join(killed, "metrics.json"))
    m_res = train(cfg, killed, resume=True, **quiet)

    resumed = kill if moment == "after_last" else (kill - 2 or None)
    assert m_res["resumed_from"] == resumed
    assert m_res["best"] == m_ref["best"] and m_res["splits"] == m_ref["splits"]
    assert list(csv.DictReader(open(os.path.join(killed, "val.csv")))) == val_ref
    for name in ("best.pt", "last.pt"):
        a, b = (load_checkpoint(os.path.join(r, "checkpoints", name)) for r in (ref, killed))
        assert a["step"] == b["step"] and a["best"] == b["best"]
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), f"{name}: {key} differs"
    assert load_checkpoint(os.path.join(killed, "checkpoints", "best.pt"))["val_metrics"] == \
        load_checkpoint(os.path.join(ref, "checkpoints", "best.pt"))["val_metrics"]


def test_run_creation_is_two_phase_and_load_run_reads_it_back(tmp_path, cache):
    """plan_run checks everything and writes nothing; open_run_folder is the first write;
    load_run rebuilds the trained model from the folder (last or best checkpoint)."""
    from pixreg.train.config import resolve_config
    from pixreg.train.process_group import DistContext
    from pixreg.train.run import RunPaths, load_run, open_run_folder, plan_run, resolve_checkpoint
    from pixreg.train.trainer import train

    cfg = resolve_config(None, tiny(cache) + ["train.steps=2"], method="rch")
    run_dir = str(tmp_path / "new" / "run")
    ctx = DistContext()
    plan = plan_run(cfg, run_dir, resume=False, overwrite=False, ctx=ctx, log=lambda s: None)
    assert plan.action == "new" and not os.path.exists(run_dir)
    bad = resolve_config(None, tiny(cache) + ["train.steps=2", "data.test_splits=[nope]"], method="rch")
    with pytest.raises(ValueError, match="data.test_splits"):
        plan_run(bad, run_dir, resume=False, overwrite=False, ctx=ctx, log=lambda s: None)
    assert not os.path.exists(run_dir)
    open_run_folder(plan, cfg, ctx, log=lambda s: None)
    paths = RunPaths(run_dir)
    assert os.path.isdir(paths.checkpoints) and os.path.isfile(paths.config)

    metrics = train(cfg, str(tmp_path / "trained"), progress=False, log=lambda s: None)
    run = load_run(str(tmp_path / "trained"), checkpoint="best")
    assert run.step == metrics["best"]["step"] and not run.model.training
    assert run.checkpoint == os.path.abspath(resolve_checkpoint(str(tmp_path / "trained"), "best"))
    assert "rch" in run.criterion.losses
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_run(str(tmp_path / "trained"), checkpoint=str(tmp_path / "nope.pt"))
