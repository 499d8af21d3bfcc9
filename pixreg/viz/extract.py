"""Load a trained run and stream a dataset split through it, collecting bounded statistics.

:func:`load_run` (the run folder's owner, :mod:`pixreg.train.run`) rebuilds the model and
criterion of a run folder (``config.yaml`` + ``checkpoints/{last,best}.pt``), as ``pixreg
eval`` does. :func:`extract_split` runs the
model over a split batch by batch (with a progress bar) and keeps only

* :class:`~pixreg.viz.stats.FeatureStats` of the pixel features at feature resolution
  (labels nearest-resized, ignored pixels dropped);
* a class-balanced :class:`~pixreg.viz.stats.Reservoir` of pixel features (strata: the
  ``K`` classes, plus background pixels under a distractor mask when the split has one);
* a reservoir of logits at label resolution, stratified by (true class, correct/wrong);
* the split's confusion-matrix metrics.

Memory is ``O(K * D + K * capacity)`` whatever the size of the split.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..losses import resize_labels
from ..train.data import eval_collate
from ..train.evaluation import progress_bar
from ..train.metrics import SegmentationMetrics
from ..train.run import LoadedRun, load_run
from .stats import FeatureStats, Reservoir, calibration_maps

__all__ = ["LoadedRun", "SplitResult", "load_run", "extract_split", "example_maps", "embedding_source"]


@dataclass
class SplitResult:
    split: str
    stats: FeatureStats
    features: Reservoir  # payload: feat (D,), label, pred, distractor
    logits: Reservoir  # payload: z_true, z_pred, label, pred
    metrics: Dict[str, Any]
    images: int
    has_distractor: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)


def embedding_source(run: LoadedRun) -> str:
    """``"rch_head"`` when the run trained an RCH head (its embedding is used for the
    calibration maps), else ``"model_features"``."""
    return "rch_head" if "rch" in getattr(run.criterion, "losses", {}) else "model_features"


def _layers(run: LoadedRun) -> List[str]:
    layers = [run.model.feature_layer]
    if embedding_source(run) == "rch_head":
        layer = run.criterion.specs["rch"].layer or run.model.feature_layer
        if layer not in layers:
            layers.append(layer)
    return layers


def _embed(run: LoadedRun, feats: Dict[str, torch.Tensor]):
    """``(embedding, calibration)`` used for the RCH calibration maps."""
    if embedding_source(run) == "rch_head":
        spec = run.criterion.specs["rch"]
        x = feats[spec.layer or run.model.feature_layer]
        if "rch" in run.criterion.projections:
            x = run.criterion.projections["rch"](x)
        rch = run.criterion.losses["rch"]
        return rch.embed(x), rch.calibration
    return feats[run.model.feature_layer], "mean_of_cosines"


def _forward(run: LoadedRun, capture, images: torch.Tensor, size) -> tuple:
    logits = run.model(images.to(run.device)).float()
    feats = dict(capture.features)
    capture.clear()
    up = logits if tuple(logits.shape[-2:]) == tuple(size) else F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits, up, feats


@torch.no_grad()
def extract_split(run: LoadedRun, dataset, *, split: str, feature_capacity: int = 300, logit_capacity: int = 4000,
                  batch_size: int = 16, max_images: Optional[int] = None, progress: bool = True, seed: int = 0) -> SplitResult:
    """Stream ``dataset`` through the run's model; see the module docstring."""
    from ..hooks import FeatureCapture

    k = int(dataset.num_classes)
    ign = int(dataset.ignore_index)
    bg = getattr(dataset, "background_index", None)
    metrics = SegmentationMetrics(k, ign, bg, getattr(dataset, "class_names", None))
    n = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    subset = torch.utils.data.Subset(dataset, list(range(n)))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=eval_collate)
    stats: Optional[FeatureStats] = None
    feat_res = Reservoir(feature_capacity, k + 1, seed=seed)
    logit_res = Reservoir(logit_capacity, 2 * k, seed=seed + 1)
    has_distractor = False
    bar = progress_bar(loader, enabled=progress, desc=f"features {run.label} {split}", unit="batch")
    with FeatureCapture(run.model, _layers(run)) as cap:
        try:
            for groups in bar:
                for batch in groups:
                    images, labels = batch[0], batch[1].long()
                    distractor = batch[2].bool() if len(batch) > 2 else None
                    has_distractor |= distractor is not None
                    _, up, feats = _forward(run, cap, images, labels.shape[-2:])
                    up, labels = up.cpu(), labels.cpu()
                    pred = up.argmax(1)
                    metrics.update(pred, labels, distractor)
                    # logits at label resolution: TP / FN / FP scores
                    valid = (labels != ign) & (labels >= 0) & (labels < k)
                    zt = up.permute(0, 2, 3, 1)[valid]
                    y, p = labels[valid], pred[valid]
                    z_true = zt.gather(1, y[:, None])[:, 0]
                    z_pred = zt.gather(1, p[:, None])[:, 0]
                    logit_res.add(y * 2 + (p != y).long(), z_true=z_true, z_pred=z_pred, label=y, pred=p)
                    # features at feature resolution
                    f = feats[run.model.feature_layer].float().cpu()
                    hw = tuple(f.shape[-2:])
                    yf = resize_labels(labels, hw).reshape(-1)
                    pf = resize_labels(pred, hw).reshape(-1)
                    df = (resize_labels(distractor.long(), hw).reshape(-1).bool() if distractor is not None
                          else torch.zeros_like(yf, dtype=torch.bool))
                    flat = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
                    keep = (yf != ign) & (yf >= 0) & (yf < k)
                    if stats is None:
                        stats = FeatureStats(k, flat.shape[1])
                    flat, yf, pf, df = flat[keep], yf[keep], pf[keep], df[keep]
                    stats.update(flat, yf)
                    is_d = df & (yf == bg) if bg is not None else torch.zeros_like(df)
                    feat_res.add(torch.where(is_d, torch.full_like(yf, k), yf), feat=flat, label=yf, pred=pf, distractor=is_d)
        finally:
            bar.close()
    if stats is None:
        raise ValueError(f"split {split!r} has no images")
    out = metrics.compute()
    out["images"] = n
    return SplitResult(split, stats, feat_res, logit_res, out, n, has_distractor)


@torch.no_grad()
def example_maps(run: LoadedRun, dataset, indices: Sequence[int]) -> List[Dict[str, Any]]:
    """Input, ground truth, prediction, error map and RCH ``phi``/``psi`` maps of a few images
    (maps at label resolution; ``phi``/``psi`` are computed at feature resolution, per image,
    and upsampled by nearest sampling)."""
    from ..data import denormalize
    from ..hooks import FeatureCapture

    k, ign = int(dataset.num_classes), int(dataset.ignore_index)
    out = []
    with FeatureCapture(run.model, _layers(run)) as cap:
        for idx in indices:
            item = dataset[int(idx)]
            image, label = item[0][None], item[1][None].long()
            logits, up, feats = _forward(run, cap, image, label.shape[-2:])
            emb, calibration = _embed(run, feats)
            phi, psi = calibration_maps(emb.float().cpu(), logits.cpu(), label, k, ign, calibration)
            size = tuple(label.shape[-2:])
            phi_up = F.interpolate(phi[:, None], size=size, mode="nearest")[0, 0]
            psi_up = F.interpolate(psi[:, None], size=size, mode="nearest")[0, 0]
            pred = up.argmax(1)[0].cpu()
            lab = label[0]
            valid = lab != ign
            rgb = denormalize(item[0]).clamp(0, 1).permute(1, 2, 0).numpy()
            out.append({
                "index": int(idx), "image": (rgb * 255).round().astype(np.uint8), "label": lab.numpy(),
                "pred": pred.numpy(), "error": (valid & (pred != lab)).numpy(), "phi": phi_up.numpy(),
                "psi": psi_up.numpy(), "calibration": calibration, "embedding": embedding_source(run),
            })
    return out
