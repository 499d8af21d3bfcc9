"""Shared input handling for the regularizers: validation, label resizing, flattening,
per-class sums and global means.

Conventions (all losses):

* features ``(B, D, h, w)`` or flat ``(N, D)``; labels ``(B, H, W)`` (or ``(N,)`` with
  flat features), integer, values in ``0..K-1`` or ``ignore_index``.
* labels are brought to feature resolution by *nearest* sampling with PyTorch's
  ``F.interpolate(mode="nearest")`` (:func:`resize_labels`, rule ``"torch"``): feature
  row ``i`` takes label row ``min(floor(fl(i * s)), H - 1)`` with ``s = fl(H / h)``, where
  ``fl`` rounds to float32 -- torch computes the scale and the product in float32. This
  is the top-left pixel of its block when ``H = s * h``, and equals the exact
  ``floor(i * H / h)`` for most but not all size pairs (26 -> 22, row 11: 12, not 13).
  Columns alike. mmsegmentation (RCH's released code) resizes the same way. CAR's
  released TensorFlow code uses rule ``"align_corners"`` instead (see :func:`resize_labels`).
* ignored pixels are mapped to a dump class ``K`` so that per-class sums can be taken
  in one ``index_add`` with no boolean indexing (no host synchronisation); the dump
  row is dropped.
* statistics are accumulated in float32 (float64 stays float64), also under autocast.

Hyper-parameter vocabulary (every constructor and functional uses it, so every bad value
gets the same kind of message, naming the argument and what was expected, before any
work): :func:`check_int`, :func:`check_real` (finite, in a range: NaN, Inf and values out of
range are refused), :func:`check_choice`, :func:`check_flag`, :func:`check_ignore_index`
(not a class index), :func:`check_bool_mask`, and :func:`renamed` for a keyword kept for
one version under its old name. Wrong types raise ``TypeError``, wrong values ``ValueError``.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..distributed import all_reduce_sum, all_reduce_sum_no_grad

_VALIDATE = True


def set_validation(enabled: bool) -> None:
    """Turn the (host-synchronising) value checks on inputs on or off globally.

    Shape, dtype and device checks are always done; value checks (finite features,
    label range) need a device-to-host copy and are skipped when disabled or while
    ``torch.compile`` traces.
    """
    global _VALIDATE
    _VALIDATE = bool(enabled)


def _value_checks_enabled() -> bool:
    if not _VALIDATE:
        return False
    try:
        return not torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return True


# ------------------------------------------------------------- hyper-parameter checks
def check_int(name: str, value: Any, *, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """``value`` as an int in ``[lo, hi]`` (bounds optional, inclusive); bools are refused.

    >>> check_int("window", 5, lo=1)
    5
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"`{name}` must be an int {_range_text(lo, hi, False, False)}, got {value!r}")
    return int(value)


def check_real(
    name: str,
    value: Any,
    *,
    lo: Optional[float] = None,
    hi: Optional[float] = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """``value`` as a finite float in the range ``lo..hi`` (``lo_open``/``hi_open`` exclude
    the bound). NaN and infinities are always refused; bools and strings are not numbers.

    >>> check_real("momentum", 0.9, lo=0.0, hi=1.0, hi_open=True)
    0.9
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    bad = not math.isfinite(v)
    bad = bad or (lo is not None and (v <= lo if lo_open else v < lo))
    bad = bad or (hi is not None and (v >= hi if hi_open else v > hi))
    if bad:
        raise ValueError(f"`{name}` must be a finite number {_range_text(lo, hi, lo_open, hi_open)}, got {value!r}")
    return v


def _range_text(lo: Optional[float], hi: Optional[float], lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return ""


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``."""
    if value not in tuple(choices):
        raise ValueError(f"`{name}` must be one of {tuple(choices)}, got {value!r}")
    return value


def check_flag(name: str, value: Any) -> bool:
    """``value`` if it is a bool (``"no"`` or ``2`` are not silently true)."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_ignore_index(ignore_index: Any, num_classes: Optional[int]) -> int:
    """``ignore_index`` as an int that is not a class index ``0..num_classes-1``: a class that
    is also "ignored" would silently vanish from every loss."""
    ignore_index = check_int("ignore_index", ignore_index)
    if num_classes is not None and 0 <= ignore_index < num_classes:
        raise ValueError(
            f"`ignore_index`={ignore_index} is a class index (num_classes={num_classes}): "
            f"use a value outside 0..{num_classes - 1}, e.g. 255 or -1"
        )
    return ignore_index


def check_bool_mask(name: str, mask: Any, length: int) -> None:
    """``mask`` must be a ``(length,)`` bool tensor."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"`{name}` must be a bool tensor, got dtype {mask.dtype}")
    if tuple(mask.shape) != (length,):
        raise ValueError(f"`{name}` must have shape ({length},), got {tuple(mask.shape)}")


def renamed(owner: str, old_name: str, old_value: Any, new_name: str, new_value: Any, default: Any = None) -> Any:
    """The value of a keyword renamed from ``old_name`` to ``new_name`` (old name kept for one
    version): ``new_value`` when the old name was not used (``old_value is None``), else
    ``old_value`` with a ``DeprecationWarning``. Giving both (``new_value`` not its
    ``default``) is an error.

    >>> renamed("Term", "weight", None, "loss_weight", 0.5, 1.0)
    0.5
    """
    if old_value is None:
        return new_value
    warnings.warn(
        f"{owner}: `{old_name}` is deprecated and will be removed in the next version; use `{new_name}`",
        DeprecationWarning,
        stacklevel=3,
    )
    if new_value is not None and new_value != default:
        raise TypeError(f"{owner}: give `{new_name}` or the deprecated `{old_name}`, not both")
    return old_value


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def no_autocast(x: torch.Tensor) -> Iterator[None]:
    """Disable autocast for the statistics (they are accumulated in float32)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        yield


def check_floating(name: str, x: torch.Tensor, dims: tuple[int, ...]) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"`{name}` must be {want}, got shape {tuple(x.shape)}")
    if _value_checks_enabled() and not _all_finite(x.detach()):
        raise ValueError(f"`{name}` contains non-finite values (NaN or Inf)")


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every element of ``x`` is finite. A finite sum proves it (a NaN or an Inf
    makes the sum NaN or Inf) with one reduction and no ``x``-sized temporary; only a
    non-finite sum, which a finite tensor reaches by overflow, needs the exact test."""
    if x.numel() == 0:
        return True
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def check_labels(labels: torch.Tensor, num_classes: Optional[int], ignore_index: int, name: str = "labels") -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"`{name}` must be an integer tensor, got dtype {labels.dtype}")
    if num_classes is not None and _value_checks_enabled() and labels.numel() > 0:
        valid = labels[labels != ignore_index]
        if valid.numel() > 0:
            lo, hi = int(valid.min()), int(valid.max())
            if lo < 0 or hi >= num_classes:
                raise ValueError(
                    f"`{name}` values must be in 0..{num_classes - 1} or ignore_index={ignore_index}, "
                    f"found values in [{lo}, {hi}]"
                )


def check_same_device(**tensors: torch.Tensor) -> None:
    items = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    if not items:
        return
    dev = items[0][1].device
    for k, v in items[1:]:
        if v.device != dev:
            names = ", ".join(f"`{n}` on {t.device}" for n, t in items)
            raise ValueError(f"inputs must be on the same device, got {names}")


LABEL_SAMPLING = ("torch", "align_corners")


def resize_labels(labels: torch.Tensor, size: tuple[int, int], rule: str = "torch") -> torch.Tensor:
    """Nearest-sample integer labels ``(B, H, W)`` to ``size = (h, w)``.

    ``fl`` below rounds to float32 (the arithmetic both libraries use); rows and columns alike.

    * ``rule="torch"``: ``F.interpolate(mode="nearest")``: row ``i`` takes source row
      ``min(floor(fl(i * fl(H / h))), H - 1)``.
    * ``rule="align_corners"``: TensorFlow's ``resize_nearest_neighbor(align_corners=True)``
      (CAR's released code): source row ``min(round(fl(i * fl((H - 1) / (h - 1)))), H - 1)``,
      rounding half away from zero (``roundf``); row 0 when ``h = 1``. The first and last
      rows map to the first and last rows, e.g. rows 0, 8, 16, ..., 512 for 513 -> 65.

    Example:
        >>> import torch
        >>> y = torch.arange(9)[None, :, None].expand(1, 9, 1)
        >>> resize_labels(y, (3, 1))[0, :, 0].tolist(), resize_labels(y, (3, 1), "align_corners")[0, :, 0].tolist()
        ([0, 3, 6], [0, 4, 8])
    """
    if rule not in LABEL_SAMPLING:
        raise ValueError(f"`label_sampling` must be one of {LABEL_SAMPLING}, got {rule!r}")
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    if rule == "align_corners":
        rows = _align_corners_index(labels.shape[-2], size[0], labels.device)
        cols = _align_corners_index(labels.shape[-1], size[1], labels.device)
        return labels.index_select(-2, rows).index_select(-1, cols)
    out = F.interpolate(labels[:, None].float(), size=size, mode="nearest")
    return out[:, 0].to(labels.dtype)


def _align_corners_index(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """TensorFlow's align-corners nearest source index (float32 arithmetic, ``roundf``)."""
    if out_size == 1:
        return torch.zeros(1, dtype=torch.long, device=device)
    f32 = torch.float32
    # made on the device (no host-to-device copy inside a training step)
    scale = torch.full((), in_size - 1, dtype=f32, device=device) / torch.full((), out_size - 1, dtype=f32, device=device)
    v = torch.arange(out_size, dtype=f32, device=device) * scale
    lo = torch.floor(v)
    idx = lo + (v - lo >= 0.5).to(f32)  # round half away from zero (v >= 0)
    return idx.long().clamp(max=in_size - 1)


def resize_bilinear(z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(z, size, mode="bilinear", align_corners=False)`` for ``(B, C, H, W)``.

    An integer downscale (``H = s * h``, ``W = t * w``) is taken from strided views, with
    the same weights: sample ``i`` sits at source coordinate ``i*s + (s-1)/2``, i.e. the
    mean of the two middle pixels of its block for an even factor, the middle pixel for
    an odd one. This avoids the full-resolution copy that ``F.interpolate`` makes on CPU
    (equal up to rounding). Anything else goes to ``F.interpolate``.
    """
    (big_h, big_w), (h, w) = z.shape[-2:], size
    if big_h % h or big_w % w:
        return F.interpolate(z, size=size, mode="bilinear", align_corners=False)
    for dim, factor in ((-2, big_h // h), (-1, big_w // w)):
        if factor == 1:
            continue
        mid = (factor - 1) // 2
        first = z.narrow(dim, mid, z.shape[dim] - mid).unfold(dim, 1, factor).squeeze(-1)
        if factor % 2 == 0:
            second = z.narrow(dim, mid + 1, z.shape[dim] - mid - 1).unfold(dim, 1, factor).squeeze(-1)
            z = 0.5 * (first + second)
        else:
            z = first
    return z


def flatten_features(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    feature_name: str = "features",
    label_name: str = "labels",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(N, D)`` features and ``(N,)`` labels.

    ``features`` is ``(B, D, h, w)`` with labels ``(B, H, W)`` (resized to ``(h, w)``),
    or ``(N, D)`` with labels ``(N,)``.
    """
    check_floating(feature_name, features, (2, 4))
    if features.dim() == 4:
        if labels.dim() != 3 or labels.shape[0] != features.shape[0]:
            raise ValueError(
                f"`{label_name}` must be (B, H, W) with B={features.shape[0]} to match "
                f"`{feature_name}` of shape {tuple(features.shape)}, got {tuple(labels.shape)}"
            )
        labels = resize_labels(labels, tuple(features.shape[-2:]))
        b, d, h, w = features.shape
        flat = features.permute(0, 2, 3, 1).reshape(b * h * w, d)
        return flat, labels.reshape(-1)
    if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"`{label_name}` must be (N,) with N={features.shape[0]} to match flat "
            f"`{feature_name}` of shape {tuple(features.shape)}, got {tuple(labels.shape)}"
        )
    return features, labels


def dump_labels(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Labels as int64 with ignored pixels mapped to the dump class ``num_classes``."""
    labels = labels.long()
    return torch.where(labels == ignore_index, torch.full_like(labels, num_classes), labels)


@dataclass
class ClassStats:
    """Global per-class sums of a batch.

    sums: ``(K, D)`` sum of features per class (differentiable, globally all-reduced).
    counts: ``(K,)`` number of valid pixels per class (no gradient, global).
    """

    sums: torch.Tensor
    counts: torch.Tensor

    @property
    def present(self) -> torch.Tensor:
        return self.counts > 0

    def centres(self) -> torch.Tensor:
        """``(K, D)`` batch centres; rows of absent classes are 0 (mask with ``present``)."""
        return self.sums / self.counts.clamp(min=1).unsqueeze(1)


def bin_counts(index: torch.Tensor, size: int) -> torch.Tensor:
    """``(size,)`` int64 counts of the values ``0..size-1`` of ``index`` (int64).

    One scatter pass like ``torch.bincount(index, minlength=size)``, but with a static
    output shape (``bincount``'s depends on the data: a graph break under ``torch.compile``).
    """
    return torch.zeros(size, dtype=torch.long, device=index.device).index_add_(0, index, torch.ones_like(index))


def class_stats(feats: torch.Tensor, dlabels: torch.Tensor, num_classes: int) -> ClassStats:
    """One-pass per-class sums and counts of flat ``feats (N, D)`` with dump labels ``(N,)``.

    Global across processes when a process group is initialised.
    """
    n, d = feats.shape
    sums = feats.new_zeros(num_classes + 1, d).index_add(0, dlabels, feats)[:num_classes]
    counts = bin_counts(dlabels, num_classes + 1)[:num_classes].to(feats.dtype)
    return ClassStats(all_reduce_sum(sums), all_reduce_sum_no_grad(counts))


def global_mean(local_sum: torch.Tensor, local_count: torch.Tensor) -> torch.Tensor:
    """Mean of a per-pixel quantity over the global batch; 0 (with a finite gradient) when empty.

    ``local_sum`` carries gradient; ``local_count`` is a count (no gradient).
    """
    total = all_reduce_sum(local_sum)
    count = all_reduce_sum_no_grad(local_count.to(total.dtype))
    return total / count.clamp(min=1)


def ema_class_means(
    feats: torch.Tensor,
    index: torch.Tensor,
    means: torch.Tensor,
    initialized: torch.Tensor,
    momentum: float,
    *,
    differentiable: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""One moving-average step of per-class means (C+1 centres, RCH prototypes, CAR's EMA centres).

    .. math::

        m_k \leftarrow \begin{cases}
            \mathrm{momentum}\, m_k + (1 - \mathrm{momentum})\, b_k & k \text{ present and initialised} \\
            b_k & k \text{ present, first sighting} \\
            m_k & k \text{ absent}
        \end{cases}

    with ``b_k`` the mean of the rows of ``feats`` whose ``index`` is ``k`` over the global
    batch (sums and counts all-reduced without autograd, so every process gets the same
    state); ``index`` values ``>= K`` (a dump class) belong to no class.

    Args:
        feats: ``(N, D)`` features (used detached).
        index: ``(N,)`` int64 class of each row, ``0..K`` (``K`` = none).
        means: ``(K, D)`` current means (not modified).
        initialized: ``(K,)`` bool, which means exist (all True for a state that starts
            from an initial value rather than from the first batch).
        momentum: weight of the old mean, in ``[0, 1)``.
        differentiable: keep the gradient path from ``feats`` through ``b_k`` (sums
            all-reduced with autograd; RCH's ``prototype_grad``); default: no gradient.

    Returns:
        ``(new_means (K, D) in the dtype of feats, new_initialized (K,))``.

    Example:
        >>> m, init = ema_class_means(torch.tensor([[2.0], [4.0]]), torch.tensor([0, 2]),
        ...                           torch.zeros(2, 1), torch.tensor([True, False]), 0.5)
        >>> m.tolist(), init.tolist()
        ([[1.0], [0.0]], [True, False])
    """
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        return _ema_step(feats if differentiable else feats.detach(), index, means, initialized, momentum,
                         differentiable)


def _ema_step(f: torch.Tensor, index: torch.Tensor, means: torch.Tensor, initialized: torch.Tensor,
              momentum: float, differentiable: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    k = means.shape[0]
    local = f.new_zeros(k + 1, f.shape[1]).index_add(0, index, f)[:k]
    sums = all_reduce_sum(local) if differentiable else all_reduce_sum_no_grad(local)
    counts = all_reduce_sum_no_grad(bin_counts(index, k + 1)[:k].to(f.dtype))
    present = counts > 0
    batch = sums / counts.clamp(min=1).unsqueeze(1)
    old = means.detach().to(f.dtype)
    blended = momentum * old + (1.0 - momentum) * batch
    initialized = initialized.clone()  # saved for backward; callers update their buffer in place
    new = torch.where(present[:, None], torch.where(initialized[:, None], blended, batch), old)
    return new, initialized | present


def to_parameter_dtype(x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """``x`` cast to the floating dtype of ``module``'s parameters, outside autocast.

    Under autocast the layer casts its inputs itself; outside it, half/bfloat16/float64
    features given to a float32 layer (a projection, RCH's head) would fail inside
    ``conv2d`` with a dtype mismatch, so they are cast (differentiably) here instead.
    """
    param = next((p for p in module.parameters() if p.is_floating_point()), None)
    if param is None or x.dtype == param.dtype or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(param.dtype)
