"""Attach pixreg regularizers to models and trainers that users already have.

* :mod:`pixreg.integrations.segformer`: Hugging Face ``transformers`` SegFormer
  (optional extra ``pixreg[segformer]``);
* :mod:`pixreg.integrations.lightning`: PyTorch Lightning ``LightningModule`` mixin and
  ready-made module (optional extra ``pixreg[lightning]``).

Neither submodule is imported here, so ``import pixreg.integrations`` never needs the
optional packages. This module only holds :func:`make_regularizer`, a one-line way to
build each of the four regularizers for a model whose number of classes and feature
channels are known.

>>> reg = make_regularizer("car", num_classes=4, feature_dim=16)
>>> type(reg).__name__, reg.uses_features, reg.uses_logits
('CARLoss', True, False)
"""
from __future__ import annotations

from typing import Any

from ..losses.base import Regularizer

__all__ = ["REGULARIZERS", "make_regularizer"]

#: Names accepted by :func:`make_regularizer`.
REGULARIZERS = ("cplus1", "car", "lall", "rch")


def make_regularizer(name: str, num_classes: int, feature_dim: int, **opts: Any) -> Regularizer:
    """Build regularizer ``name`` (one of :data:`REGULARIZERS`) with its defaults.

    Args:
        name: ``"cplus1"`` (:class:`~pixreg.losses.cplus1.CPlus1Loss`), ``"car"``
            (:class:`~pixreg.losses.car.CARLoss`), ``"lall"``
            (:class:`~pixreg.losses.lall.LocallyAdaptiveLoss`, logits only) or ``"rch"``
            (:class:`~pixreg.losses.rch.RCHLoss`, owns a training-only head).
        num_classes: number of classes ``K`` of the logits.
        feature_dim: channels ``D`` of the captured feature map (used by C+1 and RCH).
        **opts: the regularizer's own keyword arguments (e.g. ``ignore_index``).
    """
    if name == "cplus1":
        from ..losses.cplus1 import CPlus1Loss

        return CPlus1Loss(num_classes, feature_dim, **opts)
    if name == "car":
        from ..losses.car import CARLoss

        return CARLoss(num_classes, **opts)
    if name == "lall":
        from ..losses.lall import LocallyAdaptiveLoss

        return LocallyAdaptiveLoss(num_classes=num_classes, **opts)
    if name == "rch":
        from ..losses.rch import RCHLoss

        return RCHLoss(num_classes, feature_dim, **opts)
    raise ValueError(f"`name` must be one of {REGULARIZERS}, got {name!r}")
