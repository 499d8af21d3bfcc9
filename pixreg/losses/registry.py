"""The one registry of regularizers by method name, used by the command line
(:mod:`pixreg.train.methods`) and the integrations (:mod:`pixreg.integrations`).

>>> reg = make_regularizer("car", num_classes=4, feature_dim=16)
>>> type(reg).__name__, reg.uses_features, reg.uses_logits
('CARLoss', True, False)
>>> sorted(REGULARIZERS)
['car', 'cplus1', 'lall', 'rch']
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from ._common import check_choice
from .base import Regularizer
from .car import CARLoss
from .cplus1 import CPlus1Loss
from .lall import LocallyAdaptiveLoss
from .rch import RCHLoss

__all__ = ["REGULARIZERS", "regularizer_class", "make_regularizer"]

#: Method name -> regularizer class.
REGULARIZERS: Dict[str, type] = {
    "cplus1": CPlus1Loss,
    "car": CARLoss,
    "lall": LocallyAdaptiveLoss,
    "rch": RCHLoss,
}


def regularizer_class(name: str) -> type:
    """The regularizer class registered as ``name`` (``ValueError`` naming the choices otherwise)."""
    return REGULARIZERS[check_choice("name", name, tuple(REGULARIZERS))]


def make_regularizer(name: str, num_classes: int, feature_dim: Optional[int] = None, **opts: Any) -> Regularizer:
    """Build regularizer ``name`` (a key of :data:`REGULARIZERS`) with its defaults.

    Args:
        name: ``"cplus1"`` (:class:`~pixreg.losses.cplus1.CPlus1Loss`), ``"car"``
            (:class:`~pixreg.losses.car.CARLoss`), ``"lall"``
            (:class:`~pixreg.losses.lall.LocallyAdaptiveLoss`, logits only) or ``"rch"``
            (:class:`~pixreg.losses.rch.RCHLoss`, owns a training-only head).
        num_classes: number of classes ``K`` of the logits.
        feature_dim: channels ``D`` of the captured feature map (needed by C+1 and RCH;
            not passed to a regularizer that reads logits only).
        **opts: the regularizer's own keyword arguments (e.g. ``ignore_index``).
    """
    cls = regularizer_class(name)
    if cls.uses_features:
        return cls(num_classes, feature_dim, **opts)
    return cls(num_classes=num_classes, **opts)
