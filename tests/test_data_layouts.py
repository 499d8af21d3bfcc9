"""Datasets as users have them: VOC layout with its own classes, colour-coded label PNGs,
``images/ labels/ train.txt`` folders, mixed image shapes, aspect-preserving resize, corrupt
files, and the pre-flight scan.

Every fixture is written by the test in the real file format (palette PNGs, RGB PNGs, JPEGs);
expected labels are the index arrays the test drew before encoding them, never values read back
through the code under test.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from pixreg.data import DatasetError, build_dataset, preflight, scan_dataset
from pixreg.data.classes import ColorTable

# a 12-class human-parsing set and a 9-class facade set, as in the issue
PARSING = ["background", "hat", "hair", "glove", "sunglasses", "upper", "dress", "coat", "socks",
           "pants", "skin", "shoes"]
FACADE = {"background": [0, 0, 170], "facade": [0, 0, 255], "window": [0, 85, 255],
          "door": [0, 170, 255], "cornice": [255, 85, 0], "sill": [170, 255, 85],
          "balcony": [170, 0, 0], "blind": [255, 255, 0], "deco": [255, 0, 0]}
VOID = [0, 0, 0]


def blocks(h, w, values, rng, block=8):
    """A label map of ``block`` x ``block`` constant blocks drawn from ``values``."""
    b = rng.choice(np.asarray(values), size=(-(-h // block), -(-w // block)))
    return np.kron(b, np.ones((block, block), dtype=b.dtype))[:h, :w].astype(np.uint8)


def save_palette_png(path, label):
    p = Image.fromarray(label, mode="P")
    p.putpalette([(i * 37) % 256 if c == 0 else (i * 91) % 256 if c == 1 else (i * 53) % 256
                  for i in range(256) for c in range(3)])
    p.save(path)


def colour_image(label, table, void_value=255):
    """Paint an index map with the test's own colour list (void -> black)."""
    colours = np.array(list(table.values()) + [VOID], dtype=np.uint8)
    return colours[np.where(label == void_value, len(table), label)]


def write_voc(root, rng, ids_by_split, num_classes, shapes=((48, 64),)):
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(root / d, exist_ok=True)
    labels = {}
    for split, ids in ids_by_split.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for n, i in enumerate(ids):
            h, w = shapes[n % len(shapes)]
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
            lab = blocks(h, w, list(range(num_classes)) + [255], rng)
            save_palette_png(root / "SegmentationClass" / f"{i}.png", lab)
            labels[i] = lab
    return labels


# ------------------------------------------------------------------------------------------ VOC
def test_voc_layout_with_its_own_twelve_classes(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "VOC2012"
    labels = write_voc(root, rng, {"train": ["a", "b"], "val": ["c"]}, num_classes=12)
    (root / "classes.txt").write_text("# human parsing\n" + "\n".join(PARSING) + "\n")
    ds = build_dataset("voc", "train", tmp_path)
    assert ds.num_classes == 12 and ds.class_names == PARSING
    assert ds.ignore_index == 255 and ds.background_index == 0
    np.testing.assert_array_equal(ds[1][1].numpy(), labels["b"])  # palette indices, kept
    # the same from options only (no file), and contradictions refused
    os.remove(root / "classes.txt")
    assert build_dataset("voc", "val", tmp_path, num_classes=12).class_names == [f"class_{i}" for i in range(12)]
    assert build_dataset("voc", "val", tmp_path, class_names=PARSING).num_classes == 12
    with pytest.raises(ValueError, match="num_classes=11 but class_names lists 12"):
        build_dataset("voc", "val", tmp_path, num_classes=11, class_names=PARSING)
    # without any class information it is Pascal VOC (21 classes): 12 classes fit inside
    assert build_dataset("voc", "val", tmp_path).num_classes == 21


def test_voc_labels_outside_declared_classes_refused(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "VOC2012"
    write_voc(root, rng, {"train": ["a", "b"]}, num_classes=12)
    (root / "classes.txt").write_text("\n".join(PARSING[:6]) + "\n")  # declares only 6
    ds = build_dataset("voc", "train", root)
    with pytest.raises(ValueError, match=r"SegmentationClass/a\.png: label values \[6, .*outside \[0, 6\)"):
        ds[0]
    with pytest.raises(DatasetError) as info:
        preflight({"train": ds}, log=None)
    msg = str(info.value)
    assert "a.png" in msg and "b.png" in msg and "2 problem" in msg  # every file, not just the first


# ------------------------------------------------------------------------------------------ colours
def write_facade_folder(root, rng, stems_by_split, table_file="colors.txt", h=40, w=56):
    for d in ("images", "labels"):
        os.makedirs(root / d, exist_ok=True)
    labels = {}
    for split, stems in stems_by_split.items():
        (root / f"{split}.txt").write_text("\n".join(stems) + "\n")  # split files at the root
        for s in stems:
            lab = blocks(h, w, list(range(9)) + [255], rng)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{s}.jpg")
            Image.fromarray(colour_image(lab, FACADE)).save(root / "labels" / f"{s}.png")  # RGB PNG
            labels[s] = lab
    if table_file == "colors.txt":
        lines = [f"{r} {g} {b} {name}" for name, (r, g, b) in FACADE.items()] + ["0 0 0 ignore"]
        (root / "colors.txt").write_text("# r g b name\n" + "\n".join(lines) + "\n")
    elif table_file == "colors.json":
        (root / "colors.json").write_text(json.dumps({**FACADE, "ignore": [VOID]}))
    return labels


@pytest.mark.parametrize("table_file", ["colors.txt", "colors.json"])
def test_colour_coded_labels_converted_on_load(tmp_path, table_file):
    rng = np.random.default_rng(2)
    labels = write_facade_folder(tmp_path, rng, {"train": ["f1", "f2"], "val": ["f3"]}, table_file)
    ds = build_dataset("folder", "train", tmp_path)
    assert ds.num_classes == 9 and ds.class_names == list(FACADE)
    for i, s in enumerate(["f1", "f2"]):
        np.testing.assert_array_equal(ds[i][1].numpy(), labels[s])
    report = scan_dataset(build_dataset("folder", "val", tmp_path))
    assert report.ok and report.num_images == 1
    expected = np.bincount(labels["f3"][labels["f3"] != 255], minlength=9)
    np.testing.assert_array_equal(report.class_pixels, expected)
    assert report.ignored_pixels == int((labels["f3"] == 255).sum())


def test_colour_table_from_options_and_palette_images(tmp_path):
    rng = np.random.default_rng(3)
    labels = write_facade_folder(tmp_path, rng, {"train": ["f1"]}, table_file=None)
    with pytest.raises(ValueError, match="got mode RGB.*colour table"):  # no table: say how to give one
        build_dataset("folder", "train", tmp_path, num_classes=9)[0]
    opts = {"colors": {**FACADE, "ignore": VOID}}
    ds = build_dataset("folder", "train", tmp_path, **opts)
    np.testing.assert_array_equal(ds[0][1].numpy(), labels["f1"])
    # the same colours stored as a palette PNG go through the palette
    rgb = colour_image(labels["f1"], FACADE)
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16).save(tmp_path / "labels" / "f1.png")
    assert Image.open(tmp_path / "labels" / "f1.png").mode == "P"
    np.testing.assert_array_equal(ds[0][1].numpy(), labels["f1"])
    # a list of colours: class i = entry i
    ds_list = build_dataset("folder", "train", tmp_path, colors=list(FACADE.values()) + [VOID])
    assert ds_list.num_classes == 10


def test_unmatched_colours_reported_not_guessed(tmp_path):
    rng = np.random.default_rng(4)
    labels = write_facade_folder(tmp_path, rng, {"train": ["f1", "f2"]})
    rgb = colour_image(labels["f2"], FACADE)
    rgb[:3, :5] = [1, 2, 3]  # 15 pixels of an unknown colour
    rgb[10, 10] = [250, 250, 250]  # and 1 of another
    Image.fromarray(rgb).save(tmp_path / "labels" / "f2.png")
    ds = build_dataset("folder", "train", tmp_path)
    ds[0]
    with pytest.raises(ValueError, match=r"f2\.png: 16 pixels in 2 colour\(s\) .*\(1, 2, 3\) x 15, \(250, 250, 250\) x 1"):
        ds[1]
    report = scan_dataset(ds)
    assert not report.ok and len(report.problems) == 1 and "f2.png" in report.problems[0]


def test_colour_table_errors(tmp_path):
    with pytest.raises(ValueError, match=r"more than once"):
        ColorTable.from_spec({"a": [1, 2, 3], "b": [1, 2, 3]})
    with pytest.raises(ValueError, match=r"\['x'\].*0\.\.255"):
        ColorTable.from_spec({"x": [1, 2, 300]})
    bad = tmp_path / "colors.txt"
    bad.write_text("0 0 0 a\n12 red b\n")
    with pytest.raises(ValueError, match=r"colors.txt:2: expected 'r g b \[name\]'"):
        ColorTable.from_file(str(bad))
    table = ColorTable.from_spec([[0, 0, 0], [9, 9, 9]])
    assert table.encode(np.zeros((1, 2, 4), np.uint8), 255, "rgba.png").tolist() == [[0, 0]]  # alpha dropped


# ------------------------------------------------------------------------------------------ folder
def test_folder_images_labels_and_root_split_file(tmp_path):
    rng = np.random.default_rng(5)
    os.makedirs(tmp_path / "img")
    os.makedirs(tmp_path / "ann")
    labels = {}
    for s in ("x1", "x2", "x3"):
        lab = blocks(32, 48, [0, 1, 2, 255], rng)
        Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{s}_rgb.png")
        Image.fromarray(lab, mode="L").save(tmp_path / "ann" / f"{s}_mask.png")
        labels[s] = lab
    # names with folder and suffix, a bare stem, and an 'image label' pair
    (tmp_path / "train.txt").write_text("img/x1_rgb.png\nx2\nimg/x3_rgb.png ann/x3_mask.png\n")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "train_fold0.txt").write_text("x3\n")
    opts = dict(image_dir="img", label_dir="ann", image_suffix="_rgb.png", label_suffix="_mask.png",
                num_classes=3)
    ds = build_dataset("folder", "train", tmp_path, **opts)
    assert len(ds) == 3
    for i, s in enumerate(["x1", "x2", "x3"]):
        np.testing.assert_array_equal(ds[i][1].numpy(), labels[s])
    fold = build_dataset("folder", "train", tmp_path, split_file="lists/{split}_fold0.txt", **opts)
    np.testing.assert_array_equal(fold[0][1].numpy(), labels["x3"])
    with pytest.raises(ValueError, match=r"split 'val' has no list .*val\.txt"):
        build_dataset("folder", "val", tmp_path, **opts)
    with pytest.raises(FileNotFoundError, match="no label folder"):
        build_dataset("folder", "train", tmp_path, num_classes=3, image_dir="img")
    with pytest.raises(TypeError, match="label_dirr.*accepted: .*label_dir"):
        build_dataset("folder", "train", tmp_path, label_dirr="ann", **opts)


# ------------------------------------------------------------------------------------------ shapes
def write_mixed_folder(root, rng, shapes):
    for d in ("images", "masks"):
        os.makedirs(root / d, exist_ok=True)
    data = {}
    for n, (h, w) in enumerate(shapes):
        lab = blocks(h, w, [0, 1, 2], rng, block=4)
        img = np.stack([lab * 80, 255 - lab * 80, np.full_like(lab, 128)], -1).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"m{n}.png")
        Image.fromarray(lab, mode="L").save(root / "masks" / f"m{n}.png")
        data[f"m{n}"] = (img, lab)
    (root / "train.txt").write_text("\n".join(data) + "\n")
    return data


def test_aspect_preserving_resize_long_and_short(tmp_path):
    rng = np.random.default_rng(6)
    data = write_mixed_folder(tmp_path, rng, [(40, 80), (80, 40), (60, 60)])
    fit = build_dataset("folder", "train", tmp_path, num_classes=3, size=(20, 20), resize="long")
    expected_shapes = {"m0": (10, 20), "m1": (20, 10), "m2": (20, 20)}
    for i, (name, (img, lab)) in enumerate(data.items()):
        x, y = fit[i]
        assert tuple(x.shape) == (3, 20, 20) and tuple(y.shape) == (20, 20)  # batchable
        h, w = expected_shapes[name]
        step = lab.shape[0] // h  # an integer downscale: nearest keeps one pixel per cell
        np.testing.assert_array_equal(y.numpy()[:h, :w], lab[step // 2::step, step // 2::step][:h, :w])
        assert (y.numpy()[h:, :] == 255).all() and (y.numpy()[:, w:] == 255).all()  # pad = ignore
        assert np.abs(x.numpy()[:, h:, :]).max(initial=0) < 0.03  # pad = mean colour (~0)
    batch = torch.utils.data.default_collate([fit[i] for i in range(3)])
    assert tuple(batch[0].shape) == (3, 3, 20, 20)
    cover = build_dataset("folder", "train", tmp_path, num_classes=3, size=(20, 20), resize="short")
    assert [tuple(cover[i][1].shape) for i in range(3)] == [(20, 40), (40, 20), (20, 20)]
    aug = build_dataset("folder", "train", tmp_path, num_classes=3, size=(20, 20), resize="short",
                        augment=True, scale_range=(1.0, 1.0), hflip=False)
    aug.set_epoch(0)
    assert all(tuple(aug[i][1].shape) == (20, 20) for i in range(3))  # random crop of the cover
    fixed = build_dataset("folder", "train", tmp_path, num_classes=3, size=(20, 20))
    assert tuple(fixed[0][1].shape) == (20, 20) and (fixed[0][1] != 255).all()  # stretched, no pad
    with pytest.raises(ValueError, match="resize must be one of"):
        build_dataset("folder", "train", tmp_path, num_classes=3, size=(20, 20), resize="fit")
    with pytest.raises(ValueError, match="needs size"):
        build_dataset("folder", "train", tmp_path, num_classes=3, resize="long")


# ------------------------------------------------------------------------------------------ scan
def test_scan_reports_corrupt_truncated_and_mismatched_files(tmp_path, capsys):
    rng = np.random.default_rng(7)
    data = write_mixed_folder(tmp_path, rng, [(32, 32)] * 5)
    ds = build_dataset("folder", "train", tmp_path, num_classes=3)
    reports = preflight({"train": ds})
    assert "train: 5 images (32x32), 3/3 classes present, 0.0% of pixels ignored" in capsys.readouterr().out
    assert reports["train"].sizes == {(32, 32): 5}
    raw = (tmp_path / "images" / "m1.png").read_bytes()
    (tmp_path / "images" / "m1.png").write_bytes(raw[: len(raw) // 2])  # truncated
    (tmp_path / "images" / "m2.png").write_bytes(b"not an image at all")  # corrupt
    Image.fromarray(np.zeros((16, 32), np.uint8), mode="L").save(tmp_path / "masks" / "m3.png")  # wrong size
    with pytest.raises(ValueError, match=r"m1\.png: cannot decode"):
        ds[1]  # the loader names the file too
    with pytest.raises(DatasetError) as info:
        preflight({"train": ds}, log=None)
    msg = str(info.value)
    assert "3 problem" in msg
    assert "m1.png: cannot decode" in msg and "m2.png: cannot decode" in msg
    assert "m3.png: mask shape (16, 32) != image shape (32, 32)" in msg
    assert data  # the other two samples were fine


def test_train_checks_the_data_before_writing_the_run_folder(tmp_path, capsys):
    pytest.importorskip("yaml")
    from pixreg.cli import main

    rng = np.random.default_rng(8)
    data_root = tmp_path / "data"
    write_mixed_folder(data_root, rng, [(32, 32)] * 4)
    (data_root / "val.txt").write_text("m3\n")
    (data_root / "images" / "m2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--no-progress", "--threads", "1",
            "--set", "data.name=folder", "--set", f"data.root={data_root}", "--set", "data.size=[32,32]",
            "--set", "data.test_splits=[]", "--set", "data.opts={num_classes: 3}",
            "--set", "model.opts={width: 4, depth: 10, head_channels: 8}", "--set", "train.steps=2",
            "--set", "train.batch_size=2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "m2.png: cannot decode" in err
    assert not out.exists()  # nothing written
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(data_root / "images" / "m2.png")
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "train: 4 images (32x32)" in printed and "val: 1 image (32x32)" in printed
    assert (out / "metrics.json").exists()
    # compare: refused before its output folder is made
    (data_root / "images" / "m0.png").write_bytes(b"broken")
    cmp_out = tmp_path / "cmp"
    cmp_args = ["compare", "--methods", "ce,lall", "--seeds", "1", "--out", str(cmp_out)] + args[3:]
    assert main(cmp_args) == 2
    assert "m0.png: cannot decode" in capsys.readouterr().err and not cmp_out.exists()


def test_data_check_false_skips_the_scan(tmp_path):
    pytest.importorskip("yaml")
    from pixreg.train.checks import scan_data
    from pixreg.train.config import resolve_config

    rng = np.random.default_rng(9)
    write_mixed_folder(tmp_path, rng, [(16, 16)] * 2)
    (tmp_path / "images" / "m1.png").write_bytes(b"broken")
    sets = [f"data.root={tmp_path}", "data.name=folder", "data.opts={num_classes: 3}", "data.size=[16,16]",
            "data.val_split=train", "data.test_splits=[]"]
    with pytest.raises(DatasetError, match="m1.png"):
        scan_data(resolve_config(None, sets), log=None)
    scan_data(resolve_config(None, sets + ["data.check=false"]), log=None)  # skipped: no error
    # a run saved before the key existed (or with another value) still resumes
    from pixreg.train.config import RESUME_MUTABLE, config_diff

    old = resolve_config(None, sets)
    del old["data"]["check"]
    assert config_diff(old, resolve_config(None, sets + ["data.check=false"]), ignore=RESUME_MUTABLE) == []
