"""The run folder and the training state checkpointed into it: one owner.

A *run* trains one method with one seed and writes everything into its folder::

    RUN/config.yaml            the resolved configuration
    RUN/log.csv                one row per step: step, epoch, lr, loss, ce, each term, time
    RUN/val.csv                one row per validation pass (the learning curve): step,
                               mIoU, mAcc, aAcc in % (every train.eval_every steps and at the end)
    RUN/tb/                    TensorBoard events (train/*, lr, val/*, test/*)
    RUN/checkpoints/last.pt    every train.ckpt_every steps and at the end (atomic)
    RUN/checkpoints/best.pt    the best validation mIoU so far (validation every
                               train.eval_every steps and at the end)
    RUN/metrics.json           final metrics of the last model on the val and test splits

This module owns that contract (:class:`RunPaths`):

* **create**, in two phases: :func:`plan_run` makes every check (the saved configuration
  against the new one, the output folder, the datasets, the method, the data scan) and
  writes nothing; :func:`open_run_folder` is the first write (an overwritten run removed,
  stale temporaries cleaned, ``checkpoints/`` and ``config.yaml`` created). A check added
  to the first phase therefore runs before anything is written;
* **load**: :func:`load_run` rebuilds the model and criterion of a run folder from
  ``config.yaml`` and a checkpoint (:func:`resolve_checkpoint`: ``last``, ``best`` or a
  path), for ``pixreg eval``, ``compare`` and ``diagnose``;
* **train**: :class:`Run` holds the training state (model, criterion, optimiser,
  scheduler, scaler, best validation, step) and does ``resume``, ``step``, ``validate``,
  ``save`` and ``finish``. At a step where a validation and a checkpoint both fall, the
  validation comes first and ``last.pt`` is written after it, so that ``last.pt`` always
  holds the best model record of every validation up to its step: a run killed after
  that write and resumed keeps the right ``best.pt``.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..balance import CollapseGuard
from ..criterion import RegularizedCriterion, RegularizedModel
from ..distributed import all_reduce_sum_no_grad, sync_batchnorm
from . import process_group
from .checkpoint import atomic_save, load_checkpoint, load_state, remove_stale_temporaries, rng_state, set_rng_state
from .config import RESUME_MUTABLE, config_diff, dump_yaml, load_yaml, resolve_config, resolve_methods
from .checks import preflight, scan_data
from .data import SeededDataset, StepBatchSampler, collate
from .evaluation import amp_context, evaluate, progress_bar, to_device
from .build import build_run, make_dataset
from .methods import method_slug

__all__ = [
    "RunPaths", "RunExists", "run_status", "resolve_checkpoint", "make_dataset", "build_run", "TrainStep",
    "LoadedRun", "run_config", "load_run", "check_resume_config", "RunPlan", "plan_run", "open_run_folder", "Run", "CSVLog",
    "write_json", "lr_factor", "degenerate_run_warnings",
]

CKPT_VERSION = 1
#: Entries of a checkpoint that resuming needs.
CKPT_KEYS = ("version", "step", "model", "criterion", "optimizer", "scheduler", "rng", "sampler", "elapsed_s", "best")
#: Metrics written to TensorBoard after an evaluation.
_TB_METRICS = ("mIoU", "mAcc", "aAcc", "bg_to_coi", "distractor_to_coi")


class RunExists(FileExistsError):
    """The run folder already holds a run (use ``resume`` or ``overwrite``)."""


@dataclass(frozen=True)
class RunPaths:
    """The files of a run folder ``root``.

    >>> RunPaths("runs/x").last
    'runs/x/checkpoints/last.pt'
    """

    root: str

    def _join(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    config = property(lambda self: self._join("config.yaml"))
    checkpoints = property(lambda self: self._join("checkpoints"))
    last = property(lambda self: self._join("checkpoints", "last.pt"))
    best = property(lambda self: self._join("checkpoints", "best.pt"))
    metrics = property(lambda self: self._join("metrics.json"))
    log_csv = property(lambda self: self._join("log.csv"))
    val_csv = property(lambda self: self._join("val.csv"))
    tb = property(lambda self: self._join("tb"))
    #: What a run writes (removed, and only this, when a run is overwritten).
    OUTPUTS = ("checkpoints", "tb", "log.csv", "val.csv", "metrics.json", "config.yaml")


def run_status(run_dir: str) -> str:
    """``"finished"`` (metrics.json written), ``"partial"`` (a checkpoint), ``"empty"``."""
    paths = RunPaths(run_dir)
    if os.path.exists(paths.metrics):
        return "finished"
    if os.path.exists(paths.last):
        return "partial"
    return "empty"


def resolve_checkpoint(run_dir: str, checkpoint: str = "last") -> str:
    """Path of ``checkpoint`` of a run: ``"last"``, ``"best"`` or a path (``FileNotFoundError``
    naming the file when it does not exist)."""
    path = os.path.join(RunPaths(run_dir).checkpoints, f"{checkpoint}.pt") if checkpoint in ("last", "best") else checkpoint
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    return path


# --------------------------------------------------------------------------- building blocks
class TrainStep(nn.Module):
    """Model + criterion in one module (so that DDP sees every trainable parameter):
    ``forward(images, labels) -> (logits, total_loss, terms)``."""

    def __init__(self, model: nn.Module, criterion: RegularizedCriterion, layers: List[str]) -> None:
        super().__init__()
        self.wrapped = RegularizedModel(model, criterion, layers)

    @property
    def model(self) -> nn.Module:
        return self.wrapped.model

    @property
    def criterion(self) -> RegularizedCriterion:
        return self.wrapped.criterion

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits = self.wrapped(images)
        out = self.wrapped.loss(logits, labels)
        self.wrapped.capture.clear()
        return logits, out.total, out.terms


@dataclass
class LoadedRun:
    """A trained run rebuilt from its folder (:func:`load_run`), in eval mode."""

    run_dir: str
    label: str
    cfg: Dict[str, Any]
    model: nn.Module
    criterion: nn.Module
    step: int
    checkpoint: str
    device: torch.device

    @property
    def method(self) -> str:
        return method_slug(self.cfg["method"])


def run_config(run_dir: str, overrides: Sequence[str] = (), **top: Any) -> Dict[str, Any]:
    """The resolved configuration of a run folder: its ``config.yaml`` < ``overrides`` < ``top``
    keys (``device=``, ``threads=``; ``None`` values ignored)."""
    cfg_file = RunPaths(run_dir).config
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{cfg_file} not found (is {run_dir!r} a run folder?)")
    return resolve_config(cfg_file, list(overrides), **top)


def load_run(run_dir: str, overrides: Sequence[str] = (), *, checkpoint: str = "last", device: str = "cpu",
             label: Optional[str] = None, dataset=None, cfg: Optional[Mapping[str, Any]] = None,
             load_criterion: bool = True) -> LoadedRun:
    """Model (weights of ``checkpoint``: ``last``, ``best`` or a path) and criterion of a run
    folder, on ``device``, in eval mode. The configuration is the run's (:func:`run_config`
    with ``overrides``) unless ``cfg`` is given; the classes are those of ``dataset``
    (default: the first test split). ``load_criterion=False`` accepts a checkpoint without
    the criterion's state (its criterion is then freshly built): enough to evaluate."""
    cfg = dict(cfg) if cfg is not None else run_config(run_dir, overrides)
    path = resolve_checkpoint(run_dir, checkpoint)
    dev = torch.device(device)
    ckpt = load_checkpoint(path, map_location=dev, required=("model", "step") + (("criterion",) if load_criterion else ()))
    ds = dataset if dataset is not None else make_dataset(cfg, cfg["data"]["test_splits"][0])
    model, criterion, _ = build_run(cfg, ds.num_classes, ds.ignore_index, getattr(ds, "background_index", None), dev)
    load_state(model, ckpt["model"], path)
    if load_criterion:
        load_state(criterion, ckpt["criterion"], path, "criterion")
    model.eval()
    criterion.eval()
    name = label or os.path.basename(os.path.normpath(run_dir))
    return LoadedRun(run_dir, name, cfg, model, criterion, int(ckpt["step"]), os.path.abspath(path), dev)


# --------------------------------------------------------------------------- logging
class CSVLog:
    """``log.csv`` with a header that grows when new terms appear (e.g. after a warm-up)."""

    def __init__(self, path: str, resume_step: Optional[int]) -> None:
        self.path = path
        self.fields: List[str] = []
        rows: List[Dict[str, str]] = []
        if os.path.exists(path):
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                self.fields = list(reader.fieldnames or [])
                rows = [r for r in reader if resume_step is not None and int(r["step"]) <= resume_step]
            self._rewrite(rows)

    def _rewrite(self, rows: List[Mapping[str, Any]]) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, restval="")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)

    def write(self, rows: List[Dict[str, Any]]) -> None:
        new = [k for r in rows for k in r if k not in self.fields]
        if new or not os.path.exists(self.path):
            old: List[Dict[str, str]] = []
            if os.path.exists(self.path):
                with open(self.path, newline="") as f:
                    old = list(csv.DictReader(f))
            for k in new:
                if k not in self.fields:
                    self.fields.append(k)
            self._rewrite(old)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields, restval="").writerows(rows)


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


def write_json(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)


def degenerate_run_warnings(ctx: process_group.DistContext, valid_pixels: torch.Tensor, nonzero_loss: bool,
                            steps: int, ignore_index: int) -> List[str]:
    """Warnings for a run that cannot have learned anything: every training label pixel was
    ``ignore_index`` (an all-void dataset), or the loss was exactly 0 at every step."""
    if steps <= 0:
        return []
    if ctx.distributed:
        valid_pixels = all_reduce_sum_no_grad(valid_pixels)
    out = []
    if int(valid_pixels) == 0:
        out.append(f"every training label pixel of the {steps} step(s) trained was ignore_index={ignore_index} "
                   "(an all-void dataset?): the loss had nothing to fit and the model learned nothing")
    elif not nonzero_loss:
        out.append(f"the loss was 0 at every one of the {steps} step(s) trained: nothing was learned "
                   "(all-void labels, or ce_weight and every regularizer weight 0?)")
    return out


def _optimizer(cfg: Mapping[str, Any], params: List[Dict[str, Any]]) -> torch.optim.Optimizer:
    t = cfg["train"]
    if t["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=float(t["lr"]), momentum=float(t["momentum"]),
                               weight_decay=float(t["weight_decay"]), nesterov=bool(t["nesterov"]))
    return torch.optim.AdamW(params, lr=float(t["lr"]), weight_decay=float(t["weight_decay"]))


def lr_factor(cfg: Mapping[str, Any]) -> Callable[[int], float]:
    """Learning-rate multiplier at step ``s`` (linear warm-up, then poly/cosine/constant)."""
    t = cfg["train"]
    total, warm = int(t["steps"]), int(t["warmup_steps"])
    kind, power = t["scheduler"], float(t["poly_power"])

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        p = min(max(step - warm, 0) / max(total - warm, 1), 1.0)
        if kind == "poly":
            return (1.0 - p) ** power
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * p))
        return 1.0

    return f


# --------------------------------------------------------------------------- creating a run
def check_resume_config(saved: Mapping[str, Any], cfg: Mapping[str, Any], run_dir: str) -> None:
    """``ValueError`` listing the keys where ``cfg`` differs from a run's saved configuration
    (keys of :data:`~pixreg.train.config.RESUME_MUTABLE` may differ)."""
    saved = dict(saved)
    saved.setdefault("class_weight", None)  # runs written before the key existed
    with warnings.catch_warnings():  # a run saved before the loss_weight rename: same meaning
        warnings.simplefilter("ignore", DeprecationWarning)
        saved = resolve_methods(saved)
    diffs = config_diff(saved, cfg, ignore=RESUME_MUTABLE)
    if diffs:
        raise ValueError(
            f"cannot resume {run_dir}: the configuration differs from the saved one in "
            + "; ".join(diffs[:8]) + (" ..." if len(diffs) > 8 else "")
            + ". Use the same settings, or a new --out folder."
        )


@dataclass
class RunPlan:
    """What :func:`plan_run` decided: ``action`` is ``"new"``, ``"resume"``, ``"overwrite"``
    or ``"finished"`` (then ``metrics`` holds the finished run's metrics)."""

    paths: RunPaths
    action: str
    metrics: Optional[Dict[str, Any]] = None


def plan_run(cfg: Mapping[str, Any], run_dir: str, *, resume: bool, overwrite: bool, ctx: process_group.DistContext,
             log: Callable[[str], None] = print) -> RunPlan:
    """Phase 1 of creating a run: every check, nothing written. Raises :class:`RunExists`
    for a run folder in use (without ``resume``/``overwrite``), ``ValueError`` naming the key,
    file or argument for anything else (see :func:`pixreg.train.checks.preflight`)."""
    paths, status = RunPaths(run_dir), run_status(run_dir)
    if status != "empty" and resume:
        if os.path.exists(paths.config):
            check_resume_config(load_yaml(paths.config), cfg, run_dir)
        if status == "finished":
            with open(paths.metrics) as f:
                return RunPlan(paths, "finished", json.load(f))
    elif status != "empty" and not overwrite:
        raise RunExists(f"{run_dir} already holds a run ({status}); pass --resume to continue it or --overwrite to restart")
    preflight(cfg, run_dir)  # config, device, datasets, method
    if ctx.is_main:
        scan_data(cfg, log)  # every sample read once: corrupt files, sizes, labels
    action = "new" if status == "empty" else ("resume" if resume else "overwrite")
    return RunPlan(paths, action)


def open_run_folder(plan: RunPlan, cfg: Mapping[str, Any], ctx: process_group.DistContext,
                    log: Callable[[str], None] = print) -> None:
    """Phase 2 of creating a run, the first write: remove an overwritten run's outputs and
    any stale temporaries, create ``checkpoints/`` and write ``config.yaml``."""
    if ctx.is_main and plan.action == "overwrite":
        for name in RunPaths.OUTPUTS:
            p = os.path.join(plan.paths.root, name)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
    if plan.action == "overwrite":
        process_group.barrier(ctx)
    if ctx.is_main:
        for path in remove_stale_temporaries(plan.paths.root):
            log(f"removed {path} (left by an interrupted run)")
        if plan.action != "finished":
            os.makedirs(plan.paths.checkpoints, exist_ok=True)
            dump_yaml(cfg, plan.paths.config)


# --------------------------------------------------------------------------- training state
class StepLog:
    """The per-step rows of ``log.csv``/TensorBoard/the progress bar, kept on the device and
    written every ``log_every`` steps (:meth:`flush`: one host copy for many steps)."""

    def __init__(self, run: "Run", bar) -> None:
        self.run, self.bar = run, bar
        self.pending: List[Tuple[int, int, float, Dict[str, torch.Tensor], torch.Tensor]] = []
        self.term_keys: List[str] = []
        self.nonzero_loss = False

    def add(self, step: int, epoch: int, lr: float, terms: Dict[str, torch.Tensor], total: torch.Tensor) -> None:
        self.pending.append((step, epoch, lr, terms, total))

    def _reduce(self) -> List[List[float]]:
        keys = sorted({k for *_, terms, _ in self.pending for k in terms})
        self.term_keys += [k for k in keys if k not in self.term_keys]
        nan = float("nan")
        stacked = torch.stack([torch.stack([total] + [terms.get(k, torch.full_like(total, nan)) for k in self.term_keys])
                               for *_, terms, total in self.pending]).float()
        if self.run.ctx.distributed:  # mean over processes (CE and regularizers are global: equal)
            stacked = all_reduce_sum_no_grad(stacked) / self.run.ctx.world_size
        return stacked.cpu().tolist()

    def flush(self) -> None:
        if not self.pending:
            return
        values, rows = self._reduce(), list(self.pending)
        self.pending.clear()
        for (step, *_), vals in zip(rows, values):  # every process raises together
            if not math.isfinite(vals[0]):
                raise FloatingPointError(f"non-finite loss {vals[0]} at step {step} ({dict(zip(self.term_keys, vals[1:]))})")
            self.nonzero_loss = self.nonzero_loss or vals[0] != 0.0
        if self.run.ctx.is_main:
            self._write(rows, values)

    def _write(self, rows, values) -> None:
        run, out = self.run, []
        for (step, epoch, lr, _, _), vals in zip(rows, values):
            row = {"step": step, "epoch": epoch, "lr": lr, "loss": vals[0]}
            row.update({k: v for k, v in zip(self.term_keys, vals[1:]) if v == v})
            row["time_s"] = round(run.elapsed_s(), 3)
            out.append(row)
            if run.writer is not None:
                for k, v in [("train/loss", vals[0]), ("lr", lr)] + [(f"train/{k}", v) for k, v in zip(self.term_keys, vals[1:])]:
                    if v == v:
                        run.writer.add_scalar(k, v, step)
        if run.csv_log is not None:
            run.csv_log.write([{k: (_fmt(v) if isinstance(v, float) and k not in ("lr", "time_s") else v)
                                for k, v in r.items()} for r in out])
        shown = {"loss": f"{out[-1]['loss']:.4g}"}
        shown.update({k: f"{v:.4g}" for k, v in out[-1].items() if k in self.term_keys and "/" not in k})
        shown["lr"] = f"{out[-1]['lr']:.2e}"
        self.bar.set_postfix(shown, refresh=False)


class Run:
    """The training state of a run, checkpointed into its folder.

    ``Run(cfg, paths, ctx)`` builds the datasets, model, criterion, optimiser, scheduler and
    AMP scaler; :meth:`resume` loads ``last.pt``; :meth:`open_logs` opens ``log.csv``,
    ``val.csv`` and TensorBoard; then :meth:`step` for every batch of :meth:`batches`,
    and :meth:`finish` for the final evaluation and ``metrics.json``.
    """

    def __init__(self, cfg: Mapping[str, Any], paths: RunPaths, ctx: process_group.DistContext, *,
                 log: Callable[[str], None] = print, progress: bool = True) -> None:
        self.cfg, self.paths, self.ctx, self.log, self.progress = dict(cfg), paths, ctx, log, progress
        self.t = self.cfg["train"]
        self.device, self.total_steps = ctx.device, int(self.t["steps"])
        seed_everything(int(self.cfg["seed"]))
        self.train_ds = make_dataset(self.cfg, self.cfg["data"]["train_split"], train=True)
        self.num_classes, self.ignore_index = int(self.train_ds.num_classes), int(self.train_ds.ignore_index)
        self.background_index = getattr(self.train_ds, "background_index", None)
        self._build_modules()
        self.step_count, self.elapsed0, self.resumed_from = 0, 0.0, None
        self.best: Dict[str, Any] = {"step": None, "mIoU": None}
        self.final_val: Optional[Dict[str, Any]] = None
        self.sampler_state = {"seed": int(self.cfg["seed"]), "batch_size": int(self.t["batch_size"]), "n": len(self.train_ds)}
        self.writer = self.csv_log = self.val_log = None
        self.valid_pixels = torch.zeros((), dtype=torch.long, device=self.device)  # no host sync per step
        self.t_start = time.perf_counter()

    def _build_modules(self) -> None:
        cfg, ctx, device = self.cfg, self.ctx, self.device
        model, criterion, layers = build_run(cfg, self.num_classes, self.ignore_index, self.background_index, device)
        if self.t["sync_bn"] and ctx.distributed:
            model = sync_batchnorm(model, device)
        self.model, self.criterion = model, criterion
        criterion.balance_every = int(self.t.get("balance_every", criterion.balance_every) or 0)
        self.guard = None  # collapse guard (docs/balance.md)
        if self.t.get("collapse_guard", True):
            self.guard = CollapseGuard.for_criterion(criterion, class_names=getattr(self.train_ds, "class_names", None))
        self.step_module = TrainStep(model, criterion, layers).to(device)
        self.runner: nn.Module = self.step_module
        if ctx.distributed:
            needs_unused = any(p.requires_grad for p in criterion.parameters()) or any(s.warmup > 0 for s in criterion.specs.values())
            self.runner = nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=needs_unused)
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "name": "model"}]
        crit_params = [p for p in criterion.parameters() if p.requires_grad]
        if crit_params:
            groups.append({"params": crit_params, "name": "criterion"})
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = _optimizer(cfg, groups)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg))
        self.use_scaler = bool(self.t["amp"]) and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_scaler)

    def elapsed_s(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.t_start

    # ------------------------------------------------------------------ resume / save
    def resume(self) -> None:
        """Load ``last.pt``: modules, optimiser, scheduler, scaler, RNG states, step, best."""
        path = self.paths.last
        ckpt = load_checkpoint(path, map_location="cpu", required=CKPT_KEYS)
        if ckpt.get("version") != CKPT_VERSION:
            raise ValueError(f"{path}: checkpoint version {ckpt.get('version')} is not {CKPT_VERSION}")
        saved_sampler = {k: ckpt["sampler"][k] for k in self.sampler_state}
        if saved_sampler != self.sampler_state:
            raise ValueError(f"cannot resume {self.paths.root}: data order {saved_sampler} != {self.sampler_state}")
        load_state(self.model, ckpt["model"], path)
        load_state(self.criterion, ckpt["criterion"], path, "criterion")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.use_scaler and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step_count, self.elapsed0, self.best = int(ckpt["step"]), float(ckpt["elapsed_s"]), dict(ckpt["best"])
        self.resumed_from, self.final_val = self.step_count, ckpt.get("final_val_metrics")
        states = ckpt["rng"]
        if len(states) != self.ctx.world_size:
            self.log(f"warning: checkpoint has RNG states of {len(states)} processes, running {self.ctx.world_size}; "
                     "the resumed run will not be bit-identical")
        set_rng_state(states[self.ctx.rank % len(states)])
        if self.ctx.is_main:
            self.log(f"resuming {self.paths.root} at step {self.step_count}/{self.total_steps}")

    def save(self, path: str, extra: Optional[Dict[str, Any]] = None) -> None:
        """Checkpoint the whole training state to ``path`` (atomic; a collective: every rank calls it)."""
        states = process_group.all_gather_object(self.ctx, rng_state())
        if not self.ctx.is_main:
            return
        obj = {
            "version": CKPT_VERSION, "step": self.step_count, "model": self.model.state_dict(),
            "criterion": self.criterion.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.use_scaler else None,
            "rng": states, "sampler": self.sampler_state, "elapsed_s": self.elapsed_s(), "best": self.best,
            "config": json.loads(json.dumps(self.cfg, default=str)),
        }
        obj.update(extra or {})
        atomic_save(obj, path)

    # ------------------------------------------------------------------ training
    def open_logs(self) -> None:
        """``log.csv``, ``val.csv`` (rows after the resumed step dropped), TensorBoard, progress bar."""
        resumed = self.resumed_from
        if self.ctx.is_main:
            self.csv_log, self.val_log = CSVLog(self.paths.log_csv, resumed), CSVLog(self.paths.val_csv, resumed)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(self.paths.tb, purge_step=resumed + 1 if resumed is not None else None)
            except ImportError:  # pragma: no cover - tensorboard missing
                self.log("tensorboard not installed: no TensorBoard events")
        bar = progress_bar(total=self.total_steps, initial=self.step_count, enabled=self.progress and self.ctx.is_main,
                           desc=f"train {method_slug(self.cfg['method'])} seed {self.cfg['seed']}", unit="step")
        self.step_log = StepLog(self, bar)
        self.t_start = time.perf_counter()
        self.runner.train()

    def batches(self) -> Iterator[Any]:
        """The remaining training batches (the data order is a function of seed and step)."""
        seed, workers = int(self.cfg["seed"]), int(self.cfg["data"]["num_workers"])
        sampler = StepBatchSampler(len(self.train_ds), int(self.t["batch_size"]), seed, self.total_steps,
                                   self.step_count, self.ctx.rank, self.ctx.world_size)
        gen = torch.Generator()
        gen.manual_seed(seed)  # worker seeds; keeps the global RNG untouched
        return iter(torch.utils.data.DataLoader(
            SeededDataset(self.train_ds, seed), batch_sampler=sampler, num_workers=workers, collate_fn=collate,
            generator=gen, pin_memory=self.device.type == "cuda", persistent_workers=False))

    def step(self, batch) -> None:
        """One optimisation step, then (in this order) logging, validation, checkpoint."""
        images, labels = to_device(batch[0], self.device), batch[1].to(self.device, non_blocking=True)
        self.valid_pixels += (labels != self.ignore_index).sum()
        lr = float(self.optimizer.param_groups[0]["lr"])
        with amp_context(bool(self.t["amp"]), self.device):
            logits, total, terms = self.runner(images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        if total.requires_grad:  # not when nothing contributes (ce_weight 0, regularizers warming up)
            self.scaler.scale(total).backward()
            if self.t["grad_clip"]:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, float(self.t["grad_clip"]))
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        self.step_count += 1
        step, last_step = self.step_count, self.step_count == self.total_steps
        if self.guard is not None:
            for msg in self.guard.update(step, terms, logits.detach(), labels):
                if self.ctx.is_main:
                    self.log(f"warning: {msg}")
        epoch = (step * int(self.t["batch_size"]) - 1) // len(self.train_ds)
        self.step_log.add(step, epoch, lr, terms, total.detach())  # averaged over processes at flush
        if step % int(self.t["log_every"]) == 0 or last_step:
            self.step_log.flush()
        self.step_log.bar.update(1)
        self._validate_then_save(step, last_step)
        if self.t.get("step_delay_s"):
            time.sleep(float(self.t["step_delay_s"]))

    def _validate_then_save(self, step: int, last_step: bool) -> None:
        """Validation first, then ``last.pt``: the checkpoint holds this step's best record."""
        eval_every = int(self.t["eval_every"])
        if last_step:
            self.final_val = self.validate(step)
        elif eval_every and step % eval_every == 0:
            self.validate(step)
        if step % int(self.t["ckpt_every"]) == 0 or last_step:
            self.step_log.flush()
            self.save(self.paths.last, {"final_val_metrics": self.final_val} if last_step else None)

    def evaluate(self, split: str, desc: str) -> Dict[str, Any]:
        """Metrics of the current model on ``split`` (written to TensorBoard under ``tag``)."""
        m = evaluate(self.model, make_dataset(self.cfg, split), batch_size=int(self.cfg["eval"]["batch_size"]),
                     device=self.device, num_workers=int(self.cfg["data"]["num_workers"]), amp=bool(self.t["amp"]),
                     progress=self.progress, desc=desc, ctx=self.ctx)
        return m

    def _tb(self, tag: str, m: Mapping[str, Any], step: int) -> None:
        if self.writer is not None:
            for k in _TB_METRICS:
                if k in m and m[k] == m[k]:
                    self.writer.add_scalar(f"{tag}/{k}", m[k], step)

    def validate(self, step: int) -> Dict[str, Any]:
        """Validation pass: ``val.csv`` row, TensorBoard, and ``best.pt`` when the mIoU improves."""
        m = self.evaluate(self.cfg["data"]["val_split"], f"val@{step}")
        self._tb("val", m, step)
        if self.val_log is not None:
            self.val_log.write([{"step": step, **{k: _fmt(float(m[k])) for k in ("mIoU", "mAcc", "aAcc") if k in m}}])
        if self.best["mIoU"] is None or m["mIoU"] > self.best["mIoU"]:
            self.best.update(step=step, mIoU=m["mIoU"])
            self.save(self.paths.best, {"val_metrics": m})
        return m

    # ------------------------------------------------------------------ finishing
    def finish(self) -> Dict[str, Any]:
        """Test splits, ``metrics.json``, warnings for a degenerate run; returns the metrics."""
        self.step_log.bar.close()
        self.step_log.flush()
        train_time = self.elapsed_s()
        if self.step_count < self.total_steps:  # pragma: no cover - the sampler always yields the remaining steps
            raise RuntimeError(f"training stopped at step {self.step_count} < {self.total_steps}")
        trained = self.step_count - (self.resumed_from or 0)
        run_warnings = degenerate_run_warnings(self.ctx, self.valid_pixels, self.step_log.nonzero_loss, trained,
                                               self.ignore_index)
        for w in run_warnings if self.ctx.is_main else ():
            self.log(f"warning: {w}")
        t_eval = time.perf_counter()
        val = self.final_val if self.final_val is not None else self.validate(self.total_steps)
        results: Dict[str, Any] = {}  # test splits first, then validation
        for split in self.cfg["data"]["test_splits"]:
            results[split] = self.evaluate(split, f"eval {split}")
            self._tb(split, results[split], self.total_steps)
        results[self.cfg["data"]["val_split"]] = val
        metrics = self._metrics(results, train_time, time.perf_counter() - t_eval)
        if run_warnings:
            metrics["warnings"] = run_warnings
        if self.guard is not None:  # warnings of this process's steps (a resumed run: since the resume)
            metrics["collapse_guard"] = self.guard.summary()
        if self.ctx.is_main:
            write_json(metrics, self.paths.metrics)
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        process_group.barrier(self.ctx)
        self.step_module.wrapped.capture.remove()
        return metrics

    def _metrics(self, results: Dict[str, Any], train_time: float, eval_time: float) -> Dict[str, Any]:
        cfg = self.cfg
        return {
            "method": method_slug(cfg["method"]), "seed": int(cfg["seed"]), "steps": self.total_steps,
            "dataset": cfg["data"]["name"], "model": cfg["model"]["name"], "num_classes": self.num_classes,
            "class_names": list(getattr(self.train_ds, "class_names", [])), "background_index": self.background_index,
            "world_size": self.ctx.world_size, "device": str(self.device), "threads": torch.get_num_threads(),
            "train_time_s": round(train_time, 2), "eval_time_s": round(eval_time, 2),
            "resumed_from": self.resumed_from, "best": self.best, "splits": results,
        }


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
