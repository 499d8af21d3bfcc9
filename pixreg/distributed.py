"""Global ("whole batch across processes") reductions for the regularizers.

Every batch statistic in pixreg (class sums and counts, prototypes' TP means,
FN/FP means, pooled losses) is computed from *sums over pixels* that go through
the two functions below. Without an initialised process group they are the
identity, so single-process code pays nothing; under ``torch.distributed`` they
all-reduce, so the statistic is the one of the global batch.

Gradient convention under DDP
-----------------------------
Sums that depend on features are all-reduced with the differentiable collective
:func:`torch.distributed.nn.functional.all_reduce`. Each rank therefore computes
the *same* global loss value, and the backward pass of the collective sums the
gradient contributions of all ranks. The gradient a rank receives for its own
features is ``world_size`` times the single-process gradient of the global loss;
DDP then averages parameter gradients over ranks, which gives exactly the
single-process gradient (the same convention as cross-entropy averaged by DDP).
Counts and other quantities that carry no gradient (pixel counts, EMA updates of
buffers) are all-reduced without autograd.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "world_size", "all_reduce_sum", "all_reduce_sum_no_grad"]


def is_distributed() -> bool:
    """True when a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Global sum of ``tensor`` over processes, differentiable (identity when not distributed).

    Use it for sums of pixel quantities that carry gradient to features.
    """
    if not is_distributed():
        return tensor
    if not tensor.requires_grad:
        return all_reduce_sum_no_grad(tensor)
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(tensor, op=dist.ReduceOp.SUM)


def all_reduce_sum_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Global sum without autograd (counts, EMA statistics). Returns a new tensor."""
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
