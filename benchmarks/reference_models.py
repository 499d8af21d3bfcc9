"""Reference networks for the step-overhead ratios of bench_losses.py (benchmark-only).

Each maps ``(B, 3, H, W)`` images through ``features(x)`` (the pixel features the
feature regularizers read; ``feature_dim`` channels) and ``classifier(features)`` (1x1
logits, upsampled by the benchmark):

* ``"fcn18"``: :class:`pixreg.models.FCNResNet`, ResNet-18 at output stride 8, FCN head
  (256 channels, stride 8): the small reference used so far;
* ``"deeplabv3plus_r50"``: DeepLabV3+ (Chen et al. 2018) on a ResNet-50 layout (bottleneck
  blocks 3-4-6-3, widths 256-2048, output stride 16 with a dilated last stage): ASPP
  (rates 6, 12, 18, 256 channels) on the stride-16 map, decoder fusing a 48-channel
  projection of the stride-4 map, two 3x3 conv-BN-ReLU of 256 channels: features are
  ``(B, 256, H/4, W/4)``;
* ``"segformer_b2"``: SegFormer-B2 sized (Xie et al. 2021; MiT-B2 encoder, depths 3-4-6-3,
  widths 64-128-320-512, all-MLP decoder of 768 channels), built from a HuggingFace
  ``transformers`` config (random weights; needs ``pixreg[segformer]``): features are the
  decoder's fused ``(B, 768, H/4, W/4)`` map.

Weights are random: only the cost of a step matters here.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn

from pixreg.models import ASPP, FCNResNet


def _conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, dilation: int = 1, relu: bool = True):
    layers = [nn.Conv2d(cin, cout, kernel, stride, dilation * (kernel - 1) // 2, dilation, bias=False),
              nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """ResNet-50 bottleneck (1x1, 3x3 with the stride and dilation, 1x1 x4), torchvision layout."""

    def __init__(self, cin: int, width: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        cout = 4 * width
        self.body = nn.Sequential(_conv_bn(cin, width), _conv_bn(width, width, 3, stride, dilation),
                                  _conv_bn(width, cout, relu=False))
        self.short = _conv_bn(cin, cout, stride=stride, relu=False) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.short(x))


class ResNet50Trunk(nn.Module):
    """ResNet-50 layout at output stride 16; returns the stride-4 and stride-16 maps."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, width, 7, 2), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], width
        for i, (blocks, stride, dilation) in enumerate(((3, 1, 1), (4, 2, 1), (6, 2, 1), (3, 1, 2))):
            w = width * 2 ** i
            layers = [Bottleneck(cin, w, stride, dilation)] + [Bottleneck(4 * w, w, 1, dilation) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            cin = 4 * w
        self.stages = nn.ModuleList(stages)
        self.low_channels, self.out_channels = 4 * width, cin

    def forward(self, x: torch.Tensor):
        x = self.stages[0](self.stem(x))
        low = x
        for stage in self.stages[1:]:
            x = stage(x)
        return low, x


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ on :class:`ResNet50Trunk` (``width=64``: the ResNet-50 sizes)."""

    def __init__(self, num_classes: int, width: int = 64, channels: int = 256) -> None:
        super().__init__()
        self.trunk = ResNet50Trunk(width)
        self.aspp = ASPP(self.trunk.out_channels, channels)
        self.low = _conv_bn(self.trunk.low_channels, 48)
        self.decoder = nn.Sequential(_conv_bn(channels + 48, channels, 3), _conv_bn(channels, channels, 3))
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.feature_dim = channels

    def features(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.trunk(x)
        high = F.interpolate(self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.decoder(torch.cat([high, self.low(low)], dim=1))


class SegFormer(nn.Module):
    """SegFormer from a ``transformers`` config (B2 sizes by default; ``scale`` divides the widths)."""

    def __init__(self, num_classes: int, scale: int = 1) -> None:
        super().__init__()
        from transformers import SegformerConfig, SegformerForSemanticSegmentation

        cfg = SegformerConfig(num_labels=num_classes, depths=[3, 4, 6, 3],
                              hidden_sizes=[64 // scale, 128 // scale, 320 // scale, 512 // scale],
                              num_attention_heads=[1, 2, 5, 8] if scale == 1 else [1, 1, 1, 1],
                              decoder_hidden_size=768 // scale)
        self.net = SegformerForSemanticSegmentation(cfg)
        self.classifier = self.net.decode_head.classifier
        self.feature_dim = cfg.decoder_hidden_size
        self._captured: Dict[str, torch.Tensor] = {}
        self.classifier.register_forward_pre_hook(lambda mod, args: self._captured.__setitem__("x", args[0]))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self.net(pixel_values=x)  # the 1x1 classifier runs once more in the benchmark: negligible
        return self._captured.pop("x")


def fcn18(num_classes: int, width: int = 64) -> nn.Module:
    return FCNResNet(num_classes, depth=18, width=width, head="fcn", head_channels=256)


#: name -> builder(num_classes, width) (``width`` scales the tiny test configurations; 64 = the real sizes)
REFERENCES: Dict[str, Callable[[int, int], nn.Module]] = {
    "fcn18": fcn18,
    "deeplabv3plus_r50": lambda k, width=64: DeepLabV3Plus(k, width=width, channels=256 * width // 64),
    "segformer_b2": lambda k, width=64: SegFormer(k, scale=64 // width),
}
