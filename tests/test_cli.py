"""The ``pixreg`` command line: configuration, method registry, metrics, data order, and a
tiny end-to-end ``train`` + ``eval`` on CPU."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("yaml")
pytest.importorskip("torchmetrics")

from pixreg.cli import main  # noqa: E402
from pixreg.train.config import DEFAULTS, config_diff, parse_override, resolve_config  # noqa: E402
from pixreg.train.data import StepBatchSampler, epoch_permutation  # noqa: E402
from pixreg.train.methods import build_criterion, method_slug, parse_method  # noqa: E402
from pixreg.train.metrics import SegmentationMetrics  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(cache: str, steps: int = 6) -> list:
    """Overrides for a run of a second or so: 32x32 scenes, 12 images per split, 3 digits."""
    return [
        "data.size=[32,32]", "data.opts={digits: [0, 1, 2], num_images: 12}",
        "model.opts={width: 4, depth: 10, head_channels: 8}", f"train.steps={steps}", "train.batch_size=4",
        "train.ckpt_every=3", "eval.batch_size=8", "threads=1", f"data.cache_dir={cache}",
    ]


def set_args(overrides):
    return [a for o in overrides for a in ("--set", o)]


# ----------------------------------------------------------------------------- configuration
def test_scenes_yaml_equals_builtin_defaults():
    assert config_diff(resolve_config("scenes"), resolve_config(None)) == []


def test_camvid_yaml_resolves_without_scenes_options():
    cfg = resolve_config("camvid")
    assert cfg["data"]["name"] == "camvid" and cfg["data"]["opts"] == {}  # scenes' digits not inherited
    assert cfg["model"]["opts"]["width"] == 32


def test_builtin_configs_by_name_or_former_path(tmp_path, monkeypatch):
    from pixreg.train.config import builtin_configs, find_config

    assert builtin_configs() == ["camvid", "camvid_frozen", "scenes"]
    packaged = find_config("camvid")
    assert os.path.isfile(packaged) and os.path.dirname(packaged).endswith(os.path.join("pixreg", "configs"))
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: names resolve to the package data
    assert find_config("configs/camvid.yaml") == packaged == find_config("camvid.yaml")
    (tmp_path / "camvid").write_text("seed: 3\n")  # an existing file wins over a built-in name
    assert find_config("camvid") == "camvid" and resolve_config("camvid")["seed"] == 3
    with pytest.raises(FileNotFoundError, match=r"--config 'nosuch'.*built-in: camvid, camvid_frozen, scenes"):
        resolve_config("nosuch")
    with pytest.raises(FileNotFoundError, match="elsewhere/camvid.yaml"):
        find_config("elsewhere/camvid.yaml")  # a real path is never silently replaced


def test_config_help_names_every_builtin_config():
    from pixreg.cli import build_parser
    from pixreg.train.config import builtin_configs

    sub = next(a for a in build_parser()._actions if a.choices and "train" in a.choices).choices
    for command in ("train", "compare"):
        text = " ".join(sub[command].format_help().split())
        assert all(name in text for name in builtin_configs())


def test_overrides_are_yaml_and_checked():
    cfg = resolve_config(None, ["train.lr=0.5", "data.size=[40, 48]", "methods.car.eps0=0.3", "model.opts.width=8"])
    assert cfg["train"]["lr"] == 0.5 and cfg["data"]["size"] == [40, 48]
    assert cfg["methods"]["car"] == {"loss_weight": 0.1, "warmup": 0, "variant": "released", "projection": "conv1x1",
                                     "eps0": 0.3}
    assert cfg["model"]["opts"]["width"] == 8 and cfg["model"]["opts"]["depth"] == DEFAULTS["model"]["opts"]["depth"]
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    with pytest.raises(KeyError, match="train.lrr"):
        resolve_config(None, ["train.lrr=1"])
    with pytest.raises(ValueError, match="key.sub=value"):
        resolve_config(None, ["train.lr"])
    with pytest.raises(ValueError, match="train.steps"):
        resolve_config(None, ["train.steps=0"])
    # changing the model drops the previous model's options, keeps the ones given with it
    assert resolve_config(None, ["model.opts.base=8", "model.name=unet"])["model"] == {"name": "unet", "opts": {"base": 8}}


def test_parse_method():
    assert parse_method("ce") == [] and parse_method("ce+car") == ["car"]
    assert parse_method("car+lall") == ["car", "lall"] and method_slug("ce+rch") == "rch" and method_slug("ce") == "ce"
    with pytest.raises(ValueError, match="unknown method"):
        parse_method("car+foo")
    with pytest.raises(ValueError, match="twice"):
        parse_method("car+car")


# ----------------------------------------------------------------------------- method registry
def _model():
    from pixreg.models import build_model

    return build_model("fcn_resnet", 4, width=4, depth=10, head_channels=8)


def test_build_criterion_every_method_and_combination():
    model = _model()
    for spec in ("ce", "cplus1", "car", "lall", "rch", "car+lall", "cplus1+rch"):
        crit, layers = build_criterion(spec, model, num_classes=4, background_index=0, options={"lall": {"loss_weight": 0.5, "warmup": 3}})
        assert layers == ["head"]
        assert sorted(crit.specs) == sorted(parse_method(spec))
        x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
        from pixreg.criterion import RegularizedModel

        wrapped = RegularizedModel(model, crit, layers)
        out = wrapped.loss(wrapped(x), y)
        assert torch.isfinite(out.total)
        out.total.backward()
        wrapped.unwrap()
    crit, _ = build_criterion("lall", model, num_classes=4, options={"lall": {"loss_weight": 0.5, "warmup": 3}})
    assert crit.specs["lall"].loss_weight == 0.5 and crit.specs["lall"].warmup == 3
    crit, _ = build_criterion("car", model, num_classes=4,
                              options={"car": {"loss_weight": "auto", "target_ratio": 0.05, "calibration_steps": 7}})
    assert crit.specs["car"].auto and crit.balance["car"].target_ratio == 0.05 and crit.balance["car"].calibration_steps == 7
    with pytest.raises(ValueError, match="loss_weight: auto"):
        build_criterion("car", model, num_classes=4, options={"car": {"loss_weight": 0.1, "target_ratio": 0.05}})


def test_build_criterion_fills_model_and_dataset_attributes():
    model = _model()
    crit, _ = build_criterion("cplus1+rch", model, num_classes=4, background_index=2, ignore_index=7,
                              options={"rch": {"loss_weight": 0.3}, "cplus1": {"centres": "classifier"}})
    assert crit.ignore_index == 7
    c1 = crit.losses["cplus1"]
    assert c1.background_index == 2 and c1.feature_dim == model.feature_dim
    assert crit.specs["rch"].loss_weight == 0.3 and crit.losses["rch"].loss_weight == 1.0
    # a projection is a training-only parameter of the criterion, not of the model
    crit, _ = build_criterion("car", model, num_classes=4, options={"car": {"projection": "conv1x1", "projection_dim": 16}})
    assert isinstance(crit.projections["car"], torch.nn.Conv2d) and crit.projections["car"].out_channels == 16
    assert len(list(crit.parameters())) == 2
    crit, _ = build_criterion("car", model, num_classes=4, options={"car": {"projection": "conv3x3"}})
    proj = crit.projections["car"]
    assert proj.kernel_size == (3, 3) and proj.padding == (1, 1) and proj.out_channels == model.feature_dim
    with pytest.raises(ValueError, match="conv3x3"):
        build_criterion("car", model, num_classes=4, options={"car": {"projection": "conv5x5"}})


def test_build_criterion_errors():
    model = _model()
    with pytest.raises(ValueError, match="background class"):
        build_criterion("cplus1", model, num_classes=4, background_index=None)
    crit, _ = build_criterion("cplus1", model, num_classes=4, background_index=None, options={"cplus1": {"background_index": 1}})
    assert crit.losses["cplus1"].background_index == 1
    with pytest.raises(ValueError, match="unknown option"):
        build_criterion("car", model, num_classes=4, options={"car": {"epsilon": 1}})
    with pytest.raises(ValueError, match="projection"):
        build_criterion("lall", model, num_classes=4, options={"lall": {"projection": "conv1x1"}})


# ----------------------------------------------------------------------------- metrics
def test_metrics_match_torchmetrics_and_hand_counts():
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    g = torch.Generator().manual_seed(0)
    K, ign = 5, 255
    labels = torch.randint(0, K - 1, (3, 9, 11), generator=g)  # class 4 never present in the labels
    labels[0, :2] = ign
    preds = torch.randint(0, K - 1, (3, 9, 11), generator=g)  # nor predicted: no IoU, not in the mean
    distractor = torch.rand(3, 9, 11, generator=g) < 0.3
    labels[distractor & (labels != ign)] = 0  # distractors are background
    m = SegmentationMetrics(K, ign, background_index=0, class_names=list("abcde"))
    m.update(preds[:2], labels[:2], distractor[:2])
    m.update(preds[2:], labels[2:], distractor[2:])
    r = m.compute()
    jac = MulticlassJaccardIndex(K - 1, ignore_index=ign, average="macro")(preds, labels)
    acc = MulticlassAccuracy(K - 1, ignore_index=ign, average="macro")(preds, labels)
    micro = MulticlassAccuracy(K - 1, ignore_index=ign, average="micro")(preds, labels)
    assert r["mIoU"] == pytest.approx(100 * float(jac), abs=1e-4)
    assert r["mAcc"] == pytest.approx(100 * float(acc), abs=1e-4)
    assert r["aAcc"] == pytest.approx(100 * float(micro), abs=1e-4)
    assert r["per_class_iou"]["e"] is None and r["per_class_acc"]["e"] is None
    valid = labels != ign
    bg = valid & (labels == 0)
    assert r["bg_to_coi"] == pytest.approx(100 * float((bg & (preds != 0)).sum() / bg.sum()))
    d = distractor & valid
    assert r["distractor_to_coi"] == pytest.approx(100 * float((d & (preds != 0)).sum() / d.sum()))
    assert r["pixels"] == int(valid.sum())


def test_segmentation_metrics_is_a_torchmetrics_metric_with_summed_states():
    """One sync path: every state is declared with dist_reduce_fx="sum", so the metrics of
    shards merged the way processes are synchronised equal those of the whole split."""
    from torchmetrics import Metric

    g = torch.Generator().manual_seed(1)
    preds, labels = torch.randint(0, 4, (4, 6, 6), generator=g), torch.randint(0, 4, (4, 6, 6), generator=g)
    labels[0, 0] = 255
    distractor = torch.rand(4, 6, 6, generator=g) > 0.6
    whole = SegmentationMetrics(4, 255, background_index=0)
    whole.update(preds, labels, distractor)
    assert isinstance(whole, Metric) and set(whole.metric_state) == {"confmat", "distractor", "distractor_batches"}
    shards = [SegmentationMetrics(4, 255, background_index=0) for _ in range(2)]
    shards[0].update(preds[:2], labels[:2], distractor[:2])
    shards[1].update(preds[2:], labels[2:], None)  # a shard without distractor masks
    shards[0].merge_state(shards[1])  # the reduction the process sync applies
    merged, ref = shards[0].compute(), whole.compute()
    assert {k: merged[k] for k in ("mIoU", "mAcc", "aAcc", "bg_to_coi", "pixels")} == \
        {k: ref[k] for k in ("mIoU", "mAcc", "aAcc", "bg_to_coi", "pixels")}
    d = distractor[:2] & (labels[:2] != 255)
    assert merged["distractor_to_coi"] == pytest.approx(100 * float((d & (preds[:2] != 0)).sum() / d.sum()))
    whole.reset()
    assert int(whole.confmat.sum()) == 0 and int(whole.distractor_batches) == 0


# ----------------------------------------------------------------------------- data order
def test_data_order_is_a_function_of_seed_and_step_and_shards():
    n, B, steps = 10, 4, 9
    full = [b for b in StepBatchSampler(n, B, seed=3, num_steps=steps)]
    assert full == [b for b in StepBatchSampler(n, B, seed=3, num_steps=steps)]
    assert full != [b for b in StepBatchSampler(n, B, seed=4, num_steps=steps)]
    # every epoch is a permutation; batches run across epoch boundaries
    stream = [idx for b in full for idx, _ in b]
    assert sorted(stream[:n]) == list(range(n)) and sorted(stream[n:2 * n]) == list(range(n))
    assert [i for i, e in full[2]] == [int(epoch_permutation(n, 3, 0)[8]), int(epoch_permutation(n, 3, 0)[9]),
                                       int(epoch_permutation(n, 3, 1)[0]), int(epoch_permutation(n, 3, 1)[1])]
    # resuming at step k yields exactly the remaining batches
    assert [b for b in StepBatchSampler(n, B, seed=3, num_steps=steps, start_step=5)] == full[5:]
    # two ranks split each global batch; their union is the single-process batch
    r0 = list(StepBatchSampler(n, B, 3, steps, rank=0, world_size=2))
    r1 = list(StepBatchSampler(n, B, 3, steps, rank=1, world_size=2))
    for a, b, f in zip(r0, r1, full):
        assert sorted(a + b) == sorted(f) and len(a) == len(b) == 2
    with pytest.raises(ValueError, match="multiple"):
        StepBatchSampler(n, 3, 0, steps, world_size=2)


# ----------------------------------------------------------------------------- end to end
def test_train_then_eval_end_to_end(tmp_path, cache, capsys):
    run = str(tmp_path / "run")
    over = tiny(cache) + ["train.eval_every=4", "model.opts.dropout=0.1"]
    assert main(["train", "--method", "car+lall", "--seed", "1", "--out", run, "--no-progress"] + set_args(over)) == 0
    for f in ("config.yaml", "metrics.json", "log.csv", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert os.path.exists(os.path.join(run, f)), f
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(run, "tb")))
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    assert metrics["method"] == "car+lall" and metrics["seed"] == 1 and metrics["steps"] == 6
    assert list(metrics["splits"]) == ["test", "test_openset", "val"]
    for split, m in metrics["splits"].items():
        for key in ("mIoU", "mAcc", "aAcc", "bg_to_coi", "per_class_iou"):
            assert key in m, (split, key)
        assert list(m["per_class_iou"]) == ["background", "0", "1", "2"]
    assert "distractor_to_coi" in metrics["splits"]["test_openset"]
    rows = list(csv.DictReader(open(os.path.join(run, "log.csv"))))
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    for col in ("lr", "loss", "ce", "car", "car/intra_c2p", "lall"):
        assert col in rows[0]
    assert float(rows[0]["loss"]) == pytest.approx(float(rows[0]["ce"]) + float(rows[0]["car"]) + float(rows[0]["lall"]), rel=1e-4)
    assert float(rows[-1]["lr"]) < float(rows[0]["lr"])  # poly schedule
    # the learning curve: validation at step 4 (eval_every) and at the end, the last = final val
    curve = list(csv.DictReader(open(os.path.join(run, "val.csv"))))
    assert [int(r["step"]) for r in curve] == [4, 6]
    assert float(curve[-1]["mIoU"]) == pytest.approx(metrics["splits"]["val"]["mIoU"], rel=1e-5)
    # the resolved config was written and the checkpoint holds everything needed to resume
    assert resolve_config(os.path.join(run, "config.yaml"))["method"] == "car+lall"
    ckpt = torch.load(os.path.join(run, "checkpoints", "last.pt"), weights_only=True)
    assert ckpt["step"] == 6 and {"model", "criterion", "optimizer", "scheduler", "rng", "sampler"} <= set(ckpt)
    assert ckpt["criterion"]["step"] == 6
    # eval reproduces the final metrics from the checkpoint
    capsys.readouterr()
    assert main(["eval", run, "--splits", "test_openset,val", "--no-progress", "--set", f"data.cache_dir={cache}"]) == 0
    assert "test_openset" in capsys.readouterr().out
    ev = json.load(open(os.path.join(run, "eval_last.json")))
    assert ev["step"] == 6
    for split in ("test_openset", "val"):
        assert ev["splits"][split]["mIoU"] == metrics["splits"][split]["mIoU"]
        assert ev["splits"][split]["per_class_iou"] == metrics["splits"][split]["per_class_iou"]
    # an existing run is neither silently continued nor overwritten
    assert main(["train", "--method", "car+lall", "--seed", "1", "--out", run, "--no-progress"] + set_args(over)) == 2
    assert "--resume" in capsys.readouterr().err


def test_cli_errors_are_reported_not_raised(tmp_path, cache, capsys):
    code = main(["train", "--method", "nope", "--out", str(tmp_path / "r"), "--no-progress"] + set_args(tiny(cache)))
    assert code == 2 and "unknown method" in capsys.readouterr().err
    code = main(["train", "--out", str(tmp_path / "r"), "--set", "train.bogus=1"])
    assert code == 2 and "train.bogus" in capsys.readouterr().err


def test_python_dash_m_pixreg():
    out = subprocess.run([sys.executable, "-m", "pixreg", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0
    for word in ("train", "eval", "compare"):
        assert word in out.stdout
