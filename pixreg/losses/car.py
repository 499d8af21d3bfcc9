"""CAR: class-aware regularizations (METHODS.md section 2).

Three terms computed from the *batch centres* ``mu_k`` (mean feature of the
non-ignored pixels of class ``k`` in the whole, global batch):

* ``intra_c2p``: pulls each pixel to its class centre;
* ``inter_c2c``: pushes the centres apart (attention between centres);
* ``inter_c2p``: pushes each pixel away from the centres of the other classes.

Two variants: ``"paper"`` (default, the equations of the paper) and ``"released"``
(the authors' released TensorFlow code, reproduced term by term); see
:class:`CARLoss` for the table of differences.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from ._common import (
    LABEL_SAMPLING,
    check_choice,
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
    resize_labels,
)
from .base import LossOutput, Regularizer

__all__ = ["car_loss", "CARLoss", "RELEASED_CLIP_EPS", "RELEASED_INTRA_FLOOR"]

#: ``tf.keras.backend.epsilon()``: the released code clips the per-row (c2c) and
#: per-pixel (c2p) penalties to ``[eps, 1 - eps]``.
RELEASED_CLIP_EPS = 1e-7
#: The released code clamps the intra term from below: ``clip_by_value(loss, 1e-5, loss)``.
RELEASED_INTRA_FLOOR = 1e-5

_VARIANTS = ("paper", "released")
_THRESHOLD_CLASSES = ("present", "all")


def _check_args(
    num_classes: int,
    intra_weight: float,
    c2c_weight: float,
    c2p_weight: float,
    eps0: float,
    eps1: float,
    variant: str,
    threshold_classes: Optional[str],
    ignore_index: int,
    ema_decay: Optional[float],
) -> str:
    """Validate hyper-parameters; return the resolved ``threshold_classes``."""
    check_int("num_classes", num_classes, lo=1)
    for name, v in (
        ("intra_weight", intra_weight),
        ("c2c_weight", c2c_weight),
        ("c2p_weight", c2p_weight),
        ("eps0", eps0),
        ("eps1", eps1),
    ):
        check_real(name, v, lo=0.0)
    check_choice("variant", variant, _VARIANTS)
    if threshold_classes is None:
        threshold_classes = "present" if variant == "paper" else "all"
    check_choice("threshold_classes", threshold_classes, _THRESHOLD_CLASSES)
    check_ignore_index(ignore_index, num_classes)
    if ema_decay is not None:
        if variant != "released":
            raise ValueError("`ema_decay` (EMA of centres) is only available with variant='released'")
        check_real("ema_decay", ema_decay, lo=0.0, hi=1.0, hi_open=True)
    return threshold_classes


def _resolve_label_sampling(variant: str, label_sampling: Optional[str]) -> str:
    """``None`` -> the variant's rule: ``"torch"`` (paper) or ``"align_corners"`` (released)."""
    if label_sampling is None:
        return "torch" if variant == "paper" else "align_corners"
    if label_sampling not in LABEL_SAMPLING:
        raise ValueError(f"`label_sampling` must be one of {LABEL_SAMPLING} or None, got {label_sampling!r}")
    return label_sampling


def _threshold(eps: float, denom: torch.Tensor) -> torch.Tensor:
    """``eps / (K' - 1)``; infinite (no penalty) when ``K' - 1 = 0``, as the formula gives."""
    inf = torch.full_like(denom, float("inf"))
    return torch.where(denom > 0, eps / denom.clamp(min=1), inf)


def _masked_softmax(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis restricted to ``keep`` (broadcastable bool); 0 elsewhere.

    Rows with nothing kept come out uniform-then-zeroed (finite, no NaN)."""
    neg = torch.finfo(logits.dtype).min
    return torch.softmax(logits.masked_fill(~keep, neg), dim=-1) * keep


def car_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    intra_weight: float = 1.0,
    c2c_weight: float = 1.0,
    c2p_weight: float = 1.0,
    eps0: float = 0.5,
    eps1: float = 0.25,
    variant: str = "paper",
    threshold_classes: Optional[str] = None,
    ignore_index: int = 255,
    ema_centres: Optional[torch.Tensor] = None,
    ema_decay: float = 0.9,
    ema_update: bool = True,
    label_sampling: Optional[str] = None,
) -> LossOutput:
    r"""Class-aware regularizations (CAR): intra-c2p, inter-c2c and inter-c2p terms.

    Notation: ``x_i`` the feature of pixel ``i`` (``D`` channels), ``y_i`` its label,
    ``V`` the non-ignored pixels, ``P`` the set of classes present in the (global) batch,
    ``mu_k = mean_{i in V, y_i = k} x_i`` the batch centre of class ``k``.
    ``K'`` is the threshold's class count: ``|P|`` (``threshold_classes="present"``, the
    paper variant's default) or ``K = num_classes`` (``"all"``, the released default).
    When ``K' = 1`` the thresholds ``eps/(K'-1)`` are infinite: no entry is penalised
    (released: the inter terms sit at their clip floor ``(1e-7)^2``).

    Paper variant (default)::

        intra_c2p = w_intra * 1/(|V| D) * sum_{i in V} ||mu_{y_i} - x_i||^2
        A   = softmax_{l in P}(mu_k . mu_l / sqrt(D))                  (k in P)
        r_k = sum_{l in P, l != k} max(A_kl - eps0 / (K'-1), 0)
        inter_c2c = w_c2c * 1/|P| * sum_{k in P} r_k^2
        L_il = ||mu_{y_i}||^2 if l == y_i else x_i . mu_l              (no scaling)
        B_i  = softmax_{l in P}(L_i)
        s_i  = sum_{l in P, l != y_i} max(B_il - eps1 / (K'-1), 0)
        inter_c2p = w_c2p * 1/|V| * sum_{i in V} s_i^2

    ``f_mse`` is read as the mean of squares (intra: over valid pixels *and* channels),
    ``f_sum`` as the sum over the class axis. Absent classes are excluded from every
    term, including the softmax normalisers. Gradient flows through the centres in
    every term (the paper does not stop it; for ``intra_c2p`` that path contributes
    exactly 0, since the deviations from a class mean sum to 0). ``inter_c2c`` is 0 with fewer than two
    present classes; every term is 0 when no pixel is valid.

    Released variant (``variant="released"``)::

        m = sg(mu) (stop-gradient); absent classes have mu_k = 0 and stay in the softmax
        intra_c2p = w_intra * max((1/(N D) * sum_{i in V} sum_d |m_{y_i,d} - x_id|)^2, 1e-5)
        A   = softmax_{l < K}(mu_k . m_l / sqrt(D))                    (all K rows)
        r_k = clip(sum_{l != k} max(A_kl - eps0/(K'-1), 0), 1e-7, 1 - 1e-7)
        inter_c2c = w_c2c * (1/K * sum_k r_k)^2
        L_il = ||m_l||^2 / sqrt(D) if (i in V and l == y_i) else x_i . m_l / sqrt(D)
        s_i  = clip(sum_{l != y_i} max(softmax_l(L_i) - eps1/(K'-1), 0), 1e-7, 1 - 1e-7)
        inter_c2p = w_c2p * (1/N * sum_{i < N} s_i)^2                  (ignored pixels included)

    with ``N`` *all* pixels (ignored included) at feature resolution. With
    ``ema_centres`` the centres are an exponential moving average instead (see below).

    Args:
        features: ``(B, D, h, w)`` or flat ``(N, D)`` floating-point features.
        labels: ``(B, H, W)`` (nearest-resized to ``(h, w)``, see ``label_sampling``) or
            ``(N,)`` with flat features; integers in ``0..num_classes-1`` or ``ignore_index``.
        num_classes: ``K``.
        intra_weight, c2c_weight, c2p_weight: term weights (paper: 1, 1, 1). A term whose
            weight is 0 is not computed and reported as an exact 0 (no graph).
        eps0, eps1: c2c and c2p thresholds numerators (paper: 0.5, 0.25).
        variant: ``"paper"`` or ``"released"``.
        threshold_classes: ``K'`` in the thresholds: ``"present"`` or ``"all"``; ``None``
            picks the variant's default (paper: ``"present"``, released: ``"all"``).
        ignore_index: ignored label value (must not be a class index).
        ema_centres: released variant only: a ``(K, D)`` buffer of centres, updated **in
            place** (no grad) when ``ema_update`` as ``m_k <- m_k + (1 - ema_decay) *
            (mu_k - m_k)`` for present classes ``k`` (absent rows untouched), then used,
            detached, as the centres of all three terms (so no gradient flows through
            any centre, c2c included), as in the released code.
        ema_decay: the EMA decay (released code: 0.9).
        ema_update: whether to update ``ema_centres`` (the module passes ``self.training``).
        label_sampling: how labels are nearest-resized to the features
            (:func:`pixreg.losses.resize_labels`): ``"torch"`` (torch's ``nearest``,
            row ``min(floor(fl(i * fl(H/h))), H-1)`` in float32) or ``"align_corners"``
            (TensorFlow's ``align_corners=True`` resize of the released code, row
            ``round(i * (H-1)/(h-1))``: rows 0, 8, 16, ... for 513 -> 65); ``None`` (default)
            picks the variant's: paper ``"torch"``, released ``"align_corners"``.

    Returns:
        :class:`LossOutput` with ``loss`` (scalar, in the features' compute dtype: float32,
        or float64 for float64 features) and ``terms`` ``{"intra_c2p", "inter_c2c",
        "inter_c2p"}`` (each already multiplied by its weight; they sum to ``loss``).

    Units: ``intra_c2p`` is in squared feature units (paper) or squared feature units
    of a mean absolute difference (released); the inter terms are dimensionless, in [0, 1].

    Example:
        >>> import torch
        >>> x = torch.randn(2, 8, 4, 4)
        >>> y = torch.randint(0, 3, (2, 16, 16))
        >>> out = car_loss(x, y, num_classes=3)
        >>> sorted(out.terms)
        ['inter_c2c', 'inter_c2p', 'intra_c2p']
        >>> bool(torch.isfinite(out.loss)), out.loss.shape
        (True, torch.Size([]))
    """
    threshold_classes = _check_args(
        num_classes, intra_weight, c2c_weight, c2p_weight, eps0, eps1, variant,
        threshold_classes, ignore_index, ema_decay if ema_centres is not None else None,
    )
    label_sampling = _resolve_label_sampling(variant, label_sampling)
    check_labels(labels, None, ignore_index)  # types first: a NumPy array gets a TypeError, not an AttributeError
    check_same_device(features=features, labels=labels, ema_centres=ema_centres)
    if (isinstance(features, torch.Tensor) and isinstance(labels, torch.Tensor) and features.dim() == 4
            and labels.dim() == 3 and labels.shape[0] == features.shape[0]):
        labels = resize_labels(labels, tuple(features.shape[-2:]), label_sampling)
    flat, lab = flatten_features(features, labels)
    check_labels(lab, num_classes, ignore_index)
    n, d = flat.shape
    if ema_centres is not None:
        check_floating("ema_centres", ema_centres, (2,))
        if tuple(ema_centres.shape) != (num_classes, d):
            raise ValueError(
                f"`ema_centres` must have shape (num_classes, D) = ({num_classes}, {d}), "
                f"got {tuple(ema_centres.shape)}"
            )

    k = num_classes
    with no_autocast(flat):
        dt = compute_dtype(flat)
        x = flat.to(dt)
        dl = dump_labels(lab, k, ignore_index)  # (N,), ignored -> k
        valid = dl < k  # (N,)
        stats = class_stats(x, dl, k)  # global sums (grad) and counts (no grad)
        present = stats.present  # (K,)
        mu = stats.centres()  # (K, D); absent rows 0
        if ema_centres is not None:
            if ema_update:
                every = torch.ones_like(present)  # initialised (Glorot), so no first-sighting copy
                new, _ = ema_class_means(x, dl, ema_centres, every, ema_decay)
                with torch.no_grad():
                    ema_centres.copy_(new)
            mu = ema_centres.detach().to(dt).clone()
        # (N, K) bool, 1 byte per entry; ignored rows (dump class k) all False
        one_hot = dl.unsqueeze(1) == torch.arange(k, device=x.device).unsqueeze(0)
        n_present = present.sum().to(dt)
        if threshold_classes == "present":
            denom = (n_present - 1).clamp(min=0)
        else:
            denom = torch.full((), float(k - 1), dtype=dt, device=x.device)
        zero = x.new_zeros(())
        n_valid = valid.sum()
        n_all = torch.full((), float(n), dtype=dt, device=x.device)

        if variant == "paper":
            terms = _paper_terms(
                x, mu, dl, valid, one_hot, present, n_present, n_valid, denom, eps0, eps1,
                intra_weight, c2c_weight, c2p_weight, zero,
            )
        else:
            terms = _released_terms(
                x, mu, dl, valid, one_hot, n_all, denom, eps0, eps1,
                intra_weight, c2c_weight, c2p_weight, zero,
            )
        loss = terms["intra_c2p"] + terms["inter_c2c"] + terms["inter_c2p"]
    return LossOutput(loss, terms)


def _paper_terms(
    x: torch.Tensor,
    mu: torch.Tensor,
    dl: torch.Tensor,
    valid: torch.Tensor,
    one_hot: torch.Tensor,
    present: torch.Tensor,
    n_present: torch.Tensor,
    n_valid: torch.Tensor,
    denom: torch.Tensor,
    eps0: float,
    eps1: float,
    w_intra: float,
    w_c2c: float,
    w_c2p: float,
    zero: torch.Tensor,
) -> Dict[str, torch.Tensor]:
    n, d = x.shape
    k = mu.shape[0]
    out: Dict[str, torch.Tensor] = {}

    if w_intra:
        mu_ext = torch.cat([mu, mu.new_zeros(1, d)])  # dump row for ignored pixels
        diff = x - mu_ext[dl]  # (N, D)
        sq = torch.where(valid, (diff * diff).sum(1), zero)
        out["intra_c2p"] = w_intra * global_mean(sq.sum(), n_valid * d)
    else:
        out["intra_c2p"] = zero

    if w_c2c:
        gram = mu @ mu.t() / math.sqrt(d)  # (K, K)
        a = _masked_softmax(gram, present.unsqueeze(0))
        off = present.unsqueeze(0) & present.unsqueeze(1) & ~torch.eye(k, dtype=torch.bool, device=x.device)
        r = (torch.relu(a - _threshold(eps0, denom)) * off).sum(1)  # (K,); 0 for absent rows
        out["inter_c2c"] = w_c2c * (r * r).sum() / n_present.clamp(min=1)
    else:
        out["inter_c2c"] = zero

    if w_c2p:
        energy = x @ mu.t()  # (N, K)
        self_energy = (mu * mu).sum(1)  # (K,)
        energy = torch.where(one_hot, self_energy.unsqueeze(0), energy)
        b = _masked_softmax(energy, present.unsqueeze(0))
        other = present.unsqueeze(0) & ~one_hot
        s = (torch.relu(b - _threshold(eps1, denom)) * other).sum(1)  # (N,)
        s = torch.where(valid, s, zero)
        out["inter_c2p"] = w_c2p * global_mean((s * s).sum(), n_valid)
    else:
        out["inter_c2p"] = zero
    return out


def _released_terms(
    x: torch.Tensor,
    mu: torch.Tensor,
    dl: torch.Tensor,
    valid: torch.Tensor,
    one_hot: torch.Tensor,
    n_all: torch.Tensor,
    denom: torch.Tensor,
    eps0: float,
    eps1: float,
    w_intra: float,
    w_c2c: float,
    w_c2p: float,
    zero: torch.Tensor,
) -> Dict[str, torch.Tensor]:
    n, d = x.shape
    k = mu.shape[0]
    sg = mu.detach()
    lo, hi = RELEASED_CLIP_EPS, 1.0 - RELEASED_CLIP_EPS
    out: Dict[str, torch.Tensor] = {}

    if w_intra:
        sg_ext = torch.cat([sg, sg.new_zeros(1, d)])
        absd = torch.where(valid, (x - sg_ext[dl]).abs().sum(1), zero)  # masked, not dropped
        m = global_mean(absd.sum(), n_all * d)  # mean over all pixels and channels
        out["intra_c2p"] = w_intra * (m * m).clamp(min=RELEASED_INTRA_FLOOR)
    else:
        out["intra_c2p"] = zero

    if w_c2c:
        a = torch.softmax(mu @ sg.t() / math.sqrt(d), dim=1)  # query mu, key sg(mu)
        off = ~torch.eye(k, dtype=torch.bool, device=x.device)
        r = (torch.relu(a - _threshold(eps0, denom)) * off).sum(1).clamp(lo, hi)  # (K,)
        m = r.mean()
        out["inter_c2c"] = w_c2c * m * m
    else:
        out["inter_c2c"] = zero

    if w_c2p:
        energy = torch.where(one_hot, (sg * sg).sum(1).unsqueeze(0), x @ sg.t()) / math.sqrt(d)
        b = torch.softmax(energy, dim=1)
        s = (torch.relu(b - _threshold(eps1, denom)) * ~one_hot).sum(1).clamp(lo, hi)  # (N,) incl. ignored
        m = global_mean(s.sum(), n_all)
        out["inter_c2p"] = w_c2p * m * m
    else:
        out["inter_c2p"] = zero
    return out


class CARLoss(Regularizer):
    """Class-aware regularizations (CAR) as a module; see :func:`car_loss` for the equations.

    ``forward(features, labels) -> loss`` (scalar, the weighted sum of the three terms;
    ``self.terms`` holds them, detached). Stateless unless ``ema_decay`` is given
    (released variant only): then a ``(K, D)`` buffer ``ema_centres`` (needs
    ``feature_dim``) is initialised Glorot-uniform like the released code
    (``U(-a, a)``, ``a = sqrt(6 / (K + D))``), updated in training mode only, saved in
    ``state_dict``; classes absent from the batch leave their row untouched.

    Paper vs released code (``variant="released"`` reproduces the right column):

    ======================  ==================================  ==========================================
    aspect                  ``"paper"`` (default)               ``"released"``
    ======================  ==================================  ==========================================
    intra reduction         mean of squares over valid pixels   square of the mean of ``|mu - x|`` over
                            and channels (f_mse)                all pixels and channels (ignored pixels
                                                                contribute 0 but count); floor ``1e-5``
    c2c / c2p reduction     mean of squares (f_mse) of the      square of the mean of the row / pixel
                            row / pixel sums                    sums, each clipped to ``[1e-7, 1-1e-7]``
    c2c / c2p averaged on   present rows / valid pixels         all K rows / all pixels (ignored included)
    absent classes          excluded everywhere (softmax too)   zero centre, enters softmax and rows
    ignored pixels in c2p   excluded                            included: no own class, all K entries
                                                                count as "other"
    c2p energies            ``x . mu`` (no scaling)             ``x . mu / sqrt(D)``
    threshold ``K'-1``      present classes - 1 (option "all")  all classes - 1 (option "present")
    gradient via centres    flows in all three terms            intra: stop; c2c: query flows, key stop;
                                                                c2p: stop
    EMA of centres          not available                       optional (``ema_decay``, released 0.9,
                                                                off by default); EMA centres replace the
                                                                batch centres in all terms, detached
    ======================  ==================================  ==========================================

    Common to both: centres from sums and counts all-reduced across processes before
    division (global batch); squares of global means are squares of the *global* mean
    (the released code squares per-replica means). Labels are nearest-resized with
    torch's rule (paper) or TensorFlow's ``align_corners=True`` rule (released, as its code
    does), see ``label_sampling`` in :func:`car_loss`. With one class (``K' = 1``) the
    released thresholds ``eps/(K'-1)`` are infinite and the inter terms sit at their floor. The released code also stop-gradients the centres in the intra term,
    which METHODS.md does not list; we reproduce it. The released module's own default
    switches c2p off (configs switch it on); here all three weights default to 1. Its 1x1 ``linear_conv`` in front of
    the loss is not part of this module (use a ``projection`` in the criterion).

    Args: as :func:`car_loss` (hyper-parameters keyword-only), plus ``ema_decay``
    (``None`` = off) and ``feature_dim`` (``D``, required with ``ema_decay``).
    """

    uses_features = True
    uses_logits = False
    num_classes_required = True

    def __init__(
        self,
        num_classes: int,
        feature_dim: Optional[int] = None,
        *,
        intra_weight: float = 1.0,
        c2c_weight: float = 1.0,
        c2p_weight: float = 1.0,
        eps0: float = 0.5,
        eps1: float = 0.25,
        variant: str = "paper",
        threshold_classes: Optional[str] = None,
        ignore_index: int = 255,
        ema_decay: Optional[float] = None,
        label_sampling: Optional[str] = None,
    ) -> None:
        super().__init__(num_classes, ignore_index=ignore_index, feature_dim=feature_dim)
        _check_args(
            num_classes, intra_weight, c2c_weight, c2p_weight, eps0, eps1, variant,
            threshold_classes, ignore_index, ema_decay,
        )
        self.intra_weight = float(intra_weight)
        self.c2c_weight = float(c2c_weight)
        self.c2p_weight = float(c2p_weight)
        self.eps0 = float(eps0)
        self.eps1 = float(eps1)
        self.variant = variant
        self.threshold_classes = threshold_classes
        self.ema_decay = None if ema_decay is None else float(ema_decay)
        self.label_sampling = _resolve_label_sampling(variant, label_sampling)
        self.ema_centres: Optional[torch.Tensor]
        if ema_decay is not None:
            if feature_dim is None:
                raise ValueError("`feature_dim` (D) must be given when `ema_decay` is set")
            bound = math.sqrt(6.0 / (num_classes + feature_dim))
            init = torch.empty(num_classes, feature_dim).uniform_(-bound, bound)
            self.register_buffer("ema_centres", init)
        else:
            self.ema_centres = None

    def extra_repr(self) -> str:
        s = (
            f"num_classes={self.num_classes}, variant={self.variant!r}, weights=({self.intra_weight}, "
            f"{self.c2c_weight}, {self.c2p_weight}), eps0={self.eps0}, eps1={self.eps1}, "
            f"label_sampling={self.label_sampling!r}"
        )
        if self.ema_decay is not None:
            s += f", ema_decay={self.ema_decay}, feature_dim={self.feature_dim}"
        return s

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = car_loss(
            features,
            labels,
            self.num_classes,
            intra_weight=self.intra_weight,
            c2c_weight=self.c2c_weight,
            c2p_weight=self.c2p_weight,
            eps0=self.eps0,
            eps1=self.eps1,
            variant=self.variant,
            threshold_classes=self.threshold_classes,
            ignore_index=self.ignore_index,
            ema_centres=self.ema_centres,
            ema_decay=0.9 if self.ema_decay is None else self.ema_decay,
            ema_update=self.training,
            label_sampling=self.label_sampling,
        )
        return self._record(out)
