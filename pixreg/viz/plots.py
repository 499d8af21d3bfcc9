"""Figures of the diagnostics (matplotlib, Agg backend: no display needed).

Every function takes the numbers computed by :mod:`pixreg.viz.diagnose` and returns a
matplotlib figure; :func:`draw_all` saves them as PNG files and returns
``[{"key", "file", "title"}]``.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from .stats import safe_name, smooth  # noqa: E402

__all__ = ["draw_all", "class_colors"]

SET_COLORS = {"TP": "tab:green", "FN": "tab:orange", "FP": "tab:red"}
GROUP_STYLES = {"classes of interest": ("tab:blue", "-"), "background": ("0.45", "-"),
                "distractors, seen kinds": ("tab:green", "-"), "distractors, unseen kinds": ("tab:red", "-")}


def class_colors(k: int, bg: Optional[int]) -> List:
    cmap = plt.get_cmap("tab10" if k <= 11 else "tab20")
    cols, j = [], 0
    for c in range(k):
        if c == bg:
            cols.append((0.55, 0.55, 0.55, 1.0))
        else:
            cols.append(cmap(j % cmap.N))
            j += 1
    return cols


def _grid(n: int, width: float = 4.6, height: float = 3.8, rows: int = 1):
    fig, axes = plt.subplots(rows, n, figsize=(width * n, height * rows), squeeze=False, layout="constrained")
    return fig, axes


def _heatmap(ax, m: np.ndarray, names: List[str], title: str, vmin: float, vmax: float, cmap: str):
    im = ax.imshow(np.ma.masked_invalid(m), vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set_xticks(range(len(names)), names, rotation=90 if max(len(n) for n in names) > 3 else 0, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_title(title, fontsize=9)
    if len(names) <= 12:
        for i in range(len(names)):
            for j in range(len(names)):
                if np.isfinite(m[i, j]):
                    r, g, b, _ = im.cmap(im.norm(m[i, j]))
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black")
    return im


def centre_similarity(mats: Dict[str, Any]):
    runs, names = list(mats["runs"]), mats["classes"]
    fig, axes = _grid(len(runs), rows=2)
    for j, r in enumerate(runs):
        im0 = _heatmap(axes[0, j], mats["runs"][r]["centre_cosine"], names, f"{r}: centre cosine", -1, 1, "RdBu_r")
        dep = mats["runs"][r]["centre_dependency"]
        im1 = _heatmap(axes[1, j], dep, names, f"{r}: CAR class dependency", 0, 1, "viridis")
    fig.colorbar(im0, ax=list(axes[0]), shrink=0.8)
    fig.colorbar(im1, ax=list(axes[1]), shrink=0.8)
    return fig


def pixel_similarity(mats: Dict[str, Any]):
    runs, names = list(mats["runs"]), mats["classes"]
    fig, axes = _grid(len(runs))
    for j, r in enumerate(runs):
        im = _heatmap(axes[0, j], mats["runs"][r]["pixel_cosine"], names, f"{r}: mean pixel cosine", -1, 1, "RdBu_r")
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8)
    return fig


def tsne_plot(emb: Dict[str, Any], names: List[str], bg: Optional[int]):
    runs = list(emb)
    fig, axes = _grid(max(len(runs), 1), width=4.6, height=4.4)
    cols = class_colors(len(names), bg)
    for j, r in enumerate(runs):
        ax = axes[0, j]
        e = emb[r]
        xy, lab, dis = e["xy"], e["label"], e["distractor"]
        for c in range(len(names)):
            sel = (lab == c) & ~dis
            if sel.any():
                kw = dict(s=5, c=[cols[c]], alpha=0.45, label=names[c]) if c == bg else dict(s=9, c=[cols[c]], label=names[c])
                ax.scatter(xy[sel, 0], xy[sel, 1], **kw)
        if dis.any():
            ax.scatter(xy[dis, 0], xy[dis, 1], s=12, c="black", marker="x", linewidths=0.7, label="distractor (bg)")
        ax.set_title(f"{r}: t-SNE of pixel features", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if runs:
        axes[0, -1].legend(fontsize=6, markerscale=1.5, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


def _hist_panels(panels: Dict[str, List[tuple]], edges: np.ndarray, xlabel: str, xlim=None):
    """One panel per run: ``{title: [(density, label, color, linestyle), ...]}`` drawn as stairs."""
    fig, axes = _grid(max(len(panels), 1), height=3.2)
    for ax, (title, lines) in zip(axes[0], panels.items()):
        for h, label, color, ls in lines:
            ax.stairs(h, edges, color=color, linestyle=ls, label=label, linewidth=1.5)
        if xlim is not None:
            ax.set_xlim(*xlim)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
        ax.legend(fontsize=6)
    return fig


def logit_hist(hists: Dict[str, Any]):
    panels = {f"{r}: class-k logit on TP_k / FN_k / FP_k":
              [(h, f"{s} ({hists['stats'][r][s]['pixels']} px)", SET_COLORS[s], "-") for s, h in sets.items()]
              for r, sets in hists["runs"].items()}
    return _hist_panels(panels, hists["edges"], "logit z_k")


def per_class_iou(iou: Dict[str, List[Optional[float]]], names: List[str]):
    runs = list(iou)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(names) * max(1, len(runs)) + 2), 3.4), layout="constrained")
    width = 0.8 / max(1, len(runs))
    x = np.arange(len(names))
    for j, r in enumerate(runs):
        vals = [np.nan if v is None else v for v in iou[r]]
        ax.bar(x + (j - (len(runs) - 1) / 2) * width, vals, width, label=f"{r} (mIoU {np.nanmean(vals):.1f})")
    ax.set_xticks(x, names, rotation=45 if max(len(n) for n in names) > 4 else 0, fontsize=8)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    ax.set_title("per-class IoU", fontsize=9)
    return fig


def training_curves(curves: Dict[str, Dict[str, np.ndarray]], smooth):
    keys: List[str] = []
    for c in curves.values():
        keys += [k for k in c if k != "step" and k not in keys]
    fig, axes = _grid(max(len(keys), 1), width=3.6, height=3.0)
    for j, key in enumerate(keys):
        ax = axes[0, j]
        for r, c in curves.items():
            if key in c and np.isfinite(c[key]).any():
                ax.plot(c["step"], smooth(c[key]), label=r, linewidth=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        if key in ("loss", "ce"):
            ax.set_yscale("log")
    if keys:
        axes[0, 0].legend(fontsize=7)
    return fig


def background_distance(back: Dict[str, Any]):
    panels = {r: [(g["hist"], name) + GROUP_STYLES.get(name, ("tab:purple", "--")) for name, g in groups.items()]
              for r, groups in back["groups"].items()}
    return _hist_panels(panels, back["edges"], "distance to nearest class-of-interest centre", xlim=(0, 2))


def example_plot(maps: List[Dict[str, Any]], names: List[str], bg: Optional[int], title: str):
    cols = ["input", "ground truth", "prediction", "error", "phi (FN compensation)", "psi (FP penalty)"]
    fig, axes = plt.subplots(len(maps), len(cols), figsize=(2.1 * len(cols) + 0.6, 2.1 * len(maps) + 0.4), squeeze=False,
                             layout="constrained")
    cmap = ListedColormap(class_colors(len(names), bg))
    for i, m in enumerate(maps):
        panels = [m["image"], m["label"], m["pred"], m["error"], m["phi"], m["psi"]]
        for j, (p, name) in enumerate(zip(panels, cols)):
            ax = axes[i, j]
            if j == 0:
                ax.imshow(p)
            elif j in (1, 2):
                ax.imshow(np.ma.masked_where(p >= len(names), p), cmap=cmap, vmin=-0.5, vmax=len(names) - 0.5, interpolation="nearest")
            elif j == 3:
                ax.imshow(p, cmap=ListedColormap(["white", "crimson"]), vmin=0, vmax=1, interpolation="nearest")
            else:
                im = ax.imshow(np.ma.masked_invalid(p), cmap="magma", vmin=0, vmax=2, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
        axes[i, 0].set_ylabel(f"#{m['index']}", fontsize=8)
    fig.colorbar(im, ax=list(axes[:, -1]), shrink=0.6)
    fig.suptitle(title, fontsize=9)
    return fig


def draw_all(out: str, *, class_names: List[str], bg: Optional[int], mats, iou, hists, curves, tsne, back,
             examples, results=None) -> List[Dict[str, str]]:
    todo = [("centre_similarity", "Class-centre similarity and CAR class dependency", lambda: centre_similarity(mats)),
            ("pixel_similarity", "Mean intra/inter-class cosine similarity of pixel features", lambda: pixel_similarity(mats)),
            ("tsne", "t-SNE of a class-balanced pixel sample", lambda: tsne_plot(tsne, class_names, bg)),
            ("logit_hist", "Logit histograms of TP, FN and FP pixels", lambda: logit_hist(hists)),
            ("per_class_iou", "Per-class IoU", lambda: per_class_iou(iou, class_names))]
    if curves:
        todo.append(("training_curves", "Training curves", lambda: training_curves(curves, smooth)))
    if back is not None:
        todo.append(("background_distance", "Distance of background features to the nearest class centre",
                     lambda: background_distance(back)))
    for label, maps in (examples or {}).items():
        emb = maps[0]["embedding"] if maps else ""
        src = "RCH head embedding" if emb == "rch_head" else "model features (no RCH head in this run)"
        todo.append((f"examples_{safe_name(label)}", f"Examples, {label}",
                     lambda m=maps, t=f"{label}: phi/psi from {src}": example_plot(m, class_names, bg, t)))
    files = []
    for key, title, make in todo:
        fig = make()
        path = os.path.join(out, f"{key}.png")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        files.append({"key": key, "file": f"{key}.png", "title": title})
    return files
