"""The common base of the regularizer modules.

Every regularizer is a :class:`Regularizer` (an ``nn.Module``) with

* shared constructor state, checked once here: ``num_classes`` (``K``; ``None`` only where
  the loss can read it from the logits, LALL), ``ignore_index`` (never a class index) and
  ``feature_dim`` (``D``, the channels of the feature map it reads; ``None`` for a loss
  on logits only);
* ``uses_features`` / ``uses_logits``: which inputs it needs;
* ``logits_gradient``: whether its backward produces a gradient the size of the logits
  (:class:`pixreg.RegularizedCriterion` evaluates such terms before CE, so that the two
  logits-sized gradients never coexist at the peak of the backward pass);
* ``forward(...)``: the method's natural signature, its inputs in the order
  ``features`` (if used), ``logits`` (if used), ``labels``, returning a scalar loss
  (already multiplied by the method's own term weights);
* ``compute(labels, features=None, logits=None)``: the uniform entry point used by
  :class:`pixreg.RegularizedCriterion`; it checks that the needed inputs are there and
  that the logits have ``K`` channels, then calls ``forward``;
* ``terms``: a dict of the named, detached, weighted terms of the last call (for
  logging); their sum is the returned loss.

Hyper-parameters other than ``num_classes`` and ``feature_dim`` are keyword-only.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch
from torch import nn

from ._common import check_ignore_index, check_int

__all__ = ["LossOutput", "Regularizer"]


class LossOutput(NamedTuple):
    """What every functional loss returns: the scalar ``loss`` and its named ``terms``.

    ``loss == sum(terms.values())``; terms keep their autograd graph.
    """

    loss: torch.Tensor
    terms: Dict[str, torch.Tensor]


class Regularizer(nn.Module):
    """Base of the four regularizers: shared state, input dispatch and the named terms.

    Args:
        num_classes: ``K`` (an int ``>= min_classes``), or ``None`` where the subclass allows
            it (``num_classes_required`` False, e.g. LALL: ``K`` then comes from the logits).
        ignore_index: label value of ignored pixels; must not be a class index.
        feature_dim: ``D``, channels of the features (a positive int), or ``None`` when not
            needed.

    Example:
        >>> import torch
        >>> class MeanFeature(Regularizer):
        ...     def forward(self, features, labels):
        ...         return self._record(LossOutput(features.mean(), {"mean": features.mean()}))
        >>> reg = MeanFeature(3, feature_dim=4)
        >>> reg.num_classes, reg.ignore_index, reg.feature_dim
        (3, 255, 4)
        >>> float(reg.compute(torch.zeros(1, 2, 2, dtype=torch.long), features=torch.ones(1, 4, 2, 2)))
        1.0
    """

    uses_features: bool = True
    uses_logits: bool = False
    logits_gradient: bool = False
    #: Whether ``num_classes`` must be given (an int), or may be ``None``.
    num_classes_required: bool = False
    #: Smallest accepted ``num_classes`` (C+1 needs a background and one class).
    min_classes: int = 1

    def __init__(
        self,
        num_classes: Optional[int] = None,
        *,
        ignore_index: int = 255,
        feature_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        if num_classes is not None or self.num_classes_required:
            num_classes = check_int("num_classes", num_classes, lo=self.min_classes)
        if feature_dim is not None:
            feature_dim = check_int("feature_dim", feature_dim, lo=1)
        self.num_classes: Optional[int] = num_classes
        self.ignore_index = check_ignore_index(ignore_index, num_classes)
        self.feature_dim: Optional[int] = feature_dim
        self.terms: Dict[str, torch.Tensor] = {}

    def _record(self, out: LossOutput) -> torch.Tensor:
        self.terms = {k: v.detach() for k, v in out.terms.items()}
        return out.loss

    def check_logits_classes(self, logits: torch.Tensor) -> None:
        """Refuse logits whose class axis (dim 1) is not ``num_classes`` (no host sync)."""
        if self.num_classes is not None and isinstance(logits, torch.Tensor) and logits.dim() >= 2:
            if logits.shape[1] != self.num_classes:
                raise ValueError(
                    f"`logits` have {logits.shape[1]} classes (dim 1), but {type(self).__name__} was "
                    f"built for num_classes={self.num_classes}"
                )

    def compute(
        self,
        labels: torch.Tensor,
        features: Optional[torch.Tensor] = None,
        logits: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``forward`` on the inputs this regularizer uses (``features``, ``logits``, then
        ``labels``). Logits, when given, must have ``num_classes`` channels even if the loss
        does not read them (the criterion passes them to every regularizer)."""
        name = type(self).__name__
        if logits is not None:
            self.check_logits_classes(logits)
        inputs = []
        if self.uses_features:
            if features is None:
                raise ValueError(f"{name} needs `features` (uses_features=True); got features=None")
            inputs.append(features)
        if self.uses_logits:
            if logits is None:
                raise ValueError(f"{name} needs `logits` (B, K, H, W) (uses_logits=True); got logits=None")
            inputs.append(logits)
        return self(*inputs, labels)
