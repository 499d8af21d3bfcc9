"""PyTorch Lightning with pixreg regularizers.

Needs the optional extra ``pixreg[lightning]`` (the ``lightning`` package; the older
``pytorch_lightning`` package works too). Two forms:

* :class:`PixregMixin`: add it to *your* ``LightningModule`` (before
  ``LightningModule`` in the bases), call ``self.attach_pixreg(criterion)`` in
  ``__init__`` and ``return self.pixreg_loss(logits, labels)`` in ``training_step``. It
  works with ``lightning.pytorch`` and ``pytorch_lightning`` modules alike (it only uses
  ``self.log``);
* :class:`PixregLightningModule`: a ready-made module for a model that maps images to
  logits, built on ``lightning.pytorch`` (or ``pytorch_lightning`` when only that is
  installed).

What the integration guarantees:

* the criterion is a sub-module (``pixreg_criterion``), so its parameters (RCH's head,
  projections, learnable centres) are in ``self.parameters()`` and thus in the
  optimiser that ``configure_optimizers`` builds from them, and its state (centres,
  prototypes, the warm-up step counter) is saved in and restored from Lightning
  checkpoints under ``pixreg_criterion.*``;
* every named term of the criterion (``ce``, ``<name>``, ``<name>/<term>``) and the
  total (``loss``) are logged with ``self.log`` as ``<prefix>/<term>``;
* the model itself is not modified: forward hooks read the feature layer, and
  ``unwrap_pixreg()`` removes them and returns the model with exactly its own
  parameters and outputs.

Warm-ups count criterion calls in training mode (one per ``training_step``), not
optimiser steps; with gradient accumulation, scale ``Term.warmup`` accordingly. The
hooks are closures: use DDP strategies that do not pickle the module (``"ddp"``, not
``"ddp_spawn"``).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError(
            "pixreg.integrations.lightning needs PyTorch Lightning: "
            "install pixreg's 'lightning' extra (pip install -e '.[lightning]' in a checkout) or pip install lightning"
        ) from exc

from ..criterion import RegularizedCriterion, default_logits
from ..hooks import FeatureCapture

__all__ = ["PixregMixin", "PixregLightningModule", "default_logits", "default_batch"]

_IMAGE_KEYS = ("pixel_values", "image", "images", "x", "input")
_LABEL_KEYS = ("labels", "label", "mask", "masks", "y", "target")


def default_batch(batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` from a ``(images, labels, ...)`` sequence or a dict with one of
    the keys ``pixel_values/image/images/x/input`` and ``labels/label/mask/masks/y/target``."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in _IMAGE_KEYS if k in batch), None)
        y = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
        if x is not None and y is not None:
            return x, y
    raise TypeError(
        f"cannot split a batch of type {type(batch).__name__} into (images, labels); pass `batch_fn`"
    )


class PixregMixin:
    """Adds a pixreg criterion to a ``LightningModule``.

    Example (``MyModule`` is your own module; ``self.net`` maps images to logits)::

        class MyModule(PixregMixin, L.LightningModule):
            def __init__(self, net, criterion):
                super().__init__()
                self.net = net
                self.attach_pixreg(criterion, model=net, layers="head")

            def training_step(self, batch, batch_idx):
                x, y = batch
                return self.pixreg_loss(self.net(x), y)

            def configure_optimizers(self):
                return torch.optim.AdamW(self.parameters(), lr=1e-3)  # includes the criterion's
    """

    pixreg_criterion: RegularizedCriterion
    pixreg_capture: Optional[FeatureCapture]

    def attach_pixreg(self, criterion: RegularizedCriterion, layers: Union[str, Sequence[str], None] = None,
                      model: Optional[nn.Module] = None) -> None:
        """Register ``criterion`` as the sub-module ``pixreg_criterion`` and hook ``layers``.

        Args:
            criterion: the :class:`~pixreg.RegularizedCriterion`.
            layers: module name(s) in ``model`` whose output feeds the feature
                regularizers; default ``model.feature_layer`` (pixreg and SegFormer
                models have it). Not needed when no regularizer uses features.
            model: the network to hook; default ``self.model``.
        """
        if not isinstance(criterion, RegularizedCriterion):
            raise TypeError(f"`criterion` must be a pixreg RegularizedCriterion, got {type(criterion).__name__}")
        if model is None:
            model = getattr(self, "model", None)
            if not isinstance(model, nn.Module):
                raise ValueError("`model` not given and this module has no `model` attribute to hook")
        self.pixreg_criterion = criterion
        self._pixreg_model = [model]  # a list: do not register the model a second time
        needs = any(m.uses_features for m in criterion.losses.values())
        if layers is None and needs:
            layers = getattr(model, "feature_layer", None)
            if layers is None:
                raise ValueError("`layers` is needed: name the module whose output holds the pixel features")
        self.pixreg_capture = FeatureCapture(model, layers) if needs else None

    def pixreg_loss(self, logits: torch.Tensor, labels: torch.Tensor, prefix: str = "train",
                    log: bool = True, **log_kwargs: Any) -> torch.Tensor:
        """Evaluate the criterion on ``logits`` and the features captured during the
        forward pass that produced them; log every term as ``<prefix>/<term>`` and the
        total as ``<prefix>/loss``; return the total (to return from ``training_step``).

        ``log_kwargs`` go to ``self.log`` (e.g. ``prog_bar=True``, ``sync_dist=True``).
        Logits at a lower resolution than the labels are upsampled by the criterion.
        """
        capture = self.pixreg_capture
        features = capture.features if capture is not None else None
        if capture is not None and not features:
            raise RuntimeError("no features were captured: run the hooked model's forward before pixreg_loss")
        out = self.pixreg_criterion(logits, labels, features=features)
        if capture is not None:
            capture.clear()  # do not keep this step's graph alive
        if log:
            log_kwargs.setdefault("batch_size", int(labels.shape[0]))
            for name, value in out.terms.items():
                self.log(f"{prefix}/{name}", value, **log_kwargs)  # type: ignore[attr-defined]
            self.log(f"{prefix}/loss", out.total.detach(), **log_kwargs)  # type: ignore[attr-defined]
        return out.total

    def unwrap_pixreg(self) -> nn.Module:
        """Remove the hooks and return the hooked model, as it would be without pixreg."""
        if self.pixreg_capture is not None:
            self.pixreg_capture.remove()
            self.pixreg_capture = None
        return self._pixreg_model[0]


class PixregLightningModule(PixregMixin, pl.LightningModule):
    """A ``LightningModule`` training ``model`` with a pixreg criterion.

    Args:
        model: maps images to logits (a tensor, or an output that ``logits_fn`` reads;
            Hugging Face outputs and torchvision dicts are understood by default).
        criterion: the :class:`~pixreg.RegularizedCriterion`.
        layers: feature layer(s) to hook (default ``model.feature_layer``).
        optimizer: ``params -> torch.optim.Optimizer`` (e.g.
            ``functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9)``); default
            ``AdamW(lr=lr)``. It receives ``self.parameters()``: the model's and the
            criterion's.
        lr: learning rate of the default optimiser.
        logits_fn: model output -> logits (default :func:`default_logits`).
        batch_fn: batch -> ``(images, labels)`` (default :func:`default_batch`).

    ``training_step`` logs ``train/<term>`` and ``train/loss``; ``validation_step`` logs
    ``val/ce`` (mean cross-entropy over valid pixels; the regularizers are not evaluated,
    so their state is untouched). Restore a checkpoint with
    ``PixregLightningModule.load_from_checkpoint(path, model=..., criterion=...)`` (the
    modules are not pickled into it; their weights and state are).
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: RegularizedCriterion,
        layers: Union[str, Sequence[str], None] = None,
        *,
        optimizer: Optional[Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]] = None,
        lr: float = 1e-3,
        logits_fn: Callable[[Any], torch.Tensor] = default_logits,
        batch_fn: Callable[[Any], Tuple[torch.Tensor, torch.Tensor]] = default_batch,
    ) -> None:
        super().__init__()
        self.model = model
        self.attach_pixreg(criterion, layers, model)
        self.optimizer_fn = optimizer
        self.lr = float(lr)
        self.logits_fn = logits_fn
        self.batch_fn = batch_fn

    @property
    def criterion(self) -> RegularizedCriterion:
        return self.pixreg_criterion

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.pixreg_capture is not None:
            self.pixreg_capture.enabled = self.training  # no captures in validation/prediction
        return self.model(*args, **kwargs)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = self.batch_fn(batch)
        return self.pixreg_loss(self.logits_fn(self(x)), y, prefix="train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = self.batch_fn(batch)
        logits = self.logits_fn(self(x))
        if logits.shape[-2:] != y.shape[-2:]:
            logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
        ignore = self.pixreg_criterion.ignore_index
        y = y.long()
        ce_sum = F.cross_entropy(logits.float(), y, ignore_index=ignore, reduction="sum")
        ce = ce_sum / (y != ignore).sum().clamp(min=1)
        self.log("val/ce", ce, batch_size=int(y.shape[0]))
        return ce

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_fn is not None:
            return self.optimizer_fn(self.parameters())
        return torch.optim.AdamW(self.parameters(), lr=self.lr)

    def unwrap(self) -> nn.Module:
        """Same as :meth:`unwrap_pixreg`: hooks removed, the bare model returned."""
        return self.unwrap_pixreg()
