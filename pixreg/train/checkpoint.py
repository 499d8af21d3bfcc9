"""Atomic checkpoints and RNG state capture.

:func:`atomic_save` writes to a temporary file in the same folder, flushes and fsyncs
it, then ``os.replace``s it over the target (atomic on POSIX and Windows), so a run
killed at any moment leaves either the previous checkpoint or the new one, never a
truncated file. Checkpoints hold only tensors and plain Python values (RNG states are
converted), so they load with ``torch.load(weights_only=True)``: no arbitrary
unpickling.

Contents of ``checkpoints/last.pt`` (written by :class:`pixreg.train.run.Run`): ``step``,
``model``, ``criterion`` (centres, prototypes, step counter), ``optimizer``,
``scheduler``, ``scaler`` (AMP), ``rng`` (one entry per process: Python, NumPy, torch
CPU and CUDA), ``sampler`` (data order: seed, global batch size, dataset length),
``elapsed_s``, ``best``, ``config``.
"""
from __future__ import annotations

import os
import pickle
import random
import re
from typing import Any, Dict, List

import numpy as np
import torch

__all__ = ["atomic_save", "load_checkpoint", "load_state", "CheckpointError", "rng_state", "set_rng_state",
           "remove_stale_temporaries"]


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


class CheckpointError(ValueError):
    """A file that is not a readable pixreg checkpoint, or one that does not fit the model."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", *, required: tuple = ()) -> Dict[str, Any]:
    """Load a checkpoint written by the trainer (``weights_only=True``: nothing is unpickled
    but tensors and plain values, so no code in the file can run).

    Raises ``FileNotFoundError`` for a missing file and :class:`CheckpointError` (a
    ``ValueError``) naming ``path`` for a file torch cannot read (text, truncated, empty), a pickle holding other objects (refused,
    never executed) and a dict without the ``required`` entries (e.g. a plain ``state_dict``).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found:  # torch's message would advise weights_only=False: the wrong advice for an untrusted file
            raise CheckpointError(
                f"checkpoint {path}: refused: it references the Python object {found.group(1)} (code or a custom "
                "class), and pixreg reads only tensors and plain values; only checkpoints written by pixreg are accepted"
            ) from None
        raise CheckpointError(f"checkpoint {path}: not a readable torch checkpoint (not written by torch.save, "
                              "or not a checkpoint at all)") from None
    except Exception as err:  # text, empty or truncated files fail in many ways inside torch.load
        raise CheckpointError(f"checkpoint {path}: not a readable torch checkpoint (a text, empty, truncated or "
                              f"corrupt file; torch.load said {type(err).__name__}: {_first_line(err)[:160]})") from None
    if not isinstance(obj, dict) or any(k not in obj for k in required):
        have = sorted(map(str, obj))[:6] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"checkpoint {path}: not a pixreg checkpoint: expected the entries {list(required)} "
            f"(a dict written by pixreg train), got {have}" + (" (a plain state_dict?)" if isinstance(obj, dict) else "")
        )
    return obj


def load_state(module: torch.nn.Module, state: Any, path: str, what: str = "model") -> None:
    """``module.load_state_dict(state)`` with one clear error naming ``path`` when the
    checkpoint was written for another architecture (missing/unexpected keys, other shapes)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: {what!r} entry is a {type(state).__name__}, not a state_dict")
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing key(s) (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected key(s) (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(shapes)} shape mismatch(es) (e.g. {shapes[0]})" if shapes else ""]
        raise CheckpointError(f"checkpoint {path}: its {what} does not match this run's {what} (another architecture, "
                              "number of classes or method?): " + ", ".join(p for p in parts if p))
    module.load_state_dict(state)


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


def remove_stale_temporaries(run_dir: str | os.PathLike) -> List[str]:
    """Delete the temporary files a killed run can leave in ``run_dir`` and its
    ``checkpoints/`` folder (``.last.pt.tmp<pid>``, ``val.csv.tmp``, ``metrics.json.tmp<pid>``,
    ...: every write goes to such a file and is renamed over its target, so they are never
    the only copy of anything). Returns the removed paths."""
    removed = []
    for folder in (os.fspath(run_dir), os.path.join(os.fspath(run_dir), "checkpoints")):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if _TMP.fullmatch(name) and os.path.isfile(path):
                try:
                    os.remove(path)
                    removed.append(path)
                except OSError:  # pragma: no cover - e.g. removed concurrently
                    pass
    return removed


#: Temporary names written by atomic_save (".NAME.tmpPID"), dump_yaml / write_json ("NAME.tmpPID") and CSVLog ("NAME.tmp").
_TMP = re.compile(r"\.?[\w.-]+\.(pt|yaml|json|csv)\.tmp\d*")
