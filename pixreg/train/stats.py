"""Summary statistics over seeds and the paired t-interval used by ``pixreg compare``.

Interval: for a method M and the baseline B evaluated with the same seeds
``s = 1..n`` (same initial weights and data order per seed), the per-seed differences
``d_s = metric(M, s) - metric(B, s)`` give the two-sided 95 % **paired Student-t
confidence interval** of the mean difference,
``mean(d) +- t_{0.975, n-1} * sd(d) / sqrt(n)`` with ``sd`` the sample standard
deviation (``ddof = 1``). It needs ``n >= 2`` (with n = 2, ``t = 12.71``: wide).

Power: a two-sided paired t-test at level ``alpha = 0.05`` with ``n`` pairs whose
differences have true mean ``delta`` and standard deviation ``sd`` rejects with probability
``P(|T'| > t_{0.975, n-1})``, ``T'`` noncentral t with ``n - 1`` degrees of freedom and
noncentrality ``delta * sqrt(n) / sd`` (:func:`power`, exact). The smallest detectable
effect is the ``delta`` whose power is 80 % (:func:`detectable_effect`, solved exactly; the
textbook shortcut ``(t_{0.975} + t_{0.80}) * sd / sqrt(n)`` is optimistic for few seeds: at
``n = 3`` its power is 77 %, not 80 %). Quantiles and distributions come from
:mod:`scipy.stats` (the ``train`` extra).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

__all__ = ["t_quantile", "power", "mean_std", "paired_interval", "detectable_effect", "seeds_needed",
           "verdict", "INTERVAL_NAME", "DETECTABLE_NAME"]

INTERVAL_NAME = "paired Student-t 95% CI over seeds: mean(d) +- t(0.975, n-1) * sd(d) / sqrt(n)"
DETECTABLE_NAME = ("smallest detectable effect: the true mean difference that a two-sided paired t-test at the "
                   "5% level detects with 80% power (exact noncentral-t power, sd(d) taken as the true spread)")
POWER = 0.8
ALPHA = 0.05


def _scipy_stats():
    try:
        from scipy import stats
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("pixreg.train.stats needs scipy: install pixreg's 'train' extra (pip install -e '.[train]' in a checkout) or pip install scipy") from err
    return stats


def t_quantile(p: float, df: int) -> float:
    """Quantile ``t_{p, df}`` of Student's t (``scipy.stats.t.ppf``).

    >>> round(t_quantile(0.975, 1), 3), round(t_quantile(0.975, 4), 3)
    (12.706, 2.776)
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p!r}")
    if not df > 0:
        raise ValueError(f"df must be positive, got {df!r}")
    return float(_scipy_stats().t.ppf(p, df))


def power(effect: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """Exact power of the two-sided paired t-test at level ``alpha`` with ``n >= 2`` pairs whose
    differences have true mean ``effect`` and standard deviation ``sd > 0``:
    ``P(|T'| > t_{1-alpha/2, n-1})``, ``T' ~ nct(n - 1, effect * sqrt(n) / sd)``.

    >>> round(power(3.0965, 1.0, 3), 3)  # the (t_.975 + t_.80) shortcut at 3 seeds: 77 %, not 80 %
    0.766
    """
    if n < 2:
        raise ValueError(f"power needs n >= 2 pairs, got {n!r}")
    if not sd > 0:
        raise ValueError(f"sd must be positive, got {sd!r}")
    st = _scipy_stats()
    df = n - 1
    crit = st.t.ppf(1.0 - alpha / 2.0, df)
    nc = float(effect) * math.sqrt(n) / float(sd)
    # P(T' < -crit | nc) = P(T' > crit | -nc); scipy's nct.cdf far in the tail can return NaN
    return float(st.nct.sf(crit, df, nc) + st.nct.sf(crit, df, -nc))


def detectable_effect(sd: Optional[float], n: int, power_target: float = POWER) -> Optional[float]:
    """Smallest true mean paired difference detected with probability ``power_target`` by a
    two-sided paired t-test at the 5 % level, for ``n`` pairs whose differences have
    standard deviation ``sd`` (exact: solves :func:`power` ``= power_target`` with
    ``scipy.optimize.brentq``). ``None`` for ``n < 2`` or unknown ``sd``; ``0`` for ``sd = 0``.

    >>> round(detectable_effect(2.3, 3), 2), round(detectable_effect(2.3, 20), 2)
    (7.51, 1.52)
    """
    if sd is None or n < 2:
        return None
    if not 0.0 < power_target < 1.0:
        raise ValueError(f"power_target must lie in (0, 1), got {power_target!r}")
    sd = float(sd)
    if sd == 0.0:
        return 0.0
    from scipy.optimize import brentq

    # the shortcut is a lower bound; the root lies below twice it plus a margin
    hi = 2.0 * (t_quantile(0.975, n - 1) + t_quantile(power_target, n - 1)) * sd / math.sqrt(n) + sd
    return float(brentq(lambda e: power(e, sd, n) - power_target, 0.0, hi, xtol=1e-10 * sd))


def seeds_needed(sd: Optional[float], effect: float, power_target: float = POWER,
                 max_n: int = 10_000) -> Optional[int]:
    """Fewest seeds ``n >= 2`` whose exact :func:`power` for ``effect`` reaches ``power_target``
    (equivalently, whose :func:`detectable_effect` is at most ``effect``).

    >>> seeds_needed(2.3, 1.0)
    44
    """
    if sd is None or effect <= 0:
        return None
    if sd == 0:
        return 2
    n = 2
    while n <= max_n:
        if power(effect, sd, n) >= power_target:
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
    t = t_quantile(0.975, n - 1)
    half = t * sd / math.sqrt(n)
    return {"mean": m, "lo": m - half, "hi": m + half, "n": n, "t": t, "sd": sd, "mde": detectable_effect(sd, n)}
