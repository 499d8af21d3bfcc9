"""Evaluation of a model on a dataset split, and the progress bar of every long loop.

:func:`evaluate` streams a split through a model and returns the metrics of
:class:`pixreg.train.metrics.SegmentationMetrics` (under ``torch.distributed`` each process
takes every ``W``-th image and the metric states are summed).
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional

import torch
from torch import nn

from . import process_group
from .data import eval_collate, shard_indices

__all__ = ["evaluate", "progress_bar", "amp_context", "to_device"]


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


def amp_context(enabled: bool, device: torch.device):
    """Autocast (float16 on CUDA, bfloat16 on CPU) when ``enabled``, else a null context."""
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()

def to_device(x: Any, device: torch.device) -> Any:
    """``x.to(device)`` for a tensor, element-wise for a list/tuple of tensors (the feature
    levels of the frozen-encoder protocol)."""
    if isinstance(x, (list, tuple)):
        return type(x)(t.to(device, non_blocking=True) for t in x)
    return x.to(device, non_blocking=True)

def evaluate(model: nn.Module, dataset, *, batch_size: int = 16, device: torch.device | str = "cpu",
             num_workers: int = 0, amp: bool = False, progress: bool = True, desc: str = "eval",
             ctx: Optional[process_group.DistContext] = None) -> Dict[str, Any]:
    """Metrics of ``model`` on ``dataset`` (see :mod:`pixreg.train.metrics`).

    Under ``torch.distributed`` each process evaluates every ``W``-th image and the
    confusion matrices are summed. The model is put in eval mode and restored after.
    """
    from .metrics import SegmentationMetrics  # torchmetrics: the 'train' extra, needed from here on

    ctx = ctx or process_group.DistContext(device=torch.device(device))
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
                with amp_context(amp, device):
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
