"""Fused Triton kernels of the locally adaptive learning loss (LALL).

Two kernels, both over tiles of ``BLOCK_P`` pixels x all ``K`` channels of one image:

* :func:`_pool_ce_kernel` (forward, and first half of the backward): for every centre
  pixel ``p`` of the tile it loads each same-label window neighbour's logit vector once,
  z-scores it in registers, accumulates ``w * zhat`` (``w = 2^(1 - d8)`` from a small
  host table) and the normaliser ``xi``, then takes the softmax cross-entropy of
  ``v_p = acc / xi`` against ``y_p``. Forward: writes ``L_p`` (``(B, Hc, Wc)``).
  Backward: given ``dL_p``, writes ``g_p = dL_p / xi_p * (softmax(v_p) - onehot(y_p))``
  (``(B, K, Hc, Wc)``).
* :func:`_unpool_kernel` (second half of the backward): for every pixel ``q`` it gathers
  ``sum_p w(p, q) [y_p == y_q] g_p`` from the centres whose window holds ``q`` (the
  adjoint of the pooling, as a gather: no atomics), then applies the z-score backward in
  registers and writes ``dL/dz_q``.

So a forward reads the logits (window neighbours are cache hits) and writes one scalar
per pixel; a backward reads them twice, writes and re-reads one logits-sized buffer and
writes the gradient: a few passes over the logits, no ``s*s`` factor of memory traffic,
and three kernel launches per call. The Minkowski pooling ``(mean_p L_p^k)^(1/k)`` is
left to PyTorch autograd on the ``(B, Hc, Wc)`` tensor of ``L_p``.

Kernels are compiled for CUDA tensors, or run by Triton's interpreter on CPU tensors when
``TRITON_INTERPRET=1`` (set by this module when CUDA is unavailable and Triton not yet
imported): that is how the tests run them in CI.
Only imported when Triton is used (:mod:`pixreg.losses.lall` imports it lazily).
"""
from __future__ import annotations

import os
import sys

import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    # without CUDA, Triton can only run kernels in its interpreter (on CPU tensors)
    os.environ.setdefault("TRITON_INTERPRET", "1")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

__all__ = ["kernels", "lall_ce", "block_sizes"]


def _pool_ce_kernel(
    z_ptr, lab_ptr, w_ptr, grad_ce_ptr, out_ptr,
    K, H, W, HC, WC, ignore_index, eps,
    STRIDE: tl.constexpr, WINDOW: tl.constexpr, XI_WEIGHT_SUM: tl.constexpr, NORMALIZE: tl.constexpr,
    BACKWARD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    in_grid = offs_p < HC * WC
    pi = (offs_p // WC) * STRIDE
    pj = (offs_p % WC) * STRIDE
    lab = lab_ptr + b * H * W
    zb = z_ptr + b * K * H * W
    y = tl.load(lab + pi * W + pj, mask=in_grid, other=ignore_index)
    valid = in_grid & (y != ignore_index)
    acc = tl.zeros([BLOCK_P, BLOCK_K], dtype=z_ptr.dtype.element_ty)
    xi = tl.zeros([BLOCK_P], dtype=z_ptr.dtype.element_ty)
    for t in tl.static_range(WINDOW * WINDOW):
        qi = pi + (t // WINDOW - WINDOW // 2)
        qj = pj + (t % WINDOW - WINDOW // 2)
        inside = valid & (qi >= 0) & (qi < H) & (qj >= 0) & (qj < W)
        same = inside & (tl.load(lab + qi * W + qj, mask=inside, other=ignore_index) == y)
        w = tl.load(w_ptr + t)
        coef = tl.where(same, w, 0.0)
        if XI_WEIGHT_SUM:
            xi += coef
        else:
            xi += same.to(xi.dtype)
        m2 = same[:, None] & kmask[None, :]
        zq = tl.load(zb + offs_k[None, :] * (H * W) + (qi * W + qj)[:, None], mask=m2, other=0.0)
        if NORMALIZE:
            mean = tl.sum(zq, axis=1) / K
            c = tl.where(m2, zq - mean[:, None], 0.0)
            std = tl.sqrt(tl.maximum(tl.sum(c * c, axis=1) / K, eps * eps))
            zq = c / std[:, None]
        acc += coef[:, None] * zq
    xi = tl.where(xi > 0, xi, 1.0)
    v = tl.where(kmask[None, :], acc / xi[:, None], float("-inf"))
    peak = tl.max(v, axis=1)
    e = tl.exp(v - peak[:, None])
    total = tl.sum(e, axis=1)
    onehot = offs_k[None, :] == y[:, None]
    ce = tl.log(total) + peak - tl.sum(tl.where(onehot, v, 0.0), axis=1)
    if BACKWARD:
        dce = tl.load(grad_ce_ptr + b * HC * WC + offs_p, mask=valid, other=0.0)
        g = (e / total[:, None] - onehot.to(e.dtype)) * (dce / xi)[:, None]
        out = out_ptr + b * K * HC * WC + offs_k[None, :] * (HC * WC) + offs_p[:, None]
        tl.store(out, g, mask=in_grid[:, None] & kmask[None, :])
    else:
        tl.store(out_ptr + b * HC * WC + offs_p, tl.where(valid, ce, 0.0), mask=in_grid)


def _unpool_kernel(
    z_ptr, lab_ptr, w_ptr, gacc_ptr, out_ptr,
    K, H, W, HC, WC, ignore_index, eps,
    STRIDE: tl.constexpr, WINDOW: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    offs_q = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    in_img = offs_q < H * W
    qi = offs_q // W
    qj = offs_q % W
    lab = lab_ptr + b * H * W
    y = tl.load(lab + offs_q, mask=in_img, other=ignore_index)
    valid = in_img & (y != ignore_index)
    g = tl.zeros([BLOCK_P, BLOCK_K], dtype=z_ptr.dtype.element_ty)
    gb = gacc_ptr + b * K * HC * WC
    for t in tl.static_range(WINDOW * WINDOW):
        # q = p + offset(t)  <=>  p = q - offset(t); the weight table is symmetric
        pi = qi - (t // WINDOW - WINDOW // 2)
        pj = qj - (t % WINDOW - WINDOW // 2)
        centre = valid & (pi >= 0) & (pi < H) & (pj >= 0) & (pj < W) & (pi % STRIDE == 0) & (pj % STRIDE == 0)
        same = centre & (tl.load(lab + pi * W + pj, mask=centre, other=ignore_index) == y)
        coef = tl.where(same, tl.load(w_ptr + t), 0.0)
        pc = (pi // STRIDE) * WC + pj // STRIDE
        gp = tl.load(gb + offs_k[None, :] * (HC * WC) + pc[:, None], mask=same[:, None] & kmask[None, :], other=0.0)
        g += coef[:, None] * gp
    m2 = valid[:, None] & kmask[None, :]
    if NORMALIZE:
        # zhat = c / std, c = z - mean(z), std = sqrt(max(var, eps^2)), var = mean(c^2)
        zq = tl.load(z_ptr + b * K * H * W + offs_k[None, :] * (H * W) + offs_q[:, None], mask=m2, other=0.0)
        mean = tl.sum(zq, axis=1) / K
        c = tl.where(m2, zq - mean[:, None], 0.0)
        var = tl.sum(c * c, axis=1) / K
        std = tl.sqrt(tl.maximum(var, eps * eps))
        zhat = c / std[:, None]
        through_std = tl.where(var >= eps * eps, tl.sum(g * zhat, axis=1) / K, 0.0)
        gc = tl.where(m2, (g - zhat * through_std[:, None]) / std[:, None], 0.0)
        g = tl.where(m2, gc - (tl.sum(gc, axis=1) / K)[:, None], 0.0)
    out = out_ptr + b * K * H * W + offs_k[None, :] * (H * W) + offs_q[:, None]
    tl.store(out, g, mask=in_img[:, None] & kmask[None, :])


#: Whether Triton runs kernels in its interpreter in this process: decided when Triton was
#: first imported (``TRITON_INTERPRET``), which built ``triton.language`` for one mode; the
#: kernels below are built for the same mode whatever the variable says now.
INTERPRETED = type(tl.sum).__name__ == "InterpretedFunction"


def _build(fn):
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if INTERPRETED else "0"
    try:
        return triton.jit(fn)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


_pool_ce = _build(_pool_ce_kernel)
_unpool = _build(_unpool_kernel)


def kernels(x: torch.Tensor):
    """``(pool_ce, unpool)`` for tensors like ``x``; a clear error where they cannot run."""
    if not x.is_cuda and not INTERPRETED:
        raise RuntimeError(
            "LALL's Triton kernels run on CPU tensors only in Triton's interpreter: set TRITON_INTERPRET=1 "
            "before `triton` is first imported (it is set automatically when CUDA is unavailable), or use "
            "backend='torch'"
        )
    return _pool_ce, _unpool


def block_sizes(k: int) -> tuple[int, int]:
    """``(BLOCK_P, BLOCK_K)``: all channels of a pixel in one program; about 4096 elements per
    tile (16 pixels at K=171, 128 at K=21)."""
    block_k = triton.next_power_of_2(k)
    return max(16, min(128, 4096 // block_k)), block_k


def _weight_table(window: int, exponential: bool, like: torch.Tensor) -> torch.Tensor:
    r = torch.arange(window, dtype=like.dtype) - window // 2
    d8 = torch.maximum(r.abs()[:, None], r.abs()[None, :]).reshape(-1)
    w = torch.exp2(1.0 - d8) if exponential else torch.ones_like(d8)
    return w.to(like.device)


def _launch_args(z, labels, stride):
    batch, k, height, width = z.shape
    hc, wc = -(-height // stride), -(-width // stride)
    return batch, k, height, width, hc, wc


class _LallCE(torch.autograd.Function):
    """Per-centre ``L_p`` (``(B, Hc, Wc)``, 0 at ignored centres) of z-scored, same-label,
    distance-weighted window pooling; backward by :func:`_pool_ce_kernel` (``BACKWARD``)
    then :func:`_unpool_kernel`."""

    @staticmethod
    def forward(ctx, z, labels, ignore_index, window, exponential, xi_weight_sum, normalize, eps, stride):
        batch, k, height, width, hc, wc = _launch_args(z, labels, stride)
        weights = _weight_table(window, exponential, z)
        pool_ce, _ = kernels(z)
        block_p, block_k = block_sizes(k)
        ce = z.new_empty(batch, hc, wc)
        pool_ce[(triton.cdiv(hc * wc, block_p), batch)](
            z, labels, weights, ce, ce, k, height, width, hc, wc, ignore_index, eps,
            STRIDE=stride, WINDOW=window, XI_WEIGHT_SUM=xi_weight_sum, NORMALIZE=normalize, BACKWARD=False,
            BLOCK_P=block_p, BLOCK_K=block_k,
        )
        ctx.save_for_backward(z, labels, weights)
        ctx.hparams = (ignore_index, window, xi_weight_sum, normalize, eps, stride)
        return ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ce):
        z, labels, weights = ctx.saved_tensors
        ignore_index, window, xi_weight_sum, normalize, eps, stride = ctx.hparams
        batch, k, height, width, hc, wc = _launch_args(z, labels, stride)
        pool_ce, unpool = kernels(z)
        block_p, block_k = block_sizes(k)
        gacc = z.new_empty(batch, k, hc, wc)
        pool_ce[(triton.cdiv(hc * wc, block_p), batch)](
            z, labels, weights, grad_ce.contiguous(), gacc, k, height, width, hc, wc, ignore_index, eps,
            STRIDE=stride, WINDOW=window, XI_WEIGHT_SUM=xi_weight_sum, NORMALIZE=normalize, BACKWARD=True,
            BLOCK_P=block_p, BLOCK_K=block_k,
        )
        grad = torch.empty_like(z)
        unpool[(triton.cdiv(height * width, block_p), batch)](
            z, labels, weights, gacc, grad, k, height, width, hc, wc, ignore_index, eps,
            STRIDE=stride, WINDOW=window, NORMALIZE=normalize, BLOCK_P=block_p, BLOCK_K=block_k,
        )
        return grad, None, None, None, None, None, None, None, None


@torch.compiler.disable
def lall_ce(z, labels, ignore_index, window, exponential, xi_weight_sum, normalize, eps, stride):
    """Per-centre cross-entropies ``L_p`` of LALL, ``(B, Hc, Wc)`` (0 at ignored centres),
    differentiable with respect to ``z (B, K, H, W)`` (float32 or float64, at label size).

    ``labels (B, H, W)``; ``stride`` picks the centres ``(i*stride, j*stride)``. Runs the
    Triton kernels (compiled on CUDA, interpreted on CPU). ``torch.compile`` calls it
    eagerly (a graph break), CUDA graphs can capture it (no host synchronisation).

    Example:
        >>> import torch
        >>> z = torch.randn(1, 3, 4, 5, requires_grad=True)
        >>> y = torch.randint(0, 3, (1, 4, 5))
        >>> ce = lall_ce(z, y, 255, 3, True, False, True, 1e-5, 1)  # interpreted on CPU
        >>> ce.shape
        torch.Size([1, 4, 5])
    """
    return _LallCE.apply(z.contiguous(), labels.to(torch.int32).contiguous(), int(ignore_index), int(window),
                         bool(exponential), bool(xi_weight_sum), bool(normalize), float(eps), int(stride))
