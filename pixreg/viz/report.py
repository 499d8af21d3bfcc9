"""One self-contained HTML page: inline CSS, every figure embedded as a ``data:image/png``
URI, no script and no reference outside the page except relative links to the CSV/JSON
files written next to it (so it opens offline, and still shows everything on its own)."""
from __future__ import annotations

import base64
import html
import math
import os
from typing import Any, Dict, List

__all__ = ["write_report", "DESCRIPTIONS"]

DESCRIPTIONS = {
    "centre_similarity": (
        "Top: cosine similarity of the class centres (mean feature of each class) on the split. "
        "Regularizers that separate classes (CAR's inter-class terms, C+1's background margin) lower "
        "the off-diagonal entries. Bottom: CAR's class-dependency map softmax(mu mu^T / sqrt(D)) over the "
        "classes present (rows sum to 1); a diagonal-dominant map means little dependency between classes.",
        "centre_similarity.csv"),
    "pixel_similarity": (
        "Mean cosine similarity between pixel features of class row and class column (diagonal: pairs of "
        "distinct pixels of the same class, i.e. compactness; off-diagonal: confusion between classes). "
        "Computed exactly from streaming sums of normalised features over every pixel of the split.",
        "pixel_similarity.csv"),
    "tsne": (
        "t-SNE (scikit-learn) of a class-balanced random sample of L2-normalised pixel features. Background "
        "pixels are small grey dots, background pixels on distractor objects black crosses.",
        "tsne.csv"),
    "logit_hist": (
        "For each class k, the logit z_k of class k at its true positives (TP_k: labelled and predicted k), "
        "false negatives (FN_k: labelled k, predicted otherwise) and false positives (FP_k: predicted k, "
        "labelled otherwise), pooled over classes, at label resolution. Histograms are weighted back to the "
        "whole split from a stratified sample. RCH aims to push FN logits up and FP logits down.",
        "logit_hist.csv"),
    "per_class_iou": ("Per-class IoU (%) of the runs on the split (dataset-level confusion matrix).", "per_class_iou.csv"),
    "training_curves": ("Training loss, cross-entropy and each regularizer's weighted term from the runs' log.csv "
                        "(moving average); ratio/<term>: the norm of the term's gradient at its features (LALL: "
                        "logits) over cross-entropy's at the same tensor, measured every train.balance_every steps "
                        "(a regularizer above about 0.1 at the features overpowered CE in issue 13's measurements); "
                        "centre_cos/<term>: mean cosine between C+1's class centres (near 1: merged).", "curves.csv"),
    "background_distance": (
        "C+1 data: distance (sqrt(2 - 2 cos), in [0, 2]) of L2-normalised pixel features to the nearest "
        "class-of-interest centre (centres: the class means of the seen split). Classes of interest are the "
        "reference; background pixels far from every centre are what C+1 asks for. Distractors of kinds seen "
        "in training are compared with distractors of kinds never seen (the open-set split).",
        "background_distance.csv"),
}


def _img(path: str) -> str:
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return f'<img alt="{html.escape(os.path.basename(path))}" src="data:image/png;base64,{data}">'


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "&ndash;"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
    return html.escape(str(v))


def _table(header: List[str], rows: List[List[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1300px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ccc}
img{max-width:100%;height:auto;display:block;margin:.5em 0}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#f3f3f3}p.note{color:#555;font-size:.9em}code{background:#f3f3f3;padding:0 3px}
"""


def write_report(out: str, summary: Dict[str, Any], name: str = "report.html") -> str:
    """Write ``out/name`` from ``summary`` (see :func:`pixreg.viz.diagnose.diagnose`); return its path."""
    runs = summary["runs"]
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>pixreg diagnostics</title>"
             f"<style>{CSS}</style></head><body>",
             "<h1>pixreg diagnostics</h1>",
             f"<p>Split <code>{html.escape(summary['split'])}</code>, checkpoint <code>{html.escape(summary['checkpoint'])}</code>. "
             "Numbers behind every figure are in the CSV/JSON files next to this page "
             "(<a href='summary.json'>summary.json</a>, <a href='matrices.json'>matrices.json</a>).</p>"]
    metric_keys = ["mIoU", "mAcc", "aAcc", "bg_to_coi", "distractor_to_coi"]
    rows = []
    for r in runs:
        m = r["splits"].get(summary["split"], {})
        emb = "RCH head" if r["embedding_for_calibration"] == "rch_head" else "model features (no RCH head in this run)"
        rows.append([r["label"], r["method"], r["step"], r["feature_layer"], r["feature_dim"]] + [m.get(k) for k in metric_keys] + [emb])
    parts.append("<h2>Runs</h2>" + _table(["run", "method", "step", "feature layer", "D"] + metric_keys + ["phi/psi embedding"], rows))
    for r in runs:
        if r.get("flags"):
            parts.append(f"<p class='note'><b>{html.escape(r['label'])}: degenerate or warned run</b> — "
                         + html.escape("; ".join(r["flags"])) + "</p>")
    for r in runs:
        for split, m in r["splits"].items():
            if split != summary["split"]:
                parts.append(f"<p class='note'>{html.escape(r['label'])} on <code>{html.escape(split)}</code>: "
                             + ", ".join(f"{k} {_fmt(m.get(k))}" for k in metric_keys if k in m) + "</p>")
    for fig in summary.get("figures", []):
        key = fig["key"]
        desc, csv_name = DESCRIPTIONS.get(key, ("", None))
        parts.append(f"<h2>{html.escape(fig['title'])}</h2>")
        if key.startswith("examples_"):
            desc = ("Input, ground truth, prediction, error map (misclassified pixels in red) and RCH's calibration "
                    "terms per pixel, computed in each image: phi = 1 - mean cosine to the FN pixels of the pixel's "
                    "class (FN compensation), psi = 1 + mean cosine to its FP pixels (FP penalty); 0 where the set "
                    "is empty. Embedding: the run's RCH head when it had one, otherwise the model's pixel features "
                    "(stated in the figure title). Maps are in the examples_*.npz files.")
            csv_name = "examples.json"
        parts.append(f"<p>{html.escape(desc)}" + (f" Numbers: <a href='{csv_name}'>{csv_name}</a>." if csv_name else "") + "</p>")
        parts.append(_img(os.path.join(out, fig["file"])))
        if key == "per_class_iou" and summary.get("per_class_iou"):
            labels = list(summary["per_class_iou"])
            parts.append(_table(["class"] + labels, [[c] + [summary["per_class_iou"][lb][i] for lb in labels]
                                                     for i, c in enumerate(summary["classes"])]))
        if key == "logit_hist" and summary.get("logit_stats"):
            rows = [[lb, s, st["pixels"], st["mean"], st["p10"], st["median"], st["p90"]]
                    for lb, sets in summary["logit_stats"].items() for s, st in sets.items()]
            parts.append(_table(["run", "set", "pixels", "mean", "p10", "median", "p90"], rows))
        if key == "background_distance" and summary.get("background_distance"):
            rows = [[r["run"], r["group"], r["split"], r["pixels"], r["mean"], r["median"], r["frac_below_coi_median"]]
                    for r in summary["background_distance"]]
            parts.append(_table(["run", "group", "split", "pixels", "mean", "median", "share nearer than the median CoI pixel"], rows))
    parts.append("</body></html>")
    path = os.path.join(out, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return path
