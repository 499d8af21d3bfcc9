"""Naive implementations of the library's losses, for the benchmark only.

Same maths as :mod:`pixreg.losses` at their default settings, written the obvious way:
Python loops over classes with boolean indexing (a host synchronisation per class),
an unfolded ``(B, K*s*s, H*W)`` tensor for LALL, and LALL's shifted views under plain
autograd (the library's previous implementation). They exist to show the speed-up of
the library's vectorised code and to cross-check its values (tests/test_benchmarks.py).
Nothing here is imported by the library.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _flat(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, D)`` features and ``(N,)`` labels nearest-resized to the feature grid."""
    b, d, h, w = features.shape
    y = F.interpolate(labels[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
    return features.permute(0, 2, 3, 1).reshape(-1, d), y.reshape(-1)


def naive_cplus1(features, labels, centres, *, alpha=0.01, beta=0.1, margin=1.0, background_index=0,
                 ignore_index=255):
    """C+1 (squared Euclidean, normalised features, all CoIs with a centre), loops over classes."""
    f, y = _flat(features, labels)
    f = F.normalize(f, dim=1, eps=1e-12)
    num_coi = centres.shape[0]
    compact = f.new_zeros(())
    n_compact = 0
    for j in range(num_coi):
        k = j + int(j >= background_index)
        sel = f[y == k]
        if sel.shape[0]:
            compact = compact + ((sel - centres[j]) ** 2).sum()
            n_compact += sel.shape[0]
    bg = f[y == background_index]
    hinge = f.new_zeros(())
    for j in range(num_coi):
        hinge = hinge + (margin - ((bg - centres[j]) ** 2).sum(1)).clamp_min(0).sum()
    background = hinge / num_coi / max(bg.shape[0], 1)
    return alpha * compact / max(n_compact, 1) + beta * background


def naive_car(features, labels, num_classes, *, eps0=0.5, eps1=0.25, ignore_index=255, printed=False):
    """CAR, paper variant (threshold over present classes), loops over classes; c2p energies
    ``x . sg(mu) / sqrt(D)`` (the default), or the printed ``x . mu`` with ``printed=True``."""
    f, y = _flat(features, labels)
    n, d = f.shape
    present = [k for k in range(num_classes) if bool((y == k).any())]
    mu = torch.stack([f[y == k].mean(0) for k in present])  # (P, D)
    n_valid = sum(int((y == k).sum()) for k in present)
    denom = max(len(present) - 1, 1)
    intra = sum(((f[y == k] - mu[i]) ** 2).sum() for i, k in enumerate(present)) / (n_valid * d)
    a = torch.softmax(mu @ mu.t() / math.sqrt(d), dim=1)
    off = 1.0 - torch.eye(len(present), dtype=f.dtype, device=f.device)
    r = (torch.relu(a - eps0 / denom) * off).sum(1)
    c2c = (r * r).mean()
    c2p = f.new_zeros(())
    m, scale = (mu, 1.0) if printed else (mu.detach(), math.sqrt(d))
    for i, k in enumerate(present):
        xk = f[y == k]
        energy = xk @ m.t() / scale
        own = (m[i] * m[i]).sum() / scale
        energy = torch.cat([energy[:, :i], own.expand(xk.shape[0], 1), energy[:, i + 1:]], 1)
        s = (torch.relu(torch.softmax(energy, dim=1) - eps1 / denom) * off[i]).sum(1)
        c2p = c2p + (s * s).sum()
    return intra + c2c + c2p / n_valid


def naive_rch(embeddings, logits, labels, prototypes, *, tau=0.5, weight=0.1, ignore_index=255):
    """RCH metric loss (batch sets, mean of cosines), FN/FP means by per-class indexing."""
    e, y = _flat(embeddings, labels)
    b, _, h, w = embeddings.shape
    k = prototypes.shape[0]
    z = F.interpolate(logits.detach(), size=(h, w), mode="bilinear", align_corners=False)
    z = z.permute(0, 2, 3, 1).reshape(-1, k)
    pred = z.argmax(1)
    valid = y != ignore_index
    yc = y.clamp(max=k - 1)
    p_true = torch.softmax(z, 1).gather(1, yc[:, None])[:, 0]
    eh = F.normalize(e, dim=1, eps=1e-12)
    cos = eh @ F.normalize(prototypes, dim=1, eps=1e-12).t() / tau
    phi = e.new_zeros(e.shape[0])
    psi = e.new_zeros(e.shape[0])
    for c in range(k):
        anchors = valid & (y == c)
        fn = anchors & (pred != c)
        fp = valid & (y != c) & (pred == c)
        if bool(fn.any()):
            phi = torch.where(anchors, 1.0 - eh @ eh[fn].sum(0) / fn.sum(), phi)
        if bool(fp.any()):
            psi = torch.where(anchors, 1.0 + eh @ eh[fp].sum(0) / fp.sum(), psi)
    onehot = F.one_hot(yc, k).to(e.dtype)

    def ce(calib):
        zc = cos - onehot * ((1.0 - p_true) * calib)[:, None]
        per = torch.logsumexp(zc, 1) - zc.gather(1, yc[:, None])[:, 0]
        return weight * per[valid].mean()

    return ce(phi) + ce(psi)


def _zscore(logits: torch.Tensor, eps: float) -> torch.Tensor:
    centred = logits - logits.mean(1, keepdim=True)
    return centred / centred.pow(2).mean(1, keepdim=True).clamp_min(eps * eps).sqrt()


def _minkowski(ce: torch.Tensor, power: float) -> torch.Tensor:
    return ce.pow(power).mean().pow(1.0 / power)


def naive_lall_unfold(logits, labels, *, window=5, power=3.0, eps=1e-5, ignore_index=255):
    """LALL (stride 1, exponential weights, xi = count) through an unfolded (B, K*s*s, H*W) tensor."""
    b, k, h, w = logits.shape
    z = _zscore(logits, eps)
    r = window // 2
    zu = F.unfold(z, window, padding=r).view(b, k, window * window, h * w)
    lab = F.unfold(F.pad(labels.to(z.dtype)[:, None], (r, r, r, r), value=ignore_index), window)
    centre = labels.to(z.dtype).view(b, 1, h * w)
    same = (lab.view(b, window * window, h * w) == centre) & (centre != ignore_index)
    span = torch.arange(-r, r + 1, device=z.device)
    ii, jj = torch.meshgrid(span, span, indexing="ij")
    wts = 2.0 ** (1 - torch.maximum(ii.abs(), jj.abs()).reshape(-1).to(z.dtype))
    pooled = (zu * (same.to(z.dtype) * wts.view(1, -1, 1))[:, None]).sum(2)
    pooled = (pooled / same.sum(1).clamp_min(1)[:, None]).view(b, k, h, w)
    valid = labels != ignore_index
    ce = F.cross_entropy(pooled, labels.clamp(max=k - 1) * valid, reduction="none")[valid]
    return _minkowski(ce, power)


def naive_lall_views(logits, labels, *, window=5, power=3.0, eps=1e-5, ignore_index=255):
    """LALL (stride 1) from shifted views accumulated under plain autograd (pixreg <= 0.1.0)."""
    b, k, h, w = logits.shape
    z = _zscore(logits, eps)
    valid = labels != ignore_index
    pooled = torch.zeros_like(z)
    count = z.new_zeros(b, h, w)
    r = window // 2
    for di in range(-r, r + 1):
        for dj in range(-r, r + 1):
            ci, ni = slice(max(0, -di), min(h, h - di)), slice(max(0, di), min(h, h + di))
            cj, nj = slice(max(0, -dj), min(w, w - dj)), slice(max(0, dj), min(w, w + dj))
            same = (labels[:, ni, nj] == labels[:, ci, cj]) & valid[:, ci, cj]
            pooled[:, :, ci, cj] += 2.0 ** (1 - max(abs(di), abs(dj))) * torch.where(same[:, None], z[:, :, ni, nj], 0.0)
            count[:, ci, cj] += same.to(z.dtype)
    pooled = pooled / count.clamp_min(1)[:, None]
    ce = F.cross_entropy(pooled, labels.clamp(max=k - 1) * valid, reduction="none")[valid]
    return _minkowski(ce, power)
