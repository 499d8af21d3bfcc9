"""Regularizer losses: one module per method, each a functional + nn.Module pair."""
from ._common import resize_labels
from .base import LossOutput, Regularizer
from .car import CARLoss, car_loss
from .cplus1 import CPlus1Loss, cplus1_loss, update_moving_average_centres
from .lall import LocallyAdaptiveLoss, locally_adaptive_loss
from .rch import RCHLoss, rch_loss, rch_update_prototypes
from .registry import REGULARIZERS, make_regularizer, regularizer_class

__all__ = [
    "LossOutput", "Regularizer",
    "CPlus1Loss", "CARLoss", "LocallyAdaptiveLoss", "RCHLoss",
    "cplus1_loss", "update_moving_average_centres", "car_loss", "locally_adaptive_loss",
    "rch_loss", "rch_update_prototypes",
    "REGULARIZERS", "make_regularizer", "regularizer_class", "resize_labels",
]
