"""Capture intermediate features of any ``nn.Module`` by module name, without editing it.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
>>> capture = FeatureCapture(model, "1")          # the ReLU's output
>>> logits = model(torch.randn(2, 3, 16, 16))
>>> capture.features["1"].shape
torch.Size([2, 8, 16, 16])
>>> capture.remove()                                # the model is as it was
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Union

import torch
from torch import nn

__all__ = ["FeatureCapture"]


class FeatureCapture:
    """Forward hooks that keep the latest output of named sub-modules.

    Args:
        model: any module.
        layers: one dotted module name or several (as in ``model.named_modules()``).

    ``features[name]`` holds the output of the last forward pass (with its autograd
    graph, so a loss on it trains the model). Hooks only read outputs; they never
    change what the model computes. ``remove()`` (or leaving a ``with`` block) takes
    them off. Set ``enabled = False`` to stop capturing (e.g. at evaluation time).
    """

    def __init__(self, model: nn.Module, layers: Union[str, Sequence[str]]) -> None:
        if isinstance(layers, str):
            layers = [layers]
        if not layers:
            raise ValueError("`layers` must name at least one module")
        names = dict(model.named_modules())
        missing = [n for n in layers if n not in names]
        if missing:
            sample = ", ".join(n for n in list(names)[1:12])
            raise ValueError(f"`layers`: no module named {missing} in the model; some names are: {sample}, ...")
        self.layers: List[str] = list(layers)
        self.features: Dict[str, torch.Tensor] = {}
        self.enabled = True
        self._handles = [names[n].register_forward_hook(self._hook(n)) for n in self.layers]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs, output) -> None:
            if self.enabled:
                if not isinstance(output, torch.Tensor):
                    raise TypeError(f"module `{name}` returned {type(output).__name__}; a tensor output is needed")
                self.features[name] = output

        return hook

    def clear(self) -> None:
        self.features = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> "FeatureCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
