"""A segmentation decoder trained on the multi-scale features of a frozen encoder.

:class:`FPNDecoderSeg` is the trainable part of the *frozen-encoder protocol*: the
ImageNet-pretrained EfficientNet-Lite0 (:class:`~pixreg.models.efficientnet.EfficientNetLite0Pyramid`)
is run once per image and view, its features are cached on disk
(:mod:`pixreg.train.features`), and only this decoder and its classifier are trained,
with every method, by the ordinary trainer. Its input is therefore not an image but
the list of feature levels, finest first.

Architecture (FPN-style, Lin et al. 2017, with a small dense head):

* lateral: one ``1x1`` conv-BN-ReLU per level, ``C_l -> width``;
* top-down: from the coarsest level, ``p = lateral_l + upsample(p)`` (bilinear) down
  to the finest level;
* ``head`` (= ``feature_layer``, the pixel features the regularizers act on):
  ``depth`` ``3x3`` conv-BN-ReLU at the finest level's stride (``width`` channels);
* ``classifier``: ``1x1`` conv to ``K`` logits.

The logits stay at the finest level's grid; the criterion and the evaluation
upsample them bilinearly to the label size (``align_corners=False``), the same
operation :class:`~pixreg.models._common.SegmentationModel` applies inside
``forward`` for image models. So the regularizers see the decoder's features and
labels exactly as they see the head's features of a full model with the same
feature stride.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._common import ConvBNReLU, SegmentationModel, _check_positive_int, init_weights

__all__ = ["FPNDecoderSeg"]

#: Channels of EfficientNet-Lite0's stride-8, 16 and 32 levels (the default input).
LITE0_LEVELS = (40, 112, 320)


class FPNDecoderSeg(SegmentationModel):
    """FPN-style decoder + classifier on cached encoder features.

    Args:
        num_classes: ``K``.
        in_channels: channels of the input levels, finest first (default
            EfficientNet-Lite0's strides 8, 16, 32: ``(40, 112, 320)``).
        width: channels of the lateral, top-down and head layers (default 128).
        depth: ``3x3`` conv-BN-ReLU layers of the head (default 2).
        feature_stride: stride of the finest level w.r.t. the image (default 8).
        dropout: dropout before the classifier (default 0).

    ``forward(levels)``: ``levels`` a list/tuple of ``(B, C_l, H_l, W_l)`` tensors,
    finest first -> logits ``(B, K, H_0, W_0)`` at the finest level's grid.

    >>> m = FPNDecoderSeg(5, in_channels=(8, 16), width=12)
    >>> m([torch.zeros(2, 8, 12, 15), torch.zeros(2, 16, 6, 8)]).shape
    torch.Size([2, 5, 12, 15])
    >>> (m.feature_layer, m.classifier_layer, m.feature_dim, m.feature_stride)
    ('head', 'classifier', 12, 8)
    """

    def __init__(self, num_classes: int, in_channels: Sequence[int] = LITE0_LEVELS, width: int = 128,
                 depth: int = 2, feature_stride: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("width", width)
        _check_positive_int("depth", depth)
        _check_positive_int("feature_stride", feature_stride)
        if isinstance(in_channels, (str, int)) or not in_channels:
            raise ValueError(f"in_channels must be a non-empty list of ints, got {in_channels!r}")
        for c in in_channels:
            _check_positive_int("in_channels[i]", c)
        self.num_classes = num_classes
        self.level_channels = tuple(int(c) for c in in_channels)
        self.in_channels = self.level_channels[0]
        self.lateral = nn.ModuleList(ConvBNReLU(c, width, 1) for c in self.level_channels)
        self.head = nn.Sequential(*[ConvBNReLU(width, width, 3) for _ in range(depth)])
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(width, num_classes, 1)
        init_weights(self)
        self.feature_layer = "head"
        self.classifier_layer = "classifier"
        self.feature_dim = width
        self.feature_stride = feature_stride

    def features(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(levels, torch.Tensor) or len(levels) != len(self.level_channels):
            raise ValueError(f"FPNDecoderSeg expects a list of {len(self.level_channels)} feature levels "
                             f"with channels {self.level_channels}, got "
                             + (f"a tensor {tuple(levels.shape)}" if isinstance(levels, torch.Tensor)
                                else f"{len(levels)} level(s)"))
        got = [tuple(t.shape) for t in levels]
        if any(t.dim() != 4 or t.shape[1] != c for t, c in zip(levels, self.level_channels)):
            raise ValueError(f"feature levels must be (B, C, H, W) with C = {self.level_channels}, got {got}")
        p = self.lateral[-1](levels[-1])
        for lat, x in zip(reversed(self.lateral[:-1]), reversed(levels[:-1])):
            p = lat(x) + F.interpolate(p, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(p)

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        """Logits at the finest level's grid (see the class docstring)."""
        return self.classifier(self.dropout(self.features(levels)))

