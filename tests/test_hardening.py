"""Bad settings fail before training, every CLI failure is one line (exit 2), checkpoints
are checked, stale temporaries are removed, degenerate runs are warned about, and the
library accepts half/bfloat16/float64 inputs and refuses bad labels and class weights.

The CLI cases run in-process (``pixreg.cli.main``) to keep the suite fast."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("yaml")
pytest.importorskip("torchmetrics")

from test_cli import set_args, tiny  # noqa: E402  (run helpers; fixtures in conftest.py)

import pixreg  # noqa: E402
from pixreg.cli import main  # noqa: E402
from pixreg.train.checkpoint import CheckpointError, load_checkpoint, remove_stale_temporaries  # noqa: E402
from pixreg.train.config import ConfigError, resolve_config  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache):
    """A finished tiny run (4 steps) to evaluate and resume."""
    out = str(tmp_path_factory.mktemp("runs") / "run")
    assert main(["train", "--out", out, "--no-progress"] + set_args(tiny(cache, steps=4))) == 0
    return out


def one_line_error(capsys, code, *fragments):
    """The command failed with exit 2 and one stderr line holding every fragment, no traceback."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [line for line in err.splitlines() if "Warning" not in line and line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("override, fragment", [
    ("train.lr=abc", "train.lr must be a finite number > 0, got 'abc'"),
    ("train.lr=-0.1", "train.lr"),
    ("data.size=32", "data.size must be [H, W]"),
    ("data.size=[32, 0]", "data.size"),
    ("data.eval_size=[32]", "data.eval_size"),
    ("train.grad_clip=-1", "train.grad_clip must be null"),
    ("train.grad_clip=0", "train.grad_clip"),
    ("train.warmup_steps=-3", "train.warmup_steps must be an int >= 0"),
    ("threads=0", "threads must be an int >= 1"),
    ("ce_weight=.nan", "ce_weight must be a finite number >= 0, got nan"),
    ("ce_weight=-1", "ce_weight"),
    ("class_weight=[1, .nan, 1]", "class_weight"),
    ("class_weight=[1, -1]", "class_weight"),
    ("train.momentum=1.5", "train.momentum"),
    ("train.weight_decay=.inf", "train.weight_decay"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("train.amp=yes please", "train.amp must be true or false"),
    ("methods.car.weight=.nan", "methods.car.weight"),
    ("methods.rch.loss_weight=-2", "methods.rch.loss_weight"),
    ("methods.car.warmup=-5", "methods.car.warmup"),
    ("data.test_splits=test", "data.test_splits must be a list"),
    ("data.test_splits=[test, test]", "data.test_splits"),
    ("device=gpu", "device must be cpu, cuda, cuda:N or auto"),
    ("data.num_workers=-1", "data.num_workers"),
])
def test_invalid_settings_are_refused_naming_the_key(override, fragment):
    with pytest.raises(ConfigError) as info:
        resolve_config(None, [override])
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_every_problem_is_reported_at_once_and_numeric_strings_are_numbers():
    with pytest.raises(ConfigError) as info:
        resolve_config(None, ["train.lr=abc", "threads=-2", "train.grad_clip=-1"])
    assert [p.split()[0] for p in info.value.problems] == ["threads", "train.lr", "train.grad_clip"]
    cfg = resolve_config(None, ["train.lr=1e-3", "train.grad_clip=1", "class_weight=[1, '2', 0.5]"])
    assert cfg["train"]["lr"] == 0.001 and isinstance(cfg["train"]["lr"], float)  # PyYAML reads 1e-3 as a string
    assert cfg["class_weight"] == [1.0, 2.0, 0.5]


# ----------------------------------------------------------------------------- CLI: one line, exit 2
def _yaml_file(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


CLI_CASES = {
    "yaml syntax": (lambda t: ["train", "--config", _yaml_file(t, "train:\n  lr: [1,\n")], ["cfg.yaml", "invalid YAML at line"]),
    "python tag": (lambda t: ["train", "--config", _yaml_file(t, f"seed: !!python/object/apply:os.system ['touch {t}/pwned']\n")],
                   ["cfg.yaml", "Python tags are not allowed"]),
    "threads -2": (lambda t: ["train", "--threads", "-2"], ["argument --threads", "-2"]),
    "out under a file": (lambda t: ["train", "--out", "/etc/hostname/run"], ["--out", "/etc/hostname is a file"]),
    "empty methods": (lambda t: ["compare", "--methods", ""], ["--methods"]),
    "bad seed list": (lambda t: ["compare", "--seed-list", "1,x"], ["--seed-list"]),
    "lr abc": (lambda t: ["train", "--set", "train.lr=abc"], ["train.lr", "'abc'"]),
    "size 32": (lambda t: ["train", "--set", "data.size=32"], ["data.size", "got 32"]),
    "bad override yaml": (lambda t: ["train", "--set", "train.lr=[1,"], ["override 'train.lr=[1,'"]),
    "unknown key": (lambda t: ["train", "--set", "train.bogus=1"], ["train.bogus"]),
    "resume without run": (lambda t: ["train", "--resume", "--out", str(t / "none")], ["--resume", "holds no run"]),
    "eval not a run": (lambda t: ["eval", str(t)], ["config.yaml not found"]),
    "diagnose out under a file": (lambda t: ["diagnose", str(t), "--out", "/etc/hostname/d"], ["--out"]),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_failures_are_one_line_exit_2(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written: not even a default runs/ folder
    argv, fragments = CLI_CASES[case]
    argv = argv(tmp_path)
    one_line_error(capsys, main(argv + ["--no-progress"] if argv[0] != "diagnose" else argv), *fragments)
    assert sorted(os.listdir(tmp_path)) in ([], ["cfg.yaml"])  # no run folder, no executed YAML tag


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_one_line(tmp_path, capsys):
    code = main(["train", "--device", "cuda", "--out", str(tmp_path / "r"), "--no-progress"])
    one_line_error(capsys, code, "device='cuda'", "CUDA is not available")
    assert not os.path.exists(tmp_path / "r")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="train.lr"):
        main(["train", "--debug", "--set", "train.lr=abc", "--out", str(tmp_path / "r")])
    with pytest.raises(ValueError, match="train.lr"):
        main(["--debug", "train", "--set", "train.lr=abc", "--out", str(tmp_path / "r")])


def test_unexpected_errors_are_one_line_with_their_type(tmp_path, capsys, monkeypatch):
    import pixreg.train.trainer as trainer

    def boom(*a, **k):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(trainer, "train", boom)
    line = one_line_error(capsys, main(["train", "--out", str(tmp_path / "r")]), "RuntimeError: something broke", "--debug")
    assert line.startswith("pixreg train: error:")


# ----------------------------------------------------------------------------- nothing written before the checks pass
def _folder_dataset(root, splits, value=1):
    """A 2-class folder dataset (4 images of 16x16 per split); ``value`` fills every mask."""
    from PIL import Image

    for d in ("images", "masks", "splits"):
        os.makedirs(root / d, exist_ok=True)
    (root / "classes.txt").write_text("a\nb\n")
    rng = np.random.default_rng(0)
    for split in splits:
        stems = [f"{split}{i}" for i in range(4)]
        (root / "splits" / f"{split}.txt").write_text("\n".join(stems) + "\n")
        for s in stems:
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "images" / f"{s}.png")
            mask = np.full((16, 16), value, dtype=np.uint8)
            mask[:8] = value if value == 255 else 0
            Image.fromarray(mask, mode="L").save(root / "masks" / f"{s}.png")
    return str(root)


FOLDER_RUN = ["data.size=[16,16]", "model.opts={width: 4, depth: 10, head_channels: 8}", "train.steps=2",
              "train.batch_size=2", "eval.batch_size=4", "threads=1", "data.augment=false"]


def test_missing_splits_fail_before_anything_is_written(tmp_path, cache, capsys):
    out = tmp_path / "r"
    code = main(["train", "--out", str(out), "--no-progress"] + set_args(tiny(cache) + ["data.test_splits=[nope]"]))
    one_line_error(capsys, code, "data.test_splits", "'nope'")
    assert not out.exists()
    # data.name=folder keeps the scenes default test_openset split: refused up front, naming the key
    root = _folder_dataset(tmp_path / "data", ["train", "val", "test"])
    code = main(["train", "--out", str(out), "--no-progress"] + set_args(FOLDER_RUN + ["data.name=folder", f"data.root={root}"]))
    one_line_error(capsys, code, "data.test_splits", "'test_openset'")
    assert not out.exists()
    code = main(["train", "--out", str(out), "--no-progress"]
                + set_args(FOLDER_RUN + ["data.name=folder", f"data.root={root}", "data.test_splits=[test]", "class_weight=[1, 2, 3]"]))
    one_line_error(capsys, code, "class_weight has 3 entries", "2 classes")
    assert not out.exists()


def test_compare_checks_every_method_before_the_first_run(tmp_path, cache, capsys):
    out = tmp_path / "cmp"
    # ce would train fine; car's bad option must stop the comparison before ce's run starts
    code = main(["compare", "--methods", "ce,car", "--seeds", "1", "--out", str(out), "--no-progress"]
                + set_args(tiny(cache) + ["methods.car.eps0=-1"]))
    one_line_error(capsys, code, "methods.car")
    assert not out.exists()


def test_a_users_config_yaml_is_never_overwritten(tmp_path, cache, capsys):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "config.yaml").write_text("train:\n  steps: 4\n")
    for extra in ([], ["--overwrite"], ["--resume"]):
        code = main(["train", "--config", str(out / "config.yaml"), "--out", str(out), "--no-progress"] + extra
                    + set_args(tiny(cache)))
        one_line_error(capsys, code, str(out))
        assert (out / "config.yaml").read_text() == "train:\n  steps: 4\n" and os.listdir(out) == ["config.yaml"]


# ----------------------------------------------------------------------------- checkpoints
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bad_checkpoints(tmp_path, run):
    from pixreg.models import build_model

    paths = {}
    paths["text"] = tmp_path / "notes.pt"
    paths["text"].write_text("not a checkpoint\n")
    paths["empty"] = tmp_path / "empty.pt"
    paths["empty"].write_bytes(b"")
    good = open(os.path.join(run, "checkpoints", "last.pt"), "rb").read()
    paths["truncated"] = tmp_path / "truncated.pt"
    paths["truncated"].write_bytes(good[: len(good) // 2])
    paths["state_dict"] = tmp_path / "state_dict.pt"
    torch.save(torch.load(os.path.join(run, "checkpoints", "last.pt"), weights_only=True)["model"], paths["state_dict"])
    paths["architecture"] = tmp_path / "other.pt"
    torch.save({"model": build_model("fcn_resnet", 4, width=8, depth=10, head_channels=8).state_dict(), "step": 1},
               paths["architecture"])
    paths["pickle"] = tmp_path / "evil.pt"
    with open(paths["pickle"], "wb") as f:
        pickle.dump({"model": _Evil(str(tmp_path / "pwned")), "step": 1}, f)
    paths["torch pickle"] = tmp_path / "evil2.pt"
    torch.save({"model": _Evil(str(tmp_path / "pwned")), "step": 1}, paths["torch pickle"])
    return paths


EXPECTED = {"text": "not a readable torch checkpoint", "empty": "not a readable torch checkpoint",
            "truncated": "not a readable torch checkpoint", "state_dict": "not a pixreg checkpoint",
            "architecture": "does not match this run's model", "pickle": "not a readable torch checkpoint",
            "torch pickle": "refused: it references the Python object"}


def test_bad_checkpoints_are_one_line_naming_the_file(tmp_path, run, cache, capsys):
    paths = _bad_checkpoints(tmp_path, run)
    for kind, path in paths.items():
        code = main(["eval", run, "--checkpoint", str(path), "--splits", "val", "--no-progress",
                     "--set", f"data.cache_dir={cache}"])
        line = one_line_error(capsys, code, str(path), EXPECTED[kind])
        assert "weights_only=False" not in line and "weights_only` set to `False" not in line, line
    assert not (tmp_path / "pwned").exists()  # the pickled call never ran
    code = main(["eval", run, "--splits", "val,nope", "--no-progress", "--set", f"data.cache_dir={cache}"])
    one_line_error(capsys, code, "--splits", "'nope'")
    with pytest.raises(CheckpointError, match="not a pixreg checkpoint"):  # a ValueError, for library callers
        load_checkpoint(paths["state_dict"], required=("model",))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------- stale temporaries
def test_stale_temporaries_are_removed_when_a_run_starts_or_resumes(run, cache, tmp_path, capsys):
    ckpt = os.path.join(run, "checkpoints")
    planted = [os.path.join(ckpt, ".last.pt.tmp12345"), os.path.join(ckpt, ".best.pt.tmp7"),
               os.path.join(run, "val.csv.tmp"), os.path.join(run, "log.csv.tmp"), os.path.join(run, "metrics.json.tmp99")]
    kept = [os.path.join(run, "notes.txt"), os.path.join(run, "my.tmp"), os.path.join(ckpt, "last.pt")]
    for p in planted + kept[:2]:
        with open(p, "w") as f:
            f.write("x")
    assert main(["train", "--out", run, "--resume", "--no-progress"] + set_args(tiny(cache, steps=4))) == 0
    assert [p for p in planted if os.path.exists(p)] == [] and all(os.path.exists(p) for p in kept)
    assert "removed" in capsys.readouterr().out
    # a run killed before its first checkpoint: starting it again cleans its leftovers too
    fresh = tmp_path / "fresh"
    (fresh / "checkpoints").mkdir(parents=True)
    (fresh / "config.yaml").write_text(open(os.path.join(run, "config.yaml")).read())
    (fresh / "checkpoints" / ".last.pt.tmp42").write_text("x")
    (fresh / "val.csv.tmp").write_text("x")
    assert main(["train", "--out", str(fresh), "--resume", "--no-progress"] + set_args(tiny(cache, steps=4))) == 0
    assert not (fresh / "val.csv.tmp").exists() and not (fresh / "checkpoints" / ".last.pt.tmp42").exists()
    (fresh / "checkpoints" / ".best.pt.tmp1").write_text("x")
    assert remove_stale_temporaries(fresh) == [str(fresh / "checkpoints" / ".best.pt.tmp1")]


# ----------------------------------------------------------------------------- degenerate runs
def test_all_void_data_and_zero_loss_are_warned(tmp_path, capsys):
    root = _folder_dataset(tmp_path / "void", ["train", "val", "test"], value=255)
    over = FOLDER_RUN + ["data.name=folder", f"data.root={root}", "data.test_splits=[test]"]
    assert main(["train", "--out", str(tmp_path / "r1"), "--no-progress"] + set_args(over)) == 0
    out = capsys.readouterr().out
    assert "training split 'train' is ignore_index (an all-void dataset)" in out  # before training (pre-flight scan)
    assert "step(s) trained was ignore_index=255 (an all-void dataset?)" in out  # after it, also in metrics.json
    warned = json.load(open(tmp_path / "r1" / "metrics.json"))["warnings"]
    assert len(warned) == 1 and "ignore_index=255" in warned[0]
    root = _folder_dataset(tmp_path / "ok", ["train", "val", "test"], value=1)
    over = FOLDER_RUN + ["data.name=folder", f"data.root={root}", "data.test_splits=[test]"]
    assert main(["train", "--out", str(tmp_path / "r2"), "--no-progress"] + set_args(over + ["ce_weight=0"])) == 0
    assert "loss was 0 at every" in capsys.readouterr().out
    assert main(["train", "--out", str(tmp_path / "r3"), "--no-progress"] + set_args(over)) == 0
    assert "warning" not in capsys.readouterr().out
    assert "warnings" not in json.load(open(tmp_path / "r3" / "metrics.json"))


# ----------------------------------------------------------------------------- library
def test_car_refuses_numpy_labels_with_a_type_error():
    car = pixreg.CARLoss(num_classes=3)
    labels = np.zeros((2, 4, 4), dtype=np.int64)
    with pytest.raises(TypeError, match="`labels` must be a torch.Tensor, got ndarray"):
        car(torch.randn(2, 5, 4, 4), labels)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_rch_and_criterion_cast_inputs_to_their_float32_parameters(dtype):
    torch.manual_seed(0)
    feats, logits, labels = torch.randn(2, 6, 5, 5), torch.randn(2, 3, 5, 5), torch.randint(0, 3, (2, 5, 5))
    feats, logits = feats.to(dtype), logits.to(dtype)  # values representable in `dtype`
    rch = pixreg.RCHLoss(num_classes=3, feature_dim=6, embed_dim=4).eval()
    assert torch.equal(rch(feats, logits, labels), rch(feats.float(), logits.float(), labels))
    crit = pixreg.RegularizedCriterion({"car": pixreg.Term(pixreg.CARLoss(num_classes=3), projection=torch.nn.Conv2d(6, 4, 1)),
                                        "rch": pixreg.Term(rch)}).eval()
    low = crit(logits, labels, features=feats).total
    ref = crit(logits.float(), labels, features=feats.float()).total
    assert torch.isfinite(low) and float(low) == pytest.approx(float(ref), rel=1e-6 if dtype != torch.float64 else 1e-5)


def test_class_weight_is_checked_at_construction():
    car = pixreg.CARLoss(num_classes=4)
    with pytest.raises(ValueError, match="has 3 entries but regularizer 'car' has num_classes=4"):
        pixreg.RegularizedCriterion({"car": car}, class_weight=[1.0, 1.0, 1.0])
    for bad in ([1.0, float("nan"), 1.0, 1.0], [1.0, -1.0, 1.0, 1.0], [0.0] * 4, [[1.0, 1.0]]):
        with pytest.raises(ValueError, match="class_weight"):
            pixreg.RegularizedCriterion({"car": car}, class_weight=bad)
    crit = pixreg.RegularizedCriterion({}, class_weight=[1.0, 2.0, 1.0])  # no regularizer: checked against the logits
    with pytest.raises(ValueError, match="`logits` have K=4"):
        crit(torch.randn(1, 4, 3, 3), torch.zeros(1, 3, 3, dtype=torch.long))
