"""The common interface of the regularizer modules.

Every regularizer is an ``nn.Module`` with

* ``uses_features`` / ``uses_logits``: which inputs it needs;
* ``logits_gradient``: whether its backward produces a gradient the size of the logits
  (:class:`pixreg.RegularizedCriterion` evaluates such terms before CE, so that the two
  logits-sized gradients never coexist at the peak of the backward pass);
* ``forward(...)``: the method's natural signature (features first, or logits first),
  returning a scalar loss (already multiplied by the method's own term weights);
* ``compute(labels, features=None, logits=None)``: the uniform entry point used by
  :class:`pixreg.RegularizedCriterion`;
* ``terms``: a dict of the named, detached, weighted terms of the last call (for
  logging); their sum is the returned loss.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch
from torch import nn


class LossOutput(NamedTuple):
    """What every functional loss returns: the scalar ``loss`` and its named ``terms``.

    ``loss == sum(terms.values())``; terms keep their autograd graph.
    """

    loss: torch.Tensor
    terms: Dict[str, torch.Tensor]


class Regularizer(nn.Module):
    uses_features: bool = True
    uses_logits: bool = False
    logits_gradient: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.terms: Dict[str, torch.Tensor] = {}

    def _record(self, out: LossOutput) -> torch.Tensor:
        self.terms = {k: v.detach() for k, v in out.terms.items()}
        return out.loss

    def compute(
        self,
        labels: torch.Tensor,
        features: Optional[torch.Tensor] = None,
        logits: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        raise NotImplementedError
