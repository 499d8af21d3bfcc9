"""Class lists and colour tables of on-disk datasets.

Class names (:func:`resolve_class_names`) come, in this order, from the option
``class_names``, a ``classes.txt`` file beside the data (one name per line, blank lines and
``#`` comments skipped), the names of a colour table, or the dataset's built-in list; the
option ``num_classes`` must agree with whichever is used (alone it gives ``class_0 ...``).

Colour-coded label images (RGB PNGs where each class is drawn in its own colour) are turned
into class indices on load through a :class:`ColorTable`, read from

* the option ``colors``: ``{"name": [r, g, b], ...}`` in class order, or a list of
  ``[r, g, b]`` (class ``i`` = entry ``i``);
* ``colors.json`` beside the data: the same mapping;
* ``colors.txt`` beside the data: one class per line, ``r g b name`` (commas allowed, name
  optional), in class order.

In all three, the name ``ignore`` (several colours allowed in JSON/options:
``"ignore": [[0, 0, 0], [255, 255, 255]]``) marks colours mapped to ``ignore_index``; they are
not classes. A pixel whose colour is in no entry is never guessed: the file is refused, naming
the number of such pixels and the first colours.

>>> table = ColorTable.from_spec({"sky": [0, 0, 255], "wall": [255, 0, 0], "ignore": [0, 0, 0]})
>>> table.names, table.num_classes
(['sky', 'wall'], 2)
>>> rgb = np.array([[[0, 0, 255], [255, 0, 0], [0, 0, 0]]], dtype=np.uint8)
>>> table.encode(rgb, ignore_index=255, where="demo.png").tolist()
[[0, 1, 255]]
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["ColorTable", "read_class_file", "find_beside", "resolve_class_names"]

IGNORE_NAME = "ignore"


def find_beside(dirs: Sequence[str], filename: str) -> str | None:
    """The first ``dir/filename`` that exists (``None`` if none)."""
    for d in dirs:
        path = os.path.join(d, filename)
        if os.path.isfile(path):
            return path
    return None


def read_class_file(path: str) -> list[str]:
    """Class names of a ``classes.txt`` (one per line; blank lines and ``#`` comments skipped)."""
    with open(path, encoding="utf-8") as f:
        names = [line.split("#", 1)[0].strip() for line in f]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"{path}: no class names (expected one name per line)")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{path}: class names repeated: {dup}")
    return names


def _rgb(value: Any, where: str) -> tuple[int, int, int]:
    if (not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 3
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v <= 255
                       for v in value)):
        raise ValueError(f"{where}: expected a colour [r, g, b] of ints in 0..255, got {value!r}")
    return int(value[0]), int(value[1]), int(value[2])


def _pack(rgb: tuple[int, int, int]) -> int:
    return (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]


class ColorTable:
    """Colour -> class index look-up for colour-coded label images (see the module docstring).

    Args:
        colors: one ``(r, g, b)`` per class, in class order.
        names: class names (``None``: ``class_0 ...``).
        ignore: colours mapped to ``ignore_index``.
        source: where the table came from (used in messages).
    """

    def __init__(self, colors: Sequence[tuple[int, int, int]], names: Sequence[str] | None = None,
                 ignore: Sequence[tuple[int, int, int]] = (), source: str = "colors") -> None:
        if not colors:
            raise ValueError(f"{source}: the colour table has no class colours")
        self.colors = [tuple(c) for c in colors]
        self.names = list(names) if names is not None else [f"class_{i}" for i in range(len(colors))]
        if len(self.names) != len(self.colors):
            raise ValueError(f"{source}: {len(self.names)} names for {len(self.colors)} colours")
        self.ignore = [tuple(c) for c in ignore]
        self.source = source
        packed = [_pack(c) for c in self.colors] + [_pack(c) for c in self.ignore]
        if len(set(packed)) != len(packed):
            dup = sorted({c for c in self.colors + self.ignore if (self.colors + self.ignore).count(c) > 1})
            raise ValueError(f"{source}: colour(s) {dup} listed more than once")
        order = np.argsort(np.asarray(packed, dtype=np.int64))
        self._keys = np.asarray(packed, dtype=np.int64)[order]
        # class index of each key; -1 marks ignore colours (filled with ignore_index on encode)
        values = np.asarray(list(range(len(self.colors))) + [-1] * len(self.ignore), dtype=np.int64)
        self._values = values[order]

    @property
    def num_classes(self) -> int:
        return len(self.colors)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: Any, source: str = "colors") -> "ColorTable":
        """From a mapping ``{name: [r, g, b]}`` (``ignore`` may hold one colour or a list of
        colours) or a list of ``[r, g, b]`` in class order."""
        if isinstance(spec, Mapping):
            colors, names, ignore = [], [], []
            for name, value in spec.items():
                if str(name) == IGNORE_NAME:
                    many = (isinstance(value, Sequence) and len(value) > 0
                            and isinstance(value[0], Sequence) and not isinstance(value[0], str))
                    ignore += [_rgb(v, f"{source} [{name!r}]") for v in (value if many else [value])]
                else:
                    colors.append(_rgb(value, f"{source} [{name!r}]"))
                    names.append(str(name))
            return cls(colors, names, ignore, source)
        if isinstance(spec, Sequence) and not isinstance(spec, str):
            return cls([_rgb(v, f"{source} [{i}]") for i, v in enumerate(spec)], None, (), source)
        raise ValueError(f"{source}: expected a mapping {{name: [r, g, b]}} or a list of [r, g, b], "
                         f"got {type(spec).__name__}")

    @classmethod
    def from_file(cls, path: str) -> "ColorTable":
        """From ``colors.json`` (a mapping, see :meth:`from_spec`) or ``colors.txt``
        (``r g b [name]`` per line, in class order; ``#`` comments)."""
        if path.lower().endswith(".json"):
            with open(path, encoding="utf-8") as f:
                try:
                    spec = json.load(f)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}: not valid JSON ({err})") from None
            return cls.from_spec(spec, source=path)
        colors, names, ignore = [], [], []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                fields = line.split("#", 1)[0].replace(",", " ").split()
                if not fields:
                    continue
                where = f"{path}:{lineno}"
                try:
                    rgb = _rgb([int(v) for v in fields[:3]], where)
                except ValueError:
                    raise ValueError(f"{where}: expected 'r g b [name]', got {line.strip()!r}") from None
                name = " ".join(fields[3:])
                if name == IGNORE_NAME:
                    ignore.append(rgb)
                else:
                    colors.append(rgb)
                    names.append(name or f"class_{len(names)}")
        return cls(colors, names, ignore, source=path)

    # -- use ----------------------------------------------------------------------------------
    def encode(self, rgb: np.ndarray, ignore_index: int, where: str) -> np.ndarray:
        """``(H, W, 3) uint8`` colours -> ``(H, W)`` class indices (``uint8`` when they fit,
        else ``uint16``); raises ``ValueError`` naming ``where`` for colours not in the table."""
        if rgb.ndim != 3 or rgb.shape[2] < 3:
            raise ValueError(f"{where}: expected an RGB colour label image, got shape {rgb.shape}")
        rgb = rgb[..., :3].astype(np.int64)
        packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        uniq, inverse, counts = np.unique(packed, return_inverse=True, return_counts=True)
        pos = np.clip(np.searchsorted(self._keys, uniq), 0, len(self._keys) - 1)
        known = self._keys[pos] == uniq
        if not known.all():
            bad, n_bad = uniq[~known], counts[~known]
            first = np.argsort(-n_bad)[:5]
            examples = ", ".join(f"({c >> 16}, {(c >> 8) & 255}, {c & 255}) x {int(n)}"
                                 for c, n in zip(bad[first], n_bad[first]))
            raise ValueError(f"{where}: {int(n_bad.sum())} pixels in {len(bad)} colour(s) that are not in "
                             f"the colour table {self.source} (most frequent: {examples})")
        values = self._values[pos]
        values = np.where(values < 0, ignore_index, values)
        dtype = np.uint8 if max(ignore_index, self.num_classes - 1) <= 255 else np.uint16
        return values.astype(dtype)[inverse.reshape(packed.shape)]


def resolve_class_names(dataset: str, *, num_classes: int | None, class_names: Sequence[str] | None,
                        classes_file: str | None, colors: ColorTable | None,
                        default: Sequence[str] | None) -> list[str]:
    """The class list of a dataset from its options, files and colour table (see the module
    docstring); every source that is given must agree on the number of classes."""
    sources: list[tuple[str, list[str]]] = []
    if class_names is not None:
        if isinstance(class_names, str) or not all(isinstance(n, str) for n in class_names):
            raise ValueError(f"{dataset}: class_names must be a list of str, got {class_names!r}")
        sources.append(("class_names", list(class_names)))
    if classes_file is not None:
        sources.append((classes_file, read_class_file(classes_file)))
    if colors is not None:
        sources.append((colors.source, list(colors.names)))
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(f"{dataset}: num_classes must be a positive int, got {num_classes!r}")
        for where, names in sources:
            if len(names) != num_classes:
                raise ValueError(f"{dataset}: num_classes={num_classes} but {where} lists {len(names)} classes")
    for (wa, a), (wb, b) in zip(sources, sources[1:]):
        if len(a) != len(b):
            raise ValueError(f"{dataset}: {wa} lists {len(a)} classes but {wb} lists {len(b)}")
    if sources:
        return sources[0][1]
    if num_classes is not None:
        if default is not None and len(default) == num_classes:
            return list(default)
        return [f"class_{i}" for i in range(int(num_classes))]
    if default is None:
        raise ValueError(f"{dataset}: give num_classes= or class_names=, or write classes.txt "
                         f"(or a colour table, colors.txt / colors.json) beside the data")
    return list(default)
