"""Atomic checkpoints and RNG state capture.

:func:`atomic_save` writes to a temporary file in the same folder, flushes and fsyncs
it, then ``os.replace``s it over the target (atomic on POSIX and Windows), so a run
killed at any moment leaves either the previous checkpoint or the new one, never a
truncated file. Checkpoints hold only tensors and plain Python values (RNG states are
converted), so they load with ``torch.load(weights_only=True)``: no arbitrary
unpickling.

Contents of ``checkpoints/last.pt`` (see :mod:`pixreg.train.trainer`): ``step``,
``model``, ``criterion`` (centres, prototypes, step counter), ``optimizer``,
``scheduler``, ``scaler`` (AMP), ``rng`` (one entry per process: Python, NumPy, torch
CPU and CUDA), ``sampler`` (data order: seed, global batch size, dataset length),
``elapsed_s``, ``best``, ``config``.
"""
from __future__ import annotations

import os
import random
from typing import Any, Dict

import numpy as np
import torch

__all__ = ["atomic_save", "load_checkpoint", "rng_state", "set_rng_state"]


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` atomically (temporary file + fsync + ``os.replace``)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    try:  # persist the rename itself
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - e.g. Windows cannot open folders
        pass


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint written by the trainer (``weights_only=True``)."""
    return torch.load(os.fspath(path), map_location=map_location, weights_only=True)


def rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch (CPU and every CUDA device) RNG states as tensors/plain values."""
    version, py_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: Dict[str, Any] = {
        "python": [version, list(py_state), gauss],
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    version, py_state, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in py_state), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"])))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
