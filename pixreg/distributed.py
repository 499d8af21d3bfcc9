"""Global ("whole batch across processes") reductions for the regularizers.

Every batch statistic in pixreg is computed from *sums over pixels* that go through
:func:`all_reduce_sum` (with gradient) or :func:`all_reduce_sum_no_grad` (without).
Without an initialised process group (or with one process) both are the identity, so
single-process code pays nothing and needs no change; under ``torch.distributed``
they all-reduce, so every statistic is the one of the global batch.

What is synchronised, and how
-----------------------------
With gradient (:func:`torch.distributed.nn.functional.all_reduce`): every sum that is
a function of the features or logits *and* through which the loss is differentiated:

* per-class feature sums behind the batch centres ``mu_k`` of CAR
  (``_common.class_stats``; CAR differentiates through ``mu_k``, paper variant);
* the numerators of every pooled mean of a per-pixel loss (``_common.global_mean``):
  C+1 compact and background terms, CAR intra-c2p / inter-c2p, LALL's mean of
  ``L_p^k`` (before the Minkowski root), RCH's two cross-entropies, and the
  cross-entropy of :class:`pixreg.RegularizedCriterion`;
* RCH's FN/FP set sums for ``sets="batch"`` (the calibration terms ``phi``/``psi``
  are differentiated through the other pixels of the set);
* the channel sums and squared deviations of :class:`GlobalBatchNorm` (RCH's
  ``head_norm`` BatchNorm, and the model's BatchNorm with ``train.sync_bn`` on CPU;
  on CUDA ``train.sync_bn`` uses ``torch.nn.SyncBatchNorm``, which does the same).

The gradient must flow through these because a rank's loss depends on the other
ranks' pixels *through the sum*; an all-reduce without autograd would drop the
cross-rank part of the derivative and give a different gradient than one process.

Without gradient (``dist.all_reduce`` on detached tensors):

* pixel counts (per class, per set, valid pixels, the denominators of every mean),
  which are integers and carry no gradient;
* the per-class sums behind *moving* state -- C+1 moving-average centres, RCH's TP
  means for the prototype EMA, CAR's ``ema_decay`` centres. These are updated under
  ``torch.no_grad`` by design (detached buffers: the loss treats them as constants),
  so a differentiable collective would only cost an autograd node. Because every
  rank applies the same update to the same global sums, the buffers stay identical
  on every process after each step (the tests check this bit for bit).

Not synchronised: RCH ``sets="image"`` (one set per image; an image never spans two
processes) and LALL's per-pixel z-scoring and windows (local to an image).

Gradient convention under DDP
-----------------------------
Each rank computes the *same* global loss value. The backward pass of the
differentiable collective sums the gradient contributions of all ranks, so the
gradient a rank receives for its own features (logits) is ``world_size`` times the
single-process gradient of the global loss; DDP then averages parameter gradients
over ranks, which gives exactly the single-process gradient (the same convention as
a loss averaged by DDP). Parameters outside the model (C+1 learnable centres, the
RCH head, projections) must be averaged the same way: keep the criterion inside the
DDP-wrapped module (``pixreg train`` does) or all-reduce-average their gradients.

Collectives are issued in the same order on every rank, so every rank must call the
criterion every step (also when its own shard has no valid pixel: the loss is then
simply computed from the other ranks' pixels).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "is_distributed", "all_reduce_sum", "all_reduce_sum_no_grad",
    "GlobalBatchNorm", "GlobalBatchNorm1d", "GlobalBatchNorm2d", "GlobalBatchNorm3d", "convert_global_batchnorm",
    "sync_batchnorm",
]


def is_distributed() -> bool:
    """True when a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Global sum of ``tensor`` over processes, differentiable (identity when not distributed).

    Use it for sums of pixel quantities that carry gradient to features.
    """
    if not is_distributed():
        return tensor
    if not tensor.requires_grad:
        return all_reduce_sum_no_grad(tensor)
    from torch.distributed.nn.functional import all_reduce

    # recent torch (2.13 here) marks it deprecated (a FutureWarning per call site) in favour of the
    # private torch.distributed._functional_collectives; it is the public differentiable one.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(tensor, op=dist.ReduceOp.SUM)


def all_reduce_sum_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Global sum without autograd (counts, EMA statistics). Returns a new tensor."""
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, on any device.

    A drop-in for ``nn.BatchNorm1d/2d/3d`` (same parameters, buffers and state-dict
    keys; :class:`GlobalBatchNorm2d` etc. are also instances of those). Without a
    process group, or in eval mode, it *is* ``BatchNorm``. In training under
    ``torch.distributed`` the per-channel mean and (biased) variance are computed
    from all-reduced sums (two-pass: sums, then squared deviations), both with
    gradient (:func:`all_reduce_sum`), so outputs and gradients equal those of one
    process on the whole batch; the running statistics get the same update on every
    rank. ``torch.nn.SyncBatchNorm`` does the same on CUDA but refuses CPU tensors;
    this one also runs with the ``gloo`` backend (CPU training, tests). Cost: two
    differentiable all-reduces of ``C`` (+1) numbers per layer and step.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not (self.training and is_distributed()):
            return super().forward(input)
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        shape = [1, c] + [1] * (x.dim() - 2)
        local = torch.cat([x.sum(dims), x.new_full((1,), float(x.numel() // max(c, 1)))])
        total = all_reduce_sum(local)
        count = total[-1].detach()
        if float(count) <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(input.shape)}")
        mean = total[:-1] / count
        xc = x - mean.view(shape)
        var = all_reduce_sum((xc * xc).sum(dims)) / count  # biased, used to normalise
        y = xc * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                assert self.num_batches_tracked is not None
                self.num_batches_tracked.add_(1)
                f = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                unbiased = var.detach() * (count / (count - 1))
                self.running_mean.mul_(1 - f).add_(mean.detach().to(self.running_mean.dtype), alpha=f)
                self.running_var.mul_(1 - f).add_(unbiased.to(self.running_var.dtype), alpha=f)
        return y.to(input.dtype)


class GlobalBatchNorm1d(nn.BatchNorm1d, GlobalBatchNorm):
    """:class:`GlobalBatchNorm` that is also an ``nn.BatchNorm1d`` (input checks, ``isinstance``)."""


class GlobalBatchNorm2d(nn.BatchNorm2d, GlobalBatchNorm):
    """:class:`GlobalBatchNorm` that is also an ``nn.BatchNorm2d`` (input checks, ``isinstance``)."""


class GlobalBatchNorm3d(nn.BatchNorm3d, GlobalBatchNorm):
    """:class:`GlobalBatchNorm` that is also an ``nn.BatchNorm3d`` (input checks, ``isinstance``)."""


_GLOBAL_BN = ((nn.BatchNorm1d, GlobalBatchNorm1d), (nn.BatchNorm2d, GlobalBatchNorm2d), (nn.BatchNorm3d, GlobalBatchNorm3d))


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm1d/2d/3d`` in ``module`` by a :class:`GlobalBatchNorm`
    with the same parameters and buffers (in place for children; returns the module,
    or its replacement when ``module`` itself is a BatchNorm). ``SyncBatchNorm`` and
    ``GlobalBatchNorm`` layers are left as they are."""
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, (GlobalBatchNorm, nn.SyncBatchNorm)):
        cls = next((g for b, g in _GLOBAL_BN if isinstance(module, b)), GlobalBatchNorm)
        out = cls(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            out.weight = module.weight
            out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        new: Optional[nn.Module] = convert_global_batchnorm(child)
        if new is not child:
            out.add_module(name, new)
    return out


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with global-batch BatchNorm: the one place where the kind is chosen.

    On CUDA ``torch.nn.SyncBatchNorm`` (NCCL kernels); on any other device pixreg's
    :class:`GlobalBatchNorm` (``SyncBatchNorm`` refuses CPU tensors). Both give the
    statistics of the global batch, with gradient, under ``torch.distributed``; without a
    process group both behave as ``BatchNorm``.
    """
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return convert_global_batchnorm(module)
