"""A small U-Net (Ronneberger et al., 2015) with BatchNorm and bilinear upsampling.

Encoder: ``depth + 1`` levels of double conv (3x3 conv-BN-ReLU twice) with widths
``base * 2**i``, 2x2 max-pooling (``ceil_mode=True``) between levels. Decoder: at each
level, bilinear upsampling to the skip connection's exact size (so any input size
works), concatenation, double conv. The last decoder block (stride 1, ``base``
channels) gives the pixel features; a 1x1 conv classifies them.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from ._common import ConvBNReLU, SegmentationModel, _check_positive_int, init_weights

__all__ = ["DoubleConv", "UNet"]


class DoubleConv(nn.Sequential):
    """``(3x3 conv-BN-ReLU) x 2``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(ConvBNReLU(in_channels, out_channels, 3),
                         ConvBNReLU(out_channels, out_channels, 3))


class _UpBlock(nn.Module):
    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = DoubleConv(in_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([x, skip], dim=1))


class UNet(SegmentationModel):
    """U-Net; ``feature_layer = "decoders.{depth-1}"`` (stride 1, ``base`` channels).

    Args:
        num_classes: number of output classes ``K``.
        base: width of the first level (default 32); level i has ``base * 2**i``.
        depth: number of 2x downsamplings (default 4, as in the original U-Net).
        dropout: dropout between the features and the classifier (default 0).
        in_channels: image channels (default 3).

    Module names: ``encoders.{0..depth}``, ``decoders.{0..depth-1}`` (coarse to fine),
    ``classifier``. ``backbone_modules()`` is the encoder.
    """

    def __init__(self, num_classes: int, base: int = 32, depth: int = 4,
                 dropout: float = 0.0, in_channels: int = 3) -> None:
        super().__init__()
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("base", base)
        _check_positive_int("depth", depth)
        _check_positive_int("in_channels", in_channels)
        self.num_classes = num_classes
        self.in_channels = in_channels
        widths = [base * 2 ** i for i in range(depth + 1)]
        self.pool = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.encoders = nn.ModuleList(
            [DoubleConv(in_channels, widths[0])]
            + [DoubleConv(widths[i - 1], widths[i]) for i in range(1, depth + 1)])
        self.decoders = nn.ModuleList(
            [_UpBlock(widths[i + 1], widths[i], widths[i]) for i in reversed(range(depth))])
        init_weights(self)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(base, num_classes, 1)
        self.feature_layer = f"decoders.{depth - 1}"
        self.classifier_layer = "classifier"
        self.feature_dim = base
        self.feature_stride = 1

    def backbone_modules(self) -> List[nn.Module]:
        return [self.encoders]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        skips: List[torch.Tensor] = []
        for i, enc in enumerate(self.encoders):
            x = enc(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for dec in self.decoders:
            x = dec(x, skips.pop())
        return x
