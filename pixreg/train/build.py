"""Building the parts of a run from its configuration: the datasets (:func:`make_dataset`,
with a small in-process cache so that ``compare`` and the pre-flight checks build each
split once) and the model and criterion (:func:`build_run`)."""
from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..criterion import RegularizedCriterion
from .methods import build_criterion

__all__ = ["make_dataset", "build_run"]

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
