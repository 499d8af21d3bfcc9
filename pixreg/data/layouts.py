"""On-disk segmentation datasets: CamVid (SegNet layout), Pascal VOC, and a plain folder layout.

All three read RGB images with PIL and index masks as raw indices (palette PNGs are never
converted to RGB), then go through :class:`pixreg.data._base.SegmentationDataset` (resize or
augmentation, ImageNet normalisation). Files are read lazily in ``__getitem__``; the constructor
only lists and checks paths.

CamVid (``name="camvid"``), SegNet layout as in ``/work/shared/data/camvid``::

    root/{train,val,test}/*.png            RGB 480x360
    root/{train,val,test}annot/*.png       8-bit labels 0..10, 11 = void
    root/{train,val,test}.txt              "train/x.png trainannot/x.png" pairs

11 classes (Sky, Building, Pole, Road, Pavement, Tree, SignSymbol, Fence, Car, Pedestrian,
Bicyclist), no background class (``background_index=None``). Void (11) and any value > 11 are
remapped to ``ignore_index=255`` so that every dataset of the package ignores 255. Splits
``train``, ``val``, ``test``, ``trainval``. A common training size is ``size=(360, 480)`` or
``(180, 240)``.

Pascal VOC (``name="voc"``): ``root`` is ``VOC2012`` itself or a folder holding
``VOC2012``/``VOCdevkit/VOC2012``::

    JPEGImages/{id}.jpg, SegmentationClass/{id}.png (palette indices), ImageSets/Segmentation/{split}.txt

21 classes (background = 0), 255 = ignore (object boundaries). Option ``mask_dir`` (default
``"SegmentationClass"``, e.g. ``"SegmentationClassAug"`` for the augmented set whose index PNGs
are 8-bit grey). Any split listed in ``ImageSets/Segmentation`` works (``train``, ``val``,
``trainval``, ...).

Plain folder (``name="folder"``)::

    root/images/{stem}.(png|jpg|jpeg|bmp|tif|tiff)
    root/masks/{stem}.png                  index PNG (mode P, L or 16-bit)
    root/splits/{split}.txt                one stem per line
    root/classes.txt                       optional, one class name per line

``num_classes`` comes from the option ``num_classes`` or, failing that, ``classes.txt``;
``ignore_index`` (option) defaults to 255; ``background_index`` (option) defaults to ``None``.
Mask values outside ``[0, num_classes)`` other than ``ignore_index`` raise ``ValueError`` when
the sample is read.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ._base import SegmentationDataset, check_label_values, check_no_options, read_index_mask, read_rgb

CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence",
                  "Car", "Pedestrian", "Bicyclist"]
VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor"]
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _require_root(name: str, root: str | os.PathLike | None) -> str:
    if root is None:
        raise ValueError(f"dataset {name!r} needs root= (the dataset folder)")
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset {name!r}: root {root!r} is not a directory")
    return root


class _FileDataset(SegmentationDataset):
    """Lists of (image path, mask path) and a label look-up table applied on read."""

    def __init__(self, split: str, pairs: list[tuple[str, str]], *, lut: np.ndarray | None,
                 check_values: bool, **kw: Any) -> None:
        super().__init__(split, **kw)
        if not pairs:
            raise ValueError(f"dataset {self.name!r}: split {split!r} is empty")
        self.files = pairs
        self._lut = lut
        self._check_values = check_values

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, idx: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        img_path, mask_path = self.files[idx]
        image = read_rgb(img_path)
        label = read_index_mask(mask_path)
        if label.shape != image.shape[:2]:
            raise ValueError(f"{mask_path}: mask shape {label.shape} != image shape {image.shape[:2]}")
        if self._lut is not None:
            label = self._lut[label]
        if self._check_values:
            check_label_values(label, self.num_classes, self.ignore_index, mask_path)
        return image, label, []


class CamVid(_FileDataset):
    """CamVid in the SegNet layout (see the module docstring)."""

    name = "camvid"

    def __init__(self, split: str, root: str | None, **kw: Any) -> None:
        root = _require_root("camvid", root)
        names = {"train": ["train"], "val": ["val"], "test": ["test"], "trainval": ["train", "val"]}
        if split not in names:
            raise ValueError(f"camvid split must be one of {sorted(names)}, got {split!r}")
        pairs = []
        for part in names[split]:
            listing = os.path.join(root, f"{part}.txt")
            if os.path.isfile(listing):
                with open(listing) as f:
                    for line in f:
                        fields = line.split()
                        if not fields:
                            continue
                        if len(fields) != 2:
                            raise ValueError(f"{listing}: expected 'image label' pairs, got {line!r}")
                        # the original SegNet lists hold absolute /SegNet/CamVid/... paths
                        img, lbl = (os.path.join(root, *p.replace("\\", "/").split("/")[-2:])
                                    for p in fields)
                        pairs.append((img, lbl))
            else:  # no list: pair the files of part/ and partannot/
                img_dir = os.path.join(root, part)
                if not os.path.isdir(img_dir):
                    raise FileNotFoundError(f"camvid: neither {listing} nor {img_dir} exists")
                pairs += [(os.path.join(img_dir, n), os.path.join(root, part + "annot", n))
                          for n in sorted(os.listdir(img_dir)) if n.lower().endswith(".png")]
        for img, lbl in pairs[:1] + pairs[-1:]:
            for p in (img, lbl):
                if not os.path.isfile(p):
                    raise FileNotFoundError(f"camvid: listed file {p} does not exist")
        self.num_classes = 11
        self.ignore_index = 255
        self.class_names = list(CAMVID_CLASSES)
        self.background_index = None
        self.root = root
        lut = np.full(256, 255, dtype=np.uint8)
        lut[:11] = np.arange(11, dtype=np.uint8)  # 11 (void) and above -> 255
        super().__init__(split, pairs, lut=lut, check_values=False, **kw)

    def _load(self, idx: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        img_path, mask_path = self.files[idx]
        image = read_rgb(img_path)
        label = read_index_mask(mask_path)
        if label.dtype != np.uint8:
            label = np.minimum(label, 255).astype(np.uint8)
        if label.shape != image.shape[:2]:
            raise ValueError(f"{mask_path}: mask shape {label.shape} != image shape {image.shape[:2]}")
        return image, self._lut[label], []


def _voc_root(root: str) -> str:
    for cand in (root, os.path.join(root, "VOC2012"), os.path.join(root, "VOCdevkit", "VOC2012")):
        if os.path.isdir(os.path.join(cand, "JPEGImages")):
            return cand
    raise FileNotFoundError(f"voc: no JPEGImages/ under {root!r} (nor VOC2012/, VOCdevkit/VOC2012/)")


class VOC(_FileDataset):
    """Pascal VOC segmentation (see the module docstring)."""

    name = "voc"

    def __init__(self, split: str, root: str | None, *, mask_dir: str = "SegmentationClass",
                 **kw: Any) -> None:
        root = _voc_root(_require_root("voc", root))
        listing = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
        if not os.path.isfile(listing):
            raise ValueError(f"voc: split {split!r} has no list {listing}")
        with open(listing) as f:
            ids = [line.split()[0] for line in f if line.strip()]
        pairs = [(os.path.join(root, "JPEGImages", i + ".jpg"), os.path.join(root, mask_dir, i + ".png"))
                 for i in ids]
        for img, lbl in pairs[:1] + pairs[-1:]:
            for p in (img, lbl):
                if not os.path.isfile(p):
                    raise FileNotFoundError(f"voc: listed file {p} does not exist")
        self.num_classes = 21
        self.ignore_index = 255
        self.class_names = list(VOC_CLASSES)
        self.background_index = 0
        self.root = root
        super().__init__(split, pairs, lut=None, check_values=True, **kw)


class Folder(_FileDataset):
    """Plain ``images/``, ``masks/``, ``splits/`` layout (see the module docstring)."""

    name = "folder"

    def __init__(self, split: str, root: str | None, *, num_classes: int | None = None,
                 ignore_index: int = 255, background_index: int | None = None,
                 class_names: list[str] | None = None, **kw: Any) -> None:
        root = _require_root("folder", root)
        classes_file = os.path.join(root, "classes.txt")
        names_from_file = None
        if os.path.isfile(classes_file):
            with open(classes_file) as f:
                names_from_file = [line.strip() for line in f if line.strip()]
        if num_classes is None:
            if names_from_file is None:
                raise ValueError("folder: give num_classes= or write root/classes.txt")
            num_classes = len(names_from_file)
        if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(f"folder: num_classes must be a positive int, got {num_classes!r}")
        num_classes = int(num_classes)
        if class_names is None:
            if names_from_file is not None and len(names_from_file) == num_classes:
                class_names = names_from_file
            else:
                class_names = [f"class_{i}" for i in range(num_classes)]
        if len(class_names) != num_classes:
            raise ValueError(f"folder: {len(class_names)} class_names for num_classes={num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"folder: ignore_index={ignore_index} collides with a class index")
        if background_index is not None and not 0 <= background_index < num_classes:
            raise ValueError(f"folder: background_index={background_index} not in [0, {num_classes})")
        listing = os.path.join(root, "splits", f"{split}.txt")
        if not os.path.isfile(listing):
            raise ValueError(f"folder: split {split!r} has no list {listing}")
        with open(listing) as f:
            stems = [line.strip() for line in f if line.strip()]
        img_dir, mask_dir = os.path.join(root, "images"), os.path.join(root, "masks")
        by_stem: dict[str, str] = {}
        if os.path.isdir(img_dir):
            for n in sorted(os.listdir(img_dir)):
                stem, ext = os.path.splitext(n)
                if ext.lower() in _IMAGE_EXTS:
                    by_stem.setdefault(stem, os.path.join(img_dir, n))
        pairs = []
        for s in stems:
            if s not in by_stem:
                raise FileNotFoundError(f"folder: no image for stem {s!r} in {img_dir}")
            mask = os.path.join(mask_dir, s + ".png")
            if not os.path.isfile(mask):
                raise FileNotFoundError(f"folder: no mask {mask}")
            pairs.append((by_stem[s], mask))
        self.num_classes = num_classes
        self.ignore_index = int(ignore_index)
        self.class_names = list(class_names)
        self.background_index = background_index
        self.root = root
        super().__init__(split, pairs, lut=None, check_values=True, **kw)


def build_layout(name: str, split: str, root: str | None, **kw: Any) -> SegmentationDataset:
    """Dispatch ``camvid``/``voc``/``folder`` with dataset options ``kw``."""
    common = {k: kw.pop(k) for k in ("size", "augment", "seed", "scale_range", "hflip") if k in kw}
    if name == "camvid":
        check_no_options(name, kw)
        return CamVid(split, root, **common)
    if name == "voc":
        opts = {k: kw.pop(k) for k in ("mask_dir",) if k in kw}
        check_no_options(name, kw)
        return VOC(split, root, **opts, **common)
    if name == "folder":
        opts = {k: kw.pop(k) for k in ("num_classes", "ignore_index", "background_index",
                                       "class_names") if k in kw}
        check_no_options(name, kw)
        return Folder(split, root, **opts, **common)
    raise ValueError(f"unknown layout {name!r}")  # pragma: no cover - guarded by build_dataset
