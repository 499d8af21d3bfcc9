"""Cross-entropy plus any set of regularizers, and a wrapper that attaches it to a model.

>>> import torch, pixreg
>>> from torch import nn
>>> model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 1))
>>> criterion = pixreg.RegularizedCriterion({
...     "car": pixreg.Term(pixreg.CARLoss(num_classes=4), loss_weight=1.0, warmup=0),
...     "lall": pixreg.Term(pixreg.LocallyAdaptiveLoss(), loss_weight=1.0),
... })
>>> wrapped = pixreg.RegularizedModel(model, criterion, layers="1")
>>> x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 4, (2, 8, 8))
>>> out = wrapped.loss(wrapped(x), y)
>>> sorted(out.terms)[:3], out.total.ndim
(['car', 'car/inter_c2c', 'car/inter_c2p'], 0)
>>> inference_model = wrapped.unwrap()      # the original model, hooks removed
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_reduce_sum, all_reduce_sum_no_grad
from .hooks import FeatureCapture
from .losses._common import (
    check_floating, check_int, check_labels, check_real, check_same_device, renamed, to_parameter_dtype,
)
from .losses.base import Regularizer

__all__ = ["Term", "CriterionOutput", "ModelLossOutput", "RegularizedCriterion", "RegularizedModel", "default_logits"]


@dataclass(init=False)
class Term:
    """One regularizer in a :class:`RegularizedCriterion`.

    Args:
        loss: the regularizer module.
        loss_weight: multiplies the regularizer's loss (which already includes its own term
            weights): a finite number >= 0. ``weight``, its old name, is accepted for one
            version with a ``DeprecationWarning`` (renamed so that it cannot be taken for
            torch's per-class ``weight`` tensor; mmsegmentation's name).
        warmup: number of training steps (criterion calls in training mode) during which
            the term is off: not computed, state not updated, reported as 0 (an int >= 0).
            Its parameters (RCH's head, learnable centres, the projection) still enter the
            total with a zero-valued contribution (``0 * sum(p)``), so they get a zero
            gradient every step and DDP's reducer sees every parameter used (any
            ``find_unused_parameters``).
        layer: which captured feature layer feeds it (default: the only one, or the
            tensor passed as ``features``).
        projection: optional training-only module applied to the features first (e.g. a
            1x1 conv for CAR or C+1); it belongs to the criterion, not to the model.

    >>> import pixreg
    >>> pixreg.Term(pixreg.CARLoss(4), loss_weight=0.5).loss_weight
    0.5
    """

    loss: Regularizer
    loss_weight: float
    warmup: int
    layer: Optional[str]
    projection: Optional[nn.Module]

    def __init__(
        self,
        loss: Regularizer,
        loss_weight: float = 1.0,
        warmup: int = 0,
        layer: Optional[str] = None,
        projection: Optional[nn.Module] = None,
        *,
        weight: Optional[float] = None,
    ) -> None:
        loss_weight = renamed("Term", "weight", weight, "loss_weight", loss_weight, 1.0)
        self.loss = loss
        self.loss_weight = check_real("loss_weight", loss_weight, lo=0.0)
        self.warmup = check_int("warmup", warmup, lo=0)
        self.layer = layer
        self.projection = projection

    @property
    def weight(self) -> float:
        """Deprecated alias of :attr:`loss_weight` (read-only)."""
        warnings.warn("Term.weight is deprecated; use Term.loss_weight", DeprecationWarning, stacklevel=2)
        return self.loss_weight


class CriterionOutput(NamedTuple):
    """``total``: scalar to backpropagate. ``terms``: detached scalars for logging:
    ``"ce"``, ``"<name>"`` (weighted regularizer total) and ``"<name>/<term>"``."""

    total: torch.Tensor
    terms: Dict[str, torch.Tensor]


class RegularizedCriterion(nn.Module):
    """``total = ce_weight * CE(logits, labels) + sum_r loss_weight_r * L_r``.

    Args:
        regularizers: name -> :class:`Term` (or a bare regularizer, weight 1, no warm-up).
        ce_weight: weight of the cross-entropy (0 switches it off).
        ignore_index: label value ignored by CE and by every regularizer.
        class_weight: optional ``(K,)`` CE class weights.

    ``forward(logits, labels, features=None)``: logits ``(B, K, H, W)``; labels
    ``(B, H', W')`` (logits are bilinearly upsampled to the label size if they differ);
    features a tensor or a dict ``{layer: tensor}`` (as :class:`FeatureCapture` gives).
    The step counter (a buffer, saved in ``state_dict``) advances on every call in
    training mode and drives the warm-ups. Learnable parts (projections, RCH's head,
    learnable centres) are parameters of this module: give them to the optimiser.
    """

    def __init__(
        self,
        regularizers: Optional[Mapping[str, Union[Term, Regularizer]]] = None,
        *,
        ce_weight: float = 1.0,
        ignore_index: int = 255,
        class_weight: Optional[torch.Tensor] = None,
    ) -> None:
        super().__init__()
        self.ce_weight = check_real("ce_weight", ce_weight, lo=0.0)
        self.ignore_index = check_int("ignore_index", ignore_index)
        self.specs: Dict[str, Term] = {}
        self.losses = nn.ModuleDict()
        self.projections = nn.ModuleDict()
        for name, spec in (regularizers or {}).items():
            if "/" in name or "." in name:
                raise ValueError(f"`regularizers`: name {name!r} must not contain '/' or '.'")
            if isinstance(spec, Regularizer):
                spec = Term(spec)
            if not isinstance(spec, Term) or not isinstance(spec.loss, Regularizer):
                raise TypeError(f"`regularizers[{name!r}]` must be a pixreg Term or regularizer, got {type(spec).__name__}")
            if getattr(spec.loss, "ignore_index", self.ignore_index) != self.ignore_index:
                raise ValueError(
                    f"`regularizers[{name!r}]` has ignore_index={spec.loss.ignore_index}, "
                    f"the criterion has {self.ignore_index}"
                )
            self.specs[name] = spec
            self.losses[name] = spec.loss
            if spec.projection is not None:
                self.projections[name] = spec.projection
        self.register_buffer("class_weight", None if class_weight is None else self._check_class_weight(class_weight))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        # host copy of `step` for the warm-ups: read once (after construction or loading),
        # then counted here, so that a step makes no device-to-host copy (CUDA graphs)
        self._host_step: Optional[int] = None
        self.register_load_state_dict_post_hook(_forget_host_step)

    def _warmup_step(self) -> Optional[int]:
        """The step number while some term is still warming up, else None."""
        last = max((spec.warmup for spec in self.specs.values()), default=0)
        if self._host_step is None:
            self._host_step = int(self.step) if last > 0 else 0
        return self._host_step if self._host_step < last else None

    def _check_class_weight(self, class_weight) -> torch.Tensor:
        """``(K,)`` float32 weights: finite, >= 0, not all 0, and one per class of the regularizers."""
        w = torch.as_tensor(class_weight, dtype=torch.float32)
        if w.dim() != 1 or w.numel() == 0:
            raise ValueError(f"`class_weight` must be a 1-D sequence with one weight per class, got shape {tuple(w.shape)}")
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not bool((w > 0).any()):
            raise ValueError(f"`class_weight` must be finite, >= 0 and not all 0, got {w.tolist()}")
        for name, loss in self.losses.items():
            k = getattr(loss, "num_classes", None)
            if k is not None and int(k) != w.numel():
                raise ValueError(f"`class_weight` has {w.numel()} entries but regularizer {name!r} has num_classes={k}")
        return w

    def _features_for(self, name: str, spec: Term, features) -> torch.Tensor:
        if isinstance(features, torch.Tensor):
            feats = features
        elif isinstance(features, Mapping) and features:
            key = spec.layer
            if key is None:
                if len(features) != 1:
                    raise ValueError(
                        f"`features` holds layers {list(features)}; set Term(layer=...) for regularizer {name!r}"
                    )
                key = next(iter(features))
            if key not in features:
                raise ValueError(f"`features` has no layer {key!r} for regularizer {name!r} (has {list(features)})")
            feats = features[key]
        else:
            raise ValueError(f"regularizer {name!r} needs `features` (a tensor or a dict of captured layers)")
        if name in self.projections:
            feats = self.projections[name](to_parameter_dtype(feats, self.projections[name]))
        return feats

    def _untouched_parameters(self, name: str) -> torch.Tensor:
        """``0 * sum(p)`` over the trainable parameters of a term that is off (warm-up): a
        zero value whose gradient is zero, so that every parameter takes part in every
        backward pass (DDP with ``find_unused_parameters=False`` requires it) and the
        optimiser treats them the same on every step and in every process."""
        params = [p for mod in (self.losses[name], self.projections[name] if name in self.projections else None)
                  if mod is not None for p in mod.parameters() if p.requires_grad]
        if not params or not torch.is_grad_enabled():
            return torch.zeros(())
        return 0.0 * torch.stack([p.sum().float() for p in params]).sum()

    def _cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean CE over valid pixels (weighted mean with class weights); 0 when all are ignored.

        Under ``torch.distributed`` the mean is over the global batch (sum all-reduced
        with gradient, pixel count / weight sum without), like the regularizers: with
        DDP's gradient averaging this equals one process on the whole batch even when
        the ranks have different numbers of ignored pixels.
        """
        labels = labels.long()
        valid = labels != self.ignore_index
        z = logits if logits.dtype == torch.float64 else logits.float()  # float32 at least (AMP)
        w = None if self.class_weight is None else self.class_weight.to(device=z.device, dtype=z.dtype)
        total = F.cross_entropy(z, labels, weight=w, ignore_index=self.ignore_index, reduction="sum")
        if w is None:
            denom = valid.sum()
        else:
            denom = torch.where(valid, w[labels.clamp(0, w.numel() - 1)], w.new_zeros(())).sum()
        total = all_reduce_sum(total)
        denom = all_reduce_sum_no_grad(denom.to(total.dtype))
        return total / denom.clamp(min=1e-12) if w is not None else total / denom.clamp(min=1)

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        features: Union[torch.Tensor, Mapping[str, torch.Tensor], None] = None,
    ) -> CriterionOutput:
        check_floating("logits", logits, (4,))
        check_labels(labels, logits.shape[1], self.ignore_index)
        if labels.dim() != 3 or labels.shape[0] != logits.shape[0]:
            raise ValueError(f"`labels` must be (B, H, W) with B={logits.shape[0]}, got {tuple(labels.shape)}")
        check_same_device(logits=logits, labels=labels)
        if self.class_weight is not None and self.class_weight.numel() != logits.shape[1]:
            raise ValueError(f"`class_weight` has {self.class_weight.numel()} entries, `logits` have K={logits.shape[1]} classes")
        if tuple(logits.shape[-2:]) != tuple(labels.shape[-2:]):
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        step = self._warmup_step()
        if self.training:
            self.step += 1
            if step is not None:
                self._host_step = step + 1
        # Evaluation order is chosen for memory (autograd runs the most recently created nodes
        # first). A regularizer whose backward makes a logits-sized gradient (LALL) is
        # evaluated before CE, so that CE's backward (whose log-softmax output and gradients
        # are logits-sized) completes and frees its buffers first; the other order holds both
        # at once, a whole extra (B, K, H, W) tensor at the peak. The others are evaluated
        # after CE, so that their backward runs, and frees what they saved, before CE's peak.
        # The sum below keeps the order CE, then the regularizers, whatever the evaluation order.
        reg_values: Dict[str, torch.Tensor] = {}
        reg_terms: Dict[str, Dict[str, torch.Tensor]] = {}

        def evaluate(name: str) -> None:
            spec, loss_mod = self.specs[name], self.losses[name]
            if self.training and step is not None and step < spec.warmup:
                return
            feats = self._features_for(name, spec, features) if loss_mod.uses_features else None
            reg_values[name] = spec.loss_weight * loss_mod.compute(labels, features=feats, logits=logits)
            reg_terms[name] = {
                f"{name}/{tname}": (spec.loss_weight * tval).detach() for tname, tval in loss_mod.terms.items()
            }

        before_ce = [n for n in self.specs if getattr(self.losses[n], "logits_gradient", False)]
        for name in before_ce:
            evaluate(name)
        terms: Dict[str, torch.Tensor] = {}
        total = logits.new_zeros(())
        if self.ce_weight:
            ce = self._cross_entropy(logits, labels)
            total = total + self.ce_weight * ce
            terms["ce"] = ce.detach()
        for name in self.specs:
            if name not in before_ce:
                evaluate(name)
        for name in self.specs:
            if name not in reg_values:  # still warming up
                total = total + self._untouched_parameters(name)
                terms[name] = total.new_zeros(()).detach()
                continue
            total = total + reg_values[name]
            terms[name] = reg_values[name].detach()
            terms.update(reg_terms[name])
        return CriterionOutput(total, terms)


def _forget_host_step(module: RegularizedCriterion, incompatible_keys) -> None:
    module._host_step = None  # re-read from the loaded `step` buffer at the next call


def default_logits(output: Any) -> torch.Tensor:
    """The logits in a model's output: a tensor itself, ``output.logits`` (Hugging Face
    ``ModelOutput``), ``output["out"]`` (torchvision segmentation models) or the first
    element of a tuple/list (smp models with ``aux_params``: ``(masks, labels)``)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("out"), torch.Tensor):
        return output["out"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"cannot find logits in a model output of type {type(output).__name__}; pass `logits_fn`"
    )


class ModelLossOutput(NamedTuple):
    """What ``RegularizedModel(images, labels)`` returns: ``total`` (scalar to
    backpropagate) and ``terms`` as in :class:`CriterionOutput`, and ``output``, the
    model's own output (logits, or e.g. a Hugging Face ``ModelOutput``), for metrics."""

    total: torch.Tensor
    terms: Dict[str, torch.Tensor]
    output: Any


class RegularizedModel(nn.Module):
    """A model plus a criterion fed by hooks on the model's layers.

    Args:
        model: the segmentation network.
        criterion: the :class:`RegularizedCriterion`.
        layers: module name(s) in ``model`` whose output feeds the feature regularizers.
        logits_fn: model output -> logits ``(B, K, h, w)`` (default :func:`default_logits`:
            a tensor, ``.logits``, ``["out"]`` or the first element of a tuple).

    ``forward(images, labels=None, **kwargs)``:

    * without ``labels``: the model's own forward, ``model(images, **kwargs)`` (same
      output); the hooks record the features of ``layers``, and
      ``loss(logits, labels)`` evaluates the criterion on them afterwards;
    * with ``labels``: forward *and* criterion in one call, returning a
      :class:`ModelLossOutput` ``(total, terms, output)``. This is the form to use under
      ``DistributedDataParallel``: the whole loss (and so every criterion parameter) is
      computed inside the wrapped module's ``forward``, which DDP needs with
      ``find_unused_parameters=True``; with ``False`` it also works, because terms that
      are still warming up touch their parameters with a zero contribution.
      ``kwargs`` go to the model (e.g. ``pixel_values=`` for Hugging Face models,
      then ``images`` may be omitted).

    ``unwrap()`` removes the hooks and returns the original model, which then has
    exactly the parameters and outputs it would have had without pixreg. Training-only
    heads live in ``criterion`` and are not part of the returned model.

    >>> import torch, pixreg
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    >>> crit = pixreg.RegularizedCriterion({"rch": pixreg.Term(pixreg.RCHLoss(4, 8), warmup=2)})
    >>> wrapped = pixreg.RegularizedModel(net, crit, layers="1")
    >>> out = wrapped(torch.randn(2, 3, 8, 8), torch.randint(0, 4, (2, 8, 8)))
    >>> out.total.backward()          # the RCH head gets a zero gradient during its warm-up
    >>> float(out.terms["rch"]), tuple(out.output.shape)
    (0.0, (2, 4, 8, 8))
    """

    def __init__(self, model: nn.Module, criterion: RegularizedCriterion, layers: Union[str, Sequence[str]],
                 logits_fn: Callable[[Any], torch.Tensor] = default_logits) -> None:
        super().__init__()
        if not isinstance(criterion, RegularizedCriterion):
            raise TypeError(f"`criterion` must be a pixreg RegularizedCriterion, got {type(criterion).__name__}")
        self.model = model
        self.criterion = criterion
        self.capture = FeatureCapture(model, layers)
        self.logits_fn = logits_fn

    def forward(self, images: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None, **kwargs: Any):
        output = self.model(**kwargs) if images is None else self.model(images, **kwargs)
        if labels is None:
            return output
        try:
            out = self.loss(self.logits_fn(output), labels)
        finally:
            self.capture.clear()  # do not keep this step's graph alive
        return ModelLossOutput(out.total, out.terms, output)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> CriterionOutput:
        needs = any(m.uses_features for m in self.criterion.losses.values())
        return self.criterion(logits, labels, features=self.capture.features if needs else None)

    def unwrap(self) -> nn.Module:
        self.capture.remove()
        return self.model
