"""Method registry: ``"ce"``, ``"cplus1"``, ``"car"``, ``"lall"``, ``"rch"`` and ``+`` combinations.

A *method* is cross-entropy plus zero or more regularizers: ``"ce"`` is plain CE,
``"car"`` is CE + CAR, ``"car+lall"`` is CE + CAR + LALL (``"ce+car"`` is the same as
``"car"``). :func:`build_criterion` turns a method name and the per-method options of
the configuration (``methods.<name>``) into a :class:`pixreg.criterion.RegularizedCriterion`,
filling in what the model and dataset determine:

========  ==========================================================================
name      loss class (module) and what is filled in automatically
========  ==========================================================================
cplus1    ``CPlus1Loss(num_classes, feat_dim, background_index=, ignore_index=)``;
          ``classifier=`` the model's final 1x1 conv when ``centres: classifier``
car       ``CARLoss(num_classes, ignore_index=, feature_dim=)``
lall      ``LocallyAdaptiveLoss(ignore_index=, num_classes=)`` (logits only)
rch       ``RCHLoss(num_classes, in_channels=feat_dim, ignore_index=)``
========  ==========================================================================

Per-method options (``methods.<name>`` in the YAML): ``weight`` (multiplies the
regularizer, default 1), ``warmup`` (steps during which it is off, default 0),
``layer`` (dotted module name of the feature layer, default ``model.feature_layer``),
``projection`` (``null``, ``"conv1x1"`` or ``"conv3x3"``: a training-only conv on the
features, owned by the criterion, with ``projection_dim`` outputs, default the feature
width; CAR's paper prefers 1x1 so that pixels across a boundary are not mixed)
and any keyword argument of the loss class (checked against its signature). A loss
class's own ``weight`` argument (RCH's lambda = 0.1, LALL's weight = 1) is set with
``loss_weight``; the effective multiplier is ``weight * loss_weight``.

C+1 and datasets without a background class (CamVid): C+1 needs one class to play the
background. If the dataset has none (``background_index is None``), building ``cplus1``
raises ``ValueError`` unless ``methods.cplus1.background_index`` names the class to
treat as background (e.g. ``0`` = Sky on CamVid); that class then gets no centre and is
pushed away from the other classes' centres. Nothing is chosen silently.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..criterion import RegularizedCriterion, Term

__all__ = ["METHODS", "RESERVED", "parse_method", "method_slug", "build_criterion", "loss_class"]

#: name -> (module, class) of the regularizer.
METHODS: Dict[str, Tuple[str, str]] = {
    "cplus1": ("pixreg.losses.cplus1", "CPlus1Loss"),
    "car": ("pixreg.losses.car", "CARLoss"),
    "lall": ("pixreg.losses.lall", "LocallyAdaptiveLoss"),
    "rch": ("pixreg.losses.rch", "RCHLoss"),
}

#: Training-only projections a term can put in front of its loss (CAR's paper compares 1x1 with 3x3).
_PROJECTION_KERNELS = {"conv1x1": 1, "conv3x3": 3}

#: Keys of ``methods.<name>`` that configure the term, not the loss constructor.
RESERVED = ("weight", "warmup", "layer", "projection", "projection_dim", "loss_weight")


def parse_method(spec: str) -> List[str]:
    """``"car+lall"`` -> ``["car", "lall"]``; ``"ce"`` -> ``[]``; order kept, ``ce`` dropped.

    >>> parse_method("ce"), parse_method("ce+car"), parse_method(" car + lall ")
    ([], ['car'], ['car', 'lall'])
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"method must be a non-empty string like 'ce' or 'car+lall', got {spec!r}")
    parts = [p.strip().lower() for p in spec.split("+")]
    out: List[str] = []
    for p in parts:
        if p == "ce":
            continue
        if p not in METHODS:
            raise ValueError(f"unknown method {p!r} in {spec!r}; choose from ce, {', '.join(METHODS)} or '+' combinations")
        if p in out:
            raise ValueError(f"method {p!r} appears twice in {spec!r}")
        out.append(p)
    return out


def method_slug(spec: str) -> str:
    """Canonical name of a method (used for run folders): ``"ce+car"`` -> ``"car"``."""
    parts = parse_method(spec)
    return "+".join(parts) if parts else "ce"


def loss_class(name: str) -> type:
    """Import and return the regularizer class of method ``name``."""
    mod, cls = METHODS[name]
    try:
        return getattr(importlib.import_module(mod), cls)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"method {name!r} needs {mod}.{cls}, which cannot be imported: {err}") from err


def _probe_channels(model: nn.Module, layer: str, in_channels: int = 3) -> int:
    """Channels of ``layer``'s output, from one small forward pass in eval mode."""
    from ..hooks import FeatureCapture

    was_training = model.training
    model.eval()
    try:
        with FeatureCapture(model, layer) as cap, torch.no_grad():
            p = next(model.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
            model(torch.zeros(1, in_channels, 64, 64, device=device))
            return int(cap.features[layer].shape[1])
    finally:
        model.train(was_training)


def _accepts(cls: type) -> Tuple[set, bool]:
    sig = inspect.signature(cls.__init__)
    names = {n for n, p in sig.parameters.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    return names, var_kw


def build_criterion(
    spec: str,
    model: nn.Module,
    *,
    num_classes: int,
    ignore_index: int = 255,
    background_index: Optional[int] = None,
    options: Optional[Mapping[str, Mapping[str, Any]]] = None,
    ce_weight: float = 1.0,
    class_weight: Optional[Sequence[float]] = None,
) -> Tuple[RegularizedCriterion, List[str]]:
    """CE + the regularizers of method ``spec`` for ``model`` (a :mod:`pixreg.models` model).

    Args:
        spec: method name (see :func:`parse_method`).
        model: needs ``feature_layer``, ``feature_dim`` and ``classifier_layer`` attributes
            (or ``layer`` in the options, then the width is probed).
        num_classes, ignore_index, background_index: from the dataset.
        options: ``{method: {weight, warmup, layer, projection, projection_dim, **loss_kwargs}}``.
        ce_weight: weight of the cross-entropy.
        class_weight: optional CE class weights, ``num_classes`` numbers.

    Returns:
        ``(criterion, layers)``: the criterion and the feature layers to capture (always
        at least the model's ``feature_layer``, so that hooks can be set up uniformly).
    """
    options = options or {}
    names = parse_method(spec)
    terms: Dict[str, Term] = {}
    default_layer = getattr(model, "feature_layer", None)
    layers: List[str] = [default_layer] if default_layer else []
    for name in names:
        opts = dict(options.get(name) or {})
        cls = loss_class(name)
        weight = float(opts.pop("weight", 1.0))
        warmup = int(opts.pop("warmup", 0))
        layer = opts.pop("layer", None) or default_layer
        projection = opts.pop("projection", None)
        projection_dim = opts.pop("projection_dim", None)
        uses_features = bool(getattr(cls, "uses_features", True))
        if uses_features and not layer:
            raise ValueError(f"method {name!r} needs features: the model has no `feature_layer`; set methods.{name}.layer")
        feat_dim = None
        if uses_features:
            if layer == default_layer and hasattr(model, "feature_dim"):
                feat_dim = int(model.feature_dim)
            else:
                feat_dim = _probe_channels(model, layer, getattr(model, "in_channels", 3))
            if layer not in layers:
                layers.append(layer)
        proj_module = None
        if projection not in (None, False, "none"):
            if not uses_features:
                raise ValueError(f"methods.{name}.projection: {name!r} does not use features")
            if projection not in _PROJECTION_KERNELS:
                raise ValueError(f"methods.{name}.projection must be null, 'conv1x1' or 'conv3x3', got {projection!r}")
            out_dim = int(projection_dim or feat_dim)
            kernel = _PROJECTION_KERNELS[projection]
            proj_module = nn.Conv2d(feat_dim, out_dim, kernel, padding=kernel // 2)
            feat_dim = out_dim
        accepted, var_kw = _accepts(cls)
        unknown = sorted(k for k in opts if k not in accepted and not (k == "loss_weight" and "weight" in accepted))
        if unknown and not var_kw:
            raise ValueError(
                f"methods.{name}: unknown option(s) {unknown}; {cls.__name__} accepts "
                f"{sorted(a for a in accepted if a not in ('num_classes',))} plus {list(RESERVED)}"
            )
        kwargs: Dict[str, Any] = dict(opts)
        if "loss_weight" in kwargs:  # the loss class's own `weight` argument (RCH's lambda, LALL's weight)
            kwargs["weight"] = kwargs.pop("loss_weight")
        if "num_classes" in accepted:
            kwargs.setdefault("num_classes", int(num_classes))
        if "ignore_index" in accepted:
            kwargs.setdefault("ignore_index", int(ignore_index))
        for dim_name in ("feat_dim", "in_channels", "feature_dim"):
            if dim_name in accepted and feat_dim is not None:
                kwargs.setdefault(dim_name, feat_dim)
        if name == "cplus1":
            if "background_index" not in kwargs:
                if background_index is None:
                    raise ValueError(
                        "method 'cplus1' needs a background class, and this dataset has none "
                        "(background_index=None, e.g. CamVid). Set methods.cplus1.background_index "
                        "to the class to treat as background (e.g. --set methods.cplus1.background_index=0), "
                        "or leave cplus1 out."
                    )
                kwargs["background_index"] = int(background_index)
            if kwargs.get("centres") == "classifier" and "classifier" not in kwargs:
                if proj_module is not None:
                    raise ValueError("methods.cplus1: centres='classifier' cannot be combined with a projection")
                if layer != default_layer:
                    raise ValueError("methods.cplus1: centres='classifier' needs the classifier's input layer (model.feature_layer)")
                kwargs["classifier"] = model.get_submodule(model.classifier_layer)
        try:
            loss = cls(**kwargs)
        except TypeError as err:
            raise ValueError(f"methods.{name}: cannot build {cls.__name__}({kwargs}): {err}") from err
        except ValueError as err:  # the constructor's own checks: name the configuration key
            raise ValueError(f"methods.{name}: {err}") from err
        terms[name] = Term(loss, weight=weight, warmup=warmup, layer=layer, projection=proj_module)
    if class_weight is not None and len(class_weight) != num_classes:
        raise ValueError(f"class_weight must have one entry per class ({num_classes}), got {len(class_weight)}")
    criterion = RegularizedCriterion(terms, ce_weight=ce_weight, ignore_index=ignore_index, class_weight=class_weight)
    return criterion, layers
