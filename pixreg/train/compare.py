"""``pixreg compare``: train a list of methods over several seeds and tabulate the results.

For every seed and every method, one run (:func:`pixreg.train.trainer.train`) in
``OUT/<method>/seed<seed>``: with a given seed every method starts from the same
initial weights and sees the same data in the same order (only the loss differs), so
the per-seed differences to the baseline are *paired*. Runs already finished are
skipped (their ``metrics.json`` is read) and interrupted ones are resumed from their
last checkpoint, so ``compare`` can simply be run again after a crash.

Results are those of the final model (no selection on the validation set, which
would add its own noise) on every evaluated split. Written to ``OUT``:

* ``compare.md``: per split, a table of mean +- sample std over seeds per metric, and a
  table of the paired difference to the baseline (``ce`` when listed, else the first
  method) with its 95 % interval (:mod:`pixreg.train.stats`);
* ``compare.json``: every per-seed value, the summaries, the intervals, run folders and
  timings;
* ``per_class_iou.png`` (and ``per_class_iou_<split>.png`` for every split): mean per-class
  IoU of each method with +- std error bars (matplotlib, Agg backend).
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from . import process_group
from .checks import check_output_folder, check_settings
from .config import resolve_config
from .methods import method_slug
from .metrics import LOWER_IS_BETTER, METRIC_NAMES
from .stats import DETECTABLE_NAME, INTERVAL_NAME, mean_std, paired_interval, seeds_needed, verdict
from .evaluation import progress_bar
from .run import write_json
from .trainer import train

__all__ = ["compare", "summarize", "render_markdown", "plot_per_class"]

_LABELS = {"mIoU": "mIoU", "mAcc": "mAcc", "aAcc": "aAcc", "bg_to_coi": "bg→CoI", "distractor_to_coi": "distractor→CoI"}


def compare(config_path: Optional[str], methods: Sequence[str], seeds: Sequence[int], out_dir: str, *,
            overrides: Sequence[str] = (), device: Optional[str] = None, progress: bool = True,
            threads: Optional[int] = None, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train/evaluate ``methods`` x ``seeds`` (skipping finished runs), then summarise.

    Returns the summary dict written to ``compare.json``.
    """
    slugs = [method_slug(m) for m in methods]
    if len(set(slugs)) != len(slugs):
        raise ValueError(f"--methods lists a method twice: {list(methods)}")
    if not seeds:
        raise ValueError("need at least one seed")
    base_cfg = resolve_config(config_path, overrides, device=device, threads=threads)
    check_output_folder(out_dir)
    for slug in slugs:  # every method's settings, datasets and options, before the first run trains
        check_settings(resolve_config(config_path, overrides, method=slug, seed=int(seeds[0]), device=device, threads=threads))
    ctx = process_group.setup(base_cfg["device"])
    try:
        os.makedirs(out_dir, exist_ok=True)
        runs: Dict[str, Dict[int, Dict[str, Any]]] = {s: {} for s in slugs}
        dirs: Dict[str, Dict[str, str]] = {s: {} for s in slugs}
        t0 = time.perf_counter()
        jobs = [(seed, slug) for seed in seeds for slug in slugs]
        outer = progress_bar(total=len(jobs), enabled=progress and ctx.is_main, desc="compare", unit="run", leave=True, position=1)
        try:
            for i, (seed, slug) in enumerate(jobs):
                cfg = resolve_config(config_path, overrides, method=slug, seed=int(seed), device=device, threads=threads)
                run_dir = os.path.join(out_dir, slug.replace("+", "_"), f"seed{seed}")
                outer.set_description(f"compare [{slug} seed {seed}]")
                t_run = time.perf_counter()
                metrics = train(cfg, run_dir, resume=True, progress=progress, ctx=ctx, log=log)
                if ctx.is_main:
                    log(f"[{i + 1}/{len(jobs)}] {slug:>10} seed {seed}: "
                        + ", ".join(f"{split} mIoU {m['mIoU']:.2f}" for split, m in metrics["splits"].items())
                        + f"  ({time.perf_counter() - t_run:.1f} s)")
                runs[slug][int(seed)] = metrics
                dirs[slug][str(seed)] = run_dir
                outer.update(1)
        finally:
            outer.close()
        summary = summarize(runs, [int(s) for s in seeds], slugs)
        summary["run_dirs"] = dirs
        summary["wall_time_s"] = round(time.perf_counter() - t0, 1)
        summary["config"] = base_cfg
        if ctx.is_main:
            md = render_markdown(summary)
            with open(os.path.join(out_dir, "compare.md"), "w") as f:
                f.write(md)
            write_json(summary, os.path.join(out_dir, "compare.json"))
            try:
                paths = plot_per_class(summary, out_dir)
                summary["plots"] = paths
            except ImportError as err:  # pragma: no cover - matplotlib missing
                log(f"no per-class plot: {err}")
            log(md)
        process_group.barrier(ctx)
        return summary
    finally:
        process_group.teardown(ctx)


def summarize(runs: Mapping[str, Mapping[int, Mapping[str, Any]]], seeds: Sequence[int], methods: Sequence[str]) -> Dict[str, Any]:
    """Per split, metric and method: values per seed, mean/std, paired difference to the baseline."""
    baseline = "ce" if "ce" in methods else methods[0]
    first = runs[methods[0]][seeds[0]]
    splits = list(first["splits"])
    out: Dict[str, Any] = {"methods": list(methods), "seeds": list(seeds), "baseline": baseline,
                           "interval": INTERVAL_NAME, "detectable": DETECTABLE_NAME, "class_names": first.get("class_names"), "splits": {}}
    for split in splits:
        per_split: Dict[str, Any] = {"metrics": [], "methods": {}}
        present = [m for m in METRIC_NAMES if any(runs[me][s]["splits"][split].get(m) is not None
                                                  and runs[me][s]["splits"][split].get(m) == runs[me][s]["splits"][split].get(m)
                                                  for me in methods for s in seeds)]
        per_split["metrics"] = present
        for me in methods:
            entry: Dict[str, Any] = {}
            for metric in present:
                vals = [runs[me][s]["splits"][split].get(metric) for s in seeds]
                entry[metric] = dict(values=vals, **mean_std(vals))
                if me != baseline:
                    base_vals = [runs[baseline][s]["splits"][split].get(metric) for s in seeds]
                    diff = paired_interval(vals, base_vals)
                    diff["verdict"] = verdict(diff, baseline)
                    diff["seeds_for_1pt"] = seeds_needed(diff["sd"], 1.0)
                    entry[metric]["diff"] = diff
            classes = list(runs[me][seeds[0]]["splits"][split].get("per_class_iou", {}))
            entry["per_class_iou"] = {c: mean_std([runs[me][s]["splits"][split]["per_class_iou"].get(c) for s in seeds]) for c in classes}
            entry["train_time_s"] = mean_std([runs[me][s].get("train_time_s") for s in seeds])
            per_split["methods"][me] = entry
        out["splits"][split] = per_split
    return out


def _num(v: Optional[float], nd: int = 2) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def render_markdown(summary: Mapping[str, Any]) -> str:
    """Markdown tables of :func:`summarize`'s output."""
    seeds, methods, base = summary["seeds"], summary["methods"], summary["baseline"]
    lines = [f"# pixreg compare: {', '.join(methods)} over {len(seeds)} seed(s) {list(seeds)}", ""]
    lines.append("Values in %, final model, mean ± sample std over seeds. "
                 "bg→CoI / distractor→CoI: share of background / distractor pixels predicted as a class of interest (lower is better).")
    lines.append(f"Δ vs `{base}`: {summary['interval']}" + (" (n/a with one seed)." if len(seeds) < 2 else "."))
    lines.append("")
    for split, data in summary["splits"].items():
        metrics = data["metrics"]
        lines.append(f"## {split}")
        lines.append("")
        lines.append("| method | " + " | ".join(_LABELS.get(m, m) for m in metrics) + " | train s |")
        lines.append("|---|" + "---:|" * (len(metrics) + 1))
        for me in methods:
            e = data["methods"][me]
            cells = []
            for m in metrics:
                ms = e[m]
                cells.append(_num(ms["mean"]) + ("" if ms["std"] is None else f" ± {_num(ms['std'])}"))
            cells.append(_num(e["train_time_s"]["mean"], 0))
            lines.append(f"| {me} | " + " | ".join(cells) + " |")
        lines.append("")
        others = [me for me in methods if me != base]
        if others:
            lines.append(f"Paired difference to `{base}` (mean [95% CI]; * = interval excludes 0):")
            lines.append("")
            lines.append("| method | " + " | ".join("Δ " + _LABELS.get(m, m) for m in metrics) + " |")
            lines.append("|---|" + "---:|" * len(metrics))
            for me in others:
                cells = []
                for m in metrics:
                    d = data["methods"][me][m]["diff"]
                    if d["mean"] is None:
                        cells.append("–")
                    elif d["lo"] is None:
                        cells.append(f"{d['mean']:+.2f}")
                    else:
                        star = "*" if d["lo"] > 0 or d["hi"] < 0 else ""
                        cells.append(f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]{star}")
                lines.append(f"| {me} | " + " | ".join(cells) + " |")
            lines.append("")
            if "mIoU" in metrics:
                lines.extend(_power_table(data, others, base, len(seeds)))
    return "\n".join(lines)


def _power_table(data: Mapping[str, Any], others: Sequence[str], base: str, n_seeds: int) -> List[str]:
    """What these seeds can and cannot tell about the mIoU differences."""
    lines = [f"What {n_seeds} seed(s) can tell (mIoU; sd = std of the paired differences; "
             "detectable = " + DETECTABLE_NAME + "):", "",
             "| method | Δ mIoU | sd(Δ) | smallest detectable | seeds for ±1 pt | verdict |",
             "|---|---:|---:|---:|---:|---|"]
    for me in others:
        d = data["methods"][me]["mIoU"]["diff"]
        n1 = d.get("seeds_for_1pt")
        lines.append(f"| {me} | {_num(d['mean'])} | {_num(d['sd'])} | {_num(d.get('mde'))} | "
                     f"{'–' if n1 is None else n1} | {d.get('verdict', '')} |")
    lines.append("")
    return lines


def plot_per_class(summary: Mapping[str, Any], out_dir: str) -> List[str]:
    """Grouped bar charts of per-class IoU (mean ± std over seeds), one per split; the first
    split's is also written as ``per_class_iou.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: List[str] = []
    methods = summary["methods"]
    for i, (split, data) in enumerate(summary["splits"].items()):
        classes = list(data["methods"][methods[0]]["per_class_iou"])
        if not classes:
            continue
        fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(classes) * max(1, len(methods)) / 2 + 2), 4.0))
        width = 0.8 / len(methods)
        for j, me in enumerate(methods):
            pc = data["methods"][me]["per_class_iou"]
            means = [pc[c]["mean"] if pc[c]["mean"] is not None else float("nan") for c in classes]
            errs = [pc[c]["std"] if pc[c]["std"] is not None else 0.0 for c in classes]
            xs = [k + (j - (len(methods) - 1) / 2) * width for k in range(len(classes))]
            ax.bar(xs, means, width, yerr=errs, capsize=2, label=me)
        ax.set_xticks(range(len(classes)))
        ax.set_xticklabels(classes, rotation=45 if max(len(c) for c in classes) > 3 else 0, ha="right" if max(len(c) for c in classes) > 3 else "center")
        ax.set_ylabel("IoU (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"Per-class IoU on {split} (mean ± std over {len(summary['seeds'])} seed(s))")
        ax.legend(ncol=min(len(methods), 6), fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"per_class_iou_{split}.png")
        fig.savefig(path, dpi=110)
        paths.append(path)
        if i == 0:
            fig.savefig(os.path.join(out_dir, "per_class_iou.png"), dpi=110)
            paths.append(os.path.join(out_dir, "per_class_iou.png"))
        plt.close(fig)
    return paths
