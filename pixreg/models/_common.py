"""Building blocks shared by the segmentation models.

Every model in :mod:`pixreg.models` is a :class:`SegmentationModel`: a network whose
``forward(x)`` maps images ``(B, C_in, H, W)`` to logits ``(B, K, H, W)`` (the
classifier output is bilinearly upsampled to the input size inside ``forward``), and
which names the layers a regularizer needs:

* ``feature_layer``: dotted name (for ``model.get_submodule``) of the module whose
  output is the pixel feature map ``(B, feature_dim, ceil(H / feature_stride),
  ceil(W / feature_stride))``, i.e. the penultimate features;
* ``classifier_layer``: dotted name of the final ``1x1`` ``nn.Conv2d`` classifier,
  whose input is exactly ``feature_layer``'s output (when ``dropout == 0``, the
  default; with ``dropout > 0`` the classifier sees the dropped-out features during
  training, while ``feature_layer`` still gives the clean ones).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvBNReLU", "ASPP", "make_head", "SegmentationModel", "HEADS"]

HEADS = ("fcn", "aspp")


class ConvBNReLU(nn.Sequential):
    """``Conv2d(k, dilation, no bias) -> BatchNorm2d -> ReLU`` with 'same' padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, dilation: int = 1) -> None:
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                      padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class _ASPPPooling(nn.Module):
    """Image-level branch of ASPP: global average pool -> 1x1 conv (+bias) -> ReLU.

    No BatchNorm here (unlike torchvision's DeepLabV3), so that training with a batch
    of one image works.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(F.adaptive_avg_pool2d(x, 1)))
        return y.expand(-1, -1, x.shape[-2], x.shape[-1])


class ASPP(nn.Module):
    """A light atrous spatial pyramid pooling (DeepLabV3).

    Branches: one 1x1 conv, one dilated 3x3 conv per rate, and image pooling, each
    with ``channels`` outputs; concatenated and projected back to ``channels`` by a
    1x1 conv-BN-ReLU.
    """

    def __init__(self, in_channels: int, channels: int, rates: Sequence[int] = (6, 12, 18)) -> None:
        super().__init__()
        branches: List[nn.Module] = [ConvBNReLU(in_channels, channels, 1)]
        branches += [ConvBNReLU(in_channels, channels, 3, dilation=int(r)) for r in rates]
        branches.append(_ASPPPooling(in_channels, channels))
        self.branches = nn.ModuleList(branches)
        self.project = ConvBNReLU(channels * len(branches), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


def make_head(in_channels: int, head: str = "fcn", channels: int = 128,
              last_kernel: int = 3, aspp_rates: Sequence[int] = (6, 12, 18)) -> nn.Sequential:
    """The segmentation head; its output is the pixel feature map (``channels`` wide).

    * ``"fcn"``: one conv-BN-ReLU of kernel ``last_kernel`` (torchvision's FCNHead
      without its dropout and classifier);
    * ``"aspp"``: :class:`ASPP` then one conv-BN-ReLU of kernel ``last_kernel``
      (DeepLabV3's head without its classifier).

    ``last_kernel=1`` makes the last feature layer a 1x1 conv, as CAR recommends, so
    that the features of pixels across a class boundary are not mixed by that layer.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if last_kernel not in (1, 3):
        raise ValueError(f"head_last_kernel must be 1 or 3, got {last_kernel!r}")
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"head_channels must be a positive int, got {channels!r}")
    if head == "fcn":
        return nn.Sequential(ConvBNReLU(in_channels, channels, last_kernel))
    return nn.Sequential(ASPP(in_channels, channels, aspp_rates),
                         ConvBNReLU(channels, channels, last_kernel))


def init_weights(module: nn.Module) -> None:
    """torchvision's ResNet initialisation: Kaiming-normal convs (fan_out), BN = (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SegmentationModel(nn.Module):
    """Base class: ``features(x)`` -> optional dropout -> ``classifier`` -> upsample.

    Subclasses set ``self.classifier`` (a 1x1 ``nn.Conv2d``) and the four attributes
    ``feature_layer``, ``classifier_layer`` (``"classifier"``), ``feature_dim`` and
    ``feature_stride``, and implement :meth:`features`. ``in_channels`` and
    ``num_classes`` are stored as well.
    """

    feature_layer: str
    classifier_layer: str = "classifier"
    feature_dim: int
    feature_stride: int
    in_channels: int = 3
    num_classes: int
    classifier: nn.Conv2d
    dropout: nn.Module

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes, H, W)`` for images ``x`` ``(B, in_channels, H, W)``."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        size = x.shape[-2:]
        logits = self.classifier(self.dropout(self.features(x)))
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits

    def backbone_modules(self) -> List[nn.Module]:
        """The modules that form the (possibly pretrained) backbone."""
        return [self.backbone] if hasattr(self, "backbone") else []

    def parameter_groups(self) -> Dict[str, List[nn.Parameter]]:
        """``{"backbone": [...], "head": [...]}``: every trainable parameter exactly once,
        e.g. to give a pretrained backbone a smaller learning rate."""
        seen = {id(p) for m in self.backbone_modules() for p in m.parameters()}
        backbone = [p for m in self.backbone_modules() for p in m.parameters()]
        head = [p for p in self.parameters() if id(p) not in seen]
        return {"backbone": backbone, "head": head}


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _output_stride_dilations(output_stride: int) -> Sequence[bool]:
    """Which of the last two stride-2 stages become dilated (torchvision's
    ``replace_stride_with_dilation`` for the last two stages)."""
    table = {8: (True, True), 16: (False, True), 32: (False, False)}
    if output_stride not in table:
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
    return table[output_stride]
