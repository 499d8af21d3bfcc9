"""The Hugging Face ``Trainer`` with pixreg regularizers.

Needs the optional extra ``pixreg[segformer]`` (``transformers``, with ``accelerate``,
which the ``Trainer`` requires). :class:`PixregTrainer` is a ``transformers.Trainer``
whose model is a :class:`~pixreg.RegularizedModel` (your Hugging Face segmentation model
plus the criterion, e.g. from :func:`pixreg.integrations.segformer.attach`):

* the loss is computed in the wrapper's ``forward`` (``model(pixel_values=...,
  labels=...)``, cross-entropy + regularizers), so it also runs inside DDP's forward
  when the Trainer is launched with ``torchrun``/``accelerate``; the model's own loss is
  not computed (the labels are not passed to it);
* the criterion is a sub-module of the Trainer's model: its parameters (RCH's head,
  projections, learnable centres) are in the optimiser the Trainer builds, and its
  parameters and buffers (centres, prototypes, the warm-up step counter) are saved in
  every checkpoint (``model.safetensors``, keys ``criterion.*``) and restored by
  ``trainer.train(resume_from_checkpoint=...)``;
* every named term (``ce``, ``<name>``, ``<name>/<term>``) is averaged over the steps
  between two logging steps and logged as ``pixreg/<term>`` next to ``loss``;
* batches are dicts with the model's inputs (e.g. ``pixel_values``) and ``labels``
  ``(B, H, W)``; columns are kept when the model's own ``forward`` accepts them (so
  ``remove_unused_columns`` keeps working).

At the end, ``trainer.model.unwrap()`` gives the plain model back (hooks removed), to
``save_pretrained`` as usual. The criterion's loss is a per-batch mean; with gradient
accumulation the Trainer divides it by the number of accumulation steps.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Optional

import torch

try:
    from transformers import Trainer
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "pixreg.integrations.hf_trainer needs Hugging Face transformers: pip install 'pixreg[segformer]'"
    ) from exc

from ..criterion import RegularizedModel

__all__ = ["PixregTrainer"]


class PixregTrainer(Trainer):
    """``transformers.Trainer`` for a :class:`~pixreg.RegularizedModel`.

    Args:
        model: the wrapped model (``RegularizedModel(hf_model, criterion, layers)``).
        *args, **kwargs: as for ``transformers.Trainer`` (``args``, ``train_dataset``,
            ``data_collator``, ...).
    """

    loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides it under gradient accumulation

    def __init__(self, model: RegularizedModel, *args: Any, **kwargs: Any) -> None:
        if not isinstance(model, RegularizedModel):
            raise TypeError(
                f"`model` must be a pixreg RegularizedModel (e.g. pixreg.integrations.segformer.attach(model, "
                f"criterion)), got {type(model).__name__}"
            )
        super().__init__(model, *args, **kwargs)
        self.model_accepts_loss_kwargs = False  # the wrapper's **kwargs go to the model, not to a loss
        inner = inspect.signature(model.model.forward).parameters
        self._signature_columns = [n for n in inner if n != "labels"] + ["labels", "label", "label_ids"]
        self._pixreg_sums: Dict[str, float] = {}
        self._pixreg_steps = 0

    def compute_loss(self, model: torch.nn.Module, inputs: Dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Optional[Any] = None):
        inputs = dict(inputs)
        if "labels" not in inputs:
            raise KeyError(f"PixregTrainer: the batch has no `labels` (keys: {sorted(inputs)})")
        out = model(labels=inputs.pop("labels"), **inputs)
        if model.training:
            for name, value in out.terms.items():
                self._pixreg_sums[name] = self._pixreg_sums.get(name, 0.0) + float(value)
            self._pixreg_steps += 1
        return (out.total, out.output) if return_outputs else out.total

    def log(self, logs: Dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._pixreg_steps and "loss" in logs:
            logs = {**logs, **{f"pixreg/{k}": v / self._pixreg_steps for k, v in self._pixreg_sums.items()}}
            self._pixreg_sums, self._pixreg_steps = {}, 0
        super().log(logs, *args, **kwargs)
