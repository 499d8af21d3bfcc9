"""Training and evaluation of one run: :func:`train` is a short sequence of the run folder's
steps (:mod:`pixreg.train.run`, which documents the folder's layout).

Determinism and resuming: the model is initialised right after ``torch.manual_seed(seed)``
(so every method starts from the same weights for a seed), the data order is a function
of ``(seed, step)`` only (:mod:`pixreg.train.data`), and a checkpoint holds the model,
optimiser, scheduler, AMP scaler, criterion state (centres, prototypes, its step
counter), the RNG states of every process, the best validation record and the step.
``resume=True`` continues from ``last.pt``; the resumed run's final metrics, parameters
and ``best.pt`` equal those of an uninterrupted run bit for bit on CPU (same thread
count), which the test suite checks by killing a real training process.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional

import torch

from . import process_group
from .evaluation import evaluate, progress_bar
from .run import (
    CSVLog, Run, RunExists, TrainStep, build_run, lr_factor, make_dataset, open_run_folder, plan_run, run_status,
    seed_everything, write_json,
)

__all__ = ["train", "evaluate", "build_run", "make_dataset", "seed_everything", "RunExists", "progress_bar",
           "run_status", "lr_factor", "write_json", "CSVLog", "TrainStep"]


def train(cfg: Mapping[str, Any], run_dir: str, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, ctx: Optional[process_group.DistContext] = None,
          log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train ``cfg["method"]`` with ``cfg["seed"]`` into ``run_dir``; return the final metrics.

    Args:
        cfg: resolved configuration (:func:`pixreg.train.config.resolve_config`).
        run_dir: the run folder.
        resume: continue from ``run_dir/checkpoints/last.pt`` if it exists (a finished run is
            not retrained: its metrics are returned). Without it, an existing run raises
            :class:`RunExists` unless ``overwrite``.
        progress: tqdm bars.
        ctx: distributed context (default: :func:`pixreg.train.process_group.setup` from the environment).
    """
    own_ctx = ctx is None
    ctx = ctx or process_group.setup(cfg["device"])
    try:
        return _train(dict(cfg), run_dir, resume, overwrite, progress, ctx, log)
    finally:
        if own_ctx:
            process_group.teardown(ctx)


def _train(cfg: Dict[str, Any], run_dir: str, resume: bool, overwrite: bool, progress: bool,
           ctx: process_group.DistContext, log: Callable[[str], None]) -> Dict[str, Any]:
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    plan = plan_run(cfg, run_dir, resume=resume, overwrite=overwrite, ctx=ctx, log=log)  # checks only
    open_run_folder(plan, cfg, ctx, log)  # the first write
    if plan.action == "finished":
        return plan.metrics
    run = Run(cfg, plan.paths, ctx, log=log, progress=progress)
    if plan.action == "resume":
        run.resume()
    run.open_logs()
    try:
        for batch in run.batches():
            run.step(batch)
    finally:
        run.step_log.bar.close()
    return run.finish()
