"""Run configuration: built-in defaults < YAML file < ``--set key.sub=value`` overrides.

A configuration is a plain nested ``dict``. :data:`DEFAULTS` lists every key the
trainer reads; a YAML file overrides some of them: a path, or the name of a configuration
shipped inside the package (:func:`builtin_configs`: ``scenes``, ``camvid``, ``camvid_frozen``; ``--config camvid``
works from an installed wheel, see :func:`find_config`), and ``--set`` overrides (values parsed as YAML: ``--set train.lr=0.01``,
``--set data.size=[64,64]``, ``--set methods.car.weight=0.5``) come last.

Unknown keys are errors (typos would otherwise be silently ignored), except below the
free-form sections listed in :data:`FREE_FORM` (model/data options and per-method
hyper-parameters, which are checked by the constructors that receive them).

>>> cfg = resolve_config(None, ["train.steps=10", "data.size=[32,32]"])
>>> cfg["train"]["steps"], cfg["data"]["size"]
(10, [32, 32])
"""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "DEFAULTS",
    "FREE_FORM",
    "RESUME_MUTABLE",
    "builtin_configs",
    "find_config",
    "load_yaml",
    "dump_yaml",
    "merge",
    "merge_layer",
    "parse_override",
    "apply_overrides",
    "resolve_config",
    "config_diff",
    "get",
]

#: Every key the trainer reads, with its default. The defaults are the embedded
#: ``scenes`` dataset setting of the built-in ``scenes`` configuration (a test keeps them equal): a
#: small FCN-ResNet-10 (width 16, OS 8) trained 800 steps of 8 images at 96x96 with
#: AdamW, about 40-70 s per run on 2 CPU cores (LALL is the slowest).
DEFAULTS: Dict[str, Any] = {
    "seed": 0,  # run seed: model init, data order, augmentation
    "method": "ce",  # "ce", "cplus1", "car", "lall", "rch" or a "+" combination ("car+lall")
    "device": "auto",  # cpu | cuda | auto
    "threads": None,  # torch.set_num_threads (None: leave torch's default)
    "data": {
        "name": "scenes",
        "root": None,
        "size": [96, 96],  # [H, W] training (and evaluation) size; None: the dataset's native size
        "eval_size": "same",  # "same" (= size), None (native) or [H, W]
        "seed": 0,  # dataset generation/augmentation seed (fixed across runs and methods)
        "augment": True,
        "cache_dir": None,
        "train_split": "train",
        "val_split": "val",
        "test_splits": ["test", "test_openset"],  # evaluated at the end of training, written to metrics.json
        "num_workers": 0,
        "opts": {"digits": [0, 1, 2, 3, 4]},  # extra keyword options of pixreg.data.build_dataset
        "features": None,  # frozen-encoder protocol: cached encoder features (pixreg.train.features)
    },
    "model": {
        "name": "fcn_resnet",
        "opts": {"width": 16, "depth": 10, "head_channels": 64},  # keyword options of pixreg.models.build_model
    },
    "train": {
        "steps": 800,
        "batch_size": 8,  # global batch (divided among processes under torchrun)
        "optimizer": "adamw",  # sgd | adamw
        "lr": 0.003,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "nesterov": False,
        "scheduler": "poly",  # poly | cosine | constant
        "poly_power": 0.9,
        "warmup_steps": 0,  # linear learning-rate warm-up
        "grad_clip": None,  # max global grad norm (None: off)
        "amp": False,  # autocast (bfloat16 on CPU, float16 on CUDA)
        "sync_bn": False,  # global BatchNorm under torchrun (SyncBatchNorm on CUDA, pixreg GlobalBatchNorm on CPU)
        "log_every": 1,  # rows of log.csv / TensorBoard points (every step by default)
        "ckpt_every": 100,  # steps between checkpoints (last.pt); the last step always saves
        "eval_every": 0,  # steps between validation passes (0: only at the end); best.pt tracks val mIoU
        "step_delay_s": 0.0,  # sleep per step (tests only: widens the window to kill a run)
    },
    "eval": {
        "batch_size": 16,
    },
    "ce_weight": 1.0,
    # Per-method options. Reserved keys: weight (multiplies the regularizer), warmup
    # (steps during which it is off), layer (feature layer; default: the model's
    # feature_layer), projection (null | "conv1x1": a training-only 1x1 conv on the
    # features, e.g. CAR's advice). Every other key goes to the loss constructor.
    "methods": {
        "cplus1": {"weight": 1.0, "warmup": 0},
        "car": {"weight": 1.0, "warmup": 0},
        "lall": {"weight": 1.0, "warmup": 0},
        "rch": {"weight": 1.0, "warmup": 0},
    },
}

#: Sections whose sub-keys are free-form (checked by whoever consumes them).
FREE_FORM = ("data.opts", "data.features", "model.opts", "methods")

#: Keys that may differ between a run's saved config and the config given to ``--resume``
#: (they do not change what is computed).
RESUME_MUTABLE = (
    "device",
    "threads",
    "data.root",
    "data.cache_dir",
    "data.features.cache_dir",
    "data.features.batch_size",
    "data.num_workers",
    "train.log_every",
    "train.ckpt_every",
    "train.step_delay_s",
    "eval.batch_size",
)


def _yaml():
    try:
        import yaml
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("configuration files need PyYAML: pip install 'pixreg[train]'") from err
    return yaml


def _config_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def builtin_configs() -> List[str]:
    """Names of the configurations shipped as package data (``pixreg/configs/NAME.yaml``).

    >>> builtin_configs()
    ['camvid', 'camvid_frozen', 'scenes']
    """
    return sorted(n[:-5] for n in os.listdir(_config_dir()) if n.endswith(".yaml"))


def find_config(name_or_path: str | os.PathLike) -> str:
    """The YAML file for ``--config``: an existing path, else a built-in name (``camvid``,
    ``camvid.yaml``, or the former repository path ``configs/camvid.yaml``).

    Raises ``FileNotFoundError`` naming the argument and the built-in names.

    >>> os.path.basename(find_config("camvid"))
    'camvid.yaml'
    """
    text = os.fspath(name_or_path)
    if os.path.isfile(text):
        return text
    stem = os.path.basename(text)
    stem = stem[:-5] if stem.endswith(".yaml") else stem
    parent = os.path.dirname(text)
    if parent in ("", "configs") and stem in builtin_configs():
        return os.path.join(_config_dir(), stem + ".yaml")
    raise FileNotFoundError(f"--config {text!r}: no such file, and not a built-in configuration "
                            f"(built-in: {', '.join(builtin_configs())})")


def load_yaml(path: str | os.PathLike) -> Dict[str, Any]:
    """Read a YAML mapping (an empty file gives ``{}``)."""
    with open(path, "r", encoding="utf-8") as f:
        data = _yaml().safe_load(f)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a configuration must be a YAML mapping, got {type(data).__name__}")
    return data


def dump_yaml(cfg: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML (atomically: temporary file then rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        _yaml().safe_dump(_plain(cfg), f, sort_keys=False, default_flow_style=None)
    os.replace(tmp, path)


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _is_free(path: str) -> bool:
    return any(path == f or path.startswith(f + ".") for f in FREE_FORM)


def merge(base: Mapping[str, Any], override: Mapping[str, Any], *, strict: bool = True, _path: str = "") -> Dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base``. With ``strict``, a key absent from
    ``base`` raises ``KeyError`` unless it lies in a :data:`FREE_FORM` section."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        key = str(key)
        path = f"{_path}.{key}" if _path else key
        if key not in out:
            if strict and not _is_free(path):
                known = ", ".join(sorted(out)) or "(none)"
                raise KeyError(f"unknown configuration key {path!r}; known keys here: {known}")
            out[key] = copy.deepcopy(value)
        elif isinstance(out[key], Mapping) and isinstance(value, Mapping):
            out[key] = merge(out[key], value, strict=strict, _path=path)
        elif isinstance(out[key], Mapping) and value is not None and not _is_free(path):
            raise TypeError(f"configuration key {path!r} is a section; got {value!r}")
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> Tuple[List[str], Any]:
    """``"train.lr=0.01"`` -> ``(["train", "lr"], 0.01)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {text!r}: bad key {key!r}")
    value = _yaml().safe_load(raw) if raw.strip() else None
    return key.split("."), value


def merge_layer(cfg: Mapping[str, Any], layer: Mapping[str, Any]) -> Dict[str, Any]:
    """:func:`merge` one configuration layer (a file, or all ``--set`` overrides), except that
    ``data.opts`` / ``model.opts`` belong to a dataset / model: when the layer changes
    ``data.name`` (``model.name``) the old options are dropped and only the layer's own
    options (if any) are kept."""
    base = copy.deepcopy(dict(cfg))
    for section in ("data", "model"):
        sec = layer.get(section)
        if isinstance(sec, Mapping) and "name" in sec and sec["name"] != base.get(section, {}).get("name"):
            base[section]["opts"] = {}
    return merge(base, layer)


def apply_overrides(cfg: Mapping[str, Any], overrides: Iterable[str]) -> Dict[str, Any]:
    """Apply ``key.sub=value`` overrides (see :func:`parse_override`) to a copy of ``cfg``
    (all of them form one layer, see :func:`merge_layer`)."""
    layer: Dict[str, Any] = {}
    for text in overrides or ():
        parts, value = parse_override(text)
        nested: Any = value
        for part in reversed(parts):
            nested = {part: nested}
        layer = merge(layer, nested, strict=False)
    return merge_layer(cfg, layer)


def resolve_config(path: Optional[str | os.PathLike], overrides: Sequence[str] = (), **top: Any) -> Dict[str, Any]:
    """Defaults < YAML file ``path`` (optional) < ``overrides`` < non-None ``top`` keys
    (e.g. ``method=``, ``seed=``, ``device=`` from dedicated command-line flags)."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        cfg = merge_layer(cfg, load_yaml(find_config(path)))
    cfg = apply_overrides(cfg, overrides)
    for key, value in top.items():
        if value is not None:
            cfg = merge(cfg, {key: value})
    validate(cfg)
    return cfg


def validate(cfg: Mapping[str, Any]) -> None:
    """Light type checks of the keys the trainer relies on (raises ``ValueError``)."""
    t = cfg["train"]
    for key in ("steps", "batch_size", "ckpt_every", "log_every"):
        if not isinstance(t[key], int) or isinstance(t[key], bool) or t[key] < 1:
            raise ValueError(f"train.{key} must be a positive int, got {t[key]!r}")
    if not isinstance(t["eval_every"], int) or t["eval_every"] < 0:
        raise ValueError(f"train.eval_every must be an int >= 0, got {t['eval_every']!r}")
    if not isinstance(cfg["seed"], int) or isinstance(cfg["seed"], bool):
        raise ValueError(f"seed must be an int, got {cfg['seed']!r}")
    if cfg["device"] not in ("cpu", "cuda", "auto") and not str(cfg["device"]).startswith("cuda:"):
        raise ValueError(f"device must be cpu, cuda or auto, got {cfg['device']!r}")
    if t["optimizer"] not in ("sgd", "adamw"):
        raise ValueError(f"train.optimizer must be sgd or adamw, got {t['optimizer']!r}")
    if t["scheduler"] not in ("poly", "cosine", "constant"):
        raise ValueError(f"train.scheduler must be poly, cosine or constant, got {t['scheduler']!r}")
    if not isinstance(cfg["methods"], Mapping):
        raise ValueError("methods must be a mapping name -> options")
    tests = cfg["data"]["test_splits"]
    if isinstance(tests, str) or not isinstance(tests, (list, tuple)):
        raise ValueError(f"data.test_splits must be a list of split names, got {tests!r}")


def get(cfg: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    """``get(cfg, "train.lr")``."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _flatten(cfg: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in cfg.items():
        path = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, path))
        else:
            out[path] = v
    return out


def config_diff(a: Mapping[str, Any], b: Mapping[str, Any], ignore: Sequence[str] = ()) -> List[str]:
    """Dotted keys whose values differ between ``a`` and ``b`` (lists compared as lists),
    skipping keys equal to or below any of ``ignore``."""
    fa, fb = _flatten(_plain(a)), _flatten(_plain(b))
    diffs = []
    for key in sorted(set(fa) | set(fb)):
        if any(key == i or key.startswith(i + ".") for i in ignore):
            continue
        if fa.get(key, "<absent>") != fb.get(key, "<absent>"):
            diffs.append(f"{key}: {fa.get(key, '<absent>')!r} != {fb.get(key, '<absent>')!r}")
    return diffs
