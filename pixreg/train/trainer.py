"""Training and evaluation of one run.

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

Determinism and resuming: the model is initialised right after ``torch.manual_seed(seed)``
(so every method starts from the same weights for a seed), the data order is a function
of ``(seed, step)`` only (:mod:`pixreg.train.data`), and a checkpoint holds the model,
optimiser, scheduler, AMP scaler, criterion state (centres, prototypes, its step
counter), the RNG states of every process and the step. ``resume=True`` continues from
``last.pt``; the resumed run's final metrics and parameters equal those of an
uninterrupted run bit for bit on CPU (same thread count), which the test suite checks by
SIGKILLing a real training process.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import shutil
import time
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..criterion import RegularizedCriterion, RegularizedModel
from ..distributed import all_reduce_sum_no_grad, convert_global_batchnorm
from . import dist as dist_utils
from .checkpoint import atomic_save, load_checkpoint, load_state, remove_stale_temporaries, rng_state, set_rng_state
from .checks import preflight, scan_data
from .config import RESUME_MUTABLE, config_diff, dump_yaml, load_yaml, resolve_methods
from .data import SeededDataset, StepBatchSampler, collate, eval_collate, shard_indices
from .methods import build_criterion, method_slug
from .metrics import SegmentationMetrics

__all__ = ["train", "evaluate", "build_run", "make_dataset", "seed_everything", "RunExists", "progress_bar"]

CKPT_VERSION = 1
#: Entries of a checkpoint that resuming needs.
_CKPT_KEYS = ("version", "step", "model", "criterion", "optimizer", "scheduler", "rng", "sampler", "elapsed_s", "best")


class RunExists(FileExistsError):
    """The run folder already holds a run (use ``resume`` or ``overwrite``)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def progress_bar(iterable=None, *, enabled: bool = True, **kw):
    """A tqdm bar (or a no-op wrapper when tqdm is missing or ``enabled`` is False)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        enabled = False
    if not enabled:
        class _Null:
            def __init__(self, it):
                self.it = it

            def __iter__(self):
                return iter(self.it if self.it is not None else ())

            def update(self, *a, **k):
                pass

            def set_postfix(self, *a, **k):
                pass

            def set_postfix_str(self, *a, **k):
                pass

            def set_description(self, *a, **k):
                pass

            def write(self, *a, **k):
                pass

            def close(self):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *a):
                pass

        return _Null(iterable)
    kw.setdefault("dynamic_ncols", True)
    kw.setdefault("leave", False)
    return tqdm(iterable, **kw)


# --------------------------------------------------------------------------- building blocks
_DATASET_CACHE: Dict[Tuple, Any] = {}


def make_dataset(cfg: Mapping[str, Any], split: str, *, train: bool = False, cache: bool = True):
    """The dataset of ``split`` described by ``cfg["data"]`` (kept in a small in-process
    cache, so that ``compare`` builds each split once)."""
    from ..data import build_dataset

    d = cfg["data"]
    if d.get("features"):  # frozen-encoder protocol: cached encoder features (pixreg.train.features)
        from .features import feature_dataset

        return feature_dataset(cfg, split, train=train)
    size = d["size"]
    if not train:
        size = size if d.get("eval_size", "same") == "same" else d.get("eval_size")
    size = tuple(size) if size is not None else None
    opts = dict(d.get("opts") or {})
    key = (d["name"], split, str(d["root"]), size, bool(train and d["augment"]), int(d["seed"]),
           str(d["cache_dir"]), json.dumps(opts, sort_keys=True, default=str))
    if cache and key in _DATASET_CACHE:
        return _DATASET_CACHE[key]
    ds = build_dataset(d["name"], split, d["root"], size=size, augment=bool(train and d["augment"]),
                       seed=int(d["seed"]), cache_dir=d["cache_dir"], **opts)
    if not train and hasattr(ds, "return_distractor_mask") and hasattr(ds, "distractor_masks"):
        ds.return_distractor_mask = True  # open-set metric on evaluation splits
    if cache:
        if len(_DATASET_CACHE) > 16:
            _DATASET_CACHE.pop(next(iter(_DATASET_CACHE)))
        _DATASET_CACHE[key] = ds
    return ds


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


def build_run(cfg: Mapping[str, Any], num_classes: int, ignore_index: int, background_index: Optional[int],
              device: torch.device) -> Tuple[nn.Module, RegularizedCriterion, List[str]]:
    """Model (initialised from ``cfg["seed"]``) and criterion of ``cfg["method"]``, on ``device``."""
    from ..models import build_model

    torch.manual_seed(int(cfg["seed"]))  # same initial weights for every method of a seed
    model = build_model(cfg["model"]["name"], num_classes, **dict(cfg["model"].get("opts") or {}))
    torch.manual_seed(int(cfg["seed"]) + 7919)  # criterion's own random init (e.g. prototypes)
    criterion, layers = build_criterion(
        cfg["method"], model, num_classes=num_classes, ignore_index=ignore_index,
        background_index=background_index, options=cfg.get("methods") or {}, ce_weight=float(cfg.get("ce_weight", 1.0)),
        class_weight=cfg.get("class_weight"),
    )
    return model.to(device), criterion.to(device), layers


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


def _amp_context(enabled: bool, device: torch.device):
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def to_device(x: Any, device: torch.device) -> Any:
    """``x.to(device)`` for a tensor, element-wise for a list/tuple of tensors (the feature
    levels of the frozen-encoder protocol)."""
    if isinstance(x, (list, tuple)):
        return type(x)(t.to(device, non_blocking=True) for t in x)
    return x.to(device, non_blocking=True)


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, dataset, *, batch_size: int = 16, device: torch.device | str = "cpu",
             num_workers: int = 0, amp: bool = False, progress: bool = True, desc: str = "eval",
             ctx: Optional[dist_utils.DistContext] = None) -> Dict[str, Any]:
    """Metrics of ``model`` on ``dataset`` (see :mod:`pixreg.train.metrics`).

    Under ``torch.distributed`` each process evaluates every ``W``-th image and the
    confusion matrices are summed. The model is put in eval mode and restored after.
    """
    ctx = ctx or dist_utils.DistContext(device=torch.device(device))
    device = torch.device(device)
    was_training = model.training
    model.eval()
    metrics = SegmentationMetrics(dataset.num_classes, dataset.ignore_index, getattr(dataset, "background_index", None),
                                  getattr(dataset, "class_names", None), device=device)
    subset = torch.utils.data.Subset(dataset, shard_indices(len(dataset), ctx.rank, ctx.world_size))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=eval_collate, pin_memory=device.type == "cuda")
    bar = progress_bar(loader, enabled=progress and ctx.is_main, desc=desc, unit="batch")
    try:
        for groups in bar:
            for batch in groups:
                images, labels = to_device(batch[0], device), batch[1].to(device, non_blocking=True)
                distractor = batch[2] if len(batch) > 2 else None
                with _amp_context(amp, device):
                    logits = model(images)
                if logits.shape[-2:] != labels.shape[-2:]:
                    logits = torch.nn.functional.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
                metrics.update(logits.argmax(1), labels, distractor)
    finally:
        bar.close()
        model.train(was_training)
    out = metrics.compute()
    out["images"] = len(dataset)
    return out


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


# --------------------------------------------------------------------------- training
def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def _check_resume_config(saved: Mapping[str, Any], cfg: Mapping[str, Any], run_dir: str) -> None:
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


def _degenerate_run_warnings(ctx: dist_utils.DistContext, valid_pixels: torch.Tensor, nonzero_loss: bool,
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


def _remove_temporaries(run_dir: str, ctx: dist_utils.DistContext, log: Callable[[str], None]) -> None:
    if ctx.is_main:
        for path in remove_stale_temporaries(run_dir):
            log(f"removed {path} (left by an interrupted run)")


def run_status(run_dir: str) -> str:
    """``"finished"`` (metrics.json written), ``"partial"`` (a checkpoint), ``"empty"``."""
    if os.path.exists(os.path.join(run_dir, "metrics.json")):
        return "finished"
    if os.path.exists(os.path.join(run_dir, "checkpoints", "last.pt")):
        return "partial"
    return "empty"


def train(cfg: Mapping[str, Any], run_dir: str, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, ctx: Optional[dist_utils.DistContext] = None,
          log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train ``cfg["method"]`` with ``cfg["seed"]`` into ``run_dir``; return the final metrics.

    Args:
        cfg: resolved configuration (:func:`pixreg.train.config.resolve_config`).
        run_dir: the run folder.
        resume: continue from ``run_dir/checkpoints/last.pt`` if it exists (a finished run is
            not retrained: its metrics are returned). Without it, an existing run raises
            :class:`RunExists` unless ``overwrite``.
        progress: tqdm bars.
        ctx: distributed context (default: :func:`pixreg.train.dist.setup` from the environment).
    """
    own_ctx = ctx is None
    ctx = ctx or dist_utils.setup(cfg["device"])
    try:
        return _train(dict(cfg), run_dir, resume, overwrite, progress, ctx, log)
    finally:
        if own_ctx:
            dist_utils.teardown(ctx)


def _train(cfg: Dict[str, Any], run_dir: str, resume: bool, overwrite: bool, progress: bool,
           ctx: dist_utils.DistContext, log: Callable[[str], None]) -> Dict[str, Any]:
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    device = ctx.device
    t_cfg = cfg["train"]
    total_steps = int(t_cfg["steps"])
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    last_path = os.path.join(ckpt_dir, "last.pt")
    best_path = os.path.join(ckpt_dir, "best.pt")
    metrics_path = os.path.join(run_dir, "metrics.json")
    status = run_status(run_dir)

    ckpt: Optional[Dict[str, Any]] = None
    if status != "empty" and resume:
        saved_cfg_path = os.path.join(run_dir, "config.yaml")
        if os.path.exists(saved_cfg_path):
            saved = load_yaml(saved_cfg_path)
            saved.setdefault("class_weight", None)  # runs written before the key existed
            _check_resume_config(saved, cfg, run_dir)
        if status == "finished":
            _remove_temporaries(run_dir, ctx, log)
            with open(metrics_path) as f:
                return json.load(f)
    elif status != "empty" and not overwrite:
        raise RunExists(f"{run_dir} already holds a run ({status}); pass --resume to continue it or --overwrite to restart")
    preflight(cfg, run_dir)  # config, device, datasets, method: before anything is written
    if ctx.is_main:
        scan_data(cfg, log)  # every sample read once: corrupt files, sizes, labels (also before writing)
    if status != "empty":
        if resume:
            ckpt = load_checkpoint(last_path, map_location="cpu", required=_CKPT_KEYS)
        else:
            if ctx.is_main:
                for name in ("checkpoints", "tb", "log.csv", "val.csv", "metrics.json", "config.yaml"):
                    p = os.path.join(run_dir, name)
                    if os.path.isdir(p):
                        shutil.rmtree(p)
                    elif os.path.exists(p):
                        os.remove(p)
            dist_utils.barrier(ctx)

    _remove_temporaries(run_dir, ctx, log)
    if ctx.is_main:
        os.makedirs(ckpt_dir, exist_ok=True)
        dump_yaml(cfg, os.path.join(run_dir, "config.yaml"))

    # data, model, criterion ------------------------------------------------------------
    seed_everything(int(cfg["seed"]))
    train_ds = make_dataset(cfg, cfg["data"]["train_split"], train=True)
    num_classes, ignore_index = int(train_ds.num_classes), int(train_ds.ignore_index)
    background_index = getattr(train_ds, "background_index", None)
    model, criterion, layers = build_run(cfg, num_classes, ignore_index, background_index, device)
    if t_cfg["sync_bn"] and ctx.distributed:
        if device.type == "cpu":  # torch's SyncBatchNorm refuses CPU tensors: pixreg's all-reduce BatchNorm
            model = convert_global_batchnorm(model)
        else:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    step_module = TrainStep(model, criterion, layers).to(device)
    runner: nn.Module = step_module
    if ctx.distributed:
        needs_unused = any(p.requires_grad for p in criterion.parameters()) or any(s.warmup > 0 for s in criterion.specs.values())
        runner = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=needs_unused)
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "name": "model"}]
    crit_params = [p for p in criterion.parameters() if p.requires_grad]
    if crit_params:
        groups.append({"params": crit_params, "name": "criterion"})
    optimizer = _optimizer(cfg, groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    use_scaler = bool(t_cfg["amp"]) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    start_step, elapsed, best = 0, 0.0, {"step": None, "mIoU": None}
    sampler_state = {"seed": int(cfg["seed"]), "batch_size": int(t_cfg["batch_size"]), "n": len(train_ds)}
    if ckpt is not None:
        if ckpt.get("version") != CKPT_VERSION:
            raise ValueError(f"{last_path}: checkpoint version {ckpt.get('version')} is not {CKPT_VERSION}")
        saved_sampler = {k: ckpt["sampler"][k] for k in sampler_state}
        if saved_sampler != sampler_state:
            raise ValueError(f"cannot resume {run_dir}: data order {saved_sampler} != {sampler_state}")
        load_state(model, ckpt["model"], last_path)
        load_state(criterion, ckpt["criterion"], last_path, "criterion")
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if use_scaler and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_step, elapsed, best = int(ckpt["step"]), float(ckpt["elapsed_s"]), dict(ckpt["best"])
        states = ckpt["rng"]
        if len(states) != ctx.world_size:
            log(f"warning: checkpoint has RNG states of {len(states)} processes, running {ctx.world_size}; "
                "the resumed run will not be bit-identical")
        set_rng_state(states[ctx.rank % len(states)])
        if ctx.is_main:
            log(f"resuming {run_dir} at step {start_step}/{total_steps}")

    sampler = StepBatchSampler(len(train_ds), int(t_cfg["batch_size"]), int(cfg["seed"]), total_steps, start_step,
                               ctx.rank, ctx.world_size)
    loader_gen = torch.Generator()
    loader_gen.manual_seed(int(cfg["seed"]))  # worker seeds; keeps the global RNG untouched
    num_workers = int(cfg["data"]["num_workers"])
    loader = torch.utils.data.DataLoader(SeededDataset(train_ds, int(cfg["seed"])), batch_sampler=sampler,
                                         num_workers=num_workers, collate_fn=collate, generator=loader_gen,
                                         pin_memory=device.type == "cuda", persistent_workers=False)

    # logging -----------------------------------------------------------------------------
    writer = None
    csv_log = val_log = None
    if ctx.is_main:
        csv_log = CSVLog(os.path.join(run_dir, "log.csv"), start_step if ckpt is not None else None)
        val_log = CSVLog(os.path.join(run_dir, "val.csv"), start_step if ckpt is not None else None)
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=start_step + 1 if ckpt is not None else None)
        except ImportError:  # pragma: no cover - tensorboard missing
            log("tensorboard not installed: no TensorBoard events")

    def save_checkpoint(step: int, path: str, extra: Optional[Dict[str, Any]] = None) -> None:
        states = dist_utils.all_gather_object(ctx, rng_state())  # collective: every rank
        if not ctx.is_main:
            return
        obj = {
            "version": CKPT_VERSION, "step": step, "model": model.state_dict(), "criterion": criterion.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if use_scaler else None, "rng": states, "sampler": sampler_state,
            "elapsed_s": elapsed + (time.perf_counter() - t_start), "best": best, "config": json.loads(json.dumps(cfg, default=str)),
        }
        if extra:
            obj.update(extra)
        atomic_save(obj, path)

    def validate(step: int) -> Dict[str, Any]:
        val_ds = make_dataset(cfg, cfg["data"]["val_split"])
        m = evaluate(model, val_ds, batch_size=int(cfg["eval"]["batch_size"]), device=device, num_workers=num_workers,
                     amp=bool(t_cfg["amp"]), progress=progress, desc=f"val@{step}", ctx=ctx)
        if writer is not None:
            for k in ("mIoU", "mAcc", "aAcc", "bg_to_coi", "distractor_to_coi"):
                if k in m and m[k] == m[k]:
                    writer.add_scalar(f"val/{k}", m[k], step)
        if val_log is not None:
            val_log.write([{"step": step, **{k: _fmt(float(m[k])) for k in ("mIoU", "mAcc", "aAcc") if k in m}}])
        if best["mIoU"] is None or m["mIoU"] > best["mIoU"]:
            best.update(step=step, mIoU=m["mIoU"])
            save_checkpoint(step, best_path, {"val_metrics": m})
        return m

    # loop ----------------------------------------------------------------------------------
    slug = method_slug(cfg["method"])
    bar = progress_bar(total=total_steps, initial=start_step, enabled=progress and ctx.is_main,
                       desc=f"train {slug} seed {cfg['seed']}", unit="step")
    t_start = time.perf_counter()
    runner.train()
    pending: List[Tuple[int, int, float, Dict[str, torch.Tensor], torch.Tensor]] = []
    term_keys: List[str] = []
    log_every, ckpt_every, eval_every = int(t_cfg["log_every"]), int(t_cfg["ckpt_every"]), int(t_cfg["eval_every"])
    delay = float(t_cfg.get("step_delay_s") or 0.0)
    grad_clip = t_cfg["grad_clip"]
    all_params = [p for g in groups for p in g["params"]]
    valid_pixels = torch.zeros((), dtype=torch.long, device=device)  # labelled pixels seen (no host sync per step)
    loss_seen = {"nonzero": False}

    def flush() -> None:
        if not pending:
            return
        keys = sorted({k for _, _, _, terms, _ in pending for k in terms})
        for k in keys:
            if k not in term_keys:
                term_keys.append(k)
        stacked_t = torch.stack([torch.stack([total] + [terms.get(k, torch.full_like(total, float("nan"))) for k in term_keys])
                                 for _, _, _, terms, total in pending]).float()
        if ctx.distributed:  # mean over processes (CE and regularizers are global: equal)
            stacked_t = all_reduce_sum_no_grad(stacked_t) / ctx.world_size
        pending_rows = list(pending)
        pending.clear()
        stacked = stacked_t.cpu().tolist()
        for (step, _, _, _, _), vals in zip(pending_rows, stacked):  # every process raises together
            if not math.isfinite(vals[0]):
                raise FloatingPointError(f"non-finite loss {vals[0]} at step {step} ({dict(zip(term_keys, vals[1:]))})")
            loss_seen["nonzero"] = loss_seen["nonzero"] or vals[0] != 0.0
        if not ctx.is_main:
            return
        rows = []
        for (step, epoch, lr, _, _), vals in zip(pending_rows, stacked):
            row = {"step": step, "epoch": epoch, "lr": lr, "loss": vals[0]}
            row.update({k: v for k, v in zip(term_keys, vals[1:]) if v == v})
            row["time_s"] = round(elapsed + time.perf_counter() - t_start, 3)
            rows.append(row)
            if writer is not None:
                writer.add_scalar("train/loss", vals[0], step)
                writer.add_scalar("lr", lr, step)
                for k, v in zip(term_keys, vals[1:]):
                    if v == v:
                        writer.add_scalar(f"train/{k}", v, step)
        if csv_log is not None:
            csv_log.write([{k: (_fmt(v) if isinstance(v, float) and k not in ("lr", "time_s") else v) for k, v in r.items()} for r in rows])
        last = rows[-1]
        shown = {"loss": f"{last['loss']:.4g}"}
        shown.update({k: f"{v:.4g}" for k, v in last.items() if k in term_keys and "/" not in k})
        shown["lr"] = f"{last['lr']:.2e}"
        bar.set_postfix(shown, refresh=False)

    step = start_step
    try:
        for batch in loader:
            images = to_device(batch[0], device)
            labels = batch[1].to(device, non_blocking=True)
            valid_pixels += (labels != ignore_index).sum()
            lr = float(optimizer.param_groups[0]["lr"])
            with _amp_context(bool(t_cfg["amp"]), device):
                _, total, terms = runner(images, labels)
            optimizer.zero_grad(set_to_none=True)
            if total.requires_grad:  # not when nothing contributes (ce_weight 0, regularizers warming up)
                scaler.scale(total).backward()
                if grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(all_params, float(grad_clip))
                scaler.step(optimizer)
                scaler.update()
            scheduler.step()
            step += 1
            # every process keeps its terms; flush() averages them over processes
            pending.append((step, (step * int(t_cfg["batch_size"]) - 1) // len(train_ds), lr, terms, total.detach()))
            if step % log_every == 0 or step == total_steps:
                flush()
            bar.update(1)
            if step % ckpt_every == 0 or step == total_steps:
                flush()
                save_checkpoint(step, last_path)
            if eval_every and step % eval_every == 0 and step != total_steps:
                validate(step)
            if delay:
                time.sleep(delay)
    finally:
        bar.close()
    flush()
    train_time = elapsed + time.perf_counter() - t_start
    if step < total_steps:  # pragma: no cover - the sampler always yields the remaining steps
        raise RuntimeError(f"training stopped at step {step} < {total_steps}")

    run_warnings = _degenerate_run_warnings(ctx, valid_pixels, loss_seen["nonzero"], step - start_step, ignore_index)
    for w in run_warnings if ctx.is_main else ():
        log(f"warning: {w}")

    # final evaluation ----------------------------------------------------------------------
    t_eval = time.perf_counter()
    results: Dict[str, Any] = {}  # test splits first, then validation
    val_metrics = validate(total_steps)
    for split in cfg["data"]["test_splits"]:
        ds = make_dataset(cfg, split)
        results[split] = evaluate(model, ds, batch_size=int(cfg["eval"]["batch_size"]), device=device,
                                  num_workers=num_workers, amp=bool(t_cfg["amp"]), progress=progress,
                                  desc=f"eval {split}", ctx=ctx)
        if writer is not None:
            for k in ("mIoU", "mAcc", "aAcc", "bg_to_coi", "distractor_to_coi"):
                if k in results[split] and results[split][k] == results[split][k]:
                    writer.add_scalar(f"{split}/{k}", results[split][k], total_steps)
    results[cfg["data"]["val_split"]] = val_metrics
    eval_time = time.perf_counter() - t_eval
    metrics = {
        "method": slug, "seed": int(cfg["seed"]), "steps": total_steps, "dataset": cfg["data"]["name"],
        "model": cfg["model"]["name"], "num_classes": num_classes, "class_names": list(getattr(train_ds, "class_names", [])),
        "background_index": background_index, "world_size": ctx.world_size, "device": str(device),
        "threads": torch.get_num_threads(), "train_time_s": round(train_time, 2), "eval_time_s": round(eval_time, 2),
        "resumed_from": start_step if ckpt is not None else None, "best": best, "splits": results,
    }
    if run_warnings:
        metrics["warnings"] = run_warnings
    if ctx.is_main:
        write_json(metrics, os.path.join(run_dir, "metrics.json"))
    if writer is not None:
        writer.flush()
        writer.close()
    dist_utils.barrier(ctx)
    step_module.wrapped.capture.remove()
    return metrics
