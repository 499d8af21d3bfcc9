"""Gradient balance between cross-entropy and the regularizers, automatic weights, collapse guard.

A regularizer that pushes harder than cross-entropy on the features can make a
segmentation model predict one class only (issue 13: C+1 at the paper's alpha 0.1 and
CAR with the printed c2p energies did so on 3/3 seeds of the scenes data, while every
run whose regularizer gradient stayed at about 10% of CE's or less kept CE's mIoU).
This module measures that balance and acts on it:

* :func:`gradient_norm` / :func:`gradient_ratio`: the *gradient ratio* of a term

  .. math::  r = \\frac{\\lVert \\partial (w L_{reg}) / \\partial X \\rVert_2}
                     {\\lVert \\partial (w_{ce} L_{CE}) / \\partial X \\rVert_2}

  at the tensor ``X`` that feeds the term (its hooked features; the logits for a
  logits-only term such as LALL), norms over the global batch (squared norms summed
  over processes). :class:`pixreg.RegularizedCriterion` computes it every
  ``balance_every`` training steps with ``torch.autograd.grad`` on the retained graph
  (a partial backward from the losses down to ``X`` only, not into the backbone) and
  reports ``terms["ratio/<name>"]``.
* :class:`AutoWeight`: ``Term(loss, loss_weight="auto", target_ratio=0.1)`` (default 0.1
  for a term on features, 2.0 for a logits-only term): during a
  calibration window after the warm-up the weight is ``target * sum(|g_ce|) /
  sum(|g_reg|)`` (sums of the measured norms at unit weight, all-reduced: the same
  weight on every process), then frozen; the state is in buffers (``state_dict``), so a
  resumed run continues with the same weight.
* :class:`CollapseGuard`: watches training batches and ratios and returns plain-words
  warnings (once each): the model predicts one class, a ratio exceeds a threshold, or
  C+1's centres merge (``terms["centre_cos/<name>"]``).

Example (a plain loop)::

    >>> import torch, pixreg
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))
    >>> crit = pixreg.RegularizedCriterion(
    ...     {"car": pixreg.Term(pixreg.CARLoss(3), loss_weight="auto", calibration_steps=2)},
    ...     balance_every=1)
    >>> wrapped = pixreg.RegularizedModel(model, crit, layers="1")
    >>> guard = CollapseGuard()
    >>> for step in range(3):
    ...     x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    ...     out = wrapped.loss(wrapped(x), y)
    ...     out.total.backward()
    ...     messages = guard.update(step, out.terms, logits=None, labels=y)
    >>> bool(crit.balance["car"].frozen), float(crit.balance["car"].weight) > 0
    (True, True)
    >>> sorted(k for k in out.terms if "/" in k and not k.startswith("car/"))
    ['ratio/car', 'weight/car']
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .distributed import all_reduce_sum_no_grad

__all__ = [
    "DEFAULT_TARGET_RATIO", "DEFAULT_LOGITS_TARGET_RATIO", "DEFAULT_MAX_RATIO", "DEFAULT_LOGITS_MAX_RATIO",
    "DEFAULT_CALIBRATION_STEPS", "DEFAULT_BALANCE_EVERY",
    "gradient_norm", "gradient_ratio", "AutoWeight", "CollapseGuard", "centre_cosine",
]

#: Target gradient ratio of ``loss_weight="auto"`` for a term on features: the largest ratio
#: at which every feature regularizer kept cross-entropy's mIoU in the measurements of
#: issue 13 (scenes data, 500-800 steps, 3 seeds): C+1 and CAR collapsed at median
#: ratios 0.75 and 7.
DEFAULT_TARGET_RATIO = 0.1
#: Target for a logits-only term (LALL), whose ratio is taken at the logits: LALL at its
#: default weight runs at 2.2-2.7 on scenes (issue 13 acceptance logs) and beats CE there.
DEFAULT_LOGITS_TARGET_RATIO = 2.0
#: :class:`CollapseGuard` warns above these ratios (5x the targets).
DEFAULT_MAX_RATIO = 0.5
DEFAULT_LOGITS_MAX_RATIO = 10.0
#: Measured steps (after the warm-up) that set an automatic weight.
DEFAULT_CALIBRATION_STEPS = 50
#: How often (training steps) :class:`pixreg.RegularizedCriterion` measures the ratios.
DEFAULT_BALANCE_EVERY = 50


def gradient_norm(output: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``|| d output / d inputs ||_2`` over all ``inputs`` and all processes (float64, no grad).

    The graph is retained (the caller's ``backward`` still works); parameters' ``.grad``
    are not touched. An output without a graph, or inputs it does not depend on, give 0.

    >>> x = torch.tensor([3.0, 4.0], requires_grad=True)
    >>> float(gradient_norm((x * x).sum() / 2, [x]))
    5.0
    """
    inputs = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    sq = torch.zeros((), dtype=torch.float64, device=output.device)
    if inputs and output.requires_grad:
        grads = torch.autograd.grad(output, inputs, retain_graph=True, allow_unused=True)
        sq = sum((g.detach().double().pow(2).sum() for g in grads if g is not None), sq)
    return all_reduce_sum_no_grad(sq).sqrt()  # every process reduces, whatever its local graph


def gradient_ratio(term: torch.Tensor, reference: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``gradient_norm(term) / gradient_norm(reference)`` at ``inputs`` (``inf`` if the reference's is 0).

    >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> round(float(gradient_ratio(0.1 * x.sum(), x.sum(), [x])), 6)
    0.1
    """
    num, den = gradient_norm(term, inputs), gradient_norm(reference, inputs)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, math.inf))


class AutoWeight(nn.Module):
    """State of one automatic weight: ``weight = target * sum(ce norms) / sum(term norms)``.

    Buffers (float64, in ``state_dict``): ``weight`` (current value, 0 before the first
    measurement with a non-zero term gradient), ``sums`` (``[sum |g_ce|, sum |g_term|]``
    of the measurements at unit weight), ``count`` (measurements so far), ``frozen``
    (True once ``count >= calibration_steps`` and the term's gradient was non-zero).

    >>> aw = AutoWeight(target_ratio=0.1, calibration_steps=2)
    >>> aw.update(torch.tensor(2.0), torch.tensor(4.0)); float(aw.weight)
    0.05
    >>> aw.update(torch.tensor(2.0), torch.tensor(1.0)); float(aw.weight), bool(aw.frozen)
    (0.08, True)
    """

    def __init__(self, target_ratio: float = DEFAULT_TARGET_RATIO, calibration_steps: int = DEFAULT_CALIBRATION_STEPS) -> None:
        super().__init__()
        if isinstance(target_ratio, bool) or not isinstance(target_ratio, (int, float)) or not 0 < target_ratio < math.inf:
            raise ValueError(f"`target_ratio` must be a finite number > 0, got {target_ratio!r}")
        if isinstance(calibration_steps, bool) or not isinstance(calibration_steps, int) or calibration_steps < 1:
            raise ValueError(f"`calibration_steps` must be an int >= 1, got {calibration_steps!r}")
        self.target_ratio = float(target_ratio)
        self.calibration_steps = int(calibration_steps)
        self.register_buffer("weight", torch.zeros((), dtype=torch.float64))
        self.register_buffer("sums", torch.zeros(2, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))

    def extra_repr(self) -> str:
        return f"target_ratio={self.target_ratio}, calibration_steps={self.calibration_steps}"

    @torch.no_grad()
    def update(self, ce_norm: torch.Tensor, term_norm: torch.Tensor) -> None:
        """Add one measurement (global norms at unit weight) unless frozen."""
        if bool(self.frozen):
            return
        self.sums += torch.stack([ce_norm, term_norm]).to(self.sums)
        self.count += 1
        if self.sums[1] > 0:
            self.weight.copy_(self.target_ratio * self.sums[0] / self.sums[1])
            self.frozen.copy_(self.count >= self.calibration_steps)


@torch.no_grad()
def centre_cosine(centres: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean pairwise cosine similarity between the rows of ``centres`` ``(C, D)`` (rows in
    ``mask`` only); NaN with fewer than two rows. 1 means the centres have merged.

    >>> float(centre_cosine(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1e-9]])))  # doctest: +ELLIPSIS
    0.33...
    """
    keep = torch.ones(centres.shape[0], dtype=torch.bool, device=centres.device) if mask is None else mask
    u = nn.functional.normalize(centres.double(), dim=1) * keep[:, None]  # no boolean indexing: no host sync
    n = keep.sum().double()
    mean = ((u @ u.t()).sum() - u.pow(2).sum()) / (n * (n - 1)).clamp_min(1.0)
    return torch.where(n >= 2, mean, torch.full_like(mean, math.nan))


class CollapseGuard:
    """Plain-words warnings (each once) about a regularizer overpowering training.

    Args:
        start_step: steps before which nothing is checked (e.g. the longest warm-up).
        min_steps: further steps before the single-class check starts: a model trained from
            scratch predicts the majority class only for its first tens of steps (a healthy
            scenes run did so up to step 50, issue 13), which is not a collapse.
        single_class_share: a batch "predicts one class" when one class takes at least
            this share of the predicted pixels (valid pixels only) while the labels hold
            at least two classes.
        patience: consecutive such checked batches that make a sustained collapse.
        check_every: check the predictions every this many steps (one host read).
        max_ratio: warn when a term's gradient ratio (``terms["ratio/<name>"]``) exceeds it;
            a number, or ``{name: threshold}`` (terms not listed: :data:`DEFAULT_MAX_RATIO`).
            :meth:`for_criterion` uses 0.5 for feature terms and 10 for logits-only terms.
        max_centre_cosine: warn when C+1's centres' mean cosine (``terms["centre_cos/<name>"]``)
            exceeds it (they have merged).
        class_names: optional names for the messages.

    ``update(step, terms, logits, labels)`` returns the new warnings of this step;
    ``events`` holds every warning as a dict (kind, step, message, ...) and
    ``degenerate`` is True once a sustained single-class prediction was seen.
    """

    def __init__(self, *, start_step: int = 0, min_steps: int = 200, single_class_share: float = 0.99, patience: int = 10,
                 check_every: int = 10, max_ratio: Union[float, Mapping[str, float]] = DEFAULT_MAX_RATIO,
                 max_centre_cosine: float = 0.99,
                 class_names: Optional[Sequence[str]] = None, ignore_index: int = 255) -> None:
        self.start_step = int(start_step)
        self.min_steps = int(min_steps)
        self.single_class_share = float(single_class_share)
        self.patience = int(patience)
        self.check_every = max(int(check_every), 1)
        self.max_ratio = dict(max_ratio) if isinstance(max_ratio, Mapping) else float(max_ratio)
        self.max_centre_cosine = float(max_centre_cosine)
        self.class_names = list(class_names) if class_names else None
        self.ignore_index = int(ignore_index)
        self.events: List[Dict[str, object]] = []
        self.degenerate = False
        self._run = 0
        self._run_class: Optional[int] = None
        self._warned: set = set()
        self._last_ratios: Dict[str, float] = {}

    @classmethod
    def for_criterion(cls, criterion, **kwargs) -> "CollapseGuard":
        """A guard for a :class:`pixreg.RegularizedCriterion`: starts after the longest warm-up,
        ratio thresholds by where each term's ratio is taken (features or logits)."""
        kwargs.setdefault("start_step", max([s.warmup for s in criterion.specs.values()] + [0]))
        kwargs.setdefault("max_ratio", {n: DEFAULT_LOGITS_MAX_RATIO if criterion.ratio_at(n) == "logits" else DEFAULT_MAX_RATIO
                                        for n in criterion.specs})
        kwargs.setdefault("ignore_index", criterion.ignore_index)
        return cls(**kwargs)

    def _limit(self, name: str) -> float:
        if isinstance(self.max_ratio, dict):
            return float(self.max_ratio.get(name, DEFAULT_MAX_RATIO))
        return self.max_ratio

    def _name(self, k: int) -> str:
        if self.class_names and 0 <= k < len(self.class_names):
            return f"class {k} ({self.class_names[k]})"
        return f"class {k}"

    def _emit(self, key: str, event: Dict[str, object]) -> List[str]:
        if key in self._warned:
            return []
        self._warned.add(key)
        self.events.append(event)
        return [str(event["message"])]

    def _ratio_messages(self, step: int, terms: Mapping[str, torch.Tensor]) -> List[str]:
        out: List[str] = []
        for key, val in terms.items():
            if key.startswith("ratio/"):
                name, r = key[len("ratio/"):], float(val)
                self._last_ratios[name] = r
                limit = self._limit(name)
                if r > limit:
                    out += self._emit(key, {
                        "kind": "ratio", "term": name, "step": step, "ratio": r,
                        "message": (f"regularizer '{name}': its gradient at its features is {r:.3g}x cross-entropy's "
                                    f"at step {step} (threshold {limit:g}); it may overpower training. "
                                    f"Lower its weight or use loss_weight='auto'."),
                    })
            elif key.startswith("centre_cos/"):
                name, c = key[len("centre_cos/"):], float(val)
                if c > self.max_centre_cosine:
                    out += self._emit(key, {
                        "kind": "centres_merged", "term": name, "step": step, "cosine": c,
                        "message": (f"regularizer '{name}': its class centres have merged (mean cosine {c:.3f} "
                                    f"> {self.max_centre_cosine:g}) at step {step}; its compact term is pulling "
                                    f"every class to one point. Lower its weight (alpha) or use loss_weight='auto'."),
                    })
        return out

    def _collapse_check(self, step: int, logits: torch.Tensor, labels: torch.Tensor) -> List[str]:
        with torch.no_grad():
            lab = labels
            pred = logits.argmax(1)
            if pred.shape[-2:] != lab.shape[-2:]:
                lab = nn.functional.interpolate(lab[:, None].float(), size=pred.shape[-2:], mode="nearest")[:, 0].long()
            valid = lab != self.ignore_index
            k = logits.shape[1]
            counts = torch.bincount(pred[valid].flatten(), minlength=k)
            n_label_classes = int((torch.bincount(lab[valid].flatten().clamp(0, k - 1), minlength=k) > 0).sum())
            total = int(counts.sum())
            top = int(counts.argmax())
            share = float(counts[top]) / max(total, 1)
        if total == 0 or n_label_classes < 2 or share < self.single_class_share:
            self._run, self._run_class = 0, None
            return []
        self._run = self._run + 1 if self._run_class == top else 1
        self._run_class = top
        if self._run < self.patience:
            return []
        self.degenerate = True
        ratios = ", ".join(f"'{n}' {r:.3g}x" for n, r in sorted(self._last_ratios.items()))
        span = (self._run - 1) * self.check_every + 1
        return self._emit("collapse", {
            "kind": "single_class", "step": step, "class": top, "share": share,
            "ratios": dict(self._last_ratios),
            "message": (f"the model has predicted only {self._name(top)} ({share:.1%} of pixels) on the training "
                        f"batches checked over the last {span} steps (to step {step}), although the labels hold "
                        f"several classes: training has collapsed."
                        + (f" Gradient ratios to cross-entropy: {ratios}." if ratios else "")
                        + " A regularizer is probably overpowering cross-entropy: lower its weight, add a warm-up, "
                          "or use loss_weight='auto'."),
        })

    def update(self, step: int, terms: Mapping[str, torch.Tensor], logits: Optional[torch.Tensor] = None,
               labels: Optional[torch.Tensor] = None) -> List[str]:
        """Check this training step; return the warnings it triggered (each warning once per run)."""
        if step < self.start_step:
            return []
        out = self._ratio_messages(step, terms)
        if (logits is not None and labels is not None and step % self.check_every == 0
                and step >= self.start_step + self.min_steps):
            out += self._collapse_check(step, logits, labels)
        return out

    def summary(self) -> Dict[str, object]:
        """``{"degenerate": bool, "warnings": [events]}`` (for ``metrics.json``)."""
        return {"degenerate": self.degenerate, "warnings": list(self.events)}
