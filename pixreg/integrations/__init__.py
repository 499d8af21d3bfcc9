"""Attach pixreg regularizers to models and trainers that users already have.

* :mod:`pixreg.integrations.segformer`: Hugging Face ``transformers`` SegFormer
  (optional extra ``pixreg[segformer]``);
* :mod:`pixreg.integrations.lightning`: PyTorch Lightning ``LightningModule`` mixin and
  ready-made module (optional extra ``pixreg[lightning]``).

Neither submodule is imported here, so ``import pixreg.integrations`` never needs the
optional packages. This module only re-exports :func:`make_regularizer` from the one
method registry (:mod:`pixreg.losses.registry`), a one-line way to build each of the four
regularizers for a model whose number of classes and feature channels are known.

>>> reg = make_regularizer("car", num_classes=4, feature_dim=16)
>>> type(reg).__name__, reg.uses_features, reg.uses_logits
('CARLoss', True, False)
"""
from __future__ import annotations

from ..losses.registry import REGULARIZERS, make_regularizer

__all__ = ["REGULARIZERS", "make_regularizer"]
