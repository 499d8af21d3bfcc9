"""C+1 loss: compact classes of interest, background pushed away from their centres.

``L = CE + alpha * L_compact + beta * L_background`` (METHODS.md section 1). This module
implements the two regularization terms; the cross-entropy is the user's.

Notation: ``K`` classes including the background (index ``background_index``), the
``C = K - 1`` other classes are the *classes of interest* (CoIs). Centres exist for the
CoIs only, stored as a ``(C, D)`` tensor whose row ``j`` belongs to the ``j``-th CoI in
increasing class order with the background skipped (CoI row ``j`` is class ``j`` if
``j < background_index``, class ``j + 1`` otherwise).

Choices (the paper fixes neither the distance, the margin nor the momentum):

* **distance** ``"squared_euclidean"`` (default, the centre-loss convention, *without* the
  factor 1/2 of Wen et al.) or ``"euclidean"``. The Euclidean distance is computed as
  ``sqrt(max(d^2, 1e-12))`` so that its gradient stays finite when a feature coincides
  with a centre (the value is then ``1e-6`` instead of ``0``, with zero gradient).
* **margin** ``m_b = 1.0``: with the default L2-normalised features and a centre of unit
  norm, ``|f - c|^2 >= 1`` (equivalently ``|f - c| >= 1``, so the same default serves
  both distances) holds iff ``cos(f, c) <= 1/2``, i.e. background features are asked to
  keep an angle of at least 60 degrees to every CoI centre. Unit features are at squared
  distance 2 when orthogonal and 4 when opposite, so 1 asks for separation without
  forcing background to be anti-aligned with all C centres at once (impossible for many
  classes in few dimensions). A moving-average centre has norm ``r <= 1``, for which the
  condition reads ``cos(f, c) <= r / 2``. Without normalisation the feature scale is
  arbitrary and the margin must be tuned.
* **normalize** (default True, the paper's best setting): each *pixel feature vector*
  is L2-normalised over its ``D`` channels (``F.normalize``, eps 1e-12; a zero vector
  stays zero) before anything else. Batch centres are means of these unit vectors and
  are **not** re-normalised (norm <= 1); learnable and classifier centres are used as
  they are (not normalised).
* **momentum** 0.9 (default): ``c <- 0.9 c + 0.1 batch_centre``, a memory of about ten
  steps (~160 images at the usual batch of 16), long enough to smooth single-batch
  noise yet recent enough to follow features that move during training; it is the
  decay used for centres/prototypes by the CAR released code and by RCH (rho = 0.9).
* **moving-average centres in the loss**: the loss uses the centres *after* this
  step's update (a class seen for the first time thus takes part at once, with its
  batch centre), and the centres are constants in the loss (detached; gradient flows to
  the features only). The first sighting of a class sets its centre to the batch centre;
  classes absent from the batch keep their centre and ``initialized`` flag unchanged.
  The update only happens in training mode (``module.train()``); in eval mode the stored
  centres are used as they are.
* **which CoIs have a centre**: moving average: those with ``initialized`` True (ever
  seen in a training batch, not only in the current one); learnable and classifier: all
  C. Pixels of a CoI without a centre are excluded from the compact mean; the ``1/C``
  of the background term counts only the CoIs that have a centre.
* learnable / classifier centres receive gradient from both terms (the compact term
  pulls them to their pixels, the background term pushes them from background pixels).
* labels are brought to feature resolution by torch's ``nearest`` (float32 floor rule, see
  :mod:`pixreg.losses._common`).
* cost: all pixel-to-centre distances come from one ``(N, C)`` matmul,
  ``|f|^2 + |c|^2 - 2 f.c`` (clamped at 0), in float32 (float64 stays float64); no
  ``(N, D)`` gather of centres, no loop over classes, no host synchronisation.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._common import (
    check_bool_mask,
    check_choice,
    check_flag,
    check_floating,
    check_ignore_index,
    check_int,
    check_labels,
    check_real,
    check_same_device,
    compute_dtype,
    dump_labels,
    ema_class_means,
    flatten_features,
    global_mean,
    no_autocast,
    renamed,
)
from .base import LossOutput, Regularizer

__all__ = ["cplus1_loss", "update_moving_average_centres", "CPlus1Loss", "DISTANCES", "CENTRE_MODES"]

DISTANCES = ("squared_euclidean", "euclidean")
CENTRE_MODES = ("moving_average", "learnable", "classifier")
_EUCLID_EPS = 1e-12

ClassifierLike = Union[nn.Module, torch.Tensor, Callable[[], torch.Tensor]]


# ----------------------------------------------------------------------------- checks
def _check_hparams(
    num_classes: int,
    background_index: int,
    ignore_index: int,
    *,
    alpha: float = 0.0,
    beta: float = 0.0,
    margin: float = 1.0,
    distance: str = "squared_euclidean",
    normalize: bool = True,
) -> None:
    check_int("num_classes", num_classes, lo=2)
    check_int("background_index", background_index, lo=0, hi=num_classes - 1)
    check_ignore_index(ignore_index, num_classes)
    check_real("alpha", alpha, lo=0.0)
    check_real("beta", beta, lo=0.0)
    check_real("margin", margin, lo=0.0)
    check_choice("distance", distance, DISTANCES)
    check_flag("normalize", normalize)


def _check_centres(centres: torch.Tensor, feature_dim: int, name: str = "centres") -> None:
    check_floating(name, centres, (2,))
    if centres.shape[1] != feature_dim:
        raise ValueError(
            f"`{name}` must be (C, D) with D={feature_dim} (the features' channels), got {tuple(centres.shape)}"
        )


# ------------------------------------------------------------------------- internals
def _coi_index(num_classes: int, background_index: int, device: torch.device) -> torch.Tensor:
    """``(K + 1,)`` map class -> CoI row; background and the dump class K map to C."""
    idx = torch.arange(num_classes + 1, device=device)
    coi = idx - (idx > background_index).long()
    return torch.where(idx == background_index, num_classes - 1, coi)


def _coi_classes(num_classes: int, background_index: int, device: torch.device) -> torch.Tensor:
    """``(C,)`` class index of each CoI row."""
    j = torch.arange(num_classes - 1, device=device)
    return j + (j >= background_index).long()


def _prepare(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, background_index: int, ignore_index: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat features in the compute dtype (normalised if asked), dump labels, CoI rows."""
    f, lab = flatten_features(features, labels)
    f = f.to(compute_dtype(f))
    if normalize:
        f = F.normalize(f, p=2.0, dim=1, eps=1e-12)
    dl = dump_labels(lab, num_classes, ignore_index)
    cl = _coi_index(num_classes, background_index, f.device)[dl]
    return f, dl, cl


def _dist(d2: torch.Tensor, distance: str) -> torch.Tensor:
    if distance == "squared_euclidean":
        return d2
    return d2.clamp_min(_EUCLID_EPS).sqrt()


def _loss(
    f: torch.Tensor,
    dl: torch.Tensor,
    cl: torch.Tensor,
    centres: torch.Tensor,
    mask: torch.Tensor,
    *,
    background_index: int,
    alpha: float,
    beta: float,
    margin: float,
    distance: str,
) -> LossOutput:
    num_coi = centres.shape[0]
    c = centres.to(f.dtype)
    zero = f.new_zeros(())
    # all pixel-to-centre distances from one (N, C) matmul: |f|^2 + |c|^2 - 2 f.c
    d2 = f.pow(2).sum(1, keepdim=True) + c.pow(2).sum(1)[None] - 2.0 * (f @ c.t())
    dist = _dist(d2.clamp_min(0.0), distance)  # (N, C)
    # compact: pixels of CoIs that have a centre, distance to their own centre
    own = torch.cat([mask, mask.new_zeros(1)], 0)[cl]  # (N,) False: background, ignored, no centre
    d_own = dist.gather(1, cl.clamp_max(num_coi - 1)[:, None])[:, 0]
    compact = global_mean(torch.where(own, d_own, zero).sum(), own.sum())
    # background: mean over background pixels of (1/C') sum_k max(0, m - d(f, c_k))
    hinge = torch.where(mask[None], (margin - dist).clamp_min(0.0), zero)
    per_pixel = hinge.sum(1) / mask.sum().clamp_min(1).to(f.dtype)
    is_bg = dl == background_index
    background = global_mean(torch.where(is_bg, per_pixel, zero).sum(), is_bg.sum())
    terms = {"compact": alpha * compact, "background": beta * background}
    return LossOutput(terms["compact"] + terms["background"], terms)


# ------------------------------------------------------------------------ functional
def cplus1_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    centres: torch.Tensor,
    *,
    centre_mask: Optional[torch.Tensor] = None,
    background_index: int = 0,
    alpha: float = 0.1,
    beta: float = 1e-4,
    margin: float = 1.0,
    distance: str = "squared_euclidean",
    normalize: bool = True,
    ignore_index: int = 255,
) -> LossOutput:
    r"""The two C+1 regularization terms for given CoI centres.

    .. math::

        L_{compact} = \frac{1}{|P|} \sum_{i \in P} d(f_i, c_{y_i}), \qquad
        L_{background} = \frac{1}{|B|} \sum_{i \in B} \frac{1}{C'} \sum_{k: c_k}
            \max(0, m_b - d(f_i, c_k))

    with ``P`` the non-ignored pixels of a CoI that has a centre, ``B`` the background
    pixels, ``C'`` the number of CoIs with a centre and ``d`` the (squared) Euclidean
    distance. Returns ``loss = alpha * L_compact + beta * L_background`` with terms
    ``compact`` and ``background`` (already weighted). A term with no pixel is 0 (with a
    zero, finite gradient). Means are over the global batch under ``torch.distributed``.

    Args:
        features: ``(B, D, h, w)`` pixel features or flat ``(N, D)``, floating point.
        labels: ``(B, H, W)`` (nearest-resized to ``(h, w)`` by torch's rule) or ``(N,)``
            integers in ``0..K-1`` or ``ignore_index``; ``K = C + 1``.
        centres: ``(C, D)`` CoI centres, row ``j`` for the ``j``-th non-background class.
            Used as given: gradient flows into them if they require grad (learnable or
            classifier centres); pass detached centres for moving averages.
        centre_mask: ``(C,)`` bool, which CoIs have a centre (default: all).
        background_index: class index of the background.
        alpha, beta: weights of the compact and background terms (paper: 0.1, 1e-4).
        margin: ``m_b``, in the units of ``distance`` (squared units by default).
        distance: ``"squared_euclidean"`` or ``"euclidean"``.
        normalize: L2-normalise each pixel feature over ``D`` first (not the centres).
        ignore_index: label value of ignored pixels.

    Statistics are computed in float32 (float64 stays float64), autocast disabled.

    Example:
        >>> import torch
        >>> from pixreg.losses.cplus1 import cplus1_loss
        >>> feats = torch.randn(2, 8, 4, 4, requires_grad=True)
        >>> labels = torch.randint(0, 3, (2, 16, 16))   # K = 3: background 0, CoIs 1, 2
        >>> centres = torch.nn.functional.normalize(torch.randn(2, 8), dim=1)
        >>> out = cplus1_loss(feats, labels, centres)
        >>> sorted(out.terms)
        ['background', 'compact']
        >>> bool(torch.allclose(out.loss, out.terms["compact"] + out.terms["background"]))
        True
        >>> out.loss.backward()
    """
    check_same_device(features=features, labels=labels, centres=centres, centre_mask=centre_mask)
    check_floating("features", features, (2, 4))
    _check_centres(centres, features.shape[1])
    num_classes = centres.shape[0] + 1
    _check_hparams(num_classes, background_index, ignore_index, alpha=alpha, beta=beta, margin=margin,
                   distance=distance, normalize=normalize)
    if centre_mask is None:
        centre_mask = torch.ones(centres.shape[0], dtype=torch.bool, device=centres.device)
    check_bool_mask("centre_mask", centre_mask, centres.shape[0])
    check_labels(labels, num_classes, ignore_index)
    with no_autocast(features):
        f, dl, cl = _prepare(features, labels, num_classes, background_index, ignore_index, normalize)
        return _loss(
            f, dl, cl, centres, centre_mask,
            background_index=background_index, alpha=alpha, beta=beta, margin=margin, distance=distance,
        )


def update_moving_average_centres(
    features: torch.Tensor,
    labels: torch.Tensor,
    centres: torch.Tensor,
    initialized: torch.Tensor,
    *,
    background_index: int = 0,
    momentum: float = 0.9,
    normalize: bool = True,
    ignore_index: int = 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One moving-average step of the CoI centres; returns new ``(centres, initialized)``.

    For each CoI ``k`` present in the (global) batch with batch centre ``b_k`` (mean of
    its non-ignored, optionally L2-normalised features): ``c_k <- b_k`` if not yet
    initialised, else ``c_k <- momentum * c_k + (1 - momentum) * b_k``. Absent CoIs are
    returned unchanged. No gradient; the inputs are not modified. ``centres`` is
    ``(C, D)``, ``initialized`` ``(C,)`` bool; the result is in the compute dtype.

    Example:
        >>> import torch
        >>> c, init = torch.zeros(2, 4), torch.zeros(2, dtype=torch.bool)
        >>> feats, labels = torch.randn(6, 4), torch.tensor([0, 1, 1, 0, 255, 1])
        >>> c, init = update_moving_average_centres(feats, labels, c, init)
        >>> init.tolist()
        [True, False]
    """
    check_same_device(features=features, labels=labels, centres=centres, initialized=initialized)
    check_floating("features", features, (2, 4))
    _check_centres(centres, features.shape[1])
    num_classes = centres.shape[0] + 1
    _check_hparams(num_classes, background_index, ignore_index, normalize=normalize)
    check_bool_mask("initialized", initialized, centres.shape[0])
    check_real("momentum", momentum, lo=0.0, hi=1.0, hi_open=True)
    check_labels(labels, num_classes, ignore_index)
    with no_autocast(features):
        f, _, cl = _prepare(features.detach(), labels, num_classes, background_index, ignore_index, normalize)
        return ema_class_means(f, cl, centres, initialized, momentum)


# ---------------------------------------------------------------------------- module
class CPlus1Loss(Regularizer):
    """C+1 regularizer (compact CoIs + background margin) with its centres.

    Args:
        num_classes: ``K``, including the background.
        feature_dim: ``D``, channels of the features (``feat_dim``, its old name, is
            accepted for one version with a ``DeprecationWarning``).
        background_index: background class (0 as in Pascal VOC).
        alpha, beta: term weights (paper's best: 0.1 and 1e-4; alpha 0.01 for larger
            backbones).
        margin: ``m_b`` (default 1.0, see the module docstring: 60 degrees to a unit
            centre; the same condition for both distances).
        distance: ``"squared_euclidean"`` (default) or ``"euclidean"``.
        centres: ``"moving_average"`` (default, the paper's best; buffers ``centres``
            ``(C, D)`` and ``initialized`` ``(C,)``, updated in training mode, used
            after the update and detached), ``"learnable"`` (``nn.Parameter``
            ``centres`` ``(C, D)``, initialised ``randn / sqrt(D)``, i.e. near unit norm)
            or ``"classifier"`` (the CoI rows of the ``(K, D)`` weight of the final 1x1
            classifier; the background row is unused; gradient flows into the weight).
        momentum: moving-average momentum (default 0.9, see the module docstring).
        normalize: L2-normalise each pixel feature vector first (default True).
        ignore_index: ignored label value.
        classifier: for ``centres="classifier"``: an ``nn.Conv2d(D, K, 1)`` /
            ``nn.Linear(D, K)`` (its ``weight`` is read at every call), a ``(K, D)``
            tensor/parameter, or a callable returning the ``(K, D)`` (or
            ``(K, D, 1, 1)``) weight. It is *not* registered as a submodule, so the
            criterion's ``state_dict``/``parameters()``/``.to()`` do not touch the
            model's classifier. Can be set later with :meth:`set_classifier`.

    ``forward(features, labels)`` returns the weighted loss; ``terms`` holds
    ``compact`` and ``background`` of the last call.
    """

    uses_features = True
    uses_logits = False
    num_classes_required = True
    min_classes = 2

    def __init__(
        self,
        num_classes: int,
        feature_dim: Optional[int] = None,
        *,
        background_index: int = 0,
        alpha: float = 0.1,
        beta: float = 1e-4,
        margin: float = 1.0,
        distance: str = "squared_euclidean",
        centres: str = "moving_average",
        momentum: float = 0.9,
        normalize: bool = True,
        ignore_index: int = 255,
        classifier: Optional[ClassifierLike] = None,
        feat_dim: Optional[int] = None,
    ) -> None:
        feature_dim = renamed("CPlus1Loss", "feat_dim", feat_dim, "feature_dim", feature_dim)
        if feature_dim is None:
            raise TypeError("CPlus1Loss needs `feature_dim` (D, the channels of the features)")
        super().__init__(num_classes, ignore_index=ignore_index, feature_dim=feature_dim)
        _check_hparams(num_classes, background_index, ignore_index, alpha=alpha, beta=beta, margin=margin,
                       distance=distance, normalize=normalize)
        check_choice("centres", centres, CENTRE_MODES)
        check_real("momentum", momentum, lo=0.0, hi=1.0, hi_open=True)
        feat_dim = self.feature_dim
        self.background_index = background_index
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.margin = float(margin)
        self.distance = distance
        self.centre_mode = centres
        self.momentum = float(momentum)
        self.normalize = bool(normalize)
        num_coi = num_classes - 1
        if centres == "moving_average":
            self.register_buffer("centres", torch.zeros(num_coi, feat_dim))
            self.register_buffer("initialized", torch.zeros(num_coi, dtype=torch.bool))
        elif centres == "learnable":
            self.centres = nn.Parameter(torch.randn(num_coi, feat_dim) / feat_dim**0.5)
        # plain attribute, bypassing nn.Module.__setattr__: never a submodule/parameter
        object.__setattr__(self, "_classifier", None)
        if classifier is not None:  # else, for centres="classifier", set_classifier() later
            self.set_classifier(classifier)

    def set_classifier(self, classifier: ClassifierLike) -> None:
        """Set the final classifier whose weight rows are the centres (not registered)."""
        if self.centre_mode != "classifier":
            raise ValueError(f"`classifier` is only used with centres='classifier', not {self.centre_mode!r}")
        if not (isinstance(classifier, torch.Tensor) or hasattr(classifier, "weight") or callable(classifier)):
            raise TypeError(
                "`classifier` must be an nn.Conv2d/nn.Linear (with .weight), a (K, D) tensor or a callable "
                f"returning the weight, got {type(classifier).__name__}"
            )
        object.__setattr__(self, "_classifier", classifier)

    def classifier_weight(self) -> torch.Tensor:
        """The ``(K, D)`` classifier weight (with its autograd graph)."""
        clf = self._classifier
        if clf is None:
            raise ValueError("centres='classifier' needs `classifier` (constructor or set_classifier())")
        if isinstance(clf, torch.Tensor):
            w = clf
        elif isinstance(getattr(clf, "weight", None), torch.Tensor):
            w = clf.weight
        else:
            w = clf()
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"`classifier` must give a tensor weight, got {type(w).__name__}")
        if w.dim() == 4 and tuple(w.shape[2:]) == (1, 1):
            w = w.flatten(1)
        if tuple(w.shape) != (self.num_classes, self.feature_dim):
            raise ValueError(
                f"`classifier` weight must be (K, D) = ({self.num_classes}, {self.feature_dim}) "
                f"(or (K, D, 1, 1)), got {tuple(w.shape)}"
            )
        return w

    def current_centres(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(C, D)`` centres as used by the loss and the ``(C,)`` mask of those that exist."""
        if self.centre_mode == "classifier":
            w = self.classifier_weight()
            c = w[_coi_classes(self.num_classes, self.background_index, w.device)]
            return c, torch.ones(c.shape[0], dtype=torch.bool, device=c.device)
        if self.centre_mode == "learnable":
            c = self.centres
            return c, torch.ones(c.shape[0], dtype=torch.bool, device=c.device)
        # clones: a later in-place EMA update must not invalidate this step's graph
        return self.centres.detach().clone(), self.initialized.clone()

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ema = self.centre_mode == "moving_average"
        if not ema:  # parameters: read once, before the computation
            centres, mask = self.current_centres()
        # device first: the value checks below cannot run across devices
        check_same_device(features=features, labels=labels, centres=self.centres if ema else centres)
        check_floating("features", features, (2, 4))
        if features.shape[1] != self.feature_dim:
            raise ValueError(
                f"`features` must have D={self.feature_dim} channels (dim 1), got shape {tuple(features.shape)}"
            )
        check_labels(labels, self.num_classes, self.ignore_index)
        with no_autocast(features):
            f, dl, cl = _prepare(
                features, labels, self.num_classes, self.background_index, self.ignore_index, self.normalize
            )
            if ema:
                if self.training:
                    new, init = ema_class_means(f, cl, self.centres, self.initialized, self.momentum)
                    with torch.no_grad():
                        self.centres.copy_(new)
                        self.initialized.copy_(init)
                centres, mask = self.current_centres()  # after this step's update, detached
            out = _loss(
                f, dl, cl, centres, mask,
                background_index=self.background_index, alpha=self.alpha, beta=self.beta,
                margin=self.margin, distance=self.distance,
            )
        return self._record(out)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, feature_dim={self.feature_dim}, background_index={self.background_index}, "
            f"alpha={self.alpha}, beta={self.beta}, margin={self.margin}, distance={self.distance!r}, "
            f"centres={self.centre_mode!r}, momentum={self.momentum}, normalize={self.normalize}, "
            f"ignore_index={self.ignore_index}"
        )
