"""pixreg: training-time pixel-representation regularizers for semantic segmentation.

Losses (``nn.Module``): :class:`CPlus1Loss`, :class:`CARLoss`, :class:`LocallyAdaptiveLoss`,
:class:`RCHLoss`; their pure functions live in :mod:`pixreg.functional`. Plumbing:
:class:`FeatureCapture` (forward hooks by module name), :class:`RegularizedCriterion`
(CE + weighted regularizers with warm-up, :class:`Term`) and :class:`RegularizedModel`
(a model plus criterion for training; ``unwrap()`` gives the untouched model back).
The command line and training loop are in :mod:`pixreg.train` (extra ``pixreg[train]``).
"""
from . import functional
from .criterion import CriterionOutput, ModelLossOutput, RegularizedCriterion, RegularizedModel, Term
from .hooks import FeatureCapture
from .losses import CARLoss, CPlus1Loss, LocallyAdaptiveLoss, LossOutput, RCHLoss, Regularizer, make_regularizer
from .losses._common import set_validation

__version__ = "0.2.0"

__all__ = [
    "CPlus1Loss", "CARLoss", "LocallyAdaptiveLoss", "RCHLoss",
    "Regularizer", "LossOutput", "make_regularizer",
    "Term", "CriterionOutput", "ModelLossOutput", "RegularizedCriterion", "RegularizedModel",
    "FeatureCapture", "functional", "set_validation",
]
