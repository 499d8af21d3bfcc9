"""RCH: the representation calibration head (METHODS.md section 4).

Wang et al., "Renovate Yourself: Calibrating Feature Representation of Misclassified
Pixels for Semantic Segmentation" (AAAI 2022).

A training-only side branch embeds the features, ``e = conv1x1(x)`` (optionally
followed by BatchNorm, as in the released code). Per class ``k`` the pixels are split
from the ground truth ``y`` and the argmax prediction ``c`` of the segmentation logits:

* ``TP_k = {i : y_i = k, c_i = k}``, ``FN_k = {i : y_i = k, c_i != k}``,
  ``FP_k = {i : y_i != k, c_i = k}``; ignored pixels belong to no set.

Prototypes ``mu_k`` are an EMA of the TP means; a metric loss pulls each anchor pixel
(a non-ignored pixel labelled ``k`` whose prototype exists) to ``mu_k`` with two softmax
cross-entropies over cosine logits whose true-class logit is lowered by the FN
compensation ``phi`` and the FP penalty ``psi``. See :func:`rch_loss` for the equations,
the switches and every documented choice.

Functional API: :func:`rch_loss` (the metric loss for given prototypes) and
:func:`rch_update_prototypes` (the pure TP-mean EMA update). Module: :class:`RCHLoss`
(owns the embedding head and the prototype buffers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import GlobalBatchNorm2d
from ._common import (
    bin_counts,
    check_bool_mask,
    check_choice,
    check_flag,
    check_floating,
    check_ignore_index,
    check_int,
    check_labels,
    check_real,
    check_same_device,
    class_stats,
    compute_dtype,
    dump_labels,
    ema_class_means,
    flatten_features,
    global_mean,
    no_autocast,
    renamed,
    resize_bilinear,
    to_parameter_dtype,
)
from .base import LossOutput, Regularizer

__all__ = ["rch_loss", "rch_update_prototypes", "rch_calibration", "RCHLoss"]

_SETS = ("batch", "image")
_CALIBRATIONS = ("mean_of_cosines", "cosine_to_mean")
_UPDATES = ("before", "after")
_SOURCES = ("tp", "gt")
_CE_RESOLUTIONS = ("embedding", "label")
_REDUCTIONS = ("anchors", "all_pixels")
_NORM_EPS = 1e-12  # cosine: u / max(|u|, eps), as F.normalize


# ----------------------------------------------------------------------------- checks


def _check_loss_args(tau: float, loss_weight: float, hard_weight: float, use_fn: bool, use_fp: bool, sets: str,
                     calibration: str) -> None:
    check_real("tau", tau, lo=0.0, lo_open=True)
    check_real("loss_weight", loss_weight, lo=0.0)
    check_real("hard_weight", hard_weight, lo=0.0)
    check_flag("use_fn", use_fn)
    check_flag("use_fp", use_fp)
    check_choice("sets", sets, _SETS)
    check_choice("calibration", calibration, _CALIBRATIONS)


def _check_ce_args(prototype_grad: bool, ce_resolution: str, ohem_thresh: Optional[float], ohem_min_kept: int,
                   reduction: str) -> None:
    check_flag("prototype_grad", prototype_grad)
    check_choice("ce_resolution", ce_resolution, _CE_RESOLUTIONS)
    check_choice("reduction", reduction, _REDUCTIONS)
    if ohem_thresh is not None:
        check_real("ohem_thresh", ohem_thresh, lo=0.0, hi=1.0)
    check_int("ohem_min_kept", ohem_min_kept, lo=0)


def _check_prototypes(prototypes: torch.Tensor, mask: Optional[torch.Tensor], mask_name: str) -> None:
    check_floating("prototypes", prototypes, (2,))
    k = prototypes.shape[0]
    if k < 1:
        raise ValueError(f"`prototypes` must have at least one row (class), got shape {tuple(prototypes.shape)}")
    if mask is not None:
        check_bool_mask(mask_name, mask, k)


# ----------------------------------------------------------------------- preparation


@dataclass
class _Prepared:
    """Flat, resized inputs shared by the loss and the prototype update."""

    emb: torch.Tensor  # (N, E) compute dtype, carries gradient
    dlabels: torch.Tensor  # (N,) int64 GT, ignored -> K (dump class)
    pred: torch.Tensor  # (N,) int64 argmax of the (resized) logits
    p_true: torch.Tensor  # (N,) probability of the GT class (no gradient); arbitrary on ignored pixels
    image: Optional[torch.Tensor]  # (N,) image index of each pixel; None for flat inputs
    num_images: int
    num_classes: int
    size: Optional[Tuple[int, int]] = None  # (h, w) of the embeddings; None for flat inputs


def _prepare(embeddings: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, num_classes: int,
             ignore_index: int) -> _Prepared:
    check_same_device(embeddings=embeddings, logits=logits, labels=labels)
    check_floating("embeddings", embeddings, (2, 4))
    check_floating("logits", logits, (2, 4))
    check_ignore_index(ignore_index, num_classes)
    check_labels(labels, num_classes, ignore_index)
    if logits.dim() != embeddings.dim():
        want = "(B, K, H, W)" if embeddings.dim() == 4 else "(N, K)"
        raise ValueError(
            f"`logits` must be {want} to match `embeddings` of shape {tuple(embeddings.shape)}, "
            f"got {tuple(logits.shape)}"
        )
    if logits.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"`logits` batch size {logits.shape[0]} does not match `embeddings` batch size {embeddings.shape[0]}"
        )
    if logits.shape[1] != num_classes:
        raise ValueError(f"`logits` has {logits.shape[1]} classes (dim 1), expected num_classes={num_classes}")
    emb, lab = flatten_features(embeddings, labels, feature_name="embeddings")
    dt = compute_dtype(embeddings)
    with no_autocast(embeddings):
        emb = emb.to(dt)
        z = logits.detach().to(dt)  # the sets and p_ik carry no gradient (documented in rch_loss)
        if z.dim() == 4:
            b, _, h, w = embeddings.shape
            if tuple(z.shape[-2:]) != (h, w):
                z = resize_bilinear(z, (h, w))  # = F.interpolate(bilinear, align_corners=False)
            z = z.permute(0, 2, 3, 1).reshape(b * h * w, num_classes)
            image = torch.arange(b, device=emb.device).repeat_interleave(h * w)
            num_images = b
        else:
            image, num_images = None, 1
        prob = torch.softmax(z, dim=1)
        pred = z.argmax(dim=1)
        dl = dump_labels(lab, num_classes, ignore_index)
        p_true = prob.gather(1, dl.clamp(max=num_classes - 1)[:, None])[:, 0]
    size = tuple(embeddings.shape[-2:]) if embeddings.dim() == 4 else None
    return _Prepared(emb, dl, pred, p_true, image, num_images, num_classes, size)


# ------------------------------------------------------------------------ statistics


def _set_indices(prep: _Prepared) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dump-label indices ``(N,)`` of the TP, FN and FP set of each pixel (``K`` = no set)."""
    k = prep.num_classes
    dl, pred = prep.dlabels, prep.pred
    valid = dl < k
    correct = pred == dl
    dump = torch.full_like(dl, k)
    tp = torch.where(valid & correct, dl, dump)
    wrong = valid & ~correct
    fn = torch.where(wrong, dl, dump)  # FN of its GT class
    fp = torch.where(wrong, pred, dump)  # FP of its predicted class
    return tp, fn, fp


def _set_table(feats: torch.Tensor, members: torch.Tensor, prep: _Prepared, sets: str
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums of ``feats`` over the sets given by ``members`` (dump-label indices of set
    membership), their sizes, and every pixel's row ``S_{y_i}`` in them.

    ``sets="batch"``: one set per class over the global batch (sums and counts all-reduced,
    the sums differentiably); ``sets="image"``: one set per (image, class) pair, row
    ``b * K + k``, purely local (an image never spans two processes, so no reduction is
    needed). Returns ``(R + 1, E)`` sums, ``(R + 1,)`` counts (the last row: an empty set,
    the row of ignored pixels) and ``(N,)`` rows: one segmented reduction (``index_add``)
    per set kind, whatever the number of classes.
    """
    k = prep.num_classes
    n, d = feats.shape
    if sets == "batch":
        st = class_stats(feats, members, k)
        sums = torch.cat([st.sums, st.sums.new_zeros(1, d)])
        counts = torch.cat([st.counts, st.counts.new_zeros(1)])
        row = prep.dlabels
    else:
        assert prep.image is not None
        rows = prep.num_images * k
        idx = torch.where(members < k, prep.image * k + members, torch.full_like(members, rows))
        sums = feats.new_zeros(rows + 1, d).index_add(0, idx, feats)
        counts = bin_counts(idx, rows + 1).to(feats.dtype)
        row = torch.where(prep.dlabels < k, prep.image * k + prep.dlabels, torch.full_like(idx, rows))
    return sums, counts, row


def _calibration(emb: torch.Tensor, emb_hat: torch.Tensor, members: torch.Tensor, prep: _Prepared,
                 sets: str, calibration: str, sign: float) -> torch.Tensor:
    """``1 + sign * m_i`` where ``m_i`` is the FN/FP similarity of anchor ``i``; 0 where the set is empty.

    ``m_i = ê_i . t_{S(i)}``: the per-set vector ``t_S`` (the mean of the unit vectors, or the
    unit vector of the sum) is formed on the ``(R, E)`` table of set sums, before it is
    gathered to the ``N`` pixels, so that no ``(N, E)`` intermediate is normalised (or kept
    for backward).
    """
    if calibration == "mean_of_cosines":
        # mean_j cos(e_j, e_i) = e_i_hat . (sum_j e_j_hat) / |S|  -- no pixel-pair matrix
        sums, counts, row = _set_table(emb_hat, members, prep, sets)
        table = sums / counts.clamp(min=1).unsqueeze(1)
    else:
        # cos(e_i, mean_j e_j): the direction of the mean is the direction of the sum
        sums, counts, row = _set_table(emb, members, prep, sets)
        table = F.normalize(sums, dim=1, eps=_NORM_EPS)
    m = (emb_hat * table.index_select(0, row)).sum(1)
    return torch.where(counts.index_select(0, row) > 0, 1.0 + sign * m, torch.zeros_like(m))


@dataclass
class _CETarget:
    """Where the two metric CEs are taken: labels, anchors and image count at that resolution."""

    dlabels: torch.Tensor  # (M,) dump labels (ignored -> K)
    anchor: torch.Tensor  # (M,) bool: non-ignored with a valid prototype
    size: Optional[Tuple[int, int]]  # (H, W) to upsample the score maps to; None: embedding resolution
    num_images: int


def _ce_target(prep: _Prepared, pvalid: torch.Tensor, labels: Optional[torch.Tensor], ignore_index: int,
               ce_resolution: str) -> _CETarget:
    k = prep.num_classes
    size = None
    dl = prep.dlabels
    if ce_resolution == "label" and prep.size is not None:
        assert labels is not None
        if tuple(labels.shape[-2:]) != prep.size:
            size = (int(labels.shape[-2]), int(labels.shape[-1]))
            dl = dump_labels(labels.reshape(-1), k, ignore_index)
    anchor = (dl < k) & pvalid[dl.clamp(max=k - 1)]
    return _CETarget(dl, anchor, size, prep.num_images)


def _upsample_scores(scores: torch.Tensor, prep: _Prepared, size: Tuple[int, int]) -> torch.Tensor:
    """``(B*h*w, K)`` score map -> ``(B*H*W, K)``: bilinear, ``align_corners=False`` (mmseg's ``resize``)."""
    h, w = prep.size
    b, k = prep.num_images, scores.shape[1]
    z = scores.reshape(b, h, w, k).permute(0, 3, 1, 2)
    z = F.interpolate(z, size=size, mode="bilinear", align_corners=False)
    return z.permute(0, 2, 3, 1).reshape(-1, k)


@torch.no_grad()
def _ohem_select(per_pixel: torch.Tensor, anchor: torch.Tensor, thresh: float, min_kept: int,
                 num_images: int) -> torch.Tensor:
    """mmseg's ``OHEMPixelSampler`` rule (with ``thresh``) on one score map; ``(M,)`` bool.

    ``p_i = exp(-CE_i)`` is the true-class probability of the (masked) softmax of the
    scores. Among the ``n`` anchors sorted by ``p``, ``t = max(p_(min(min_kept * B, n - 1)), thresh)``
    (0-based order statistic; ``thresh`` alone when ``n = 0``); an anchor is kept when
    ``p_i < t``. The order statistic is taken on this process's pixels (as mmseg does per GPU).
    """
    if per_pixel.numel() == 0:
        return anchor
    p = torch.exp(-per_pixel)
    ranked = torch.where(anchor, p, torch.full_like(p, float("inf"))).sort().values
    n = anchor.sum()
    idx = torch.clamp(n - 1, min=0).clamp(max=min_kept * num_images)
    order_stat = torch.where(n > 0, ranked[idx], torch.zeros_like(ranked[0]))
    return anchor & (p < order_stat.clamp(min=thresh))


def _loss(prep: _Prepared, prototypes: torch.Tensor, prototype_valid: torch.Tensor, *, tau: float,
          loss_weight: float, hard_weight: float, use_fn: bool, use_fp: bool, sets: str,
          calibration: str, prototype_grad: bool = False, labels: Optional[torch.Tensor] = None,
          ignore_index: int = 255, ce_resolution: str = "embedding", ohem_thresh: Optional[float] = None,
          ohem_min_kept: int = 100000, reduction: str = "anchors") -> LossOutput:
    if sets == "image" and prep.image is None:
        raise ValueError("`sets='image'` needs (B, E, h, w) embeddings; flat (N, E) inputs have no images")
    k = prep.num_classes
    emb = prep.emb
    dt = emb.dtype
    if prototypes.shape[1] != emb.shape[1]:
        raise ValueError(
            f"`prototypes` has dimension {prototypes.shape[1]}, `embeddings` have {emb.shape[1]} channels"
        )
    with no_autocast(emb):
        # EMA state: a gradient path only when asked for (prototype_grad: the released code's f_mem)
        proto = prototypes.to(dt) if prototype_grad else prototypes.detach().to(dtype=dt, copy=True)
        pvalid = prototype_valid.detach().clone()
        dl = prep.dlabels
        emb_hat = F.normalize(emb, dim=1, eps=_NORM_EPS)
        z = emb_hat @ F.normalize(proto, dim=1, eps=_NORM_EPS).t() / tau  # (N, K)
        onehot = (dl.unsqueeze(1) == torch.arange(k, device=dl.device)).to(dt)  # F.one_hot syncs
        base = hard_weight * (1.0 - prep.p_true)  # (1 - p_ik), detached (from logits.detach())
        target = _ce_target(prep, pvalid, labels, ignore_index, ce_resolution)
        gt = target.dlabels.clamp(max=k - 1)
        # classes without a prototype leave the softmax; non-anchor rows stay finite (masked later)
        keep = pvalid[None, :] | ~target.anchor[:, None]
        total = torch.full((), float(target.dlabels.numel()), dtype=dt, device=emb.device)  # no host copy

        def ce(calib: Optional[torch.Tensor]) -> torch.Tensor:
            zc = z if calib is None else z - onehot * (base * calib)[:, None]
            if target.size is not None:
                zc = _upsample_scores(zc, prep, target.size)
            zc = zc.masked_fill(~keep, float("-inf"))
            per_pixel = torch.logsumexp(zc, dim=1) - zc.gather(1, gt[:, None])[:, 0]
            chosen = target.anchor
            if ohem_thresh is not None:
                chosen = _ohem_select(per_pixel.detach(), chosen, ohem_thresh, ohem_min_kept, target.num_images)
            per_pixel = torch.where(chosen, per_pixel, torch.zeros_like(per_pixel))
            count = chosen.sum() if reduction == "anchors" else total
            return loss_weight * global_mean(per_pixel.sum(), count)

        phi = psi = None
        if use_fn or use_fp:
            _, fn_idx, fp_idx = _set_indices(prep)
            if use_fn:
                phi = _calibration(emb, emb_hat, fn_idx, prep, sets, calibration, -1.0)
            if use_fp:
                psi = _calibration(emb, emb_hat, fp_idx, prep, sets, calibration, +1.0)
        fn_term = ce(phi)
        fp_term = fn_term if (phi is None and psi is None) else ce(psi)
    return LossOutput(fn_term + fp_term, {"fn": fn_term, "fp": fp_term})


def _update(prep: _Prepared, prototypes: torch.Tensor, initialized: torch.Tensor, rho: float,
            source: str = "tp", differentiable: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """EMA update from the TP (or GT) means. ``differentiable``: the new prototypes keep the
    gradient path through this batch's means (in the compute dtype)."""
    with no_autocast(prep.emb):
        # "tp": true positives (the paper); "gt": every non-ignored pixel of the class (ablation)
        idx = _set_indices(prep)[0] if source == "tp" else prep.dlabels
        new, init = ema_class_means(prep.emb, idx, prototypes, initialized, rho, differentiable=differentiable)
        return (new if differentiable else new.to(prototypes.dtype)), init


# ------------------------------------------------------------------------ functional


def rch_loss(
    embeddings: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    prototypes: torch.Tensor,
    prototype_valid: Optional[torch.Tensor] = None,
    *,
    tau: float = 0.5,
    loss_weight: float = 0.1,
    hard_weight: float = 1.0,
    use_fn: bool = True,
    use_fp: bool = True,
    sets: str = "batch",
    calibration: str = "mean_of_cosines",
    ignore_index: int = 255,
    prototype_grad: bool = False,
    ce_resolution: str = "embedding",
    ohem_thresh: Optional[float] = None,
    ohem_min_kept: int = 100000,
    reduction: str = "anchors",
    weight: Optional[float] = None,
) -> LossOutput:
    r"""RCH metric loss for given prototypes (METHODS.md section 4).

    Inputs are brought to the embedding resolution ``(h, w)``: labels by torch's
    ``nearest`` (row ``min(floor(fl(i * fl(H / h))), H - 1)`` in float32, see ``_common``;
    mmseg's rule too); logits by bilinear interpolation
    (``align_corners=False``), after which ``p = softmax(z)`` and the prediction
    ``c = argmax(z)`` are taken. Per class ``k``:
    ``TP_k = {y=k, c=k}``, ``FN_k = {y=k, c!=k}``, ``FP_k = {y!=k, c=k}`` (ignored pixels in
    no set), over the whole (global) batch (``sets="batch"``) or over the anchor's own
    image (``sets="image"``). An *anchor* is a non-ignored pixel ``i`` with ``y_i = k``
    whose prototype is valid (``prototype_valid[k]``). With ``ê = e/|e|``::

        cos_il = ê_i . mu_l / |mu_l|                   (valid prototypes l only)
        mean_of_cosines (paper):   m^S_i = mean_{j in S_k} cos(e_j, e_i) = ê_i . (sum_j ê_j) / |S_k|
        cosine_to_mean (released): m^S_i = cos(e_i, mean_{j in S_k} e_j)
        phi_i = 1 - m^FN_i  if FN_k non-empty else 0     (FN compensation, in [0, 2])
        psi_i = 1 + m^FP_i  if FP_k non-empty else 0     (FP penalty, in [0, 2])
        L^c_i = -log  exp(cos_ik/tau - h (1 - p_ik) c_i)
                      / [exp(cos_ik/tau - h (1 - p_ik) c_i) + sum_{l != k, valid} exp(cos_il/tau)]
        fn = loss_weight * mean_{anchors} L^{phi}_i,   fp = loss_weight * mean_{anchors} L^{psi}_i
        loss = fn + fp

    (``h`` = ``hard_weight``.) An anchor that is itself in ``FN_k`` counts in its own
    FN mean (``cos(e_i, e_i) = 1``), as the formula is written.

    Options that reproduce the released mmsegmentation code (all off by default):

    * ``ce_resolution="label"``: the two score maps ``S^c_il = cos_il/tau - [l = y_i] h (1 - p_ik) c_i``
      (built at embedding resolution, with the embedding-resolution labels) are
      upsampled bilinearly (``align_corners=False``) to the labels' ``(H, W)`` and both CEs
      are taken there, against the full-resolution labels; anchors are then the
      label-resolution pixels (non-ignored, with a valid prototype).
    * ``ohem_thresh=t, ohem_min_kept=m``: mmseg's ``OHEMPixelSampler(thresh=t, min_kept=m)``
      applied to each metric CE on its own score map: with ``q_i`` the true-class
      softmax probability of anchor ``i`` and ``q_(0) <= q_(1) <= ...`` the ``n`` anchors
      sorted, keep the anchors with ``q_i < max(q_(min(m * B, n - 1)), t)`` (``t`` when
      ``n = 0``; ``B`` images, 1 for flat inputs). The order statistic is per process,
      as mmseg's is per GPU; the selection carries no gradient.
    * ``reduction="all_pixels"``: the CE sums are divided by the number of *all* pixels
      at the CE's resolution (ignored and unselected pixels count as 0), as mmseg's
      ``CrossEntropyLoss`` (``avg_non_ignore=False``); default ``"anchors"``: by the
      number of anchors kept. An all-ignored batch gives 0 either way (the released code
      gives NaN for an all-ignored image).
    * ``prototype_grad=True``: ``prototypes`` are used with their autograd graph (pass
      the output of ``rch_update_prototypes(..., differentiable=True)`` to get the
      released code's gradient through this step's TP mean); default: detached.

    Switches (a switched-off calibration is replaced by 0, i.e. the plain true-class
    logit; both terms always exist, so the loss scale does not change across ablations):

    ===============  ==============================================================
    use_fn, use_fp   loss
    ===============  ==============================================================
    True,  True      w * CE(phi) + w * CE(psi)   (the paper; w = loss_weight)
    True,  False     w * CE(phi) + w * CE(0)
    False, True      w * CE(0)   + w * CE(psi)
    False, False     2 * w * CE(0): a plain cosine-softmax CE to the prototypes
                     (use ``loss_weight = lambda / 2`` for a single lambda-weighted CE)
    ===============  ==============================================================

    Gradients (what is detached):

    * ``prototypes``: detached (they are an EMA state, updated without gradient).
    * ``p_ik``, the sets and the prediction: from ``logits.detach()``; ``logits`` get
      no gradient. ``(1 - p_ik)`` is a hardness weight of the margin; a gradient through
      it would only push the classifier's own probability up (a second, oddly weighted
      CE on the segmentation head) instead of shaping the embedding.
    * ``phi``/``psi``: NOT detached. Their gradient is what pulls FN pixels towards
      the anchors of their class and pushes FP pixels away from them (the loss grows
      with ``psi`` and with ``phi``); detached, they would only be an adaptive margin of
      the prototype CE and FP pixels would receive no calibration gradient at all.
      The gradient reaches both the anchor and the FN/FP set members (through the
      global, differentiably all-reduced set sums in batch mode).

    Classes without a valid prototype leave the softmax (masked) and provide no
    anchors; they still define FN/FP sets. The mean is over the anchors of the global
    batch; with no anchor (all pixels ignored, no prototype) the loss is 0 with a
    finite (zero) gradient.

    Args:
        embeddings: ``(B, E, h, w)`` or flat ``(N, E)`` pixel embeddings (any units; only
            directions matter).
        logits: segmentation logits ``(B, K, H, W)`` (or ``(N, K)`` with flat embeddings).
        labels: ``(B, H, W)`` (or ``(N,)``) integer labels in ``0..K-1`` or ``ignore_index``.
        prototypes: ``(K, E)`` class prototypes (detached).
        prototype_valid: ``(K,)`` bool, which prototypes exist; default all.
        tau: temperature of the cosine logits (paper: 0.5).
        loss_weight: weight of each of the two CE terms (paper: lambda = 0.1); ``weight``,
            its old name, is accepted for one version with a ``DeprecationWarning``.
        hard_weight: coefficient ``h`` of ``(1 - p_ik)`` (1 = the paper's Eq. 8: the
            true-class logit is lowered by ``(1 - p) phi``). The released code lowers it by
            ``(alp / tmp) (1 - p) phi`` (it multiplies by ``alp``, then divides all logits by
            ``tmp``); its configs set ``alp = tmp = 0.5``, i.e. ``hard_weight = 1``.
        use_fn, use_fp: the FN compensation and FP penalty switches (table above).
        sets: ``"batch"`` (default; the global batch) or ``"image"`` (per image, 4-D only).
            The released code takes the FN/FP means per GPU and trains one image per GPU:
            ``"image"`` reproduces it.
        calibration: ``"mean_of_cosines"`` (paper, default) or ``"cosine_to_mean"``
            (released code; the mean of the raw embeddings).
        ignore_index: label value of ignored pixels.
        prototype_grad: keep the gradient path through ``prototypes`` (default False).
        ce_resolution: ``"embedding"`` (default) or ``"label"`` (released).
        ohem_thresh: OHEM probability threshold in ``[0, 1]``; ``None`` (default) = no OHEM.
        ohem_min_kept: OHEM's ``min_kept`` per image (mmseg's default 100000).
        reduction: ``"anchors"`` (default) or ``"all_pixels"`` (mmseg's mean).

    Returns:
        ``LossOutput(loss, {"fn": ..., "fp": ...})`` (weighted terms, dimensionless).

    Example:
        >>> import torch
        >>> e = torch.randn(2, 8, 4, 4, requires_grad=True)
        >>> z = torch.randn(2, 3, 8, 8)
        >>> y = torch.randint(0, 3, (2, 8, 8))
        >>> out = rch_loss(e, z, y, torch.randn(3, 8))
        >>> sorted(out.terms), out.loss.shape
        (['fn', 'fp'], torch.Size([]))
        >>> out.loss.backward()
    """
    loss_weight = renamed("rch_loss", "weight", weight, "loss_weight", loss_weight, 0.1)
    _check_loss_args(tau, loss_weight, hard_weight, use_fn, use_fp, sets, calibration)
    _check_ce_args(prototype_grad, ce_resolution, ohem_thresh, ohem_min_kept, reduction)
    check_same_device(embeddings=embeddings, logits=logits, labels=labels, prototypes=prototypes,
                      prototype_valid=prototype_valid)
    _check_prototypes(prototypes, prototype_valid, "prototype_valid")
    num_classes = prototypes.shape[0]
    prep = _prepare(embeddings, logits, labels, num_classes, ignore_index)
    if prototype_valid is None:
        prototype_valid = torch.ones(num_classes, dtype=torch.bool, device=prototypes.device)
    return _loss(prep, prototypes, prototype_valid, tau=tau, loss_weight=loss_weight, hard_weight=hard_weight,
                 use_fn=use_fn, use_fp=use_fp, sets=sets, calibration=calibration,
                 prototype_grad=prototype_grad, labels=labels, ignore_index=ignore_index,
                 ce_resolution=ce_resolution, ohem_thresh=ohem_thresh, ohem_min_kept=ohem_min_kept,
                 reduction=reduction)


def rch_update_prototypes(
    embeddings: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    prototypes: torch.Tensor,
    initialized: torch.Tensor,
    *,
    rho: float = 0.9,
    ignore_index: int = 255,
    source: str = "tp",
    differentiable: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""TP-mean EMA update of the prototypes (pure: returns new tensors, no gradient).

    ``t_k = mean(e_i, i in TP_k)`` over the global batch (sums and counts all-reduced
    without autograd, so every process gets the same state). For every class with TP
    pixels: ``mu_k <- rho * mu_k + (1 - rho) * t_k`` if ``initialized[k]``, else
    ``mu_k <- t_k`` (first sighting). Classes without TP pixels are untouched. Inputs
    are prepared as in :func:`rch_loss` (same sets, same resizing). ``source="gt"`` (the
    paper's ablation "ground-truth prototypes") averages every non-ignored pixel labelled
    ``k`` instead of ``TP_k``. ``differentiable=True`` keeps the gradient path from
    ``embeddings`` through ``t_k`` (the released code's ``f_mem``; sums all-reduced with
    autograd) and returns the prototypes in the compute dtype; default: no gradient.

    Returns:
        ``(new_prototypes (K, E) in the dtype of prototypes, new_initialized (K,) bool)``.

    Example:
        >>> import torch
        >>> y = torch.tensor([0, 0, 1, 255])
        >>> z = torch.tensor([[2., 0.], [0., 2.], [0., 2.], [2., 0.]])  # pixel 1 is an FN
        >>> e = torch.tensor([[1., 0.], [9., 9.], [0., 3.], [5., 5.]])
        >>> mu, init = rch_update_prototypes(e, z, y, torch.zeros(2, 2), torch.tensor([True, False]))
        >>> mu, init
        (tensor([[0.1000, 0.0000],
                [0.0000, 3.0000]]), tensor([True, True]))
    """
    check_real("rho", rho, lo=0.0, hi=1.0, hi_open=True)
    check_choice("source", source, _SOURCES)
    check_flag("differentiable", differentiable)
    check_same_device(embeddings=embeddings, logits=logits, labels=labels, prototypes=prototypes,
                      initialized=initialized)
    _check_prototypes(prototypes, initialized, "initialized")
    num_classes = prototypes.shape[0]
    prep = _prepare(embeddings, logits, labels, num_classes, ignore_index)
    if prototypes.shape[1] != prep.emb.shape[1]:
        raise ValueError(
            f"`prototypes` has dimension {prototypes.shape[1]}, `embeddings` have {prep.emb.shape[1]} channels"
        )
    return _update(prep, prototypes, initialized, rho, source, differentiable)


@torch.no_grad()
def rch_calibration(
    embeddings: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    ignore_index: int = 255,
    calibration: str = "mean_of_cosines",
    sets: str = "batch",
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""The per-pixel FN compensation ``phi`` and FP penalty ``psi`` of :func:`rch_loss` (no gradient).

    With the sets ``FN_k``/``FP_k`` of :func:`rch_loss` (over the global batch, or the pixel's
    own image with ``sets="image"``), for a non-ignored pixel ``i`` labelled ``k``:
    ``phi_i = 1 - m^FN_i`` and ``psi_i = 1 + m^FP_i`` (0 when the set is empty), ``m`` the
    mean of cosines (``"mean_of_cosines"``) or the cosine to the set's mean
    (``"cosine_to_mean"``). Inputs are prepared as in :func:`rch_loss`.

    Returns:
        ``(phi, psi)``, each ``(N,)`` over the pixels at embedding resolution (``N = B*h*w``
        in ``(b, y, x)`` order for 4-D embeddings), ``NaN`` at ignored pixels.

    Example:
        >>> import torch
        >>> e, z = torch.randn(1, 8, 4, 4), torch.randn(1, 3, 4, 4)
        >>> phi, psi = rch_calibration(e, z, torch.randint(0, 3, (1, 4, 4)), 3, sets="image")
        >>> phi.shape, bool(((phi >= 0) & (phi <= 2)).all())
        (torch.Size([16]), True)
    """
    check_choice("calibration", calibration, _CALIBRATIONS)
    check_choice("sets", sets, _SETS)
    prep = _prepare(embeddings, logits, labels, check_int("num_classes", num_classes, lo=1), ignore_index)
    if sets == "image" and prep.image is None:
        raise ValueError("`sets='image'` needs (B, E, h, w) embeddings; flat (N, E) inputs have no images")
    with no_autocast(prep.emb):
        emb_hat = F.normalize(prep.emb, dim=1, eps=_NORM_EPS)
        _, fn, fp = _set_indices(prep)
        valid = prep.dlabels < num_classes
        phi = _calibration(prep.emb, emb_hat, fn, prep, sets, calibration, -1.0)
        psi = _calibration(prep.emb, emb_hat, fp, prep, sets, calibration, +1.0)
    nan = torch.full_like(phi, float("nan"))
    return torch.where(valid, phi, nan), torch.where(valid, psi, nan)


# ---------------------------------------------------------------------------- module


class RCHLoss(Regularizer):
    r"""Representation calibration head: embedding head + prototypes + metric loss.

    ``forward(features, logits, labels)`` embeds ``features`` (``(B, D, h, w)`` or
    ``(N, D)``) with the module's own training-only head ``Conv2d(feature_dim,
    embed_dim, 1)`` (+ ``BatchNorm2d`` if ``head_norm``, bias-free conv then, as
    mmseg's ``ConvModule``; no activation), so the segmentation model itself is
    unchanged at inference. **Add this module's parameters to the optimizer**, and
    under DDP keep it inside the DDP-wrapped module (or all-reduce its gradients), as
    for any trainable layer. The ``head_norm`` BatchNorm is a
    :class:`pixreg.distributed.GlobalBatchNorm2d`: its statistics are global under DDP.

    In training mode each call also updates the prototypes (:func:`rch_update_prototypes`),
    either before the loss is computed (``prototype_update="after"``, default: the loss
    sees the prototypes *after* this step's update, as the released code does -- its
    ``f_mem`` mixes the old buffer with this batch's TP mean -- and as the paper
    describes, prototype clustering before error calibration) or after it (``"before"``:
    the loss sees the prototypes from before the update; with an empty state the very
    first step is 0). ``prototype_grad=True`` (needs ``"after"``) lets the gradient flow
    into this batch's TP mean inside the updated prototypes, as in the released code
    (the paper treats prototypes as constants: default False; the loss value is the
    same, the gradient differs). In eval mode the state is left untouched and the
    prototypes are constants.

    State (buffers, saved with ``state_dict``): ``prototypes (K, E)`` (zeros until
    a class is first seen; the released code starts from random values) and
    ``initialized (K,)`` bool. The loss is :func:`rch_loss` (terms ``fn``, ``fp``).

    ``feature_dim`` was called ``in_channels`` and ``loss_weight`` ``weight``; the old
    names are accepted for one version with a ``DeprecationWarning``. Hyper-parameters
    after ``feature_dim`` are keyword-only.

    Defaults: ``tau=0.5``, ``rho=0.9``, ``loss_weight=0.1`` (paper); ``embed_dim=96`` is the
    released code's value (the paper does not give it); ``hard_weight=1`` (paper
    equation; see :func:`rch_loss`); ``head_norm=False`` (paper: a 1x1 conv; the released
    code adds BN); ``sets="batch"`` (the paper says "of the input image": per image is
    the option ``"image"``), ``calibration="mean_of_cosines"`` (paper). The paper
    skips the head during warm-up: use the criterion's warm-up for that. The released
    code's CE at label resolution, OHEM pixel selection and mean over all pixels are the
    options ``ce_resolution``, ``ohem_thresh``/``ohem_min_kept`` and ``reduction`` (see
    :func:`rch_loss`); ``docs/recipes.md`` has the full released recipe and what still
    differs. ``prototype_source="gt"`` builds the
    prototypes from all ground-truth pixels of a class instead of its true positives (the
    paper's Table 1 ablation; learnable prototypes, its other ablation, are not offered).
    """

    uses_features = True
    uses_logits = True
    num_classes_required = True

    def __init__(
        self,
        num_classes: int,
        feature_dim: Optional[int] = None,
        *,
        embed_dim: int = 96,
        tau: float = 0.5,
        rho: float = 0.9,
        loss_weight: float = 0.1,
        hard_weight: float = 1.0,
        use_fn: bool = True,
        use_fp: bool = True,
        sets: str = "batch",
        calibration: str = "mean_of_cosines",
        prototype_update: str = "after",
        prototype_source: str = "tp",
        head_norm: bool = False,
        ignore_index: int = 255,
        prototype_grad: bool = False,
        ce_resolution: str = "embedding",
        ohem_thresh: Optional[float] = None,
        ohem_min_kept: int = 100000,
        reduction: str = "anchors",
        in_channels: Optional[int] = None,
        weight: Optional[float] = None,
    ) -> None:
        feature_dim = renamed("RCHLoss", "in_channels", in_channels, "feature_dim", feature_dim)
        loss_weight = renamed("RCHLoss", "weight", weight, "loss_weight", loss_weight, 0.1)
        if feature_dim is None:
            raise TypeError("RCHLoss needs `feature_dim` (D, the channels of the features)")
        super().__init__(num_classes, ignore_index=ignore_index, feature_dim=feature_dim)
        check_int("embed_dim", embed_dim, lo=1)
        _check_loss_args(tau, loss_weight, hard_weight, use_fn, use_fp, sets, calibration)
        check_real("rho", rho, lo=0.0, hi=1.0, hi_open=True)
        check_choice("prototype_update", prototype_update, _UPDATES)
        check_choice("prototype_source", prototype_source, _SOURCES)
        check_flag("head_norm", head_norm)
        _check_ce_args(prototype_grad, ce_resolution, ohem_thresh, ohem_min_kept, reduction)
        if prototype_grad and prototype_update != "after":
            raise ValueError(
                "`prototype_grad=True` differentiates through this step's prototype update; "
                f"it needs prototype_update='after', got {prototype_update!r}"
            )
        self.embed_dim = embed_dim
        self.tau = float(tau)
        self.rho = float(rho)
        self.loss_weight = float(loss_weight)
        self.hard_weight = float(hard_weight)
        self.use_fn = bool(use_fn)
        self.use_fp = bool(use_fp)
        self.sets = sets
        self.calibration = calibration
        self.prototype_update = prototype_update
        self.prototype_source = prototype_source
        self.prototype_grad = bool(prototype_grad)
        self.ce_resolution = ce_resolution
        self.ohem_thresh = None if ohem_thresh is None else float(ohem_thresh)
        self.ohem_min_kept = ohem_min_kept
        self.reduction = reduction
        self.head = nn.Conv2d(feature_dim, embed_dim, 1, bias=not head_norm)
        # BatchNorm over the global batch under torch.distributed (plain BatchNorm2d otherwise)
        self.norm: nn.Module = GlobalBatchNorm2d(embed_dim) if head_norm else nn.Identity()
        self.register_buffer("prototypes", torch.zeros(num_classes, embed_dim))
        self.register_buffer("initialized", torch.zeros(num_classes, dtype=torch.bool))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """The head: ``(B, D, h, w) -> (B, E, h, w)`` or ``(N, D) -> (N, E)``."""
        check_floating("features", features, (2, 4))
        if features.shape[1] != self.feature_dim:
            raise ValueError(
                f"`features` must have feature_dim={self.feature_dim} channels (dim 1), "
                f"got shape {tuple(features.shape)}"
            )
        features = to_parameter_dtype(features, self.head)
        if features.dim() == 4:
            return self.norm(self.head(features))
        out = self.head(features[:, :, None, None])  # 1x1 conv == linear map on flat features
        return self.norm(out)[:, :, 0, 0]

    @torch.no_grad()
    def _store(self, new: torch.Tensor, init: torch.Tensor) -> None:
        self.prototypes.copy_(new.detach())
        self.initialized.copy_(init)

    def forward(self, features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        check_same_device(features=features, logits=logits, labels=labels, prototypes=self.prototypes)
        emb = self.embed(features)
        prep = _prepare(emb, logits, labels, self.num_classes, self.ignore_index)
        if self.sets == "image" and prep.image is None:
            raise ValueError("`sets='image'` needs (B, C, h, w) features; flat (N, C) inputs have no images")
        update = self.training
        protos, with_grad = self.prototypes, False
        if update and self.prototype_update == "after":
            with_grad = self.prototype_grad
            protos, init = _update(prep, self.prototypes, self.initialized, self.rho, self.prototype_source,
                                   differentiable=with_grad)
            self._store(protos, init)
            if not with_grad:
                protos = self.prototypes
        out = _loss(prep, protos, self.initialized, tau=self.tau, loss_weight=self.loss_weight,
                    hard_weight=self.hard_weight, use_fn=self.use_fn, use_fp=self.use_fp,
                    sets=self.sets, calibration=self.calibration, prototype_grad=with_grad, labels=labels,
                    ignore_index=self.ignore_index, ce_resolution=self.ce_resolution,
                    ohem_thresh=self.ohem_thresh, ohem_min_kept=self.ohem_min_kept, reduction=self.reduction)
        if update and self.prototype_update == "before":
            self._store(*_update(prep, self.prototypes, self.initialized, self.rho, self.prototype_source))
        return self._record(out)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, feature_dim={self.feature_dim}, embed_dim={self.embed_dim}, "
            f"tau={self.tau}, rho={self.rho}, loss_weight={self.loss_weight}, hard_weight={self.hard_weight}, "
            f"use_fn={self.use_fn}, use_fp={self.use_fp}, sets={self.sets!r}, "
            f"calibration={self.calibration!r}, prototype_update={self.prototype_update!r}, prototype_source={self.prototype_source!r}, "
            f"ignore_index={self.ignore_index}, prototype_grad={self.prototype_grad}, "
            f"ce_resolution={self.ce_resolution!r}, ohem_thresh={self.ohem_thresh}, "
            f"ohem_min_kept={self.ohem_min_kept}, reduction={self.reduction!r}"
        )
