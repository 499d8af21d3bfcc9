"""Shared machinery of the segmentation datasets: normalisation, resizing, augmentation.

Every dataset of :mod:`pixreg.data` derives from :class:`SegmentationDataset`, which turns a
``(H, W, 3) uint8`` RGB array and a ``(H, W)`` integer label array (already remapped so that
ignored pixels hold ``ignore_index``) into the item ``(image, label)``:

* ``image``: ``float32`` tensor ``(3, H, W)``, ``(rgb / 255 - IMAGENET_MEAN) / IMAGENET_STD``;
* ``label``: ``int64`` tensor ``(H, W)`` with values in ``[0, num_classes)`` or ``ignore_index``.

Geometry (``size=(H, W)``), option ``resize``:

* ``resize="fixed"`` (default): the sample is resized to ``size`` (image bilinear with PIL,
  label nearest), whatever its aspect ratio; ``size=None`` keeps the native resolution
  (variable-size datasets then need ``batch_size=1``).
* ``resize="long"`` (aspect ratio kept): scaled by ``min(H / h, W / w)`` so that it fits inside
  ``(H, W)`` (its longer side, relative to the box, touches it), then padded at the bottom and
  right to exactly ``(H, W)`` (image with the ImageNet mean colour, label with ``ignore_index``):
  batches of mixed shapes, no distortion, padded pixels ignored by every loss and metric.
* ``resize="short"`` (aspect ratio kept): scaled by ``max(H / h, W / w)`` so that it covers
  ``(H, W)``; without augmentation the whole resized sample is returned (variable size:
  evaluation groups equal shapes), with augmentation the random crop below cuts ``(H, W)``.
* ``augment=True`` (training splits only, i.e. names starting with ``train``; ignored with a
  warning on other splits), with
  albumentations: resize to ``size`` as above (the evaluation geometry), random scale in ``scale_range``
  (image bilinear, label nearest), pad to ``size`` (image with the ImageNet mean colour, which
  normalises to 0, label with ``ignore_index``), random crop to ``size``, horizontal flip with
  probability 0.5 when ``hflip``.

Augmentation randomness is deterministic: sample ``idx`` gets the seed
``SeedSequence([seed, idx, epoch])`` once :meth:`SegmentationDataset.set_epoch` has been called
(then independent of the number of DataLoader workers); without ``set_epoch`` the seed mixes the
DataLoader worker seed (``torch.initial_seed()``, fresh each epoch and reproducible under
``torch.manual_seed``) with a per-process visit counter of the sample, so every epoch still sees
new augmentations.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32)
_MEAN_FILL = tuple(int(round(255 * m)) for m in IMAGENET_MEAN)  # pads to ~0 after normalising



def normalize(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3) uint8`` RGB -> ``(3, H, W) float32`` tensor normalised with ImageNet mean/std."""
    x = image.astype(np.float32) * np.float32(1.0 / 255.0)
    x = (x - _MEAN) / _STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize` for display: ``(..., 3, H, W)`` -> RGB in ``[0, 1]``."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image * std + mean).clamp(0.0, 1.0)


def check_size(size: Any) -> tuple[int, int] | None:
    """Validate ``size`` = ``(H, W)`` of positive ints (or ``None``)."""
    if size is None:
        return None
    if isinstance(size, int) or not isinstance(size, Sequence) or len(size) != 2:
        raise ValueError(f"size must be a pair (H, W) of positive ints or None, got {size!r}")
    h, w = size
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (h, w)):
        raise ValueError(f"size must be a pair (H, W) of positive ints or None, got {size!r}")
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be a pair (H, W) of positive ints or None, got {size!r}")
    return int(h), int(w)


def check_no_options(name: str, opts: dict[str, Any], accepted: Sequence[str] = ()) -> None:
    """Raise ``TypeError`` naming options a dataset does not understand (catches typos)."""
    if opts:
        tail = f"; accepted: {', '.join(sorted(accepted))}" if accepted else ""
        raise TypeError(f"dataset {name!r} got unexpected option(s): {', '.join(sorted(opts))}{tail}")


def _resize_pil(image: np.ndarray, label: np.ndarray, extra: list[np.ndarray],
                size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    from PIL import Image

    h, w = size
    if image.shape[:2] == (h, w):
        return image, label, extra
    img = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))

    def nearest(a: np.ndarray) -> np.ndarray:
        if a.dtype == np.bool_:
            a = a.astype(np.uint8)
            return np.asarray(Image.fromarray(a).resize((w, h), Image.NEAREST)).astype(bool)
        return np.asarray(Image.fromarray(a).resize((w, h), Image.NEAREST))

    return img, nearest(label), [nearest(e) for e in extra]


RESIZE_MODES = ("fixed", "long", "short")


def _resize_keep_ratio(image: np.ndarray, label: np.ndarray, extra: list[np.ndarray],
                       size: tuple[int, int], mode: str,
                       ignore_index: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Aspect-preserving resize (``mode`` ``"long"``: fit inside ``size`` and pad; ``"short"``:
    cover ``size``), see the module docstring."""
    h, w = image.shape[:2]
    box_h, box_w = size
    scale = min(box_h / h, box_w / w) if mode == "long" else max(box_h / h, box_w / w)
    new = (max(1, round(h * scale)), max(1, round(w * scale)))
    if mode == "long":  # rounding must never leave the box
        new = (min(new[0], box_h), min(new[1], box_w))
    image, label, extra = _resize_pil(image, label, extra, new)
    if mode == "short" or new == (box_h, box_w):
        return image, label, extra
    pad = ((0, box_h - new[0]), (0, box_w - new[1]))
    image = np.stack([np.pad(image[..., c], pad, constant_values=_MEAN_FILL[c]) for c in range(3)], axis=-1)
    label = np.pad(label, pad, constant_values=ignore_index)
    return image, label, [np.pad(e, pad, constant_values=False) for e in extra]


def build_augmentation(size: tuple[int, int] | None, scale_range: tuple[float, float],
                       hflip: bool, ignore_index: int, resize: bool = True):
    """albumentations pipeline: [resize to size], random scale, pad, random crop, h-flip.

    With ``size=None`` the crop size is the image's own size (set per call by the dataset);
    ``resize=False`` leaves out the first resize (done by the dataset when it keeps the aspect
    ratio).
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check at import
    try:
        import albumentations as A
        import cv2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("augment=True needs albumentations: install pixreg's 'train' extra (pip install -e '.[train]' in a checkout) or pip install albumentations") from err
    lo, hi = scale_range
    ops = []
    if size is not None and resize:
        ops.append(A.Resize(size[0], size[1], interpolation=cv2.INTER_LINEAR,
                            mask_interpolation=cv2.INTER_NEAREST))
    if (lo, hi) != (1.0, 1.0):
        ops.append(A.RandomScale(scale_limit=(lo - 1.0, hi - 1.0), interpolation=cv2.INTER_LINEAR,
                                 mask_interpolation=cv2.INTER_NEAREST, p=1.0))
    if size is not None:
        ops += [A.PadIfNeeded(min_height=size[0], min_width=size[1], border_mode=cv2.BORDER_CONSTANT,
                              fill=_MEAN_FILL, fill_mask=ignore_index),
                A.RandomCrop(size[0], size[1])]
    if hflip:
        ops.append(A.HorizontalFlip(p=0.5))
    return A.Compose(ops, seed=0)


class SegmentationDataset(Dataset):
    """Base class: subclasses set the metadata attributes and implement ``__len__``/``_load``.

    Attributes every dataset has: ``name``, ``split``, ``num_classes``, ``ignore_index``,
    ``class_names`` (``len == num_classes``), ``background_index`` (``None`` when every labelled
    pixel belongs to a class of interest), ``size``, ``resize``, ``augment``, ``seed``.
    """

    name: str = ""
    split: str = ""
    num_classes: int = 0
    ignore_index: int = 255
    class_names: list[str]
    background_index: int | None = None

    def __init__(self, split: str, *, size: tuple[int, int] | None, augment: bool, seed: int,
                 scale_range: tuple[float, float] = (0.5, 2.0), hflip: bool = True,
                 resize: str = "fixed") -> None:
        self.split = split
        self.size = check_size(size)
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        if resize != "fixed" and self.size is None:
            raise ValueError(f"resize={resize!r} needs size=(H, W)")
        self.resize = resize
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = int(seed)
        if augment and not split.startswith("train"):
            warnings.warn(f"augment=True ignored for the evaluation split {split!r}", stacklevel=3)
            augment = False
        self.augment = bool(augment)
        lo, hi = (float(v) for v in scale_range)
        if not 0.0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range!r}")
        self.scale_range = (lo, hi)
        self.hflip = bool(hflip)
        self._transform = None
        self._epoch: int | None = None
        self._visits: dict[int, int] = {}

    # -- to implement -------------------------------------------------------------------------
    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _load(self, idx: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Return ``(rgb uint8 (H, W, 3), label (H, W) uint8/uint16, extra masks)``."""
        raise NotImplementedError  # pragma: no cover

    # -- public -------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Make augmentations a function of ``(seed, idx, epoch)`` only (call once per epoch)."""
        self._epoch = int(epoch)

    def _aug_seed(self, idx: int) -> int:
        if self._epoch is not None:
            key = [self.seed, idx, 0, self._epoch]
        else:
            visit = self._visits.get(idx, 0)
            self._visits[idx] = visit + 1
            worker = torch.utils.data.get_worker_info()
            wseed = torch.initial_seed() % (2**63) if worker is not None else 0
            key = [self.seed, idx, 1, wseed, visit]
        return int(np.random.SeedSequence(key).generate_state(1)[0])

    def _geometry(self, idx: int, image: np.ndarray, label: np.ndarray,
                  extra: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        if self.resize != "fixed":
            image, label, extra = _resize_keep_ratio(image, label, extra, self.size, self.resize,
                                                     self.ignore_index)
        if not self.augment:
            if self.size is not None and self.resize == "fixed":
                return _resize_pil(image, label, extra, self.size)
            return image, label, extra
        if self._transform is None:
            self._transform = build_augmentation(self.size, self.scale_range, self.hflip,
                                                 self.ignore_index, resize=self.resize == "fixed")
        t = self._transform
        if self.size is None:  # crop back to the native size of this image
            h, w = image.shape[:2]
            import albumentations as A
            import cv2
            t = A.Compose(list(t.transforms) + [
                A.PadIfNeeded(min_height=h, min_width=w, border_mode=cv2.BORDER_CONSTANT,
                              fill=_MEAN_FILL, fill_mask=self.ignore_index),
                A.RandomCrop(h, w)], seed=0)
        t.set_random_seed(self._aug_seed(idx))
        # extra masks are boolean; encoded 0/1 and padded with ignore_index (!= 1 -> False)
        masks = [label] + [e.astype(np.uint8) for e in extra]
        out = t(image=image, masks=masks)
        out_masks = out["masks"]
        return out["image"], out_masks[0], [np.asarray(m) == 1 for m in out_masks[1:]]

    def __getitem__(self, idx: int):
        if not -len(self) <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} samples")
        idx = int(idx) % len(self)
        image, label, extra = self._load(idx)
        image, label, extra = self._geometry(idx, image, label, extra)
        img_t = normalize(np.asarray(image))
        lbl_t = torch.from_numpy(np.asarray(label).astype(np.int64))
        if extra:
            return (img_t, lbl_t) + tuple(torch.from_numpy(np.ascontiguousarray(e)) for e in extra)
        return img_t, lbl_t

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"num_classes={self.num_classes}, size={self.size}, augment={self.augment})")


def _open_image(path: str, convert: str | None = None) -> tuple[str, np.ndarray]:
    """``(mode, pixels)`` of an image file, fully decoded; unreadable, corrupt or truncated files
    raise ``ValueError`` naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode = im.mode
            if convert is not None and mode != convert:
                im = im.convert(convert)
            return mode, np.asarray(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{path}: cannot decode the image ({err})") from None


def read_rgb(path: str) -> np.ndarray:
    """Read an image file as ``(H, W, 3) uint8`` RGB (``ValueError`` naming a corrupt file)."""
    return _open_image(path, "RGB")[1]


_INDEX_MODES = ("P", "L", "I;16", "I;16B", "I;16L", "I", "1")


def read_index_mask(path: str) -> np.ndarray:
    """Read an index mask (palette ``P``, ``L`` or 16-bit) as its raw indices, never via RGB."""
    mode, arr = _open_image(path)
    if mode not in _INDEX_MODES:
        raise ValueError(f"{path}: expected an index mask (mode P, L or I;16), got mode {mode}; for "
                         f"colour-coded labels give a colour table (colors.txt or colors.json beside "
                         f"the data, or the option colors=...)")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.dtype not in (np.uint8, np.uint16):
        if arr.min() < 0 or arr.max() > 65535:
            raise ValueError(f"{path}: label values outside [0, 65535]")
        arr = arr.astype(np.uint16)
    return arr


def read_color_mask(path: str) -> np.ndarray:
    """Read a colour-coded label image as ``(H, W, 3) uint8`` colours (palette images through
    their palette, alpha dropped); 16-bit images are refused."""
    from PIL import Image

    with Image.open(path) as im:  # mode only (cheap); decoding errors are reported below
        mode = im.mode
    if mode.startswith("I") or mode == "F":
        raise ValueError(f"{path}: a colour table is configured but this label image is {mode} "
                         f"(16/32-bit values, not colours)")
    return read_rgb(path)


def check_label_values(label: np.ndarray, num_classes: int, ignore_index: int, where: str) -> None:
    """Raise ``ValueError`` when a label is neither in ``[0, num_classes)`` nor ``ignore_index``."""
    bad = (label >= num_classes) & (label != ignore_index)
    if bad.any():
        vals = np.unique(label[bad])[:5].tolist()
        raise ValueError(f"{where}: label values {vals} are outside [0, {num_classes}) and are not "
                         f"ignore_index={ignore_index}")
