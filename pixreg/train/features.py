"""Frozen-encoder protocol: multi-scale encoder features computed once, cached on disk.

With ``data.features`` set in the configuration, the trainer's datasets
(:func:`pixreg.train.trainer.make_dataset`) yield ``(levels, label)`` instead of
``(image, label)``: ``levels`` is the list of feature maps of a frozen ImageNet-pretrained
encoder (:class:`~pixreg.models.efficientnet.EfficientNetLite0Pyramid`, strides 8, 16, 32
by default), read from a cache, and the model is a decoder on them
(``model.name: fpn_decoder``, :class:`~pixreg.models.decoder.FPNDecoderSeg`). The
ordinary trainer, criterion, checkpoints, evaluation and ``pixreg compare`` are used
unchanged; only the encoder's forward pass is skipped.

``data.features`` (a mapping; every key optional)::

    encoder: efficientnet_lite0      # the only encoder so far
    strides: [8, 16, 32]             # levels kept, finest first
    views: [[1.0, false], [1.0, true], [1.5, false], [1.5, true], [2.0, false], [2.0, true]]
    dtype: float16                   # storage type (float16 or float32)
    batch_size: 8                    # images per encoder forward pass while building
    cache_dir: null                  # default: <data.cache_dir>/features, else $PIXREG_CACHE/features

Views (training split only; evaluation splits have the single view ``[1.0, false]``): a
view ``[s, flip]`` is the image zoomed by ``s`` (a crop of ``1/s`` of its height and
width, at a position drawn once per image and view from ``data.seed``, resized to
``data.size``; ``s = 1`` is the whole image, resized exactly as the evaluation pipeline
does), mirrored if ``flip``. At each training step every sample takes one of its views,
chosen from ``(run seed, epoch, index)`` like the on-line augmentation, so every method
of a seed sees the same views in the same order.

The cache: one folder per ``(dataset, split, size, views, encoder, strides, weights,
dtype, data seed)`` named by a hash of all of these and of the cache format
:data:`CACHE_VERSION`, holding one ``.npy`` array per level
``(N * V, C, ceil(H / s), ceil(W / s))``, the labels ``(N * V, H, W)`` and
``meta.json``. Built with a progress bar, written through memory maps (memory bounded
by one batch) into a temporary folder renamed at the end (concurrent builders are
safe, an interrupted build leaves no cache), read through memory maps.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["CACHE_VERSION", "DEFAULT_VIEWS", "feature_spec", "cache_folder", "build_feature_cache",
           "CachedFeatures", "feature_dataset", "prepare_feature_caches"]

#: Version of the cache layout (part of every cache key).
CACHE_VERSION = 1
#: Default views of a training image: zoom 1, 1.5, 2, each unflipped and flipped.
DEFAULT_VIEWS: Tuple[Tuple[float, bool], ...] = ((1.0, False), (1.0, True), (1.5, False), (1.5, True),
                                                 (2.0, False), (2.0, True))
_ENCODERS = ("efficientnet_lite0",)
_DTYPES = ("float16", "float32")
_SPEC_KEYS = ("encoder", "strides", "views", "dtype", "batch_size", "cache_dir")


def feature_spec(cfg: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The checked ``data.features`` mapping with defaults filled in (``None`` when off).

    Raises ``ValueError`` naming the key for an unknown key or a bad value.
    """
    raw = cfg["data"].get("features")
    if raw is None or raw is False:
        return None
    if raw is True:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"data.features must be a mapping (or null), got {raw!r}")
    unknown = sorted(set(raw) - set(_SPEC_KEYS))
    if unknown:
        raise ValueError(f"data.features: unknown key(s) {unknown}; known: {list(_SPEC_KEYS)}")
    spec = {"encoder": "efficientnet_lite0", "strides": [8, 16, 32], "views": [list(v) for v in DEFAULT_VIEWS],
            "dtype": "float16", "batch_size": 8, "cache_dir": None}
    spec.update(dict(raw))
    if spec["encoder"] not in _ENCODERS:
        raise ValueError(f"data.features.encoder must be one of {_ENCODERS}, got {spec['encoder']!r}")
    if spec["dtype"] not in _DTYPES:
        raise ValueError(f"data.features.dtype must be one of {_DTYPES}, got {spec['dtype']!r}")
    bs = spec["batch_size"]
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ValueError(f"data.features.batch_size must be a positive int, got {bs!r}")
    views = spec["views"]
    if not isinstance(views, (list, tuple)) or not views or not all(
            isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[0], (int, float)) and not isinstance(v[0], bool)
            and v[0] >= 1.0 and isinstance(v[1], bool) for v in views):
        raise ValueError(f"data.features.views must be a non-empty list of [zoom >= 1, flip (bool)] pairs, got {views!r}")
    spec["views"] = [[float(v[0]), bool(v[1])] for v in views]
    if spec["views"][0] != [1.0, False]:
        raise ValueError(f"data.features.views must start with [1.0, false] (the plain image), got {views!r}")
    spec["strides"] = [int(s) for s in spec["strides"]]
    if cfg["data"].get("size") is None:
        raise ValueError("data.features needs a fixed data.size [H, W] (every cached view has that size)")
    return spec


def _source_id(ds: Dataset) -> List[Any]:
    """What identifies the source images: their count and, for file datasets, the file names."""
    files = getattr(ds, "files", None)
    names = [os.path.basename(str(p)) for pair in files for p in pair] if files else []
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    return [len(ds), digest, os.path.realpath(str(getattr(ds, "root", "") or ""))]


def cache_folder(cfg: Mapping[str, Any], split: str, train: bool, source: Dataset) -> str:
    """The cache folder of ``split`` (whether or not it exists yet)."""
    from ..data.scenes import default_cache_dir
    from ..models.efficientnet import lite0_weights_path

    spec = feature_spec(cfg)
    assert spec is not None
    d = cfg["data"]
    size = d["size"] if train or d.get("eval_size", "same") == "same" else d["eval_size"]
    if size is None:
        raise ValueError("data.features needs a fixed data.eval_size (or 'same')")
    views = spec["views"] if train else [[1.0, False]]
    key = {"version": CACHE_VERSION, "dataset": d["name"], "split": split, "source": _source_id(source),
           "opts": d.get("opts") or {}, "size": list(size), "views": views, "data_seed": int(d["seed"]),
           "encoder": spec["encoder"], "weights": os.path.basename(lite0_weights_path()),
           "strides": spec["strides"], "dtype": spec["dtype"]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    root = spec["cache_dir"] or (os.path.join(d["cache_dir"], "features") if d.get("cache_dir")
                                 else os.path.join(default_cache_dir(), "features"))
    name = f"{d['name']}-{split}-{size[0]}x{size[1]}-v{len(views)}-{digest}"
    return os.path.join(str(root), name)


def _view(image: torch.Tensor, label: torch.Tensor, zoom: float, flip: bool, size: Sequence[int],
          rng: np.random.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Crop ``1/zoom`` of a native ``(3, H0, W0)`` image (and ``(H0, W0)`` label) at a position
    drawn from ``rng``, resize to ``size`` (bilinear with antialiasing / nearest), flip."""
    h0, w0 = image.shape[-2:]
    ch, cw = max(1, round(h0 / zoom)), max(1, round(w0 / zoom))
    top, left = int(rng.integers(0, h0 - ch + 1)), int(rng.integers(0, w0 - cw + 1))
    img = image[:, top:top + ch, left:left + cw]
    lbl = label[top:top + ch, left:left + cw]
    img = F.interpolate(img[None], size=tuple(size), mode="bilinear", align_corners=False, antialias=True)[0]
    lbl = F.interpolate(lbl[None, None].float(), size=tuple(size), mode="nearest")[0, 0].long()
    if flip:
        img, lbl = img.flip(-1), lbl.flip(-1)
    return img, lbl


def _view_rng(data_seed: int, index: int, view: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(data_seed), int(index), int(view), 0xFEA7]))


def build_feature_cache(cfg: Mapping[str, Any], split: str, *, train: bool, progress: bool = True,
                        log=print) -> str:
    """Build (if missing) the feature cache of ``split`` and return its folder."""
    from ..data import build_dataset

    spec = feature_spec(cfg)
    if spec is None:
        raise ValueError("data.features is not set")
    d = cfg["data"]
    size = tuple(d["size"] if train or d.get("eval_size", "same") == "same" else d["eval_size"])
    opts = dict(d.get("opts") or {})
    plain = build_dataset(d["name"], split, d["root"], size=size, augment=False, seed=int(d["seed"]),
                          cache_dir=d["cache_dir"], **opts)
    folder = cache_folder(cfg, split, train, plain)
    if os.path.exists(os.path.join(folder, "meta.json")):
        return folder
    views = spec["views"] if train else [[1.0, False]]
    native = None
    if any(z != 1.0 for z, _ in views):
        native = build_dataset(d["name"], split, d["root"], size=None, augment=False, seed=int(d["seed"]),
                               cache_dir=d["cache_dir"], **opts)
    from ..models.efficientnet import EfficientNetLite0Pyramid
    from .evaluation import progress_bar

    encoder = EfficientNetLite0Pyramid(spec["strides"], pretrained=True).eval()
    n, nv = len(plain), len(views)
    h, w = size
    shapes = [(n * nv, c, -(-h // s), -(-w // s)) for c, s in zip(encoder.out_channels, spec["strides"])]
    ignore = int(plain.ignore_index)
    label_dtype = np.uint8 if max(int(plain.num_classes) - 1, ignore) <= 255 else np.int32
    tmp = f"{folder}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    t0 = time.perf_counter()
    try:
        levels = [np.lib.format.open_memmap(os.path.join(tmp, f"level{i}.npy"), mode="w+", dtype=spec["dtype"],
                                            shape=sh) for i, sh in enumerate(shapes)]
        labels = np.lib.format.open_memmap(os.path.join(tmp, "labels.npy"), mode="w+", dtype=label_dtype,
                                           shape=(n * nv, h, w))
        bar = progress_bar(total=n * nv, enabled=progress, desc=f"features {d['name']} {split}", unit="view", leave=True)
        _encode_views(encoder, plain, native, views, spec, int(d["seed"]), size, levels, labels, bar)
        bar.close()
        for arr in levels + [labels]:
            arr.flush()
        del levels, labels
        meta = {"version": CACHE_VERSION, "dataset": d["name"], "split": split, "size": list(size), "views": views,
                "n_images": n, "strides": spec["strides"], "channels": list(encoder.out_channels),
                "encoder": spec["encoder"], "dtype": spec["dtype"], "num_classes": int(plain.num_classes),
                "ignore_index": ignore, "class_names": list(getattr(plain, "class_names", [])),
                "background_index": getattr(plain, "background_index", None), "build_time_s": round(time.perf_counter() - t0, 1),
                "torch": torch.__version__, "threads": torch.get_num_threads()}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished the same cache first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"feature cache {folder}: {n} images x {nv} view(s) in {time.perf_counter() - t0:.0f} s")
    return folder


def _encode_views(encoder, plain, native, views, spec: Mapping[str, Any], seed: int, size, levels, labels,
                  bar) -> None:
    """Encode every (image, view) pair in batches of ``spec["batch_size"]`` into the memmaps
    ``levels`` (one per stride) and ``labels``; row ``i * len(views) + v`` is view ``v`` of image ``i``."""
    nv = len(views)
    batch_img: List[torch.Tensor] = []
    row = 0

    def flush() -> None:
        nonlocal row
        with torch.no_grad():
            outs = encoder(torch.stack(batch_img))
        for arr, out in zip(levels, outs):
            arr[row:row + len(batch_img)] = out.numpy().astype(spec["dtype"])
        row += len(batch_img)
        bar.update(len(batch_img))
        batch_img.clear()

    for i in range(len(plain)):
        for v, (zoom, flip) in enumerate(views):
            if zoom == 1.0:
                img, lbl = plain[i][:2]
                if flip:
                    img, lbl = img.flip(-1), lbl.flip(-1)
            else:
                img, lbl = _view(*native[i][:2], zoom, flip, size, _view_rng(seed, i, v))
            labels[i * nv + v] = lbl.numpy().astype(labels.dtype)
            batch_img.append(img)
            if len(batch_img) == spec["batch_size"]:
                flush()
    if batch_img:
        flush()


class CachedFeatures(Dataset):
    """The dataset of a feature cache folder: ``ds[i] = (levels, label)``, ``levels`` a list of
    ``float32`` ``(C_l, H_l, W_l)`` tensors, ``label`` ``(H, W)`` int64.

    Image ``i`` yields view 0 (the plain image) until :meth:`set_epoch` is called; after
    ``set_epoch(key)`` it yields the view drawn from ``(key, i)``. Metadata attributes as
    the source dataset: ``num_classes``, ``ignore_index``, ``class_names``,
    ``background_index``, plus ``views`` and ``folder``.
    """

    def __init__(self, folder: str) -> None:
        meta_path = os.path.join(folder, "meta.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{folder} is not a finished feature cache (no meta.json)")
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("version") != CACHE_VERSION:
            raise ValueError(f"{folder}: feature cache version {meta.get('version')} != {CACHE_VERSION}")
        self.folder, self.meta = folder, meta
        self.name, self.split = meta["dataset"], meta["split"]
        self.num_classes, self.ignore_index = int(meta["num_classes"]), int(meta["ignore_index"])
        self.class_names, self.background_index = list(meta["class_names"]), meta["background_index"]
        self.views = [tuple(v) for v in meta["views"]]
        self._n = int(meta["n_images"])
        self._epoch: Optional[int] = None
        self._arrays: Optional[List[np.ndarray]] = None

    def _open(self) -> List[np.ndarray]:
        if self._arrays is None:  # opened lazily (after fork in DataLoader workers)
            n_levels = len(self.meta["strides"])
            self._arrays = [np.load(os.path.join(self.folder, f"level{i}.npy"), mmap_mode="r") for i in range(n_levels)]
            self._arrays.append(np.load(os.path.join(self.folder, "labels.npy"), mmap_mode="r"))
        return self._arrays

    def __len__(self) -> int:
        return self._n

    def set_epoch(self, key: int) -> None:
        self._epoch = int(key)

    def view_of(self, idx: int) -> int:
        if self._epoch is None or len(self.views) == 1:
            return 0
        return int(np.random.SeedSequence([self._epoch, int(idx)]).generate_state(1)[0]) % len(self.views)

    def __getitem__(self, idx: int):
        if not 0 <= idx < self._n:
            raise IndexError(f"index {idx} out of range for {self._n} images")
        arrays = self._open()
        r = int(idx) * len(self.views) + self.view_of(idx)
        levels = [torch.from_numpy(np.asarray(a[r], dtype=np.float32)) for a in arrays[:-1]]
        return levels, torch.from_numpy(np.asarray(arrays[-1][r]).astype(np.int64))

    def __repr__(self) -> str:
        return f"CachedFeatures({self.folder!r}, n={self._n}, views={len(self.views)})"


def feature_dataset(cfg: Mapping[str, Any], split: str, *, train: bool, progress: bool = False) -> CachedFeatures:
    """The cached-feature dataset of ``split`` (building the cache if missing)."""
    return CachedFeatures(build_feature_cache(cfg, split, train=train, progress=progress))


def prepare_feature_caches(cfg: Mapping[str, Any], *, progress: bool = True, log=print) -> List[str]:
    """Build every split's cache of ``cfg`` (train, val and test splits) once, e.g. before
    ``pixreg compare`` starts parallel runs; returns the folders (none when features are off)."""
    if feature_spec(cfg) is None:
        return []
    d = cfg["data"]
    out = [build_feature_cache(cfg, d["train_split"], train=True, progress=progress, log=log)]
    for split in [d["val_split"]] + [s for s in d["test_splits"] if s != d["val_split"]]:
        out.append(build_feature_cache(cfg, split, train=False, progress=progress, log=log))
    return out
