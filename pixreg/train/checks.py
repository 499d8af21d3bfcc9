"""Checks made before a run writes anything: output folder, dataset splits, method.

:func:`preflight` is called by :func:`pixreg.train.run.plan_run` after the configuration
has been validated (:func:`pixreg.train.config.validate`) and before the run folder is
touched (and, in the main process, :func:`scan_data` reads every sample once), so that a
setting that can only fail later (a test split that does not exist, a
``class_weight`` of the wrong length, a cplus1 run
on a dataset without background) fails in seconds instead of after training, and leaves no
half-made run behind. :func:`check_output_folder` refuses an output path under a file or in
a read-only folder; :func:`check_run_folder` refuses to overwrite a ``config.yaml`` that
was not written by a run.

>>> import tempfile, os
>>> check_output_folder(os.path.join(tempfile.mkdtemp(), "new", "run"))   # fine: will be created
>>> check_output_folder("/etc/hostname/run")
Traceback (most recent call last):
...
ValueError: --out /etc/hostname/run: /etc/hostname is a file, not a folder
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Mapping

import torch

__all__ = ["check_output_folder", "check_run_folder", "check_datasets", "check_settings", "preflight", "scan_data"]


def check_output_folder(path: str, what: str = "--out") -> None:
    """``ValueError`` unless ``path`` is, or can be created as, a writable folder."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(f"{what} {path}: is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{what} {path}: the folder is not writable")
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{what} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: cannot create it, {parent} is not writable")


def check_run_folder(run_dir: str) -> None:
    """``ValueError`` if ``run_dir`` holds a ``config.yaml`` but no run (no ``checkpoints/``
    folder, which every run creates together with its ``config.yaml``): that file is the
    user's own, and neither a new run, ``--overwrite`` nor ``--resume`` may replace it."""
    check_output_folder(run_dir)
    if os.path.isfile(os.path.join(run_dir, "config.yaml")) and not os.path.isdir(os.path.join(run_dir, "checkpoints")):
        raise ValueError(f"--out {run_dir}: holds a config.yaml but no pixreg run (no checkpoints/ folder); "
                         "refusing to overwrite it: choose another --out folder")


def check_datasets(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """Build the training, validation and test datasets of ``cfg`` (kept in the trainer's
    dataset cache, so this costs nothing extra) and check what depends on them. Errors
    name the configuration key: ``data.test_splits: 'nope': ...``. Returns the datasets
    by split."""
    from .build import make_dataset

    d = cfg["data"]
    keyed = [("data.train_split", d["train_split"], True), ("data.val_split", d["val_split"], False)]
    keyed += [("data.test_splits", s, False) for s in d["test_splits"]]
    out: Dict[str, Any] = {}
    for key, split, train in keyed:
        try:
            out[split if not train else "__train__"] = make_dataset(cfg, split, train=train)
        except (ValueError, FileNotFoundError, KeyError, OSError) as err:
            msg = err.args[0] if isinstance(err, KeyError) and err.args else err
            raise ValueError(f"{key}: split {split!r} of dataset {d['name']!r}: {msg}") from err
    train_ds = out["__train__"]
    weights = cfg.get("class_weight")
    if weights is not None and len(weights) != int(train_ds.num_classes):
        raise ValueError(f"class_weight has {len(weights)} entries, dataset {d['name']!r} has "
                         f"{int(train_ds.num_classes)} classes")
    return out


def check_settings(cfg: Mapping[str, Any]) -> None:
    """The checks of :func:`preflight` that do not depend on the run folder: the datasets
    (:func:`check_datasets`) and the method, built once on the CPU so that every constructor
    check runs (its errors name ``methods.<name>``)."""
    train_ds = check_datasets(cfg)["__train__"]
    from .build import build_run

    build_run(cfg, int(train_ds.num_classes), int(train_ds.ignore_index),
              getattr(train_ds, "background_index", None), torch.device("cpu"))


def preflight(cfg: Mapping[str, Any], run_dir: str) -> None:
    """Everything that can be checked before training writes a file (see the module
    docstring). Raises ``ValueError`` naming the key, argument or file."""
    check_run_folder(run_dir)
    check_settings(cfg)


_SCANNED: set = set()


def _files_fingerprint(datasets: Any) -> int:
    """Hash of the size and modification time of every file the datasets list (``files``)."""
    stats = []
    for ds in datasets:
        for path in (p for pair in getattr(ds, "files", ()) for p in pair):
            try:
                st = os.stat(path)
                stats.append((path, st.st_size, st.st_mtime_ns))
            except OSError:
                stats.append((path, -1, -1))
    return hash(tuple(stats))


def scan_data(cfg: Mapping[str, Any], log: Callable[[str], None] = print) -> None:
    """Read every sample of the training, validation and test splits once
    (:func:`pixreg.data.preflight`): corrupt or truncated files, image/label size mismatches,
    labels outside the classes and unknown colours raise :class:`pixreg.data.DatasetError`
    listing them all; one summary line per split is logged. Done once per process for a given
    ``data`` configuration and unchanged files (sizes and modification times, so that
    ``compare`` scans once); ``data.check: false`` skips it."""
    from ..data import preflight as scan

    d = cfg["data"]
    if not d.get("check", True):
        return
    if d.get("features"):  # cached encoder features: scan their source images
        cfg = dict(cfg, data=dict(d, features=None, augment=False))
    datasets = check_datasets(cfg)
    splits = {d["train_split"]: datasets.pop("__train__")}
    splits.update({s: ds for s, ds in datasets.items() if s not in splits})
    key = (json.dumps(d, sort_keys=True, default=str), _files_fingerprint(splits.values()))
    if key in _SCANNED:
        return
    reports = scan(splits, log=log)
    labelled = reports[d["train_split"]].class_pixels
    if labelled is not None and int(labelled.sum()) == 0:
        log(f"warning: every label pixel of the training split {d['train_split']!r} is ignore_index "
            "(an all-void dataset): the model will learn nothing")
    _SCANNED.add(key)
