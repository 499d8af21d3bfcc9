"""The numbers behind the diagnostics: streaming class statistics, a bounded stratified
reservoir of pixels, RCH's per-pixel calibration terms and histogram helpers.

Nothing here imports matplotlib; everything works on tensors / arrays and is tested on
its own. Memory is bounded: :class:`FeatureStats` keeps ``O(K * D)`` sums whatever the
number of pixels, :class:`Reservoir` keeps at most ``capacity`` items per stratum.

>>> import torch
>>> st = FeatureStats(3, 4)
>>> st.update(torch.randn(50, 4), torch.randint(0, 3, (50,)))
>>> m = st.pixel_cosine(); m.shape, bool(np.allclose(m, m.T))
((3, 3), True)
"""
from __future__ import annotations

import math
import re
from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F


__all__ = ["FeatureStats", "Reservoir", "calibration_maps", "weighted_histogram", "weighted_quantiles",
           "nearest_centre_distance"]


class FeatureStats:
    """Per-class sums of pixel features, accumulated batch by batch (float64).

    Keeps, for every class ``k``: the count ``n_k``, the sum of the features ``sum_k``
    (for the class centres ``mu_k = sum_k / n_k``) and the sum of the L2-normalised
    features ``s_k`` with ``q_k = sum |f_i_hat|^2`` (1 per non-zero feature). From these:

    * :meth:`centre_cosine`: ``cos(mu_k, mu_l)``, the class-centre similarity matrix;
    * :meth:`centre_dependency`: CAR's class-dependency map ``softmax_l(mu_k . mu_l / sqrt(D))``
      over the classes present (rows sum to 1);
    * :meth:`pixel_cosine`: the mean cosine similarity of pixel pairs,
      ``mean_{i in k, j in l} cos(f_i, f_j) = s_k . s_l / (n_k n_l)`` off the diagonal, and over
      pairs ``i != j`` on the diagonal, ``(|s_k|^2 - q_k) / (n_k (n_k - 1))`` -- exact, with no
      pixel-pair matrix.

    Classes with no pixel (or one, for the diagonal of :meth:`pixel_cosine`) get ``NaN``.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        self.num_classes, self.dim = int(num_classes), int(dim)
        self.counts = torch.zeros(self.num_classes, dtype=torch.float64)
        self.sums = torch.zeros(self.num_classes, self.dim, dtype=torch.float64)
        self.sums_hat = torch.zeros(self.num_classes, self.dim, dtype=torch.float64)
        self.sq_hat = torch.zeros(self.num_classes, dtype=torch.float64)

    def update(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        """``feats (N, D)``, ``labels (N,)`` in ``0..K-1`` (drop ignored pixels first)."""
        f = feats.detach().to("cpu", torch.float64)
        y = labels.detach().to("cpu", torch.long)
        fh = F.normalize(f, dim=1)
        self.counts += torch.bincount(y, minlength=self.num_classes).to(torch.float64)
        self.sums.index_add_(0, y, f)
        self.sums_hat.index_add_(0, y, fh)
        self.sq_hat.index_add_(0, y, (fh * fh).sum(1))

    @property
    def present(self) -> np.ndarray:
        return (self.counts > 0).numpy()

    def centres(self) -> np.ndarray:
        """``(K, D)`` class means (``NaN`` rows for absent classes)."""
        mu = self.sums / self.counts.clamp(min=1)[:, None]
        mu[self.counts == 0] = float("nan")
        return mu.numpy()

    def centre_cosine(self) -> np.ndarray:
        """``(K, K)`` cosine similarity of the class centres, in ``[-1, 1]``, symmetric."""
        mu = torch.from_numpy(self.centres())
        mh = F.normalize(torch.nan_to_num(mu), dim=1)
        out = (mh @ mh.t()).clamp(-1, 1)
        out.fill_diagonal_(1.0)
        absent = self.counts == 0
        out[absent] = float("nan")
        out[:, absent] = float("nan")
        return out.numpy()

    def centre_dependency(self) -> np.ndarray:
        """``(K, K)`` CAR class-dependency map ``softmax(mu mu^T / sqrt(D))`` over present classes."""
        keep = self.counts > 0
        out = torch.full((self.num_classes, self.num_classes), float("nan"), dtype=torch.float64)
        if keep.any():
            mu = torch.from_numpy(self.centres())[keep]
            a = torch.softmax(mu @ mu.t() / math.sqrt(self.dim), dim=1)
            idx = torch.nonzero(keep)[:, 0]
            out[idx[:, None], idx[None, :]] = a
        return out.numpy()

    def pixel_cosine(self) -> np.ndarray:
        """``(K, K)`` mean pairwise cosine similarity of pixel features (intra on the diagonal)."""
        n = self.counts
        gram = self.sums_hat @ self.sums_hat.t()
        out = gram / (n[:, None] * n[None, :]).clamp(min=1)
        diag = (gram.diagonal() - self.sq_hat) / (n * (n - 1)).clamp(min=1)
        out[range(self.num_classes), range(self.num_classes)] = diag
        out = out.clamp(-1, 1)
        absent = n == 0
        out[absent] = float("nan")
        out[:, absent] = float("nan")
        out[(n == 1).nonzero()[:, 0], (n == 1).nonzero()[:, 0]] = float("nan")
        return out.numpy()


class Reservoir:
    """A bounded, stratified uniform sample of items arriving in batches.

    Every item gets a uniform random key; per stratum the ``capacity`` items with the
    smallest keys are kept, which is a uniform sample without replacement of everything
    that stratum has seen (and merges batch by batch). ``seen[s]`` counts all items of
    stratum ``s``, so ``weights()`` (``seen / kept`` of each item's stratum) turn sample
    statistics back into whole-split estimates.
    """

    def __init__(self, capacity: int, num_strata: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity, self.num_strata = int(capacity), int(num_strata)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.seen = np.zeros(self.num_strata, dtype=np.int64)
        self.keys = torch.zeros(0, dtype=torch.float64)
        self.strata = torch.zeros(0, dtype=torch.long)
        self.data: Dict[str, torch.Tensor] = {}

    def add(self, strata: torch.Tensor, **payload: torch.Tensor) -> None:
        """Offer ``N`` items: ``strata (N,)`` in ``0..num_strata-1`` and payload tensors ``(N, ...)``."""
        strata = strata.detach().to("cpu", torch.long).reshape(-1)
        if strata.numel() == 0:
            return
        self.seen += np.bincount(strata.numpy(), minlength=self.num_strata)
        keys = torch.rand(strata.numel(), generator=self.gen, dtype=torch.float64)
        new = {k: v.detach().to("cpu").reshape(strata.numel(), *v.shape[1:]) for k, v in payload.items()}
        if not self.data:
            self.data = {k: v[:0] for k, v in new.items()}
        keys = torch.cat([self.keys, keys])
        strata = torch.cat([self.strata, strata])
        data = {k: torch.cat([self.data[k], new[k].to(self.data[k].dtype)]) for k in self.data}
        order = torch.argsort(keys, stable=True)
        order = order[torch.argsort(strata[order], stable=True)]  # by stratum, then key
        s_sorted = strata[order]
        first = torch.searchsorted(s_sorted, s_sorted, right=False)
        rank = torch.arange(len(order)) - first
        keep = order[rank < self.capacity]
        self.keys, self.strata = keys[keep], strata[keep]
        self.data = {k: v[keep] for k, v in data.items()}

    def __len__(self) -> int:
        return int(self.strata.numel())

    def kept(self) -> np.ndarray:
        return np.bincount(self.strata.numpy(), minlength=self.num_strata)

    def weights(self) -> np.ndarray:
        """Per kept item: pixels of its stratum in the split / pixels of it kept."""
        kept = self.kept()
        w = self.seen / np.maximum(kept, 1)
        return w[self.strata.numpy()].astype(np.float64)

    def get(self, name: str) -> np.ndarray:
        return self.data[name].numpy() if name in self.data else np.zeros(0)


def calibration_maps(emb: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     ignore_index: int = 255, calibration: str = "mean_of_cosines") -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel RCH FN compensation ``phi`` and FP penalty ``psi`` (METHODS.md section 4), per image.

    ``emb (B, E, h, w)``; ``logits (B, K, H', W')`` (bilinearly resized to ``(h, w)``, prediction
    = argmax); ``labels (B, H, W)`` (nearest-resized to ``(h, w)``). For a pixel ``i`` labelled
    ``k`` the sets ``FN_k``/``FP_k`` are taken in its own image: ``phi_i = 1 - m^FN_i`` and
    ``psi_i = 1 + m^FP_i`` (0 when the set is empty), with ``m`` the mean of cosines
    (``"mean_of_cosines"``, the paper) or the cosine to the set's mean embedding
    (``"cosine_to_mean"``, the released code), exactly as :func:`pixreg.losses.rch.rch_loss`
    with ``sets="image"``. Returns two ``(B, h, w)`` float tensors, ``NaN`` at ignored pixels.
    """
    from ..losses.rch import rch_calibration  # the loss's own sets and calibration

    b, _, h, w = emb.shape
    phi, psi = rch_calibration(emb.detach().float(), logits.detach().float(), labels, num_classes,
                               ignore_index=ignore_index, calibration=calibration, sets="image")
    return phi.reshape(b, h, w), psi.reshape(b, h, w)


def weighted_histogram(values: np.ndarray, weights: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Density histogram (integrates to 1 over ``edges``; zeros when there is nothing)."""
    if len(values) == 0 or weights.sum() <= 0:
        return np.zeros(len(edges) - 1)
    h, _ = np.histogram(values, bins=edges, weights=weights, density=False)
    total = h.sum()
    return h / (total * np.diff(edges)) if total > 0 else np.zeros(len(edges) - 1)


def weighted_quantiles(values: np.ndarray, weights: np.ndarray, qs) -> np.ndarray:
    """Quantiles of a weighted sample (``NaN`` when empty)."""
    if len(values) == 0:
        return np.full(len(qs), np.nan)
    order = np.argsort(values)
    v, w = values[order], weights[order]
    cw = np.cumsum(w) - 0.5 * w
    cw /= w.sum()
    return np.interp(qs, cw, v)


def nearest_centre_distance(feats: np.ndarray, centres: np.ndarray, classes) -> Tuple[np.ndarray, np.ndarray]:
    """Distance of L2-normalised features to the nearest L2-normalised centre among
    ``classes`` (``sqrt(2 - 2 cos)``, in ``[0, 2]``), and the index of that class."""
    classes = [c for c in classes if np.all(np.isfinite(centres[c]))]
    if not classes or len(feats) == 0:
        return np.full(len(feats), np.nan), np.full(len(feats), -1)
    f = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    c = centres[classes]
    c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    cos = np.clip(f @ c.T, -1.0, 1.0)
    best = cos.argmax(1)
    return np.sqrt(np.maximum(2.0 - 2.0 * cos.max(1), 0.0)), np.asarray(classes)[best]


def safe_name(label: str) -> str:
    """``label`` reduced to a file-name-safe string (``"run"`` when nothing is left).

    >>> safe_name("car+lall / seed 1")
    'car_lall_seed_1'
    """
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


def smooth(v: np.ndarray) -> np.ndarray:
    """Trailing moving average of a curve over about 1/40 of its length (NaNs skipped)."""
    w = max(1, len(v) // 40)
    if w == 1:
        return v
    out = np.empty_like(v)
    for i in range(len(v)):
        out[i] = np.nanmean(v[max(0, i - w + 1): i + 1])
    return out
