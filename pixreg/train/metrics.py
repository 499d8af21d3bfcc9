"""Segmentation metrics: a torchmetrics ``Metric`` over one confusion matrix.

:class:`SegmentationMetrics` is a ``torchmetrics.Metric`` whose states are declared with
``add_state(..., dist_reduce_fx="sum")``: the ``(K, K)`` confusion matrix (filled by
torchmetrics' ``multiclass_confusion_matrix``, ``ignore_index`` pixels dropped) and the
distractor counts. Under ``torch.distributed``, ``compute()`` sums every state over the
processes first (torchmetrics' one sync path), so the metrics are those of the whole
split (dataset-level, not averaged per image). With ``C[i, j]`` = pixels of true class
``i`` predicted ``j``:

* ``IoU_k = C[k,k] / (sum_j C[k,j] + sum_i C[i,k] - C[k,k])``; a class with no true and
  no predicted pixel has no IoU (``null``) and is left out of ``mIoU`` (mean over the
  other classes), as torchmetrics' ``MulticlassJaccardIndex(average="macro")`` and
  mmsegmentation do;
* ``Acc_k = C[k,k] / sum_j C[k,j]`` (recall), ``mAcc`` its mean over classes with true
  pixels; ``aAcc = trace(C) / sum(C)`` (pixel accuracy).

The confusion matrix gives all of these in one pass (three separate torchmetrics
objects would each redo the same bincount); the test suite checks the values against
``MulticlassJaccardIndex`` and ``MulticlassAccuracy``.

For datasets with a background class (C+1 data), also:

* ``bg_to_coi``: share of true-background pixels predicted as any class of interest,
  ``sum_{j != bg} C[bg, j] / sum_j C[bg, j]``;
* ``distractor_to_coi`` (when the split provides a distractor mask, e.g. the embedded
  dataset's open-set split): the same share restricted to distractor pixels (background
  objects of kinds never seen in training), counted outside the confusion matrix.

Every value is a percentage (0-100).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
from torchmetrics import Metric
from torchmetrics.functional.classification import multiclass_confusion_matrix

__all__ = ["SegmentationMetrics", "METRIC_NAMES", "LOWER_IS_BETTER"]

#: Scalar metrics, in table order.
METRIC_NAMES = ("mIoU", "mAcc", "aAcc", "bg_to_coi", "distractor_to_coi")
#: Metrics where smaller is better.
LOWER_IS_BETTER = ("bg_to_coi", "distractor_to_coi")


def _nan_to_none(values: List[float]) -> List[Optional[float]]:
    return [None if (v is None or math.isnan(v)) else float(v) for v in values]


class SegmentationMetrics(Metric):
    """Accumulate predictions and compute mIoU, mAcc, aAcc, per-class IoU/accuracy and
    the background-to-class-of-interest rates.

    Args:
        num_classes: ``K``.
        ignore_index: label ignored by every metric.
        background_index: the background class (``None``: no background metrics).
        class_names: names for the per-class dictionaries (default ``"0".."K-1"``).
        device: where the states live.

    States (summed over processes by ``compute()``): ``confmat (K, K)``, ``distractor``
    ``(2,)`` = [distractor pixels predicted as a class of interest, distractor pixels] and
    ``distractor_batches`` (updates that had a distractor mask).

    >>> m = SegmentationMetrics(3, ignore_index=255, background_index=0)
    >>> m.update(torch.tensor([[0, 1, 2, 1]]), torch.tensor([[0, 255, 2, 0]]))
    >>> r = m.compute(); round(r["aAcc"], 4), r["bg_to_coi"]
    (66.6667, 50.0)
    """

    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = 255, background_index: Optional[int] = None,
                 class_names: Optional[Sequence[str]] = None, device: torch.device | str = "cpu") -> None:
        super().__init__(compute_with_cache=False)
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.background_index = background_index
        self.class_names = [str(c) for c in (class_names or range(num_classes))]
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names for {num_classes} classes")
        k = self.num_classes
        self.add_state("confmat", default=torch.zeros(k, k, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("distractor", default=torch.zeros(2, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("distractor_batches", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.to(torch.device(device))

    def update(self, preds: torch.Tensor, labels: torch.Tensor, distractor: Optional[torch.Tensor] = None) -> None:
        """``preds`` and ``labels``: ``(B, H, W)`` integer class maps; ``distractor``: optional
        ``(B, H, W)`` bool mask of distractor pixels (background objects)."""
        if preds.shape != labels.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and labels {tuple(labels.shape)} differ in shape")
        preds, labels = preds.to(self.device).reshape(-1), labels.to(self.device).reshape(-1)
        self.confmat += multiclass_confusion_matrix(preds, labels, self.num_classes, ignore_index=self.ignore_index,
                                                    validate_args=False).long()
        if distractor is not None and self.background_index is not None:
            d = distractor.to(self.device).bool().reshape(-1) & (labels != self.ignore_index)
            self.distractor_batches += 1
            self.distractor += torch.stack([(d & (preds != self.background_index)).sum(), d.sum()])

    def compute(self) -> Dict[str, object]:
        """Metrics dict (percentages; per-class values ``None`` where undefined)."""
        cm = self.confmat.to(torch.float64)
        tp, gt, pred = cm.diag(), cm.sum(1), cm.sum(0)
        union = gt + pred - tp
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=cm.device)
        iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
        total = cm.sum()
        out: Dict[str, object] = {
            "mIoU": 100.0 * float(iou.nanmean()) if (union > 0).any() else float("nan"),
            "mAcc": 100.0 * float(acc.nanmean()) if (gt > 0).any() else float("nan"),
            "aAcc": 100.0 * float(tp.sum() / total) if total > 0 else float("nan"),
            "pixels": int(total),
        }
        if self.background_index is not None:
            b = int(self.background_index)
            bg = cm[b].sum()
            out["bg_to_coi"] = 100.0 * float((bg - cm[b, b]) / bg) if bg > 0 else float("nan")
            if int(self.distractor_batches) > 0:
                d = self.distractor.to(torch.float64)
                out["distractor_to_coi"] = 100.0 * float(d[0] / d[1]) if d[1] > 0 else float("nan")
                out["distractor_pixels"] = int(d[1])
        out["per_class_iou"] = dict(zip(self.class_names, _nan_to_none((100.0 * iou).tolist())))
        out["per_class_acc"] = dict(zip(self.class_names, _nan_to_none((100.0 * acc).tolist())))
        return out
