"""``pixreg diagnose``: the numbers layer on its own, and the whole report on two tiny trained runs."""
from __future__ import annotations

import csv
import json
import os
import re

import numpy as np
import pytest
import torch

pytest.importorskip("yaml")
pytest.importorskip("torchmetrics")

from pixreg.viz.stats import FeatureStats, Reservoir, calibration_maps, nearest_centre_distance  # noqa: E402


# ----------------------------------------------------------------------------- numbers
def test_feature_stats_match_brute_force():
    g = torch.Generator().manual_seed(0)
    k, d = 4, 6
    feats = torch.randn(300, d, generator=g)
    labels = torch.randint(0, k - 1, (300,), generator=g)  # class 3 absent
    labels[:1] = 2
    st = FeatureStats(k, d)
    st.update(feats[:100], labels[:100])
    st.update(feats[100:], labels[100:])  # streaming == all at once
    fh = torch.nn.functional.normalize(feats.double(), dim=1)
    cos = fh @ fh.t()
    pix = st.pixel_cosine()
    for a in range(k - 1):
        for b in range(k - 1):
            block = cos[labels == a][:, labels == b]
            if a == b:
                n = block.shape[0]
                want = (block.sum() - block.diagonal().sum()) / (n * (n - 1))
            else:
                want = block.mean()
            assert pix[a, b] == pytest.approx(float(want), abs=1e-9)
    mu = torch.stack([feats[labels == c].double().mean(0) for c in range(k - 1)])
    cc = st.centre_cosine()
    want = torch.nn.functional.cosine_similarity(mu[:, None], mu[None], dim=2)
    assert np.allclose(cc[:3, :3], want.numpy(), atol=1e-9)
    dep = st.centre_dependency()
    assert np.allclose(dep[:3, :3], torch.softmax(mu @ mu.t() / d ** 0.5, 1).numpy())
    for m in (pix, cc):
        assert np.isnan(m[3]).all() and np.isnan(m[:, 3]).all()
        f = m[:3, :3]
        assert np.allclose(f, f.T) and (f >= -1).all() and (f <= 1).all()


def test_reservoir_is_bounded_stratified_and_uniform():
    r = Reservoir(50, 3, seed=0)
    total = np.zeros(3, dtype=int)
    hits = np.zeros(2000)
    for start in range(0, 2000, 100):
        ids = torch.arange(start, start + 100)
        strata = torch.where(ids < 1900, torch.zeros_like(ids), torch.ones_like(ids))  # stratum 2 never seen
        r.add(strata, idx=ids)
        total += np.bincount(strata.numpy(), minlength=3)
    assert list(r.kept()) == [50, 50, 0] and list(r.seen) == list(total)
    assert np.allclose(r.weights()[r.strata.numpy() == 0], 1900 / 50)
    # uniform: over many seeds each early / late item is kept about equally often
    for seed in range(20):
        r = Reservoir(20, 1, seed=seed)
        for start in range(0, 2000, 250):
            r.add(torch.zeros(250, dtype=torch.long), idx=torch.arange(start, start + 250))
        hits[r.get("idx")] += 1
    assert abs(hits[:1000].sum() - hits[1000:].sum()) < 0.25 * hits.sum()


def _ref_calibration_maps(emb, logits, labels, k, calibration):
    """Loop reference from METHODS.md section 4, per image (float64): labels nearest (floor),
    logits bilinear to the embedding size; phi = 1 - m(FN_y), psi = 1 + m(FP_y), 0 for an empty set."""
    b, _, h, w = emb.shape
    z = torch.nn.functional.interpolate(logits.double(), size=(h, w), mode="bilinear", align_corners=False)
    big_h, big_w = labels.shape[-2:]
    phi = torch.full((b, h, w), float("nan"), dtype=torch.float64)
    psi = phi.clone()
    for i in range(b):
        px = [(r, c, int(labels[i, r * big_h // h, c * big_w // w]), int(z[i, :, r, c].argmax())) for r in range(h) for c in range(w)]
        vec = {(r, c): emb[i, :, r, c].double() for r, c, _, _ in px}

        def sim(r, c, members):
            if calibration == "mean_of_cosines":
                return sum(torch.cosine_similarity(vec[m], vec[(r, c)], dim=0) for m in members) / len(members)
            return torch.cosine_similarity(sum(vec[m] for m in members) / len(members), vec[(r, c)], dim=0)

        for r, c, y, _ in px:
            if y == 255:
                continue
            fn = [(r2, c2) for r2, c2, y2, p2 in px if y2 == y and p2 != y]
            fp = [(r2, c2) for r2, c2, y2, p2 in px if y2 != 255 and y2 != p2 and p2 == y]
            phi[i, r, c] = 1 - sim(r, c, fn) if fn else 0.0
            psi[i, r, c] = 1 + sim(r, c, fp) if fp else 0.0
    return phi, psi


def test_calibration_maps_match_loop_reference():
    g = torch.Generator().manual_seed(1)
    k = 4
    emb = torch.randn(2, 5, 6, 6, generator=g)
    logits = torch.randn(2, k, 12, 12, generator=g)
    labels = torch.randint(0, k, (2, 12, 12), generator=g)
    labels[0, :2] = 255
    for calibration in ("mean_of_cosines", "cosine_to_mean"):
        phi, psi = calibration_maps(emb, logits, labels, k, 255, calibration)
        ref_phi, ref_psi = _ref_calibration_maps(emb, logits, labels, k, calibration)
        torch.testing.assert_close(phi.double(), ref_phi, atol=1e-5, rtol=0, equal_nan=True)
        torch.testing.assert_close(psi.double(), ref_psi, atol=1e-5, rtol=0, equal_nan=True)
        assert torch.isnan(phi[0, 0]).all() and (phi[~torch.isnan(phi)] > 0).any()
        v = phi[~torch.isnan(phi)]
        assert (v >= 0).all() and (v <= 2).all()
    with pytest.raises(ValueError, match="calibration"):
        calibration_maps(emb, logits, labels, k, 255, "nope")


def test_nearest_centre_distance():
    centres = np.array([[1.0, 0.0], [0.0, 2.0], [np.nan, np.nan]])
    d, c = nearest_centre_distance(np.array([[3.0, 0.0], [0.0, -1.0], [1.0, 1.0]]), centres, [0, 1, 2])
    assert np.allclose(d, [0.0, np.sqrt(2.0), np.sqrt(2 - np.sqrt(2))]) and list(c[:2]) == [0, 0]


# ----------------------------------------------------------------------------- end to end
def _tiny(cache: str, steps: int = 4) -> list:
    return ["data.size=[32,32]", "data.opts={digits: [0, 1, 2], num_images: 10}",
            "model.opts={width: 4, depth: 10, head_channels: 8}", f"train.steps={steps}", "train.batch_size=4",
            "train.ckpt_every=4", "eval.batch_size=10", "threads=1", f"data.cache_dir={cache}"]


def _set(overrides):
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    from pixreg.cli import main

    root = tmp_path_factory.mktemp("diag")
    cache = str(root / "cache")
    n = torch.get_num_threads()
    try:
        for method in ("ce", "cplus1+rch"):
            assert main(["train", "--method", method, "--out", str(root / method.replace("+", "_")), "--no-progress"]
                        + _set(_tiny(cache))) == 0
        out = root / "report"
        assert main(["diagnose", str(root / "ce"), str(root / "cplus1_rch"), "--out", str(out), "--no-progress",
                     "--samples-per-class", "30", "--examples", "2", "--threads", "1", "--set", f"data.cache_dir={cache}"]) == 0
    finally:
        torch.set_num_threads(n)
    return out


def test_diagnose_writes_every_file(report):
    files = set(os.listdir(report))
    for name in ("report.html", "summary.json", "matrices.json", "centre_similarity.csv", "centre_similarity.png",
                 "pixel_similarity.csv", "pixel_similarity.png", "tsne.csv", "tsne.png", "logit_hist.csv",
                 "logit_hist.png", "per_class_iou.csv", "per_class_iou.png", "curves.csv", "training_curves.png",
                 "background_distance.csv", "background_distance_hist.csv", "background_distance.png",
                 "examples.json", "examples_ce.npz", "examples_ce.png", "examples_cplus1_rch.npz", "examples_cplus1_rch.png"):
        assert name in files, name
    for name in files:
        if name.endswith(".png"):
            assert open(report / name, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    summary = json.load(open(report / "summary.json"))
    assert summary["split"] == "test" and summary["unseen_split"] == "test_openset"
    runs = {r["label"]: r for r in summary["runs"]}
    assert runs["ce"]["embedding_for_calibration"] == "model_features"
    assert runs["cplus1_rch"]["embedding_for_calibration"] == "rch_head"
    assert set(runs["ce"]["splits"]) == {"test", "test_openset"}
    # the per-class IoU equals the metrics of the run's own final evaluation
    metrics = json.load(open(report.parent / "ce" / "metrics.json"))
    rows = {r["class"]: r for r in csv.DictReader(open(report / "per_class_iou.csv"))}
    for c, v in metrics["splits"]["test"]["per_class_iou"].items():
        assert (rows[c]["ce"] == "" and v is None) or float(rows[c]["ce"]) == pytest.approx(v, abs=1e-3)
    groups = {r["group"] for r in csv.DictReader(open(report / "background_distance.csv"))}
    assert {"classes of interest", "background", "distractors, seen kinds", "distractors, unseen kinds"} <= groups
    # gradient balance columns of log.csv (measured at step 0) are plotted; flags come from metrics.json
    keys = {(r["run"], r["key"]) for r in csv.DictReader(open(report / "curves.csv"))}
    assert {("cplus1_rch", "ratio/cplus1"), ("cplus1_rch", "ratio/rch"), ("cplus1_rch", "centre_cos/cplus1")} <= keys
    assert all(isinstance(r["flags"], list) for r in summary["runs"])
    tsne = list(csv.DictReader(open(report / "tsne.csv")))
    assert len(tsne) <= 2 * 30 * 5 and {r["run"] for r in tsne} == {"ce", "cplus1_rch"}
    assert any(r["distractor"] == "1" for r in tsne)
    ex = np.load(report / "examples_cplus1_rch.npz")
    idx = json.load(open(report / "examples.json"))["indices"]
    assert len(idx) == 2 and ex[f"phi_{idx[0]}"].shape == (32, 32) and ex[f"image_{idx[0]}"].shape == (32, 32, 3)
    phi = ex[f"phi_{idx[0]}"]
    assert np.all((phi[np.isfinite(phi)] >= 0) & (phi[np.isfinite(phi)] <= 2))


def test_diagnose_matrices_shape_symmetry_range(report):
    mats = json.load(open(report / "matrices.json"))
    k = len(mats["classes"])
    assert mats["classes"] == ["background", "0", "1", "2"]
    for run, m in mats["runs"].items():
        for key in ("centre_cosine", "pixel_cosine", "centre_dependency"):
            a = np.array([[np.nan if v is None else v for v in row] for row in m[key]], dtype=float)
            assert a.shape == (k, k), (run, key)
            f = np.isfinite(a)
            assert f.sum() >= 4, (run, key)
            lo = 0.0 if key == "centre_dependency" else -1.0
            assert (a[f] >= lo - 1e-9).all() and (a[f] <= 1 + 1e-9).all(), (run, key)
            if key == "centre_dependency":
                rows = f.all(1)
                assert np.allclose(a[rows][:, f.all(0)].sum(1), 1.0)
            else:
                assert np.array_equal(f, f.T) and np.allclose(a[f], a.T[f]), (run, key)
        assert np.allclose(np.diag(np.array(m["centre_cosine"], dtype=float)), 1.0)
        assert len(m["pixels"]) == k and sum(m["pixels"]) > 0
    hist = list(csv.DictReader(open(report / "logit_hist.csv")))
    assert {r["set"] for r in hist} == {"TP", "FN", "FP"}


def test_report_is_offline_and_self_contained(report):
    text = open(report / "report.html", encoding="utf-8").read()
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", text, flags=re.I)
    assert refs
    for ref in refs:
        assert not re.match(r"^(https?:)?//", ref, flags=re.I), ref
        assert ref.startswith("data:image/png;base64,") or os.path.exists(report / ref), ref
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower() and "@import" not in text and "url(" not in text
    imgs = re.findall(r"<img[^>]*src=['\"]([^'\"]+)", text)
    assert len(imgs) >= 8 and all(s.startswith("data:image/png;base64,") for s in imgs)
    assert "model features (no RCH head in this run)" in text and "RCH head<" in text


def test_diagnose_with_an_unknown_split_fails_before_writing(report, capsys):
    from pixreg.cli import main

    out = report.parent / "bad_split_report"
    assert main(["diagnose", str(report.parent / "ce"), "--split", "nope", "--out", str(out), "--no-progress",
                 "--threads", "1", "--set", f"data.cache_dir={report.parent / 'cache'}"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
