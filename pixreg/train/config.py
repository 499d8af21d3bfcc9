"""Run configuration: built-in defaults < YAML file < ``--set key.sub=value`` overrides.

A configuration is a plain nested ``dict``. :data:`DEFAULTS` lists every key the
trainer reads; a YAML file overrides some of them: a path, or the name of a configuration
shipped inside the package (:func:`builtin_configs`: ``scenes``, ``camvid``, ``camvid_frozen``; ``--config camvid``
works from an installed wheel, see :func:`find_config`), and ``--set`` overrides (values parsed as YAML: ``--set train.lr=0.01``,
``--set data.size=[64,64]``, ``--set methods.car.loss_weight=0.5``) come last.

Unknown keys are errors (typos would otherwise be silently ignored), except below the
free-form sections listed in :data:`FREE_FORM` (model/data options and per-method
hyper-parameters, which are checked by the constructors that receive them).

>>> cfg = resolve_config(None, ["train.steps=10", "data.size=[32,32]"])
>>> cfg["train"]["steps"], cfg["data"]["size"]
(10, [32, 32])
"""
from __future__ import annotations

import copy
import math
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
    "validate",
    "ConfigError",
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
        "check": True,  # read every sample once before training (pixreg.data.preflight); false: skip
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
    "class_weight": None,  # optional CE class weights: a list of K numbers >= 0 (e.g. median-frequency on CamVid)
    # Per-method options (pixreg.train.methods.RESERVED): loss_weight (the one multiplier of
    # the regularizer: RCH's 0.1 is the paper's lambda), warmup (steps during which it is
    # off), layer (feature layer; default: the model's feature_layer), projection (null |
    # "conv1x1" | "conv3x3": a training-only conv on the features, e.g. CAR's advice) and
    # projection_dim (its outputs). Every other key goes to the loss constructor. The old key
    # `weight` is multiplied into loss_weight, with a DeprecationWarning.
    "methods": {
        "cplus1": {"loss_weight": 1.0, "warmup": 0},
        "car": {"loss_weight": 1.0, "warmup": 0},
        "lall": {"loss_weight": 1.0, "warmup": 0},
        "rch": {"loss_weight": 0.1, "warmup": 0},
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
    "data.check",
    "train.log_every",
    "train.ckpt_every",
    "train.step_delay_s",
    "eval.batch_size",
)


def _yaml():
    try:
        import yaml
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("configuration files need PyYAML: install pixreg's 'train' extra (pip install -e '.[train]' in a checkout) or pip install pyyaml") from err
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
    yaml = _yaml()
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a text (UTF-8) file: {err.reason} at byte {err.start}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: {_yaml_problem(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a configuration must be a YAML mapping, got {type(data).__name__}")
    return data


def _yaml_problem(err: Exception) -> str:
    """One line for a PyYAML error: what and where (``!!python/object`` tags are refused by
    ``safe_load``: nothing in a configuration is ever executed or instantiated)."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    if "python/" in str(err) or "could not determine a constructor" in str(problem):
        return f"invalid YAML{where}: {problem} (Python tags are not allowed: configurations are plain data)"
    return f"invalid YAML{where}: {problem}"


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
    yaml = _yaml()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ValueError(f"override {text!r}: {_yaml_problem(err)}") from None
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
    return resolve_methods(cfg)


def resolve_methods(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """A copy of ``cfg`` whose ``methods.<name>`` each show one effective ``loss_weight``
    (see :func:`pixreg.train.methods.resolve_method_options`: the deprecated ``weight`` key
    is folded in). Also applied to a saved run's configuration before it is compared."""
    from .methods import METHODS, resolve_method_options

    out = copy.deepcopy(dict(cfg))
    methods = out.get("methods")
    if isinstance(methods, Mapping):
        out["methods"] = {
            name: resolve_method_options(name, opts) if name in METHODS and isinstance(opts, Mapping) else opts
            for name, opts in methods.items()
        }
    return out


class ConfigError(ValueError):
    """An invalid configuration: every problem found, each naming its dotted key."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration: " + "; ".join(self.problems))


def _number(value: Any) -> Optional[float]:
    """``value`` as a float when it is a real number or a numeric string (PyYAML reads
    ``1e-3`` as a string), else ``None``. Booleans are not numbers."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


class _Checker:
    """Collects the problems of one configuration (see :func:`validate`)."""

    def __init__(self, cfg: Dict[str, Any]) -> None:
        self.cfg = cfg
        self.problems: List[str] = []

    def value(self, key: str) -> Any:
        return get(self.cfg, key)

    def bad(self, key: str, want: str, value: Any) -> None:
        self.problems.append(f"{key} must be {want}, got {value!r}")

    def real(self, key: str, *, lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False,
             hi_open: bool = False, none: bool = False, want: Optional[str] = None) -> None:
        """A finite real number in the range; a numeric string is converted in place."""
        v = self.value(key)
        if v is None and none:
            return
        x = _number(v)
        ok = x is not None and math.isfinite(x)
        ok = ok and (lo is None or (x > lo if lo_open else x >= lo)) and (hi is None or (x < hi if hi_open else x <= hi))
        if not ok:
            if want is None:
                rng = [f"{'>' if lo_open else '>='} {lo:g}" if lo is not None else "",
                       f"{'<' if hi_open else '<='} {hi:g}" if hi is not None else ""]
                want = "a finite number" + (" " + " and ".join(r for r in rng if r) if any(rng) else "")
                want += " or null" if none else ""
            self.bad(key, want, v)
        elif isinstance(v, str):
            self._set(key, x)

    def integer(self, key: str, lo: Optional[int] = None, *, none: bool = False) -> None:
        v = self.value(key)
        if v is None and none:
            return
        if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo):
            self.bad(key, "an int" + (f" >= {lo}" if lo is not None else "") + (" or null" if none else ""), v)

    def flag(self, key: str) -> None:
        if not isinstance(self.value(key), bool):
            self.bad(key, "true or false", self.value(key))

    def text(self, key: str, *, none: bool = False, choices: Sequence[str] = ()) -> None:
        v = self.value(key)
        if v is None and none:
            return
        if not isinstance(v, str) or not v or (choices and v not in choices):
            self.bad(key, "one of " + ", ".join(choices) if choices else "a non-empty string" + (" or null" if none else ""), v)

    def size(self, key: str, *, extra: Sequence[Any] = ()) -> None:
        v = self.value(key)
        if v is None or any(v == e for e in extra if isinstance(v, str)):
            return
        if not (isinstance(v, (list, tuple)) and len(v) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in v)):
            alts = "".join(f", {e!r}" for e in extra)
            self.bad(key, f"[H, W] (two positive ints, e.g. [96, 96]){alts} or null", v)

    def mapping(self, key: str) -> bool:
        v = self.value(key)
        if v is None:
            return True
        if not isinstance(v, Mapping):
            self.bad(key, "a mapping", v)
            return False
        return True

    def _set(self, key: str, value: Any) -> None:
        *parents, last = key.split(".")
        node = self.cfg
        for part in parents:
            node = node[part]
        node[last] = value


def validate(cfg: Dict[str, Any]) -> None:
    """Check every key the trainer reads: types, ranges and signs, all at once.

    Raises :class:`ConfigError` (a ``ValueError``) listing every problem with its dotted
    key (``train.lr must be a finite number > 0, got 'abc'``). Numeric strings such as
    ``1e-3`` (a string for PyYAML) are converted to floats in place. ``train.grad_clip``
    is ``null`` (off) or a positive max norm: 0 or a negative value (sometimes meant as
    "off") is refused rather than guessed. Dataset-dependent checks (that the splits
    exist, ``class_weight`` has one entry per class) are made when the dataset is built,
    still before anything is written (:func:`pixreg.train.checks.preflight`).
    """
    c = _Checker(cfg)
    c.integer("seed")
    c.text("method")
    device = cfg.get("device")
    if not (device in ("cpu", "cuda", "auto") or (isinstance(device, str) and device.startswith("cuda:")
                                                  and device[5:].isdigit())):
        c.bad("device", "cpu, cuda, cuda:N or auto", device)
    c.integer("threads", 1, none=True)
    c.text("data.name")
    c.text("data.root", none=True)
    c.size("data.size")
    c.size("data.eval_size", extra=("same",))
    c.integer("data.seed")
    c.flag("data.augment")
    c.flag("data.check")
    c.text("data.cache_dir", none=True)
    c.text("data.train_split")
    c.text("data.val_split")
    tests = get(cfg, "data.test_splits")
    if not isinstance(tests, (list, tuple)) or not all(isinstance(s, str) and s for s in tests):
        c.bad("data.test_splits", "a list of split names, e.g. [test]", tests)
    elif len(set(tests)) != len(tests):
        c.bad("data.test_splits", "a list without repeated names", tests)
    c.integer("data.num_workers", 0)
    c.mapping("data.opts")
    c.text("model.name")
    c.mapping("model.opts")
    for key in ("steps", "batch_size", "ckpt_every", "log_every"):
        c.integer(f"train.{key}", 1)
    for key in ("eval_every", "warmup_steps"):
        c.integer(f"train.{key}", 0)
    c.text("train.optimizer", choices=("sgd", "adamw"))
    c.text("train.scheduler", choices=("poly", "cosine", "constant"))
    c.real("train.lr", lo=0, lo_open=True)
    c.real("train.momentum", lo=0, hi=1, hi_open=True)
    c.real("train.weight_decay", lo=0)
    c.real("train.poly_power", lo=0)
    c.real("train.grad_clip", lo=0, lo_open=True, none=True,
           want="null (no clipping) or a finite max norm > 0 (0 and negative values are refused, not read as 'off')")
    c.real("train.step_delay_s", lo=0)
    for key in ("nesterov", "amp", "sync_bn"):
        c.flag(f"train.{key}")
    c.integer("eval.batch_size", 1)
    c.real("ce_weight", lo=0)
    weights = cfg.get("class_weight")
    if weights is not None:
        nums = [_number(w) for w in weights] if isinstance(weights, (list, tuple)) and weights else [None]
        if any(x is None or not math.isfinite(x) or x < 0 for x in nums):
            c.bad("class_weight", "null or a list of finite numbers >= 0, one per class", weights)
        else:
            cfg["class_weight"] = nums
    if c.mapping("methods"):
        _check_methods(c)
    if c.problems:
        raise ConfigError(c.problems)


def _check_methods(c: _Checker) -> None:
    for name, opts in (c.cfg.get("methods") or {}).items():
        if not c.mapping(f"methods.{name}"):
            continue
        for key in ("weight", "loss_weight"):
            if key in (opts or {}):
                c.real(f"methods.{name}.{key}", lo=0)
        if "warmup" in (opts or {}):
            c.integer(f"methods.{name}.warmup", 0)


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
