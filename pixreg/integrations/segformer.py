"""Hugging Face ``transformers`` SegFormer with pixreg regularizers.

Needs the optional extra ``pixreg[segformer]`` (``transformers``; it installs beside
the CPU torch build and needs no torchvision). Nothing is downloaded: models are built
from a :class:`~transformers.SegformerConfig` with random initialisation, or loaded from
a local directory written by ``save_pretrained``.

Where the regularizers look in ``SegformerForSemanticSegmentation``:

* features: :data:`FEATURE_LAYER` = ``"decode_head.activation"``, the ReLU after the
  all-MLP head's ``linear_fuse`` (a 1x1 conv) and ``batch_norm``, i.e. the fused pixel
  features the classifier acts on (before the head's dropout), ``decoder_hidden_size``
  channels at 1/4 of the input resolution (``ceil(H / 4)``, the first stage's size);
* classifier: :data:`CLASSIFIER_LAYER` = ``"decode_head.classifier"`` (1x1 conv);
* logits: ``outputs.logits`` is at 1/4 resolution as well. Give them to the criterion
  as they are: :class:`~pixreg.RegularizedCriterion` upsamples logits to the label size
  bilinearly with ``align_corners=False``, exactly as SegFormer's own loss does, and the
  feature regularizers bring the labels to feature resolution themselves.

Two ways to use it:

* your own ``SegformerForSemanticSegmentation``: ``wrapped = attach(model, criterion)``,
  then ``wrapped.loss(wrapped(pixel_values).logits, labels)``;
* :func:`build_segformer` returns a :class:`SegformerSegmenter`, a thin module with the
  attribute contract of :mod:`pixreg.models` (``forward(x)`` gives logits at the input
  size, ``feature_layer``, ``classifier_layer``, ``feature_dim``, ``feature_stride``), so
  the training tool can train it like its own models.

>>> import torch
>>> from pixreg.criterion import RegularizedCriterion
>>> from pixreg.integrations import make_regularizer
>>> model = build_segformer(4, preset="tiny")
>>> criterion = RegularizedCriterion({"car": make_regularizer("car", 4, model.feature_dim)})
>>> wrapped = attach(model, criterion)
>>> x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
>>> logits = wrapped(x)
>>> tuple(logits.shape), tuple(wrapped.capture.features[model.feature_layer].shape)
((2, 4, 32, 32), (2, 32, 8, 8))
>>> wrapped.loss(logits, y).total.backward()
>>> model = wrapped.unwrap()                     # hooks removed, no pixreg trace left
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

try:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "pixreg.integrations.segformer needs Hugging Face transformers: "
        "install pixreg's 'segformer' extra (pip install -e '.[segformer]' in a checkout) or pip install transformers"
    ) from exc

from ..criterion import RegularizedCriterion, RegularizedModel

__all__ = [
    "FEATURE_LAYER", "CLASSIFIER_LAYER", "FEATURE_STRIDE", "PRESETS", "segformer_config", "min_input_size",
    "SegformerSegmenter", "build_segformer", "feature_layer", "attach",
]

#: Module (in ``SegformerForSemanticSegmentation``) whose output is the fused pixel feature map.
FEATURE_LAYER = "decode_head.activation"
#: The final 1x1 conv classifier.
CLASSIFIER_LAYER = "decode_head.classifier"
#: Features and logits are at ``ceil(H / 4)`` (the stride of the first patch embedding).
FEATURE_STRIDE = 4

_HEADS = [1, 2, 5, 8]
_WIDE = [64, 128, 320, 512]
#: MiT encoder sizes of the SegFormer paper (b0-b5) and a tiny one for CPU tests.
PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 4],
                 decoder_hidden_size=32),
    "b0": dict(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], num_attention_heads=_HEADS,
               decoder_hidden_size=256),
    "b1": dict(hidden_sizes=_WIDE, depths=[2, 2, 2, 2], num_attention_heads=_HEADS, decoder_hidden_size=256),
    "b2": dict(hidden_sizes=_WIDE, depths=[3, 4, 6, 3], num_attention_heads=_HEADS, decoder_hidden_size=768),
    "b3": dict(hidden_sizes=_WIDE, depths=[3, 4, 18, 3], num_attention_heads=_HEADS, decoder_hidden_size=768),
    "b4": dict(hidden_sizes=_WIDE, depths=[3, 8, 27, 3], num_attention_heads=_HEADS, decoder_hidden_size=768),
    "b5": dict(hidden_sizes=_WIDE, depths=[3, 6, 40, 3], num_attention_heads=_HEADS, decoder_hidden_size=768),
}
# pixreg-style option names accepted besides the SegformerConfig fields.
_ALIASES = {"in_channels": "num_channels", "dropout": "classifier_dropout_prob"}


def segformer_config(num_classes: int, preset: str = "b0", **overrides: Any) -> SegformerConfig:
    """A :class:`~transformers.SegformerConfig` for ``num_classes`` classes.

    Args:
        num_classes: number of output classes (``num_labels``).
        preset: one of :data:`PRESETS` (encoder/decoder sizes; ``"b0"`` is also
            transformers' default).
        **overrides: any ``SegformerConfig`` field (e.g. ``drop_path_rate=0.0``), or
            ``in_channels`` / ``dropout`` (aliases of ``num_channels`` /
            ``classifier_dropout_prob``). Unknown names raise ``TypeError`` (a
            ``SegformerConfig`` would silently keep them).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"`num_classes` must be a positive int, got {num_classes!r}")
    if preset not in PRESETS:
        raise ValueError(f"`preset` must be one of {tuple(PRESETS)}, got {preset!r}")
    known = SegformerConfig()
    fields: Dict[str, Any] = dict(PRESETS[preset])
    for key, value in overrides.items():
        key = _ALIASES.get(key, key)
        if key in ("num_labels", "id2label", "label2id"):
            raise TypeError(f"`{key}` is set from `num_classes`; do not pass it")
        if not hasattr(known, key):
            raise TypeError(f"unknown SegformerConfig option {key!r}")
        fields[key] = value
    return SegformerConfig(num_labels=num_classes, **fields)


def min_input_size(config: SegformerConfig) -> int:
    """Smallest image side the encoder accepts: each stage's sequence-reduction conv
    (kernel and stride ``sr_ratios[i]``) needs a feature map at least that large
    (29 for the presets)."""
    n = 1
    while True:
        size, ok = n, True
        for k, s, sr in zip(config.patch_sizes, config.strides, config.sr_ratios):
            size = (size + 2 * (k // 2) - k) // s + 1
            ok = ok and (sr <= 1 or size >= sr)
        if ok:
            return n
        n += 1


class SegformerSegmenter(nn.Module):
    """A ``SegformerForSemanticSegmentation`` as a pixreg segmentation model.

    ``forward(x)`` returns logits ``(B, K, H, W)`` at the input size (the model's 1/4
    resolution logits, bilinearly upsampled with ``align_corners=False``). Attributes:
    ``model`` (the transformers model, unchanged: ``save_pretrained`` it after training),
    ``feature_layer`` = ``"model.decode_head.activation"``, ``classifier_layer`` =
    ``"model.decode_head.classifier"``, ``feature_dim`` (``decoder_hidden_size``),
    ``feature_stride`` (4), ``in_channels``, ``num_classes``. Images must be at least
    :func:`min_input_size` pixels high and wide (29 for the presets).
    """

    feature_layer = "model." + FEATURE_LAYER
    classifier_layer = "model." + CLASSIFIER_LAYER
    feature_stride = FEATURE_STRIDE

    def __init__(self, model: SegformerForSemanticSegmentation) -> None:
        super().__init__()
        if not isinstance(model, SegformerForSemanticSegmentation):
            raise TypeError(f"`model` must be a SegformerForSemanticSegmentation, got {type(model).__name__}")
        self.model = model
        self.feature_dim = int(model.config.decoder_hidden_size)
        self.num_classes = int(model.config.num_labels)
        self.in_channels = int(model.config.num_channels)

    @property
    def classifier(self) -> nn.Conv2d:
        return self.model.decode_head.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes, H, W)`` for images ``x`` ``(B, in_channels, H, W)``."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, {self.in_channels}, H, W), got {shape}")
        small = min_input_size(self.model.config)
        if x.shape[-2] < small or x.shape[-1] < small:
            raise ValueError(f"x must be at least {small}x{small} pixels for this SegFormer config, got {tuple(x.shape[-2:])}")
        logits = self.model(pixel_values=x).logits
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits

    def backbone_modules(self) -> List[nn.Module]:
        """The MiT encoder (the part a pretrained checkpoint initialises)."""
        return [self.model.segformer]

    def parameter_groups(self) -> Dict[str, List[nn.Parameter]]:
        """``{"backbone": encoder parameters, "head": decode-head parameters}``."""
        seen = {id(p) for p in self.model.segformer.parameters()}
        return {
            "backbone": list(self.model.segformer.parameters()),
            "head": [p for p in self.parameters() if id(p) not in seen],
        }


def build_segformer(num_classes: int, preset: str = "b0", pretrained: Optional[str] = None,
                    **config_overrides: Any) -> SegformerSegmenter:
    """A SegFormer for ``num_classes`` classes, wrapped as a :class:`SegformerSegmenter`.

    Args:
        num_classes: output classes.
        preset: encoder/decoder size, one of :data:`PRESETS` (ignored when ``pretrained``).
        pretrained: optional local directory written by ``save_pretrained`` (loaded with
            ``local_files_only=True``: nothing is downloaded); its classifier is
            re-initialised when its number of labels differs.
        **config_overrides: see :func:`segformer_config`.

    This is the function to register as ``"segformer"`` in :func:`pixreg.models.build_model`.
    """
    if pretrained is not None:
        extra = {_ALIASES.get(k, k): v for k, v in config_overrides.items()}
        model = SegformerForSemanticSegmentation.from_pretrained(
            pretrained, num_labels=num_classes, ignore_mismatched_sizes=True, local_files_only=True, **extra
        )
    else:
        model = SegformerForSemanticSegmentation(segformer_config(num_classes, preset, **config_overrides))
    return SegformerSegmenter(model)


def feature_layer(model: nn.Module) -> str:
    """The module name to hook for the fused decoder features of ``model`` (a
    ``SegformerForSemanticSegmentation`` or a :class:`SegformerSegmenter`)."""
    if isinstance(model, SegformerSegmenter):
        return model.feature_layer
    if isinstance(model, SegformerForSemanticSegmentation):
        return FEATURE_LAYER
    raise TypeError(f"`model` must be a SegFormer for semantic segmentation, got {type(model).__name__}")


def attach(model: nn.Module, criterion: RegularizedCriterion,
           layers: Union[str, Sequence[str], None] = None) -> RegularizedModel:
    """Hook ``criterion`` onto a SegFormer: a :class:`~pixreg.RegularizedModel` capturing
    :func:`feature_layer` (or ``layers``). ``unwrap()`` it after training."""
    return RegularizedModel(model, criterion, layers if layers is not None else feature_layer(model))
