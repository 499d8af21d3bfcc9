"""Summary statistics over seeds and the paired t-interval used by ``pixreg compare``.

Interval: for a method M and the baseline B evaluated with the same seeds
``s = 1..n`` (same initial weights and data order per seed), the per-seed differences
``d_s = metric(M, s) - metric(B, s)`` give the two-sided 95 % **paired Student-t
confidence interval** of the mean difference,
``mean(d) +- t_{0.975, n-1} * sd(d) / sqrt(n)`` with ``sd`` the sample standard
deviation (``ddof = 1``). It needs ``n >= 2`` (with n = 2, ``t = 12.71``: wide). The
quantile comes from SciPy when installed, else from :func:`t_quantile` (exact inversion
of the Student-t CDF for integer degrees of freedom, Abramowitz & Stegun 26.7.3-4).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

__all__ = ["t_cdf_two_sided", "t_quantile", "mean_std", "paired_interval", "detectable_effect", "seeds_needed",
           "verdict", "INTERVAL_NAME", "DETECTABLE_NAME"]

INTERVAL_NAME = "paired Student-t 95% CI over seeds: mean(d) +- t(0.975, n-1) * sd(d) / sqrt(n)"
DETECTABLE_NAME = ("smallest detectable effect: the true mean difference that a two-sided paired t-test at the "
                   "5% level detects with 80% power, (t(0.975, n-1) + t(0.80, n-1)) * sd(d) / sqrt(n)")
POWER = 0.8


def t_cdf_two_sided(t: float, df: int) -> float:
    """``P(|T| <= t)`` for Student's t with integer ``df >= 1`` (A&S 26.7.3/26.7.4)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"df must be a positive integer, got {df!r}")
    t = abs(float(t))
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 1:
        if df == 1:
            return 2.0 * theta / math.pi
        term, total = c, c
        for k in range(3, df - 1, 2):  # cos + 2/3 cos^3 + (2*4)/(3*5) cos^5 + ...
            term *= (k - 1) / k * c * c
            total += term
        return 2.0 / math.pi * (theta + s * total)
    term, total = 1.0, 1.0
    for k in range(2, df - 1, 2):  # 1 + 1/2 cos^2 + (1*3)/(2*4) cos^4 + ...
        term *= (k - 1) / k * c * c
        total += term
    return s * total


def t_quantile(p: float, df: int) -> float:
    """Quantile ``t_{p, df}`` of Student's t (``0.5 < p < 1``), by bisection on the CDF.

    >>> round(t_quantile(0.975, 1), 3), round(t_quantile(0.975, 4), 3)
    (12.706, 2.776)
    """
    if not 0.5 < p < 1.0:
        raise ValueError(f"p must lie in (0.5, 1), got {p!r}")
    target = 2.0 * p - 1.0
    lo, hi = 0.0, 1.0
    while t_cdf_two_sided(hi, df) < target:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf_two_sided(mid, df) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def _t(p: float, df: int) -> float:
    try:
        from scipy.stats import t as student_t

        return float(student_t.ppf(p, df))
    except ImportError:  # pragma: no cover - scipy is optional
        return t_quantile(p, df)


def _t975(df: int) -> float:
    return _t(0.975, df)


def detectable_effect(sd: Optional[float], n: int, power: float = POWER) -> Optional[float]:
    """Smallest true mean paired difference detected with probability ``power`` by a
    two-sided paired t-test at the 5 % level, for ``n`` pairs whose differences have
    sample standard deviation ``sd``: ``(t(0.975, n-1) + t(power, n-1)) * sd / sqrt(n)``
    (the usual approximation of the noncentral-t power calculation, treating ``sd`` as
    the true spread). ``None`` for ``n < 2`` or unknown ``sd``.

    >>> round(detectable_effect(2.3, 3), 2), round(detectable_effect(2.3, 20), 2)
    (7.12, 1.52)
    """
    if sd is None or n < 2:
        return None
    return (_t975(n - 1) + _t(power, n - 1)) * float(sd) / math.sqrt(n)


def seeds_needed(sd: Optional[float], effect: float, power: float = POWER, max_n: int = 10_000) -> Optional[int]:
    """Fewest seeds ``n >= 2`` whose :func:`detectable_effect` is at most ``effect``.

    >>> seeds_needed(2.3, 1.0)
    44
    """
    if sd is None or effect <= 0:
        return None
    if sd == 0:
        return 2
    n = 2
    while n <= max_n:
        if detectable_effect(sd, n, power) <= effect:
            return n
        n = n + 1 if n < 100 else int(n * 1.1)
    return None


def verdict(diff: Dict[str, Optional[float]], baseline: str = "ce") -> str:
    """Plain-words reading of a :func:`paired_interval` result."""
    if diff.get("mean") is None:
        return "no paired values"
    if diff.get("lo") is None:
        return "one seed: no interval, cannot tell"
    if diff["lo"] > 0:
        return f"higher than {baseline} (95% interval excludes 0)"
    if diff["hi"] < 0:
        return f"lower than {baseline} (95% interval excludes 0)"
    mde = diff.get("mde")
    tail = f"; effects smaller than about ±{mde:.2f} could not be detected with {diff['n']} seeds" if mde is not None else ""
    return "not distinguishable from zero" + tail


def _finite(values: Sequence[Optional[float]]) -> list:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def mean_std(values: Sequence[Optional[float]]) -> Dict[str, Optional[float]]:
    """Mean and sample standard deviation (``ddof=1``; ``None`` for fewer than 2 values)."""
    v = _finite(values)
    n = len(v)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    m = sum(v) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1)) if n > 1 else None
    return {"mean": m, "std": sd, "n": n}


def paired_interval(method: Sequence[Optional[float]], baseline: Sequence[Optional[float]]) -> Dict[str, Optional[float]]:
    """Mean paired difference ``method - baseline`` with its 95 % t-interval (see module doc).

    Pairs where either value is missing are dropped. ``lo``/``hi`` are ``None`` for n < 2.
    ``sd`` is the sample std of the differences, ``mde`` its :func:`detectable_effect`.

    >>> r = paired_interval([2.0, 3.0, 4.0], [1.0, 1.0, 1.0])
    >>> r["mean"], round(r["lo"], 3), round(r["hi"], 3)
    (2.0, -0.484, 4.484)
    """
    if len(method) != len(baseline):
        raise ValueError("method and baseline need one value per seed each")
    d = [float(a) - float(b) for a, b in zip(method, baseline)
         if a is not None and b is not None and not math.isnan(float(a)) and not math.isnan(float(b))]
    n = len(d)
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0, "t": None, "sd": None, "mde": None}
    m = sum(d) / n
    if n < 2:
        return {"mean": m, "lo": None, "hi": None, "n": n, "t": None, "sd": None, "mde": None}
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1))
    t = _t975(n - 1)
    half = t * sd / math.sqrt(n)
    return {"mean": m, "lo": m - half, "hi": m + half, "n": n, "t": t, "sd": sd, "mde": detectable_effect(sd, n)}
