"""Method registry: ``"ce"``, ``"cplus1"``, ``"car"``, ``"lall"``, ``"rch"`` and ``+`` combinations.

A *method* is cross-entropy plus zero or more regularizers: ``"ce"`` is plain CE,
``"car"`` is CE + CAR, ``"car+lall"`` is CE + CAR + LALL (``"ce+car"`` is the same as
``"car"``). :func:`build_criterion` turns a method name and the per-method options of
the configuration (``methods.<name>``) into a :class:`pixreg.criterion.RegularizedCriterion`,
filling in what the model and dataset determine:

The regularizer classes come from the one registry, :data:`pixreg.losses.registry.REGULARIZERS`:

========  ==========================================================================
name      loss class (module) and what is filled in automatically
========  ==========================================================================
cplus1    ``CPlus1Loss(num_classes, feature_dim, background_index=, ignore_index=)``;
          ``classifier=`` the model's final 1x1 conv when ``centres: classifier``
car       ``CARLoss(num_classes, feature_dim, ignore_index=)``
lall      ``LocallyAdaptiveLoss(num_classes=, ignore_index=)`` (logits only)
rch       ``RCHLoss(num_classes, feature_dim, ignore_index=)``
========  ==========================================================================

Per-method options (``methods.<name>`` in the YAML), the reserved keys :data:`RESERVED`:
``loss_weight`` (the one effective multiplier of the regularizer; default the loss
class's own default: 0.1 for RCH, the paper's lambda, 1 for the others), ``warmup``
(steps during which it is off, default 0), ``layer`` (dotted module name of the feature
layer, default ``model.feature_layer``), ``projection`` (``null``, ``"conv1x1"`` or
``"conv3x3"``: a training-only conv on the features, owned by the criterion) and
``projection_dim`` (its outputs, default the feature width; CAR's paper prefers 1x1 so
that pixels across a boundary are not mixed). Every other key is a keyword argument of
the loss class (checked against its signature). The term is
``Term(loss, loss_weight=<loss_weight>)`` with the loss's own ``loss_weight`` left at 1,
so the resolved ``config.yaml`` says exactly what multiplies each regularizer.

The old key ``weight`` (a second multiplier: ``methods.rch.weight: 1`` meant 0.1) is
accepted for one version with a ``DeprecationWarning`` and folded in by
:func:`resolve_method_options`: ``loss_weight = weight * loss_weight``.

C+1 and datasets without a background class (CamVid): C+1 needs one class to play the
background. If the dataset has none (``background_index is None``), building ``cplus1``
raises ``ValueError`` unless ``methods.cplus1.background_index`` names the class to
treat as background (e.g. ``0`` = Sky on CamVid); that class then gets no centre and is
pushed away from the other classes' centres. Nothing is chosen silently.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..criterion import RegularizedCriterion, Term
from ..losses.registry import REGULARIZERS, regularizer_class

__all__ = [
    "METHODS", "RESERVED", "parse_method", "method_slug", "build_criterion", "loss_class",
    "default_loss_weight", "resolve_method_options",
]

#: Method name -> regularizer class: the one registry, :data:`pixreg.losses.registry.REGULARIZERS`.
METHODS = REGULARIZERS

#: Training-only projections a term can put in front of its loss (CAR's paper compares 1x1 with 3x3).
_PROJECTION_KERNELS = {"conv1x1": 1, "conv3x3": 3}

#: Keys of ``methods.<name>`` that configure the term, not the loss constructor.
RESERVED = ("loss_weight", "warmup", "layer", "projection", "projection_dim")
#: Reserved for one version: the old second multiplier, folded into ``loss_weight``.
DEPRECATED = ("weight",)


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
    """The regularizer class of method ``name``."""
    return regularizer_class(name)


def default_loss_weight(name: str) -> float:
    """The default of the ``loss_weight`` of method ``name``'s class (1 where it has none)."""
    param = inspect.signature(loss_class(name).__init__).parameters.get("loss_weight")
    return 1.0 if param is None or param.default is inspect.Parameter.empty else float(param.default)


def resolve_method_options(name: str, opts: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """``methods.<name>`` with one effective ``loss_weight``: the class's default when absent,
    the deprecated ``weight`` multiplied in (with a ``DeprecationWarning``).

    >>> resolve_method_options("rch", {"warmup": 5})
    {'warmup': 5, 'loss_weight': 0.1}
    """
    out = dict(opts or {})
    loss_weight = out.get("loss_weight", default_loss_weight(name))
    if "weight" in out:
        warnings.warn(
            f"methods.{name}.weight is deprecated: use methods.{name}.loss_weight, the one multiplier "
            f"of the term (weight {out['weight']!r} x loss_weight {loss_weight!r} is used)",
            DeprecationWarning,
            stacklevel=2,
        )
        weight = out.pop("weight")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or isinstance(loss_weight, bool) \
                or not isinstance(loss_weight, (int, float)):
            raise ValueError(f"methods.{name}.weight and .loss_weight must be numbers, got {weight!r}, {loss_weight!r}")
        loss_weight = float(weight) * float(loss_weight)
    out["loss_weight"] = loss_weight
    return out


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
        options: ``{method: {loss_weight, warmup, layer, projection, projection_dim, **loss_kwargs}}``.
        ce_weight: weight of the cross-entropy.
        class_weight: optional CE class weights, ``num_classes`` numbers.

    Returns:
        ``(criterion, layers)``: the criterion and the feature layers to capture (always
        at least the model's ``feature_layer``, so that hooks can be set up uniformly).
    """
    options = options or {}
    terms: Dict[str, Term] = {}
    default_layer = getattr(model, "feature_layer", None)
    layers: List[str] = [default_layer] if default_layer else []
    for name in parse_method(spec):
        terms[name] = _build_term(name, dict(resolve_method_options(name, options.get(name))), model, layers,
                                  num_classes=num_classes, ignore_index=ignore_index, background_index=background_index)
    if class_weight is not None and len(class_weight) != num_classes:
        raise ValueError(f"class_weight must have one entry per class ({num_classes}), got {len(class_weight)}")
    criterion = RegularizedCriterion(terms, ce_weight=ce_weight, ignore_index=ignore_index, class_weight=class_weight)
    return criterion, layers


def _build_term(name: str, opts: Dict[str, Any], model: nn.Module, layers: List[str], *, num_classes: int,
                ignore_index: int, background_index: Optional[int]) -> Term:
    """The :class:`Term` of method ``name`` from its resolved options (``layers`` gets its layer)."""
    cls = loss_class(name)
    loss_weight, warmup = opts.pop("loss_weight"), opts.pop("warmup", 0)
    default_layer = getattr(model, "feature_layer", None)
    layer = opts.pop("layer", None) or default_layer
    projection, projection_dim = opts.pop("projection", None), opts.pop("projection_dim", None)
    feat_dim, proj_module = None, None
    if cls.uses_features:
        if not layer:
            raise ValueError(f"method {name!r} needs features: the model has no `feature_layer`; set methods.{name}.layer")
        feat_dim = _feature_width(model, layer)
        if layer not in layers:
            layers.append(layer)
    if projection not in (None, False, "none"):
        proj_module = _projection(name, projection, projection_dim, feat_dim)
        feat_dim = proj_module.out_channels
    kwargs = _loss_kwargs(name, cls, opts, num_classes=num_classes, ignore_index=ignore_index, feature_dim=feat_dim)
    if name == "cplus1":
        _cplus1_defaults(kwargs, model, background_index, proj_module is not None, layer == default_layer)
    try:
        loss = cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"methods.{name}: cannot build {cls.__name__}({kwargs}): {err}") from err
    except ValueError as err:  # the constructor's own checks: name the configuration key
        raise ValueError(f"methods.{name}: {err}") from err
    try:
        return Term(loss, loss_weight=loss_weight, warmup=warmup, layer=layer, projection=proj_module)
    except (TypeError, ValueError) as err:
        raise ValueError(f"methods.{name}: {err}") from err


def _feature_width(model: nn.Module, layer: str) -> int:
    if layer == getattr(model, "feature_layer", None) and hasattr(model, "feature_dim"):
        return int(model.feature_dim)
    return _probe_channels(model, layer, getattr(model, "in_channels", 3))


def _projection(name: str, projection: Any, projection_dim: Optional[int], feat_dim: Optional[int]) -> nn.Conv2d:
    """The training-only conv ``methods.<name>.projection`` in front of the loss."""
    if feat_dim is None:
        raise ValueError(f"methods.{name}.projection: {name!r} does not use features")
    if projection not in _PROJECTION_KERNELS:
        raise ValueError(f"methods.{name}.projection must be null, 'conv1x1' or 'conv3x3', got {projection!r}")
    kernel = _PROJECTION_KERNELS[projection]
    return nn.Conv2d(feat_dim, int(projection_dim or feat_dim), kernel, padding=kernel // 2)


def _loss_kwargs(name: str, cls: type, opts: Mapping[str, Any], *, num_classes: int, ignore_index: int,
                 feature_dim: Optional[int]) -> Dict[str, Any]:
    """The constructor arguments: the options (checked against the signature) and what the
    model and dataset determine; the loss's own ``loss_weight`` is 1 (the term's is the one)."""
    accepted, var_kw = _accepts(cls)
    own_weight = "loss_weight" in accepted
    accepted -= {"loss_weight", "weight", "feat_dim", "in_channels"}  # the term's, or deprecated
    unknown = sorted(k for k in opts if k not in accepted)
    if unknown and not var_kw:
        raise ValueError(
            f"methods.{name}: unknown option(s) {unknown}; {cls.__name__} accepts "
            f"{sorted(a for a in accepted if a not in ('num_classes',))} plus {list(RESERVED)}"
        )
    kwargs: Dict[str, Any] = dict(opts)
    if own_weight:
        kwargs["loss_weight"] = 1.0
    kwargs.setdefault("num_classes", int(num_classes))
    kwargs.setdefault("ignore_index", int(ignore_index))
    if cls.uses_features:
        kwargs.setdefault("feature_dim", feature_dim)
    return kwargs


def _cplus1_defaults(kwargs: Dict[str, Any], model: nn.Module, background_index: Optional[int],
                     projected: bool, on_feature_layer: bool) -> None:
    """C+1's background class (the dataset's, or refused) and its classifier centres."""
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
        if projected:
            raise ValueError("methods.cplus1: centres='classifier' cannot be combined with a projection")
        if not on_feature_layer:
            raise ValueError("methods.cplus1: centres='classifier' needs the classifier's input layer (model.feature_layer)")
        kwargs["classifier"] = model.get_submodule(model.classifier_layer)
