"""``pixreg diagnose``: what a regularizer did to the features of trained runs.

:func:`diagnose` loads one or more run folders, streams a dataset split through each model
(:mod:`pixreg.viz.extract`, bounded memory), computes the numbers (:mod:`pixreg.viz.stats`),
writes them as CSV/JSON, draws the figures (:mod:`pixreg.viz.plots`) and writes one
self-contained HTML report (:mod:`pixreg.viz.report`). Files written into ``out``::

    report.html                 the report (images embedded as data: URIs, no network)
    summary.json                runs, checkpoints, settings, metrics per split, file list
    matrices.json               per run: centre_cosine, centre_dependency, pixel_cosine (K x K), counts
    centre_similarity.csv/.png  class-centre cosine similarity and CAR's dependency map
    pixel_similarity.csv/.png   mean intra/inter-class cosine similarity of pixel features
    tsne.csv/.png               2-D t-SNE of a class-balanced pixel sample
    logit_hist.csv/.png         class-k logit at TP_k / FN_k / FP_k pixels (weighted histograms)
    examples.json, examples_<run>.npz/.png   input, GT, prediction, error, RCH phi / psi maps
    per_class_iou.csv/.png      per-class IoU of the runs on the split
    curves.csv, training_curves.png          training curves from each run's log.csv
    background_distance.csv, background_distance_hist.csv/.png   (data with a background class)
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .extract import LoadedRun, SplitResult, embedding_source, example_maps, extract_split, load_run
from .stats import nearest_centre_distance, safe_name, smooth, weighted_histogram, weighted_quantiles

__all__ = ["diagnose", "safe_name", "read_curves"]

SETS = ("TP", "FN", "FP")


def _labels(run_dirs: Sequence[str]) -> List[str]:
    """Short unique names: the folder name, or more of the path when two folders share it."""
    parts = [os.path.normpath(os.path.abspath(d)).split(os.sep) for d in run_dirs]
    depth = 1
    while depth < max(len(p) for p in parts):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
        depth += 1
    return ["/".join(p[-depth:]) for p in parts]


def _finite(x):
    """JSON-safe: NaN/inf -> None, numpy -> python."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, np.ndarray):
        return _finite(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _write_json(obj: Any, path: str) -> None:
    with open(path, "w") as f:
        json.dump(_finite(obj), f, indent=1)
        f.write("\n")


def _write_csv(rows: List[Dict[str, Any]], path: str, fields: Optional[List[str]] = None) -> None:
    fields = fields or (list(rows[0]) if rows else [])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()})


def read_curves(run_dir: str) -> Dict[str, np.ndarray]:
    """``{"step": ..., "loss": ..., "ce": ..., "<regularizer>": ...}`` from ``log.csv`` (top-level terms),
    plus the sparse gradient-balance columns ``ratio/<term>`` and ``centre_cos/<term>`` (NaN
    on the steps where they were not measured; see :mod:`pixreg.balance`)."""
    path = os.path.join(run_dir, "log.csv")
    if not os.path.exists(path):
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    keys = [k for k in rows[0] if k not in ("step", "epoch", "lr", "time_s") and ("/" not in k or k.startswith(SPARSE_KEYS))]
    out = {"step": np.array([int(r["step"]) for r in rows])}
    for k in keys:
        out[k] = np.array([float(r[k]) if r.get(k) not in (None, "") else np.nan for r in rows])
    return out


#: log.csv columns measured every few steps only (plotted as points, not smoothed).
SPARSE_KEYS = ("ratio/", "centre_cos/")


def run_flags(run_dir: str) -> List[str]:
    """Why a run is degenerate or was warned about (from its ``metrics.json``; see
    :func:`pixreg.train.compare.degenerate_reasons`); empty when healthy or unfinished."""
    from ..train.compare import degenerate_reasons

    path = os.path.join(run_dir, "metrics.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return degenerate_reasons(json.load(f))


# ----------------------------------------------------------------------------- numbers
def _matrices(results: Dict[str, SplitResult], class_names: List[str], out: str) -> Dict[str, Any]:
    mats: Dict[str, Any] = {"classes": class_names, "runs": {}}
    centre_rows, pixel_rows = [], []
    for label, res in results.items():
        st = res.stats
        m = {"centre_cosine": st.centre_cosine(), "centre_dependency": st.centre_dependency(),
             "pixel_cosine": st.pixel_cosine(), "pixels": st.counts.numpy().astype(np.int64)}
        mats["runs"][label] = m
        for i, a in enumerate(class_names):
            for j, b in enumerate(class_names):
                centre_rows.append({"run": label, "row": a, "col": b, "cosine": float(m["centre_cosine"][i, j]),
                                    "dependency": float(m["centre_dependency"][i, j])})
                pixel_rows.append({"run": label, "row": a, "col": b, "mean_cosine": float(m["pixel_cosine"][i, j])})
    _write_json(mats, os.path.join(out, "matrices.json"))
    _write_csv(centre_rows, os.path.join(out, "centre_similarity.csv"))
    _write_csv(pixel_rows, os.path.join(out, "pixel_similarity.csv"))
    return mats


def _tsne(results: Dict[str, SplitResult], class_names: List[str], out: str, seed: int) -> Dict[str, Any]:
    from sklearn.manifold import TSNE

    emb: Dict[str, Any] = {}
    rows = []
    for label, res in results.items():
        r = res.features
        feats = r.get("feat").astype(np.float64)
        if len(feats) < 5:
            continue
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
        perplexity = float(min(30.0, max(2.0, (len(feats) - 1) / 3.0)))
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, max_iter=500).fit_transform(feats)
        lab, pred, dis = r.get("label"), r.get("pred"), r.get("distractor").astype(bool)
        emb[label] = {"xy": xy, "label": lab, "pred": pred, "distractor": dis}
        for (x, y), a, p, d in zip(xy, lab, pred, dis):
            rows.append({"run": label, "x": round(float(x), 4), "y": round(float(y), 4), "label": int(a),
                         "class": class_names[int(a)], "pred": int(p), "distractor": int(d)})
    _write_csv(rows, os.path.join(out, "tsne.csv"), ["run", "x", "y", "label", "class", "pred", "distractor"])
    return emb


def _logit_hists(results: Dict[str, SplitResult], out: str, bins: int = 40) -> Dict[str, Any]:
    data: Dict[str, Any] = {}
    allv = []
    for label, res in results.items():
        r = res.logits
        zt, zp, w = r.get("z_true"), r.get("z_pred"), r.weights()
        wrong = r.get("label") != r.get("pred")
        data[label] = {"TP": (zt[~wrong], w[~wrong]), "FN": (zt[wrong], w[wrong]), "FP": (zp[wrong], w[wrong])}
        allv += [zt, zp]
    v = np.concatenate(allv) if allv else np.zeros(0)
    lo, hi = (np.percentile(v, [0.1, 99.9]) if len(v) else (0.0, 1.0))
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    rows, stats = [], {}
    hists: Dict[str, Any] = {"edges": edges, "runs": {}}
    for label, sets in data.items():
        hists["runs"][label] = {}
        stats[label] = {}
        for s in SETS:
            vals, w = sets[s]
            h = weighted_histogram(np.clip(vals, lo, hi), w, edges)
            hists["runs"][label][s] = h
            q = weighted_quantiles(vals, w, [0.1, 0.5, 0.9])
            stats[label][s] = {"pixels": int(round(w.sum())), "sampled": int(len(vals)),
                               "mean": float(np.average(vals, weights=w)) if len(vals) else float("nan"),
                               "p10": q[0], "median": q[1], "p90": q[2]}
            for a, b, d in zip(edges[:-1], edges[1:], h):
                rows.append({"run": label, "set": s, "bin_lo": round(float(a), 5), "bin_hi": round(float(b), 5), "density": float(d)})
    _write_csv(rows, os.path.join(out, "logit_hist.csv"), ["run", "set", "bin_lo", "bin_hi", "density"])
    hists["stats"] = stats
    return hists


def _per_class_iou(results: Dict[str, SplitResult], class_names: List[str], out: str) -> Dict[str, Any]:
    table = {label: [res.metrics["per_class_iou"].get(c) for c in class_names] for label, res in results.items()}
    rows = []
    for i, c in enumerate(class_names):
        row: Dict[str, Any] = {"class": c}
        row.update({label: ("" if v[i] is None else round(v[i], 3)) for label, v in table.items()})
        rows.append(row)
    rows.append({"class": "mIoU", **{label: round(res.metrics["mIoU"], 3) for label, res in results.items()}})
    _write_csv(rows, os.path.join(out, "per_class_iou.csv"), ["class"] + list(results))
    return table


def _curves(runs: List[LoadedRun], out: str) -> Dict[str, Dict[str, np.ndarray]]:
    curves, rows = {}, []
    for run in runs:
        c = read_curves(run.run_dir)
        if not c:
            continue
        curves[run.label] = c
        for k, v in c.items():
            if k == "step":
                continue
            sm = v if k.startswith(SPARSE_KEYS) else smooth(v)
            rows += [{"run": run.label, "step": int(s), "key": k, "value": float(a), "smoothed": float(b)}
                     for s, a, b in zip(c["step"], v, sm)]
    _write_csv(rows, os.path.join(out, "curves.csv"), ["run", "step", "key", "value", "smoothed"])
    return curves


def _background(by_run: Dict[str, Dict[str, SplitResult]], seen: str, unseen: Optional[str], bg: int,
                num_classes: int, out: str, bins: int = 40) -> Dict[str, Any]:
    """Distance of pixel features to the nearest class-of-interest centre (centres: the
    ``seen`` split's class means), per pixel group."""
    coi = [c for c in range(num_classes) if c != bg]
    groups: Dict[str, Any] = {}
    rows = []
    for label, res_by_split in by_run.items():
        ref = res_by_split[seen]
        centres = ref.stats.centres()
        spec = [("classes of interest", seen, lambda s: s != bg), ("background", seen, lambda s: s == bg)]
        if ref.has_distractor:
            spec.append(("distractors, seen kinds", seen, lambda s: s == num_classes))
        if unseen is not None and unseen in res_by_split:
            spec += [(f"background ({unseen})", unseen, lambda s: s == bg),
                     ("distractors, unseen kinds", unseen, lambda s: s == num_classes)]
        groups[label] = {}
        coi_median = float("nan")
        for name, split, select in spec:
            r = res_by_split[split].features
            strata = r.strata.numpy()
            sel = select(strata) & (strata >= 0)
            d, _ = nearest_centre_distance(r.get("feat")[sel].astype(np.float64), centres, coi)
            w = r.weights()[sel]
            q = weighted_quantiles(d, w, [0.1, 0.5, 0.9])
            if name == "classes of interest":
                coi_median = q[1]
            below = float(np.sum(w[d < coi_median]) / w.sum()) if len(d) and w.sum() > 0 else float("nan")
            groups[label][name] = {"d": d, "w": w}
            rows.append({"run": label, "group": name, "split": split, "sampled": int(len(d)), "pixels": int(round(w.sum())),
                         "mean": float(np.average(d, weights=w)) if len(d) else float("nan"),
                         "p10": q[0], "median": q[1], "p90": q[2], "frac_below_coi_median": below})
    _write_csv(rows, os.path.join(out, "background_distance.csv"))
    edges = np.linspace(0.0, 2.0, bins + 1)
    hist_rows = []
    for label, gs in groups.items():
        for name, g in gs.items():
            g["hist"] = weighted_histogram(g["d"], g["w"], edges)
            hist_rows += [{"run": label, "group": name, "bin_lo": round(float(a), 4), "bin_hi": round(float(b), 4), "density": float(h)}
                          for a, b, h in zip(edges[:-1], edges[1:], g["hist"])]
    _write_csv(hist_rows, os.path.join(out, "background_distance_hist.csv"), ["run", "group", "bin_lo", "bin_hi", "density"])
    return {"edges": edges, "groups": groups, "rows": rows}


def _examples(runs: List[LoadedRun], dataset, n: int, out: str) -> Dict[str, List[Dict[str, Any]]]:
    if n <= 0:
        return {}
    idx = sorted(set(np.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().astype(int).tolist()))
    ex, summary = {}, {}
    for run in runs:
        maps = example_maps(run, dataset, idx)
        ex[run.label] = maps
        np.savez_compressed(os.path.join(out, f"examples_{safe_name(run.label)}.npz"),
                            **{f"{key}_{m['index']}": m[key] for m in maps for key in ("image", "label", "pred", "error", "phi", "psi")})
        summary[run.label] = [{"index": m["index"], "pixel_error": float(m["error"].mean()),
                               "mean_phi": float(np.nanmean(m["phi"])) if np.isfinite(m["phi"]).any() else None,
                               "mean_psi": float(np.nanmean(m["psi"])) if np.isfinite(m["psi"]).any() else None,
                               "embedding": m["embedding"], "calibration": m["calibration"]} for m in maps]
    _write_json({"indices": idx, "runs": summary}, os.path.join(out, "examples.json"))
    return ex


# ----------------------------------------------------------------------------- entry point
def diagnose(run_dirs: Sequence[str], out: str, *, split: Optional[str] = None, data: Optional[str] = None,
             data_root: Optional[str] = None, overrides: Sequence[str] = (), checkpoint: str = "last",
             device: str = "cpu", examples: int = 4, feature_capacity: int = 300, logit_capacity: int = 4000,
             max_images: Optional[int] = None, batch_size: Optional[int] = None, openset_split: Optional[str] = "auto",
             progress: bool = True, seed: int = 0, plots: bool = True, report: bool = True) -> Dict[str, Any]:
    """Diagnose the runs in ``run_dirs`` on one split; write everything into ``out``.

    Args:
        split: the split to analyse (default: each run's first test split).
        data, data_root, overrides: dataset name / root / ``key=value`` overrides of the runs'
            ``config.yaml`` (default: the dataset each run was trained on).
        checkpoint: ``last``, ``best`` or a path.
        examples: number of images shown with their error and calibration maps.
        feature_capacity: pixels kept per class (per stratum) for t-SNE and the distances.
        logit_capacity: pixels kept per (class, correct/wrong) for the logit histograms.
        max_images: analyse only the first N images of the split.
        openset_split: for data with distractor masks and an open-set split (the embedded
            scenes data): the split with unseen distractor kinds (``"auto"``: ``test_openset``
            when the dataset has it; ``None``: none).

    Returns the summary (also written to ``summary.json``).
    """
    from ..train.run import make_dataset, run_config

    if not run_dirs:
        raise ValueError("diagnose needs at least one run folder")
    over = list(overrides)
    if data is not None:
        over.append(f"data.name={json.dumps(data)}")
    if data_root is not None:
        over.append(f"data.root={json.dumps(data_root)}")
    runs: List[LoadedRun] = []
    datasets = {}
    for run_dir, label in zip(run_dirs, _labels(run_dirs)):
        cfg = run_config(run_dir, over)
        sp = split or cfg["data"]["test_splits"][0]
        ds = make_dataset(cfg, sp)
        runs.append(load_run(run_dir, checkpoint=checkpoint, device=device, label=label, dataset=ds, cfg=cfg))
        datasets[label] = (sp, ds, cfg)
    os.makedirs(out, exist_ok=True)  # after the runs and splits are checked: a bad --split leaves no folder
    first = datasets[runs[0].label][1]
    class_names = [str(c) for c in getattr(first, "class_names", range(first.num_classes))]
    for label, (_, ds, _) in datasets.items():
        names = [str(c) for c in getattr(ds, "class_names", range(ds.num_classes))]
        if names != class_names:
            raise ValueError(f"run {label!r} has classes {names}, run {runs[0].label!r} has {class_names}: diagnose runs of one dataset")
    main_split = datasets[runs[0].label][0]
    bg = getattr(first, "background_index", None)
    k = int(first.num_classes)
    # open-set comparison (C+1 data with distractor kinds seen / unseen in training)
    unseen = None
    seen = main_split
    if bg is not None and openset_split and hasattr(first, "unseen_kinds"):
        unseen = "test_openset" if openset_split == "auto" else openset_split
        if main_split == unseen:
            seen = "test"

    by_run: Dict[str, Dict[str, SplitResult]] = {}
    for run in runs:
        sp, ds, cfg = datasets[run.label]
        bs = int(batch_size or cfg["eval"]["batch_size"])
        kw = dict(feature_capacity=feature_capacity, logit_capacity=logit_capacity, batch_size=bs,
                  max_images=max_images, progress=progress, seed=seed)
        by_run[run.label] = {sp: extract_split(run, ds, split=sp, **kw)}
        for extra in (seen, unseen):
            if extra is not None and extra not in by_run[run.label]:
                by_run[run.label][extra] = extract_split(run, make_dataset(cfg, extra), split=extra, **kw)
    results = {label: r[main_split] for label, r in by_run.items()}

    mats = _matrices(results, class_names, out)
    iou = _per_class_iou(results, class_names, out)
    hists = _logit_hists(results, out)
    curves = _curves(runs, out)
    tsne = _tsne(results, class_names, out, seed)
    back = _background(by_run, seen, unseen, bg, k, out) if bg is not None else None
    ex = _examples(runs, first, examples, out)

    summary: Dict[str, Any] = {
        "split": main_split, "classes": class_names, "background_index": bg, "seen_split": seen if back else None,
        "unseen_split": unseen if back else None, "checkpoint": checkpoint,
        "settings": {"feature_capacity": feature_capacity, "logit_capacity": logit_capacity, "max_images": max_images,
                     "examples": examples, "seed": seed},
        "runs": [{"label": r.label, "run_dir": os.path.abspath(r.run_dir), "method": r.method, "step": r.step,
                  "checkpoint": r.checkpoint, "embedding_for_calibration": embedding_source(r),
                  "flags": run_flags(r.run_dir),
                  "feature_layer": r.model.feature_layer, "feature_dim": results[r.label].stats.dim,
                  "sampled_pixels": len(results[r.label].features),
                  "splits": {s: {m: v for m, v in res.metrics.items() if not isinstance(v, dict)} for s, res in by_run[r.label].items()}}
                 for r in runs],
        "per_class_iou": iou,
        "logit_stats": hists["stats"],
        "background_distance": back["rows"] if back else None,
    }
    if plots:
        from . import plots as P

        files = P.draw_all(out, class_names=class_names, bg=bg, mats=mats, iou=iou, hists=hists, curves=curves,
                           tsne=tsne, back=back, examples=ex, results=results)
        summary["figures"] = files
    if report:
        from .report import write_report

        write_report(out, summary)
    summary["files"] = sorted(os.listdir(out)) + (["summary.json"] if "summary.json" not in os.listdir(out) else [])
    _write_json(summary, os.path.join(out, "summary.json"))
    return summary
