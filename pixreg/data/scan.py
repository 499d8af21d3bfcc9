"""Dataset pre-flight scan: read every sample once before training starts.

:func:`scan_dataset` decodes each image and label file of a dataset (no resizing, no
augmentation) and checks what would otherwise fail in a loader worker in the middle of a run:
unreadable, corrupt or truncated files (named), image/label size mismatches, label values
outside the declared classes, colours missing from a colour table. It returns a
:class:`SplitReport` (number of images, distinct sizes, pixels per class, ignored pixels, the
problems found). :func:`preflight` scans several splits, prints one line per split and raises
:class:`DatasetError` listing the problems of every split at once; the trainer calls it in the
main process before anything is written to the run folder.

>>> import tempfile
>>> from pixreg.data import build_dataset
>>> ds = build_dataset("scenes", "val", num_images=2, cache_dir=tempfile.mkdtemp())
>>> report = scan_dataset(ds)
>>> report.num_images, report.problems
(2, [])
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["SplitReport", "DatasetError", "scan_dataset", "preflight"]


class DatasetError(ValueError):
    """A dataset failed the pre-flight scan; the message lists every problem found."""


@dataclass
class SplitReport:
    """What :func:`scan_dataset` found in one split."""

    split: str
    num_images: int
    num_classes: int
    class_names: list[str]
    sizes: Counter = field(default_factory=Counter)  # (H, W) -> number of images
    class_pixels: np.ndarray | None = None  # (num_classes,) int64
    ignored_pixels: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line: images, sizes, classes present, ignored fraction (or the problem count)."""
        if self.sizes:
            (hw, _), = self.sizes.most_common(1)
            sizes = (f"{hw[0]}x{hw[1]}" if len(self.sizes) == 1
                     else f"{len(self.sizes)} sizes, most often {hw[0]}x{hw[1]}")
        else:
            sizes = "no readable image"
        px = self.class_pixels if self.class_pixels is not None else np.zeros(self.num_classes, np.int64)
        total = int(px.sum()) + self.ignored_pixels
        ignored = 100.0 * self.ignored_pixels / total if total else 0.0
        images = f"{self.num_images} image{'' if self.num_images == 1 else 's'}"
        line = (f"{self.split}: {images} ({sizes}), {int((px > 0).sum())}/{self.num_classes} classes "
                f"present, {ignored:.1f}% of pixels ignored")
        absent = [n for n, c in zip(self.class_names, px) if c == 0]
        if absent and len(absent) <= 5:
            line += f" (absent: {', '.join(absent)})"
        if self.problems:
            line += f"; {len(self.problems)} problem(s)"
        return line


def _read_sample(dataset: Any, idx: int) -> tuple[tuple[int, int], np.ndarray]:
    """``((H, W), label)`` of sample ``idx`` at its stored resolution when the dataset can read it
    raw (``pixreg.data`` datasets), else from ``dataset[idx]``."""
    load = getattr(dataset, "_load", None)
    if load is not None:
        image, label, _ = load(idx)
        return tuple(image.shape[:2]), np.asarray(label)
    item = dataset[idx]
    image, label = item[0], item[1]
    return tuple(image.shape[-2:]), np.asarray(label)


def _where(dataset: Any, idx: int) -> str:
    files = getattr(dataset, "files", None)
    if files is not None and idx < len(files):
        return " / ".join(os.fspath(p) for p in files[idx])
    return f"sample {idx}"


def scan_dataset(dataset: Any, *, split: str | None = None, max_problems: int = 20,
                 workers: int | None = None) -> SplitReport:
    """Read every sample of ``dataset`` once and report (see the module docstring).

    Problems are collected, not raised: at most ``max_problems`` messages are kept (the count
    of the rest is added as a last message). ``workers`` threads decode in parallel (default:
    up to 4, PIL releases the GIL while decoding).
    """
    k = int(dataset.num_classes)
    ignore = int(getattr(dataset, "ignore_index", -1))
    report = SplitReport(split=split or str(getattr(dataset, "split", "?")), num_images=len(dataset),
                         num_classes=k, class_names=list(getattr(dataset, "class_names", range(k))),
                         class_pixels=np.zeros(k, dtype=np.int64))
    extra_problems = 0

    def one(idx: int) -> tuple[int, Any]:
        try:
            return idx, _read_sample(dataset, idx)
        except (ValueError, OSError) as err:  # decode errors, missing files, bad values/colours
            msg = str(err)
            files = getattr(dataset, "files", None)
            named = files is not None and any(os.fspath(f) in msg for f in files[idx])
            return idx, msg if named else f"{_where(dataset, idx)}: {msg}"

    n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, n_workers)) as pool:
        for idx, result in pool.map(one, range(len(dataset))):
            if isinstance(result, str):
                if len(report.problems) < max_problems:
                    report.problems.append(result)
                else:
                    extra_problems += 1
                continue
            hw, label = result
            report.sizes[hw] += 1
            values = label.astype(np.int64).ravel()
            report.ignored_pixels += int((values == ignore).sum())
            valid = values[(values >= 0) & (values < k)]
            report.class_pixels += np.bincount(valid, minlength=k)[:k]
            stray = int(((values < 0) | (values >= k)).sum()) - int((values == ignore).sum())
            if stray > 0 and len(report.problems) < max_problems:  # datasets that do not check themselves
                report.problems.append(f"{_where(dataset, idx)}: {stray} label values outside "
                                       f"[0, {k}) that are not ignore_index={ignore}")
    if extra_problems:
        report.problems.append(f"... and {extra_problems} more problem(s)")
    return report


def preflight(datasets: Mapping[str, Any], *, log: Callable[[str], None] | None = print,
              **scan_kw: Any) -> dict[str, SplitReport]:
    """Scan each ``{split: dataset}``, log one summary line per split, and raise
    :class:`DatasetError` listing every problem if any split has one."""
    reports = {}
    for split, ds in datasets.items():
        reports[split] = scan_dataset(ds, split=split, **scan_kw)
        if log is not None:
            log("data " + reports[split].summary())
    bad = {s: r for s, r in reports.items() if r.problems}
    if bad:
        lines = [f"dataset check failed ({sum(len(r.problems) for r in bad.values())} problem(s)):"]
        for split, r in bad.items():
            lines += [f"  [{split}] {p}" for p in r.problems]
        raise DatasetError("\n".join(lines))
    return reports
