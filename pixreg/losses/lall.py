"""Locally adaptive learning loss (LALL) on segmentation logits.

For every valid centre pixel ``p`` (label ``y_p != ignore_index``, on the stride grid),
the z-scored logit vectors of the pixels ``q`` of the ``s x s`` window around ``p`` that
carry the same label are pooled with chessboard-distance weights, and the pooled vector
is scored by softmax cross-entropy against ``y_p``:

.. math::

    \\hat z_q = (z_q - \\mathrm{mean}_K(z_q)) / \\max(\\mathrm{std}_K(z_q), \\varepsilon)

    v_p = \\frac{1}{\\xi_p} \\sum_{q \\in N_s(p),\\, y_q = y_p} w(p, q)\\, \\hat z_q,
    \\qquad w(p, q) = 2^{1 - d_8(p, q)}

    L_p = -\\log \\mathrm{softmax}(v_p)_{y_p}

    L = \\Big( \\frac{1}{|P|} \\sum_{p \\in P} L_p^k \\Big)^{1/k}

with ``xi_p`` the number of same-label pixels in the window (centre included; the
paper's reading) or, optionally, the sum of their weights; ``P`` the valid centre
pixels of the whole (global) batch; ``k`` the Minkowski power (3 in the paper).

The pooled vectors are built from shifted views of the normalised logits (one in-place
multiply-add per window offset), never from an unfolded ``(B, K*s*s, H*W)`` tensor, a
group of images at a time (one on CPU; on CUDA as many as fit in about one logits
tensor of working memory) in three reused buffers; on CPU the offsets loop over chunks
of channels small enough to stay in cache. The backward pass is written by hand
(:class:`_PooledNumerator`): nothing but the inputs is kept for it (each image's pool is
recomputed), and no autograd graph is recorded over the ``s*s`` offsets. No host
synchronisation; runs under ``torch.compile`` without graph breaks.

On CUDA with Triton installed (``backend="auto"``), fused kernels replace all of this
(:mod:`pixreg.kernels.lall_triton`: one kernel forward, two backward, a few passes over the
logits); ``torch.compile`` calls them eagerly (a graph break), CUDA graphs capture them.
Their GPU speed has not been measured yet (``benchmarks/cuda_grid.sh``).

Cost: forward + backward is about ``3 * s*s`` multiply-adds per logit plus a z-score and
a softmax cross-entropy, so LALL costs a few cross-entropies' worth of time; see
``benchmarks/results/losses_cpu.md`` for measured numbers.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._common import (
    check_choice,
    check_floating,
    check_ignore_index,
    check_int,
    check_labels,
    check_real,
    check_same_device,
    compute_dtype,
    global_mean,
    no_autocast,
    renamed,
)
from .base import LossOutput, Regularizer

__all__ = ["locally_adaptive_loss", "LocallyAdaptiveLoss"]

_DISTANCE_WEIGHTS = ("exponential", "uniform")
_NORMALIZE = ("zscore", None)
_XI = ("count", "weight_sum")
_BACKENDS = ("auto", "triton", "torch")


def _triton_available() -> bool:
    """Whether Triton is installed (not imported here: see :mod:`pixreg.kernels.lall_triton` for why)."""
    return importlib.util.find_spec("triton") is not None


def _resolve_backend(backend: str, z: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"`` for ``backend`` (checked by :func:`_check_hparams`) and logits ``z``."""
    if backend == "auto":
        return "triton" if z.is_cuda and _triton_available() else "torch"
    if backend == "triton" and not _triton_available():
        raise ImportError("backend='triton' needs the `triton` package (pip install 'pixreg[triton]')")
    return backend


def _check_hparams(
    window: int,
    distance_weights: str,
    normalize: Optional[str],
    power: float,
    stride: int,
    xi: str,
    eps: float,
    loss_weight: float,
    backend: str = "auto",
) -> None:
    check_choice("backend", backend, _BACKENDS)
    check_int("window", window, lo=1)
    if window % 2 == 0:
        raise ValueError(f"`window` must be a positive odd int, got {window!r}")
    check_choice("distance_weights", distance_weights, _DISTANCE_WEIGHTS)
    check_choice("normalize", normalize, _NORMALIZE)
    check_real("power", power, lo=1.0)  # the Minkowski exponent k
    check_int("stride", stride, lo=1)
    check_choice("xi", xi, _XI)
    check_real("eps", eps, lo=0.0, lo_open=True)
    check_real("loss_weight", loss_weight, lo=0.0)


def _offset_slices(size: int, d: int, stride: int) -> Optional[tuple[slice, slice]]:
    """Slices pairing centres (on the stride grid, in grid coordinates) with neighbours at offset ``d``.

    Centre grid index ``c`` is pixel ``c * stride``; its neighbour is pixel ``c * stride + d``.
    Both must lie in ``0..size-1``. Returns ``(centre_slice, neighbour_slice)`` or None when empty.
    """
    n_centres = -(-size // stride)
    lo = -(-max(0, -d) // stride)  # first c with c*stride + d >= 0
    hi = min(n_centres, (size - 1 - d) // stride + 1) if size - 1 - d >= 0 else 0  # c*stride + d <= size-1
    if hi <= lo:
        return None
    return slice(lo, hi), slice(lo * stride + d, (hi - 1) * stride + d + 1, stride)


def _window_offsets(
    height: int, width: int, window: int, stride: int, exponential: bool, xi_weight_sum: bool
) -> list[tuple[slice, slice, slice, slice, float, float, int, int]]:
    """The in-image window offsets: ``(centre_rows, centre_cols, nb_rows, nb_cols, w, xi_w, di, dj)``."""
    radius = window // 2
    out = []
    for di in range(-radius, radius + 1):
        rows = _offset_slices(height, di, stride)
        if rows is None:
            continue
        for dj in range(-radius, radius + 1):
            cols = _offset_slices(width, dj, stride)
            if cols is None:
                continue
            w = 2.0 ** (1 - max(abs(di), abs(dj))) if exponential else 1.0
            out.append((rows[0], cols[0], rows[1], cols[1], w, w if xi_weight_sum else 1.0, di, dj))
    # by decreasing weight, so that equal weights are contiguous (see _group_setup)
    return sorted(out, key=lambda o: -o[4])


def _group_setup(labels: torch.Tensor, ignore_index: int, offsets, radius: int, stride: int, xi_weight_sum: bool,
                 dtype: torch.dtype):
    """Pooling set-up of a group of images ``labels (g, H, W)``, all offsets at once (a few
    kernels, whatever the window):

    * ``coefs (n_offsets, g, 1, Hc, Wc)``: ``w * [y_q == y_p, p valid]`` for centre ``p`` and
      neighbour ``q = p + offset`` (0 where ``q`` is outside the image: the labels are padded
      with ``ignore_index``, which a valid centre never carries);
    * ``xi (g, Hc, Wc)``: count (or weight sum) of the pooled pixels, at least 1;
    * ``valid``, ``target (g, Hc, Wc)``: centre mask and centre labels (0 where ignored).
    """
    centre = labels[..., ::stride, ::stride]
    hc, wc = centre.shape[-2:]
    valid = centre != ignore_index
    padded = F.pad(labels, (radius,) * 4, value=ignore_index)
    span_h, span_w = (hc - 1) * stride + 1, (wc - 1) * stride + 1
    neighbours = torch.stack([
        padded[..., radius + o[6]:radius + o[6] + span_h:stride, radius + o[7]:radius + o[7] + span_w:stride]
        for o in offsets])  # (n_offsets, g, Hc, Wc)
    same = (neighbours == centre) & valid
    del neighbours
    coefs = same.to(dtype)
    start = 0
    for end in range(1, len(offsets) + 1):  # one multiply per run of equal weights (scalars: no host copy)
        if end == len(offsets) or offsets[end][4] != offsets[start][4]:
            if offsets[start][4] != 1.0:
                coefs[start:end].mul_(offsets[start][4])
            start = end
    xi = coefs.sum(0) if xi_weight_sum else same.sum(0).to(dtype)  # xi weights equal the pooling weights
    xi = torch.where(xi > 0, xi, torch.ones_like(xi))
    target = torch.where(valid, centre, torch.zeros_like(centre)).long()
    return coefs.unsqueeze(2), xi, valid, target


def _group_size(z: torch.Tensor, n_offsets: int) -> int:
    """Images pooled together. CPU: one (its buffers stay cache-sized and nothing is gained
    by batching). CUDA: as many as keep the working memory (3 ``(K, H, W)`` buffers and
    ``n_offsets`` coefficient maps per image) within about one logits tensor, since kernel
    launches, not arithmetic, bound a per-image loop there."""
    b, k = z.shape[:2]
    if not z.is_cuda:
        return 1
    return max(1, min(b, int(b // (3 + n_offsets / k))))


def _zscore_into(out: torch.Tensor, scratch: torch.Tensor, zg: torch.Tensor, ignored: torch.Tensor,
                 normalize: bool, eps: float):
    """z-score over the class axis (-3) of a group of images ``(g, K, H, W)`` written into
    ``out`` (``scratch``, the same shape, is clobbered), ignored pixels set to 0 (they never
    pool). Returns ``(std, var)`` (``(g, 1, H, W)``, ``std`` infinite at ignored pixels; None
    without z-score)."""
    if not normalize:
        return torch.where(ignored, zg.new_zeros(()), zg, out=out), None, None
    torch.sub(zg, zg.mean(dim=-3, keepdim=True), out=out)
    var = torch.mul(out, out, out=scratch).mean(dim=-3, keepdim=True)  # population variance
    # dividing by an infinite std zeroes the ignored pixels in the same pass (logits are finite)
    std = torch.where(ignored, torch.full_like(var, math.inf), var.clamp_min(eps * eps).sqrt())
    return out.div_(std), std, var


#: Bytes of one channel chunk of the pooling loops: small enough for the chunk of the
#: source and of the accumulator to stay in the CPU's cache across the ``s*s`` offsets
#: (measured 2.1x faster than whole-image passes at K=171, 256x256, one thread).
_CHUNK_BYTES = 4 << 20


def _channel_chunks(x: torch.Tensor) -> tuple[range, int]:
    """Channel ranges of the pooling loops of ``x (g, K, H, W)``: cache-sized on CPU, all of
    ``K`` on CUDA (fewer kernel launches)."""
    k = x.shape[-3]
    per_channel = x.shape[0] * x.shape[-2] * x.shape[-1] * x.element_size()
    step = k if x.is_cuda else max(1, _CHUNK_BYTES // max(per_channel, 1))
    return range(0, k, step), step


def _pool_into(acc: torch.Tensor, x: torch.Tensor, coefs: torch.Tensor, offsets, transpose: bool = False
               ) -> torch.Tensor:
    """``acc (g, K, Hc, Wc) = sum_offsets coef * shifted x``: the (unnormalised) pooled
    vectors of a group of images (``coefs`` from :func:`_group_setup`), accumulated in place
    from shifted views of ``x (g, K, H, W)``, a chunk of channels at a time.
    ``transpose=True`` applies the adjoint (``acc (g, K, H, W)``, ``x (g, K, Hc, Wc)``): the
    backward pass of the pooling."""
    acc.zero_()
    starts, step = _channel_chunks(acc)
    for k0 in starts:
        a, xs = acc[:, k0:k0 + step], x[:, k0:k0 + step]
        for coef, (cr, cc, nr, nc) in zip(coefs, (o[:4] for o in offsets)):
            if transpose:
                a[..., nr, nc].addcmul_(xs[..., cr, cc], coef[..., cr, cc])
            else:
                a[..., cr, cc].addcmul_(xs[..., nr, nc], coef[..., cr, cc])
    return acc


def _lse_into(scratch: torch.Tensor, acc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``logsumexp`` of ``acc (g, K, Hc, Wc)`` over the class axis and the sum it is the log
    of, ``sum_k exp(acc - max)`` (both ``(g, Hc, Wc)``); leaves ``exp(acc - max)`` in
    ``scratch`` (the shape of ``acc``), so that the softmax is ``scratch / sum``. Faster on
    CPU than ``torch.logsumexp`` over a non-innermost axis, and allocates no full-size
    temporary."""
    peak = acc.amax(dim=-3)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    torch.sub(acc, peak.unsqueeze(-3), out=scratch).exp_()
    total = scratch.sum(dim=-3)
    return total.log().add_(peak), total


def _lall_pass(z, labels, hparams, grad_numerator=None):
    """``sum_p L_p^power`` over the valid centres of ``z`` and, given the upstream gradient
    ``grad_numerator`` (a scalar), the gradient with respect to ``z``.

    A group of images at a time (:func:`_group_size`), in three preallocated scratch
    buffers reused across the groups with in-place operations: fresh multi-megabyte tensors
    per operation would each be mapped and page-faulted by the allocator, which on CPU cost
    more than the arithmetic.
    """
    ignore_index, window, exponential, xi_weight_sum, normalize, eps, stride, power = hparams
    batch, k = z.shape[:2]
    height, width = labels.shape[-2:]
    offsets = _window_offsets(height, width, window, stride, exponential, xi_weight_sum)
    if -(1 << 15) <= ignore_index < (1 << 15) and k <= (1 << 15):
        labels = labels.to(torch.int16)  # same values; 4x less label traffic in the comparisons
    ignored = (labels == ignore_index).unsqueeze(1)
    hc, wc = -(-height // stride), -(-width // stride)
    group = _group_size(z, len(offsets))
    zhat_buf = z.new_empty(group, k, height, width)
    acc_buf = z.new_empty(group, k, hc, wc)
    scratch_buf = z.new_empty(group, k, height, width)  # exp(acc - max), then the gradient of zhat
    grad = None if grad_numerator is None else torch.empty_like(z, memory_format=torch.contiguous_format)
    numerator = z.new_zeros(())
    for b0 in range(0, batch, group):
        b1 = min(batch, b0 + group)
        zhat, acc, scratch = zhat_buf[:b1 - b0], acc_buf[:b1 - b0], scratch_buf[:b1 - b0]
        coefs, xi, valid, target = _group_setup(labels[b0:b1], ignore_index, offsets, window // 2, stride,
                                                xi_weight_sum, z.dtype)
        _, std, var = _zscore_into(zhat, scratch, z[b0:b1], ignored[b0:b1], normalize, eps)
        _pool_into(acc, zhat, coefs, offsets).div_(xi.unsqueeze(1))
        exp_shift = scratch[..., :hc, :wc] if stride == 1 else scratch.new_empty(acc.shape)
        lse, exp_sum = _lse_into(exp_shift, acc)
        tgt = target.unsqueeze(1)
        ce = torch.where(valid, lse - acc.gather(1, tgt)[:, 0], torch.zeros_like(lse))
        if grad is None:
            numerator = numerator + (ce.pow(power).sum() if power != 1 else ce.sum())
            continue
        # d numerator / d(acc before the division by xi) = power L^(power-1) (softmax - onehot) / xi
        dce = power * ce.pow(power - 1) if power != 1 else torch.ones_like(ce)
        scale = torch.where(valid, dce, torch.zeros_like(dce)) * grad_numerator / xi
        g_acc = torch.div(exp_shift, exp_sum.unsqueeze(1), out=acc)  # softmax
        g_acc.scatter_add_(1, tgt, torch.full_like(g_acc[:, :1], -1.0)).mul_(scale.unsqueeze(1))
        g_zhat = _pool_into(scratch, g_acc, coefs, offsets, transpose=True)
        if normalize:
            # zhat = c / std, c = z - mean(z), std = sqrt(max(var, eps^2)), var = mean(c^2)
            # acc (the softmax gradient) is consumed: reuse it for the product when it fits
            prod = torch.mul(g_zhat, zhat, out=acc) if stride == 1 else g_zhat * zhat
            through_std = (var >= eps * eps).to(z.dtype) * prod.mean(dim=1, keepdim=True)
            # dL/dz = g_c - mean_K(g_c) with g_c = (g_zhat - zhat * through_std) / std; the mean is
            # 0: g_zhat pools vectors (softmax - onehot) that sum to 0 over K, and zhat sums to 0
            torch.div(g_zhat.sub_(zhat.mul_(through_std)), std, out=grad[b0:b1])
        else:
            grad[b0:b1].copy_(g_zhat)  # 0 at ignored pixels (they never pool)
    return numerator, grad


class _PooledNumerator(torch.autograd.Function):
    """``sum_p L_p^power`` over the valid centres of the local batch, with a hand-written backward.

    Works a group of images at a time (one on CPU, see :func:`_group_size`): the z-scored
    logits, the pooled vectors and their gradients exist for one group only (three
    group-sized scratch buffers), and there is no autograd graph over the ``s*s`` shifted
    views. Nothing but the inputs is saved for
    backward (the logits are alive in the caller's graph anyway), so the loss adds no
    ``(B, K, H, W)`` tensor to a training step's peak memory; backward recomputes each
    image's pool (one more pass of ``s*s`` multiply-adds) before back-propagating it.
    """

    @staticmethod
    def forward(ctx, z, labels, ignore_index, window, exponential, xi_weight_sum, normalize, eps, stride, power):
        ctx.hparams = (ignore_index, window, exponential, xi_weight_sum, normalize, eps, stride, power)
        ctx.save_for_backward(z, labels)
        return _lall_pass(z, labels, ctx.hparams)[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_numerator):
        z, labels = ctx.saved_tensors
        grad = _lall_pass(z, labels, ctx.hparams, grad_numerator)[1]
        return grad, None, None, None, None, None, None, None, None, None


def locally_adaptive_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    window: int = 5,
    distance_weights: str = "exponential",
    normalize: Optional[str] = "zscore",
    power: float = 3.0,
    stride: int = 1,
    xi: str = "count",
    ignore_index: int = 255,
    eps: float = 1e-5,
    num_classes: Optional[int] = None,
    loss_weight: float = 1.0,
    weight: Optional[float] = None,
    backend: str = "auto",
) -> LossOutput:
    """Locally adaptive learning loss (LALL), Minkowski-pooled over the batch.

    For each valid centre pixel ``p``: ``v_p = (1/xi_p) * sum_q w(p,q) * zhat_q`` over
    the pixels ``q`` of the ``window x window`` neighbourhood with ``y_q == y_p``
    (``w = 2^(1 - d8(p, q))``: 2 at the centre, 1 at chessboard distance 1, 1/2 at 2,
    ...); ``L_p = CE(v_p, y_p)`` (softmax cross-entropy, nats); the loss is
    ``loss_weight * (mean_p L_p^power)^(1/power)``.

    Args:
        logits: ``(B, K, h, w)`` floating logits. If ``(h, w)`` differs from the label
            size they are resized *bilinearly* to ``(H, W)`` with
            ``align_corners=False`` (the loss is defined at label resolution).
        labels: ``(B, H, W)`` integer labels in ``0..K-1`` or ``ignore_index``.
        window: odd side ``s`` of the square window (5 is the paper's best; 3, 7 also
            reported). Neighbours outside the image do not exist: no padding value
            ever enters the pool, and they are not counted in ``xi``.
        distance_weights: ``"exponential"`` (``2^(1 - d8)``, the paper) or
            ``"uniform"`` (all weights 1).
        normalize: ``"zscore"`` (each pixel's logit vector minus its mean over the K
            entries, divided by its *population* standard deviation, floored at
            ``eps``) or ``None`` (raw logits are pooled).
        power: Minkowski exponent ``k >= 1`` of the batch pooling (3 in the paper;
            1 gives the plain mean of ``L_p``).
        stride: centre pixels are those at ``(i, j)`` with ``i % stride == 0`` and
            ``j % stride == 0`` (grid anchored at the top-left pixel); neighbours are
            taken at full resolution. 1 in the paper.
        xi: ``"count"`` (the paper: number of same-label pixels in the window, centre
            included, so an isolated pixel pools to ``2 * zhat_p``) or
            ``"weight_sum"`` (sum of their weights: a weighted average).
        ignore_index: label value that is ignored: such pixels are never centres
            (never counted in the mean) and never pool as neighbours.
        eps: floor of the per-pixel standard deviation in the z-score,
            ``std_eff = max(std, eps)``. The z-score is exact whenever
            ``std >= eps``; a pixel with all-equal logits normalises to the zero
            vector, with a finite (zero) gradient through its std.
        num_classes: optional check: must equal ``K`` of ``logits``.
        loss_weight: multiplier of the returned loss (term ``"lall"``); ``weight``, its old
            name, is accepted for one version with a ``DeprecationWarning``.
        backend: ``"auto"`` (the fused Triton kernels for CUDA tensors when Triton is
            installed, else PyTorch), ``"triton"`` (CPU tensors run in Triton's
            interpreter: for tests, slow) or ``"torch"`` (the PyTorch implementation,
            the reference the kernels are tested against). Same values either way.

    Returns:
        ``LossOutput(loss, {"lall": loss})``, a float32 scalar (float64 for float64
        logits). Gradient flows to the logits of every centre and every pooled
        neighbour (nothing is detached). With no valid centre pixel in the (global)
        batch the loss is 0 with a zero gradient; the ``1/k`` root is guarded so that
        a tiny mean never gives an infinite or NaN gradient.

    The mean over centre pixels is global under ``torch.distributed`` (numerator and
    count all-reduced through :func:`pixreg.losses._common.global_mean`).
    Computed in float32 with autocast disabled.

    Example:
        >>> import torch
        >>> logits = torch.randn(2, 4, 8, 8, requires_grad=True)
        >>> labels = torch.randint(0, 4, (2, 8, 8))
        >>> labels[:, 0] = 255
        >>> out = locally_adaptive_loss(logits, labels, window=5)
        >>> out.loss.backward()
        >>> bool(torch.isfinite(logits.grad).all()), sorted(out.terms)
        (True, ['lall'])
    """
    loss_weight = renamed("locally_adaptive_loss", "weight", weight, "loss_weight", loss_weight, 1.0)
    _check_hparams(window, distance_weights, normalize, power, stride, xi, eps, loss_weight, backend)
    if num_classes is not None:
        check_int("num_classes", num_classes, lo=1)
    check_same_device(logits=logits, labels=labels)
    check_floating("logits", logits, (4,))
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"`labels` must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 3 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"`labels` must be (B, H, W) with B={logits.shape[0]} to match `logits` of shape "
            f"{tuple(logits.shape)}, got {tuple(labels.shape)}"
        )
    k_classes = logits.shape[1]
    if num_classes is not None and num_classes != k_classes:
        raise ValueError(f"`num_classes`={num_classes} does not match the K={k_classes} channels of `logits`")
    check_ignore_index(ignore_index, k_classes)
    check_labels(labels, k_classes, ignore_index)

    dtype = compute_dtype(logits)
    with no_autocast(logits):
        z = logits.to(dtype)
        height, width = labels.shape[-2:]
        if tuple(z.shape[-2:]) != (height, width):
            z = F.interpolate(z, size=(height, width), mode="bilinear", align_corners=False)
        labels = labels.long()
        centre_labels = labels[:, ::stride, ::stride]  # (B, Hc, Wc)
        valid = centre_labels != ignore_index
        flags = (distance_weights == "exponential", xi == "weight_sum", normalize == "zscore")
        if _resolve_backend(backend, z) == "triton":
            from ..kernels.lall_triton import lall_ce

            ce = lall_ce(z, labels, ignore_index, window, *flags, eps, stride)  # 0 at ignored centres
            numerator = ce.pow(power).sum() if power != 1 else ce.sum()
        else:
            # local sum_p L_p^power over valid centres (one image at a time, see _PooledNumerator)
            numerator = _PooledNumerator.apply(z, labels, ignore_index, window, *flags, eps, stride, float(power))
        mean = global_mean(numerator, valid.sum().to(dtype))
        if power == 1:
            loss = mean
        else:
            tiny = torch.finfo(dtype).tiny
            loss = torch.where(mean > tiny, mean.clamp_min(tiny).pow(1.0 / power), torch.zeros_like(mean))
        loss = loss * loss_weight
    return LossOutput(loss, {"lall": loss})


class LocallyAdaptiveLoss(Regularizer):
    """Module form of :func:`locally_adaptive_loss` (no state; hyper-parameters only).

    ``forward(logits, labels)`` returns the weighted scalar loss; ``terms`` holds
    ``{"lall": ...}`` of the last call. Every argument is keyword-only; ``num_classes``
    is optional (``K`` is then read from the logits); ``weight``, the old name of
    ``loss_weight``, is accepted for one version with a ``DeprecationWarning``.

    Example:
        >>> import torch
        >>> crit = LocallyAdaptiveLoss(window=5, power=3)
        >>> loss = crit(torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 8, 8)))
        >>> loss.shape, list(crit.terms)
        (torch.Size([]), ['lall'])
    """

    uses_features = False
    uses_logits = True
    logits_gradient = True

    def __init__(
        self,
        *,
        window: int = 5,
        distance_weights: str = "exponential",
        normalize: Optional[str] = "zscore",
        power: float = 3.0,
        stride: int = 1,
        xi: str = "count",
        ignore_index: int = 255,
        eps: float = 1e-5,
        num_classes: Optional[int] = None,
        loss_weight: float = 1.0,
        weight: Optional[float] = None,
        backend: str = "auto",
    ) -> None:
        loss_weight = renamed("LocallyAdaptiveLoss", "weight", weight, "loss_weight", loss_weight, 1.0)
        super().__init__(num_classes, ignore_index=ignore_index)
        _check_hparams(window, distance_weights, normalize, power, stride, xi, eps, loss_weight, backend)
        self.backend = backend
        self.window = window
        self.distance_weights = distance_weights
        self.normalize = normalize
        self.power = power
        self.stride = stride
        self.xi = xi
        self.eps = eps
        self.loss_weight = float(loss_weight)

    def extra_repr(self) -> str:
        return (
            f"window={self.window}, distance_weights={self.distance_weights!r}, normalize={self.normalize!r}, "
            f"power={self.power}, stride={self.stride}, xi={self.xi!r}, ignore_index={self.ignore_index}, "
            f"loss_weight={self.loss_weight}, backend={self.backend!r}"
        )

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = locally_adaptive_loss(
            logits,
            labels,
            window=self.window,
            distance_weights=self.distance_weights,
            normalize=self.normalize,
            power=self.power,
            stride=self.stride,
            xi=self.xi,
            ignore_index=self.ignore_index,
            eps=self.eps,
            num_classes=self.num_classes,
            loss_weight=self.loss_weight,
            backend=self.backend,
        )
        return self._record(out)
