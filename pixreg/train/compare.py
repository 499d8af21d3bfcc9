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

import json
import math
import os
import time
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch

from . import process_group
from .checks import check_output_folder, check_settings, scan_data
from .config import resolve_config
from .features import prepare_feature_caches
from .methods import method_slug
from .metrics import LOWER_IS_BETTER, METRIC_NAMES
from .stats import DETECTABLE_NAME, INTERVAL_NAME, mean_std, paired_interval, seeds_needed, verdict
from .evaluation import progress_bar
from .run import run_status, write_json
from .trainer import train

__all__ = ["compare", "summarize", "render_markdown", "plot_per_class", "predicts_one_class"]

_LABELS = {"mIoU": "mIoU", "mAcc": "mAcc", "aAcc": "aAcc", "bg_to_coi": "bg→CoI", "distractor_to_coi": "distractor→CoI"}


def compare(config_path: Optional[str], methods: Sequence[str], seeds: Sequence[int], out_dir: str, *,
            overrides: Sequence[str] = (), device: Optional[str] = None, progress: bool = True,
            threads: Optional[int] = None, jobs: int = 1, report_only: bool = False,
            log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train/evaluate ``methods`` x ``seeds`` (skipping finished runs), then summarise.

    ``jobs > 1`` trains that many runs at once in separate processes, within a thread
    budget of ``threads`` (default: all CPU cores): each run gets ``threads // jobs``
    threads. Runs are started seed by seed (every method of seed 0 first), so an
    interrupted compare leaves complete pairs; running it again resumes it (finished runs
    are read, interrupted ones continue from their last checkpoint). ``report_only``
    trains nothing: it summarises the seeds whose runs of every method have finished
    (e.g. while a compare is still running). Feature caches of
    the frozen-encoder protocol (``data.features``, :mod:`pixreg.train.features`) are
    built once, before any run, and shared by every method and seed.

    Returns the summary dict written to ``compare.json``.
    """
    slugs, run_threads = _check_compare_args(methods, seeds, jobs, threads)
    base_cfg = resolve_config(config_path, overrides, device=device, threads=threads)
    check_output_folder(out_dir)
    for slug in slugs:  # every method's settings, datasets and options, before the first run trains
        check_settings(resolve_config(config_path, overrides, method=slug, seed=int(seeds[0]), device=device, threads=threads))
    if int(os.environ.get("RANK", "0")) == 0:
        scan_data(base_cfg, log)  # every sample read once, before out_dir is made (runs reuse the result)
    ctx = process_group.setup(base_cfg["device"])
    if jobs > 1 and ctx.distributed:
        raise ValueError("--jobs > 1 cannot be combined with torchrun (each run is already distributed)")
    try:
        os.makedirs(out_dir, exist_ok=True)
        if ctx.is_main and not report_only:
            if threads:
                torch.set_num_threads(int(threads))
            prepare_feature_caches(base_cfg, progress=progress, log=log)
        process_group.barrier(ctx)
        runs: Dict[str, Dict[int, Dict[str, Any]]] = {s: {} for s in slugs}
        dirs: Dict[str, Dict[str, str]] = {s: {} for s in slugs}
        t0 = time.perf_counter()
        specs = [RunSpec(config_path, tuple(overrides), slug, int(seed), device, run_threads,
                         os.path.join(out_dir, slug.replace("+", "_"), f"seed{seed}"))
                 for seed in seeds for slug in slugs]
        outer = progress_bar(total=len(specs), enabled=progress and ctx.is_main, desc="compare", unit="run", leave=True, position=1)

        def done(i: int, spec: "RunSpec", metrics: Mapping[str, Any], secs: float) -> None:
            if ctx.is_main:
                log(f"[{i + 1}/{len(specs)}] {spec.method:>10} seed {spec.seed}: "
                    + ", ".join(f"{split} mIoU {m['mIoU']:.2f}" for split, m in metrics["splits"].items())
                    + f"  ({secs:.1f} s)")
            runs[spec.method][spec.seed] = dict(metrics)
            dirs[spec.method][str(spec.seed)] = spec.run_dir
            outer.update(1)

        try:
            if report_only:
                seeds = _report_finished(specs, done, log)
            elif jobs == 1:
                _run_sequential(specs, done, outer, ctx, progress, log)
            else:
                _run_parallel(specs, jobs, done, log)
        finally:
            outer.close()
        summary = summarize(runs, [int(s) for s in seeds], slugs)
        summary.update(run_dirs=dirs, wall_time_s=round(time.perf_counter() - t0, 1), jobs=jobs,
                       threads_per_run=run_threads, config=base_cfg)
        if ctx.is_main:
            _write_report(summary, out_dir, log)
        process_group.barrier(ctx)
        return summary
    finally:
        process_group.teardown(ctx)


def _run_sequential(specs: Sequence["RunSpec"], done: Callable, outer, ctx, progress: bool,
                    log: Callable[[str], None]) -> None:
    """Train (or resume, or read back) every run in this process, one after the other."""
    for i, spec in enumerate(specs):
        outer.set_description(f"compare [{spec.method} seed {spec.seed}]")
        t_run = time.perf_counter()
        metrics = train(spec.config(), spec.run_dir, resume=True, progress=progress, ctx=ctx, log=log)
        done(i, spec, metrics, time.perf_counter() - t_run)


def _check_compare_args(methods: Sequence[str], seeds: Sequence[int], jobs: int,
                        threads: Optional[int]) -> Tuple[List[str], Optional[int]]:
    """Validate ``compare``'s arguments; return the method slugs and the threads per run."""
    slugs = [method_slug(m) for m in methods]
    if len(set(slugs)) != len(slugs):
        raise ValueError(f"--methods lists a method twice: {list(methods)}")
    if not seeds:
        raise ValueError("need at least one seed")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs must be a positive int, got {jobs!r}")
    budget = int(threads) if threads else (os.cpu_count() or 1)
    if jobs > budget:
        raise ValueError(f"--jobs {jobs} exceeds the thread budget --threads {budget} (one thread per run at least)")
    return slugs, (threads if jobs == 1 else budget // jobs)


def _write_report(summary: Dict[str, Any], out_dir: str, log: Callable[[str], None]) -> None:
    """Write ``compare.md``, ``compare.json`` and the per-class plots; print the table."""
    md = render_markdown(summary)
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(md)
    write_json(summary, os.path.join(out_dir, "compare.json"))
    try:
        summary["plots"] = plot_per_class(summary, out_dir)
    except ImportError as err:  # pragma: no cover - matplotlib missing
        log(f"no per-class plot: {err}")
    log(md)


def degenerate_reasons(metrics: Mapping[str, Any]) -> List[str]:
    """Why a finished run is degenerate (empty list: it is not).

    * every class but one has an IoU below 1 % on a split: the model predicts one class
      (the rule of ``benchmarks/claims.py``);
    * the collapse guard saw a sustained single-class prediction on training batches;
    * the guard's other warnings (a regularizer's gradient ratio above its threshold,
      merged C+1 centres) are listed too, as warnings.
    """
    out: List[str] = []
    for split, m in (metrics.get("splits") or {}).items():
        if predicts_one_class(m):
            out.append(f"predicts one class on {split}")
    guard = metrics.get("collapse_guard") or {}
    for ev in guard.get("warnings", []):
        if ev.get("kind") == "single_class":
            out.append(f"training collapsed to class {ev.get('class')} at step {ev.get('step')}")
        elif ev.get("kind") == "ratio":
            out.append(f"warning: '{ev.get('term')}' gradient ratio {float(ev.get('ratio', 0)):.3g} at step {ev.get('step')}")
        elif ev.get("kind") == "centres_merged":
            out.append(f"warning: '{ev.get('term')}' centres merged (cosine {float(ev.get('cosine', 0)):.3f}) at step {ev.get('step')}")
    return out


class RunSpec(NamedTuple):
    """One run of a compare: what :func:`_run_one` needs to rebuild its config in a fresh process."""

    config_path: Optional[str]
    overrides: Tuple[str, ...]
    method: str
    seed: int
    device: Optional[str]
    threads: Optional[int]
    run_dir: str

    def config(self) -> Dict[str, Any]:
        return resolve_config(self.config_path, list(self.overrides), method=self.method, seed=self.seed,
                              device=self.device, threads=self.threads)


def _report_finished(specs: Sequence[RunSpec], done: Callable[..., None], log: Callable[[str], None]) -> List[int]:
    """Read the finished runs of ``specs``; return the seeds finished for every method."""
    finished = {(sp.method, sp.seed) for sp in specs if run_status(sp.run_dir) == "finished"}
    methods = list(dict.fromkeys(sp.method for sp in specs))
    seeds = [s for s in dict.fromkeys(sp.seed for sp in specs) if all((m, s) in finished for m in methods)]
    if not seeds:
        raise ValueError("--report-only: no seed has finished runs of every method yet")
    left = sorted({sp.seed for sp in specs} - set(seeds))
    if left:
        log(f"--report-only: seeds {left} are not finished for every method; summarising seeds {seeds}")
    for i, sp in enumerate(specs):
        if sp.seed in seeds:
            with open(os.path.join(sp.run_dir, "metrics.json")) as f:
                done(i, sp, json.load(f), 0.0)
    return seeds


def _run_one(spec: RunSpec) -> Tuple[Dict[str, Any], float]:
    """Train one run in a worker process (no progress bars); returns its metrics and seconds."""
    t = time.perf_counter()
    metrics = train(spec.config(), spec.run_dir, resume=True, progress=False,
                    log=lambda msg: print(f"[{spec.method} seed {spec.seed}] {msg}", flush=True))
    return metrics, time.perf_counter() - t


def _run_parallel(specs: Sequence[RunSpec], jobs: int, done: Callable[..., None], log: Callable[[str], None]) -> None:
    """Run ``specs`` in ``jobs`` spawned processes, in order; ``done`` is called as each finishes.
    On a failure no new run is started, the running ones finish, and the first error is raised
    (finished runs stay on disk, so running the compare again resumes it)."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    error: Optional[BaseException] = None
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        pending = {pool.submit(_run_one, spec): i for i, spec in enumerate(specs)}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                i = pending.pop(fut)
                try:
                    metrics, secs = fut.result()
                except BaseException as err:  # noqa: BLE001 - reported after the running ones finish
                    if error is None:
                        error = err
                        log(f"run {specs[i].method} seed {specs[i].seed} failed: {err}; stopping after the running runs")
                        for f in pending:
                            f.cancel()
                    continue
                done(i, specs[i], metrics, secs)
            pending = {f: i for f, i in pending.items() if not f.cancelled()}
    if error is not None:
        raise error


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
            entry["single_class_seeds"] = [s for s in seeds if predicts_one_class(runs[me][s]["splits"][split])]
            per_split["methods"][me] = entry
        out["splits"][split] = per_split
    flags = {me: {str(s): degenerate_reasons(runs[me][s]) for s in seeds} for me in methods}
    out["flags"] = {me: {s: r for s, r in v.items() if r} for me, v in flags.items() if any(v.values())}
    out["degenerate"] = {me: [s for s, r in v.items() if any(not x.startswith("warning") for x in r)]
                         for me, v in flags.items()}
    out["degenerate"] = {me: v for me, v in out["degenerate"].items() if v}
    return out


def _flag_lines(summary: Mapping[str, Any]) -> List[str]:
    flags = summary.get("flags") or {}
    if not flags:
        return ["Degenerate runs: none (no run predicts a single class; no collapse-guard warning).", ""]
    lines = ["## Degenerate runs and warnings", "",
             "A degenerate run (a model that predicts one class) says nothing about the method's effect; "
             "its numbers are in the tables below but should not be trusted.", ""]
    for me, per_seed in flags.items():
        for s, reasons in per_seed.items():
            tag = "**degenerate**" if s in (summary.get("degenerate") or {}).get(me, []) else "warning"
            lines.append(f"- `{me}` seed {s} ({tag}): " + "; ".join(reasons))
    lines.append("")
    return lines


def predicts_one_class(split_metrics: Mapping[str, Any]) -> bool:
    """Whether a model predicts (almost) nothing but one class on a split: every class but the
    best has an IoU below 1 %. Numbers from such a run say little and are flagged."""
    ious = sorted(v for v in (split_metrics.get("per_class_iou") or {}).values() if v is not None and v == v)
    return len(ious) > 1 and ious[-2] < 1.0


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
    lines.extend(_flag_lines(summary))
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
        flagged = {me: data["methods"][me].get("single_class_seeds") for me in methods}
        flagged = {me: v for me, v in flagged.items() if v}
        if flagged:
            lines.append("**Single-class models** (every class but one below 1 % IoU; their numbers say little): "
                         + "; ".join(f"`{me}` seeds {v}" for me, v in flagged.items()) + ".")
            lines.append("")
        lines.extend(_per_class_table(data, methods))
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


def _per_class_table(data: Mapping[str, Any], methods: Sequence[str]) -> List[str]:
    """Per-class IoU, mean over seeds (classes as rows)."""
    classes = list(data["methods"][methods[0]].get("per_class_iou") or {})
    if not classes:
        return []
    lines = ["Per-class IoU (%, mean over seeds):", "", "| class | " + " | ".join(methods) + " |",
             "|---|" + "---:|" * len(methods)]
    for c in classes:
        lines.append(f"| {c} | " + " | ".join(_num(data["methods"][me]["per_class_iou"][c]["mean"], 1) for me in methods) + " |")
    lines.append("")
    return lines


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
