"""FCN / DeepLabV3-style segmentation on a ResNet (BasicBlock) backbone at output stride 8.

The backbone follows torchvision's ResNet-18/34 layout (7x7 stem, max-pool, four stages
of BasicBlocks with widths ``width * (1, 2, 4, 8)``); the stride-2 of the last two stages
is replaced by dilation as torchvision's ``replace_stride_with_dilation`` does (the first
block of a dilated stage keeps the previous dilation, the others use the new one), so
the final map has stride 8. No pretrained weights (torchvision is not used).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from ._common import (SegmentationModel, _check_positive_int, _output_stride_dilations,
                      init_weights, make_head)

__all__ = ["BasicBlock", "ResNetBackbone", "FCNResNet", "RESNET_LAYERS"]

#: ``depth -> blocks per stage`` for BasicBlock ResNets.
RESNET_LAYERS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN with an identity (or 1x1 conv-BN projection) shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=dilation,
                               dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetBackbone(nn.Module):
    """ResNet trunk (no pooling/fc). Output: ``(B, 8 * width, ceil(H/s), ceil(W/s))``
    with ``s = output_stride``."""

    def __init__(self, layers: Sequence[int] = (2, 2, 2, 2), width: int = 64,
                 output_stride: int = 8, in_channels: int = 3,
                 zero_init_residual: bool = False) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must give 4 stage depths, got {tuple(layers)}")
        for n in layers:
            _check_positive_int("layers[i]", n)
        dilate = (False,) + tuple(_output_stride_dilations(output_stride))
        self.output_stride = output_stride
        self.out_channels = 8 * width
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._in = width
        self._dilation = 1
        self.layer1 = self._make_layer(width, layers[0], 1, False)
        self.layer2 = self._make_layer(2 * width, layers[1], 2, dilate[0])
        self.layer3 = self._make_layer(4 * width, layers[2], 2, dilate[1])
        self.layer4 = self._make_layer(8 * width, layers[3], 2, dilate[2])
        init_weights(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, channels: int, blocks: int, stride: int, dilate: bool) -> nn.Sequential:
        previous = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        mods: List[nn.Module] = [BasicBlock(self._in, channels, stride, previous)]
        self._in = channels
        mods += [BasicBlock(channels, channels, 1, self._dilation) for _ in range(blocks - 1)]
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class FCNResNet(SegmentationModel):
    """ResNet backbone (output stride 8) + FCN or light-ASPP head + 1x1 classifier.

    Args:
        num_classes: number of output classes ``K``.
        depth: 10, 18 (default) or 34, BasicBlock layouts; ``layers`` overrides it.
        width: channels of the first stage (64 = ResNet-18; 32 = a 4x cheaper variant).
        head: ``"fcn"`` (conv-BN-ReLU) or ``"aspp"`` (light ASPP then conv-BN-ReLU).
        head_channels: width of the head = ``feature_dim`` (default 128).
        head_last_kernel: kernel of the head's last (feature) conv, 3 or 1 (CAR's advice).
        aspp_rates: dilation rates of the ASPP 3x3 branches.
        output_stride: 8 (default), 16 or 32.
        dropout: dropout between the features and the classifier (default 0).
        in_channels: image channels (default 3).

    Module names: ``backbone``, ``head`` (= ``feature_layer``), ``classifier``.
    """

    def __init__(self, num_classes: int, depth: int = 18, width: int = 64,
                 head: str = "fcn", head_channels: int = 128, head_last_kernel: int = 3,
                 aspp_rates: Sequence[int] = (6, 12, 18), output_stride: int = 8,
                 dropout: float = 0.0, in_channels: int = 3,
                 layers: Optional[Sequence[int]] = None,
                 zero_init_residual: bool = False) -> None:
        super().__init__()
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("width", width)
        _check_positive_int("in_channels", in_channels)
        if layers is None:
            if depth not in RESNET_LAYERS:
                raise ValueError(f"depth must be one of {sorted(RESNET_LAYERS)}, got {depth!r}")
            layers = RESNET_LAYERS[depth]
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.backbone = ResNetBackbone(layers, width, output_stride, in_channels,
                                       zero_init_residual)
        self.head = make_head(self.backbone.out_channels, head, head_channels,
                              head_last_kernel, aspp_rates)
        init_weights(self.head)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)
        self.feature_layer = "head"
        self.classifier_layer = "classifier"
        self.feature_dim = head_channels
        self.feature_stride = output_stride

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
