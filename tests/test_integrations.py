"""Integrations: Hugging Face SegFormer, PyTorch Lightning, the examples and the docs.

Each regularizer is trained for a few CPU steps on a fixed, learnable tiny batch; the
loss must decrease, every named term must be reported/logged, and after ``unwrap`` the
model must carry no trace of pixreg: the parameter/buffer/module names and shapes of a
fresh model of the same config, no pixreg hook, and outputs bitwise equal to a copy of
the model that never had hooks, loaded with the trained weights.
"""
from __future__ import annotations

import copy
import importlib.util
import re
import runpy
import warnings
from pathlib import Path
from typing import Callable, Dict, List

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pixreg.criterion import RegularizedCriterion, Term
from pixreg.integrations import REGULARIZERS, make_regularizer

ROOT = Path(__file__).resolve().parents[1]


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


HAS_TRANSFORMERS = _installed("transformers")
HAS_HF_TRAINER = HAS_TRANSFORMERS and _installed("accelerate")
HAS_LIGHTNING = _installed("lightning") or _installed("pytorch_lightning")
needs_transformers = pytest.mark.skipif(
    not HAS_TRANSFORMERS, reason="Hugging Face transformers is not installed (pip install 'pixreg[segformer]')")
needs_lightning = pytest.mark.skipif(
    not HAS_LIGHTNING, reason="PyTorch Lightning is not installed (pip install 'pixreg[lightning]')")

K = 4
TINY = dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 4],
            decoder_hidden_size=32, drop_path_rate=0.0, classifier_dropout_prob=0.0)


def blocky_batch(batch: int = 2, size: int = 32, seed: int = 0):
    """Labels constant on 8x8 blocks (learnable at stride 4), colour = f(label) + noise,
    two ignored rows; every class present."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.arange(batch * (size // 8) ** 2).reshape(batch, size // 8, size // 8) % K
    blocks = blocks.flatten()[torch.randperm(blocks.numel(), generator=g)].reshape(blocks.shape)
    labels = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)
    colours = 1.5 * torch.randn(K, 3, generator=g)
    images = colours[labels].permute(0, 3, 1, 2) + 0.5 * torch.randn(batch, 3, size, size, generator=g)
    labels = labels.clone()
    labels[:, :2] = 255
    return images, labels


def expected_terms(criterion: RegularizedCriterion) -> set:
    """Names a criterion output must hold: ce, each regularizer, each of its own terms."""
    names = {"ce"}
    for name, loss in criterion.losses.items():
        assert loss.terms, f"{name} reported no named term"
        names.add(name)
        names.update(f"{name}/{t}" for t in loss.terms)
    return names


def pixreg_hooks(model: nn.Module) -> List[str]:
    found = []
    for mname, m in model.named_modules():
        for h in [*m._forward_hooks.values(), *m._forward_pre_hooks.values(), *m._backward_hooks.values()]:
            if "pixreg" in (getattr(h, "__module__", "") or ""):
                found.append(mname)
    return found


def hook_counts(model: nn.Module) -> Dict[str, tuple]:
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for n, m in model.named_modules()}


def assert_no_trace(trained: nn.Module, twin: nn.Module, fresh: nn.Module, x: torch.Tensor,
                    logits_of: Callable = lambda o: o, hooked_output: torch.Tensor | None = None) -> None:
    """``twin``: a deep copy of the model taken before pixreg was attached (never hooked);
    ``fresh``: a new model of the same config."""
    assert type(trained) is type(fresh)
    shapes = lambda it: [(n, tuple(t.shape)) for n, t in it]  # noqa: E731
    assert shapes(trained.named_parameters()) == shapes(fresh.named_parameters())
    assert shapes(trained.named_buffers()) == shapes(fresh.named_buffers())
    assert [n for n, _ in trained.named_modules()] == [n for n, _ in fresh.named_modules()]
    assert pixreg_hooks(trained) == []
    twin.load_state_dict(trained.state_dict(), strict=True)
    trained.eval()
    twin.eval()
    with torch.no_grad():
        out = logits_of(trained(x))
        ref = logits_of(twin(x))
    assert torch.equal(out, ref)
    if hooked_output is not None:  # what the hooked model gave at inference, before unwrap
        assert torch.equal(hooked_output, ref)
    assert hook_counts(trained) == hook_counts(twin)  # also library-own hooks (transformers adds some)


def make_criterion(name: str, feature_dim: int) -> RegularizedCriterion:
    return RegularizedCriterion({name: Term(make_regularizer(name, K, feature_dim), loss_weight=1.0)})


# ----------------------------------------------------------------------------- SegFormer
if HAS_TRANSFORMERS:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    from pixreg.integrations import segformer as pseg


def tiny_segformer(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return SegformerForSemanticSegmentation(SegformerConfig(num_labels=K, **{**TINY, **overrides}))


@needs_transformers
def test_segformer_feature_layer_is_the_classifier_input_at_quarter_resolution():
    model = tiny_segformer(classifier_dropout_prob=0.1).eval()
    seen = {}
    model.get_submodule(pseg.CLASSIFIER_LAYER).register_forward_pre_hook(lambda m, inp: seen.update(x=inp[0]))
    wrapped = pseg.attach(model, RegularizedCriterion())
    x = torch.randn(2, 3, 30, 34)  # not multiples of 4: ceil(30/4)=8, ceil(34/4)=9
    logits = wrapped(pixel_values=x).logits
    feats = wrapped.capture.features[pseg.FEATURE_LAYER]
    assert tuple(feats.shape) == (2, TINY["decoder_hidden_size"], 8, 9)
    assert tuple(logits.shape) == (2, K, 8, 9)
    assert torch.equal(feats, seen["x"])  # eval: dropout is identity, the classifier sees exactly these
    assert isinstance(model.get_submodule(pseg.FEATURE_LAYER), nn.ReLU)
    assert pseg.feature_layer(model) == pseg.FEATURE_LAYER
    with pytest.raises(TypeError):
        pseg.feature_layer(nn.Conv2d(3, 3, 1))


@needs_transformers
def test_segformer_quarter_resolution_logits_give_transformers_own_loss():
    """The criterion upsamples SegFormer's 1/4 logits to the labels as SegFormer's own loss does."""
    model = tiny_segformer().eval()
    x, y = blocky_batch(size=32)
    y[0, 10:14, 5:9] = 255
    with torch.no_grad():
        hf = model(pixel_values=x, labels=y)
        ours = RegularizedCriterion()(hf.logits, y)
    assert hf.logits.shape[-1] == 8
    torch.testing.assert_close(ours.total, hf.loss, rtol=1e-6, atol=1e-6)


@needs_transformers
def test_build_segformer_contract():
    m = pseg.build_segformer(K, preset="tiny", dropout=0.0, drop_path_rate=0.0)
    x = torch.randn(2, 3, 30, 34)
    m.eval()
    with torch.no_grad():
        out = m(x)
        ref = F.interpolate(m.model(pixel_values=x).logits, size=(30, 34), mode="bilinear", align_corners=False)
    assert tuple(out.shape) == (2, K, 30, 34)
    assert torch.equal(out, ref)
    assert m.get_submodule(m.feature_layer) is m.model.decode_head.activation
    cls = m.get_submodule(m.classifier_layer)
    assert isinstance(cls, nn.Conv2d) and cls.kernel_size == (1, 1) and cls.in_channels == m.feature_dim == 32
    assert (m.feature_stride, m.num_classes, m.in_channels) == (4, K, 3)
    assert m.model.config.classifier_dropout_prob == 0.0 and m.model.config.drop_path_rate == 0.0
    groups = m.parameter_groups()
    ids = [id(p) for g in groups.values() for p in g]
    assert sorted(ids) == sorted(id(p) for p in m.parameters()) and len(set(ids)) == len(ids)
    assert pseg.build_segformer(2, preset="tiny", in_channels=1).in_channels == 1
    # b0 is transformers' default SegformerConfig
    b0, default = pseg.segformer_config(K), SegformerConfig()
    for field in ("hidden_sizes", "depths", "num_attention_heads"):
        assert list(getattr(b0, field)) == list(getattr(default, field)), field
    assert b0.decoder_hidden_size == default.decoder_hidden_size
    with pytest.raises(TypeError, match="unknown"):
        pseg.build_segformer(K, preset="tiny", not_an_option=1)
    with pytest.raises(TypeError, match="num_labels"):
        pseg.build_segformer(K, num_labels=3)
    with pytest.raises(ValueError, match="preset"):
        pseg.build_segformer(K, preset="b9")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        m(torch.randn(2, 1, 8, 8))
    # the smallest accepted image, checked against transformers itself
    small = pseg.min_input_size(m.model.config)
    with torch.no_grad():
        m.model(pixel_values=torch.randn(1, 3, small, small))
        with pytest.raises(RuntimeError):
            m.model(pixel_values=torch.randn(1, 3, small - 1, small + 5))
        with pytest.raises(ValueError, match="at least"):
            m(torch.randn(1, 3, small - 1, small + 5))


@needs_transformers
def test_build_segformer_from_local_directory(tmp_path):
    src = tiny_segformer(seed=3).eval()
    src.save_pretrained(tmp_path)
    same = pseg.build_segformer(K, pretrained=str(tmp_path)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(same.model(pixel_values=x).logits, src(pixel_values=x).logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = pseg.build_segformer(K + 2, pretrained=str(tmp_path))  # new classifier, same encoder
    assert other.classifier.out_channels == K + 2
    assert torch.equal(other.model.segformer.stages[0].patch_embeddings.proj.weight,
                       src.segformer.stages[0].patch_embeddings.proj.weight)


@needs_transformers
@pytest.mark.parametrize("name", REGULARIZERS)
def test_segformer_training_with_each_regularizer_leaves_no_trace(name):
    model = tiny_segformer()
    twin = copy.deepcopy(model)  # never hooked
    criterion = make_criterion(name, TINY["decoder_hidden_size"])
    wrapped = pseg.attach(model, criterion)
    x, y = blocky_batch()
    crit_params = {n: p.detach().clone() for n, p in criterion.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-2)
    wrapped.train()
    totals = []
    for _ in range(5):
        out = wrapped.loss(wrapped(pixel_values=x).logits, y)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        totals.append(out.total.item())
        assert set(out.terms) == expected_terms(criterion)
        assert all(torch.isfinite(v) for v in out.terms.values())
        assert out.terms[name] > 0  # the regularizer is active (no warm-up) and contributes
    assert totals[-1] < totals[0], totals
    assert int(criterion.step) == 5
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    for n, p in criterion.named_parameters():  # training-only parameters (RCH's head) were optimised
        assert not torch.equal(crit_params[n], p), n
    assert (len(crit_params) > 0) == (name == "rch")
    wrapped.eval()
    with torch.no_grad():
        hooked = wrapped(pixel_values=x).logits
    trained = wrapped.unwrap()
    assert trained is model
    assert_no_trace(trained, twin, tiny_segformer(seed=1), x, lambda o: o.logits, hooked)


# ----------------------------------------------------------------------------- Lightning
if HAS_LIGHTNING:
    try:
        import lightning.pytorch as L
        from lightning.pytorch.loggers import Logger
    except ImportError:  # pragma: no cover
        import pytorch_lightning as L  # type: ignore[no-redef]
        from pytorch_lightning.loggers import Logger  # type: ignore[no-redef]

    from pixreg.integrations.lightning import PixregLightningModule, PixregMixin, default_batch, default_logits

    class RecordingLogger(Logger):
        """Keeps every ``log_metrics`` call: what a real logger would receive."""

        def __init__(self) -> None:
            super().__init__()
            self.records: List[Dict[str, float]] = []

        @property
        def name(self) -> str:
            return "recording"

        @property
        def version(self) -> int:
            return 0

        def log_hyperparams(self, params, *args, **kwargs) -> None:
            pass

        def log_metrics(self, metrics, step=None) -> None:
            self.records.append(dict(metrics))


FEAT = 16


class TinyNet(nn.Module):
    """Features and logits at 1/2 of the input (the criterion upsamples the logits)."""

    feature_layer = "features"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(3, FEAT, 3, stride=2, padding=1), nn.BatchNorm2d(FEAT), nn.ReLU(),
            nn.Conv2d(FEAT, FEAT, 1), nn.BatchNorm2d(FEAT), nn.ReLU())
        self.classifier = nn.Conv2d(FEAT, K, 1)

    def forward(self, x):
        return self.classifier(self.features(x))


def fixed_loader(batch=None):
    x, y = batch if batch is not None else blocky_batch()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=x.shape[0])


def fit(module, steps: int, logger=False, ckpt_path=None):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=logger, log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, fixed_loader(), ckpt_path=ckpt_path)
    return trainer


@needs_lightning
@pytest.mark.parametrize("name", REGULARIZERS)
def test_lightning_training_with_each_regularizer(name):
    model = TinyNet()
    twin = copy.deepcopy(model)
    criterion = make_criterion(name, FEAT)
    module = PixregLightningModule(model, criterion, lr=1e-2)
    logger = RecordingLogger()
    trainer = fit(module, 5, logger=logger)
    steps = [r for r in logger.records if "train/loss" in r]
    assert len(steps) == 5
    want = {f"train/{k}" for k in expected_terms(criterion)} | {"train/loss"}
    for rec in steps:
        assert want <= set(rec), want - set(rec)
        assert {k for k in rec if k.startswith("train/")} == want
        assert rec[f"train/{name}"] > 0
    assert steps[-1]["train/loss"] < steps[0]["train/loss"], [r["train/loss"] for r in steps]
    assert int(criterion.step) == 5
    opt_ids = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in criterion.parameters()} <= opt_ids  # RCH's head is optimised
    assert {id(p) for p in model.parameters()} <= opt_ids
    x, _ = blocky_batch(seed=5)
    module.eval()
    with torch.no_grad():
        hooked = module(x)
    trained = module.unwrap()
    assert trained is model
    assert_no_trace(trained, twin, TinyNet(seed=1), x, hooked_output=hooked)


@needs_lightning
def test_lightning_checkpoint_round_trip_keeps_criterion_state(tmp_path):
    def criterion():
        return RegularizedCriterion({n: Term(make_regularizer(n, K, FEAT), warmup=w)
                                     for n, w in zip(REGULARIZERS, (0, 0, 0, 10))})

    module = PixregLightningModule(TinyNet(), criterion(), lr=1e-2)
    trainer = fit(module, 3)
    path = tmp_path / "pixreg.ckpt"
    trainer.save_checkpoint(path)
    state = {k: v.clone() for k, v in module.criterion.state_dict().items()}
    fresh_state = criterion().state_dict()
    assert int(state["step"]) == 3
    changed = [k for k in state if not torch.equal(state[k], fresh_state[k])]
    assert any("cplus1" in k for k in changed) and any("rch" in k for k in changed), changed  # centres, prototypes, head
    assert torch.load(path, weights_only=False)["state_dict"].keys() >= {f"pixreg_criterion.{k}" for k in state}

    restored = PixregLightningModule.load_from_checkpoint(path, model=TinyNet(seed=1), criterion=criterion())
    got = restored.criterion.state_dict()
    assert got.keys() == state.keys()
    for k in state:
        assert torch.equal(got[k], state[k]), k
    for k, v in module.model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[k], v), k

    resumed = PixregLightningModule(TinyNet(seed=2), criterion(), lr=1e-2)  # Trainer resume path
    fit(resumed, 5, ckpt_path=str(path))
    assert int(resumed.criterion.step) == 5  # the warm-up counter went on from 3


@needs_lightning
def test_lightning_mixin_in_a_user_module():
    class UserModule(PixregMixin, L.LightningModule):
        def __init__(self, net, crit):
            super().__init__()
            self.net = net
            self.criterion = nn.CrossEntropyLoss()  # the user's own attribute is left alone
            self.attach_pixreg(crit, model=net, layers="features.2")

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.pixreg_loss(self.net(x), y, prog_bar=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    net = TinyNet()
    crit = make_criterion("car", FEAT)
    module = UserModule(net, crit)
    assert isinstance(module.criterion, nn.CrossEntropyLoss)
    logger = RecordingLogger()
    fit(module, 2, logger=logger)
    logged = set().union(*[r.keys() for r in logger.records])
    assert {"train/ce", "train/car", "train/car/intra_c2p", "train/loss"} <= logged
    assert int(crit.step) == 2
    assert any(k.startswith("pixreg_criterion.") for k in module.state_dict())
    assert module.unwrap_pixreg() is net and pixreg_hooks(net) == []
    with pytest.raises(ValueError, match="model"):
        PixregMixin.attach_pixreg(L.LightningModule(), crit)  # no `model` given nor self.model to hook


@needs_lightning
def test_lightning_defaults_read_common_batches_and_outputs():
    x, y = torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long)
    assert default_batch((x, y, "meta"))[1] is y
    assert default_batch({"pixel_values": x, "labels": y})[0] is x
    assert default_batch({"image": x, "mask": y})[1] is y
    with pytest.raises(TypeError):
        default_batch({"foo": x})
    assert default_logits(x) is x
    assert default_logits({"out": x, "aux": y}) is x

    class Out:
        logits = x

    assert default_logits(Out()) is x
    assert default_logits((x, y)) is x  # smp with aux_params: (masks, labels)
    with pytest.raises(TypeError):
        default_logits(["x"])


@needs_lightning
def test_lightning_module_errors_and_evaluation_mode():
    crit = make_criterion("car", FEAT)
    module = PixregLightningModule(TinyNet(), crit)
    x, y = blocky_batch()
    module.eval()
    module(x)
    assert module.pixreg_capture.features == {}  # nothing captured outside training
    with pytest.raises(RuntimeError, match="no features"):
        module.pixreg_loss(torch.randn(2, K, 16, 16), y, log=False)
    module.train()
    total = module.pixreg_loss(module(x), y, log=False)
    assert total.requires_grad and module.pixreg_capture.features == {}  # cleared after use
    assert int(crit.step) == 1
    with pytest.raises(TypeError, match="RegularizedCriterion"):
        PixregLightningModule(TinyNet(), nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="layers"):
        PixregLightningModule(nn.Conv2d(3, K, 1), crit)  # no feature_layer attribute to default to
    ce_only = PixregLightningModule(nn.Conv2d(3, K, 1), RegularizedCriterion())  # nothing to hook
    assert ce_only.pixreg_capture is None


def test_make_regularizer():
    for name in REGULARIZERS:
        reg = make_regularizer(name, K, FEAT)
        assert reg.uses_logits or reg.uses_features
    assert not make_regularizer("lall", K, FEAT).uses_features
    with pytest.raises(ValueError, match="name"):
        make_regularizer("focal", K, FEAT)


# ----------------------------------------------------------------------------- examples and docs
def _run_example(name: str, **kwargs):
    ns = runpy.run_path(str(ROOT / "examples" / name), run_name="pixreg_example")
    return ns["main"](**kwargs)


def test_plain_loop_example_runs(capsys):
    model = _run_example("plain_loop.py", steps=3)
    assert pixreg_hooks(model) == []
    assert "ce=" in capsys.readouterr().out


@needs_transformers
def test_segformer_example_runs():
    model = _run_example("segformer_example.py", steps=2)
    assert isinstance(model, SegformerForSemanticSegmentation) and pixreg_hooks(model) == []


@needs_lightning
def test_lightning_example_runs(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _run_example("lightning_example.py", steps=2, workdir=str(tmp_path))
    assert pixreg_hooks(model) == [] and (tmp_path / "last.ckpt").exists()


def _doc_blocks():
    text = (ROOT / "docs" / "integrations.md").read_text()
    blocks = re.findall(r"(<!-- ([\w-]+) -->\n)?```python\n(.*?)```", text, flags=re.S)
    return [(marker, code) for _, marker, code in blocks]


def test_docs_code_blocks_run(tmp_path, monkeypatch):
    """Every python block in docs/integrations.md is marked and runs as written here, except
    the torchrun scripts (``ddp``, ``lightning-ddp``: tests/test_ddp_user_loop.py runs them
    with 1 and 2 processes), the ``zoo`` blocks (run by tests/integrations_zoo in
    .venv-integrations; only compiled here) and blocks needing a missing optional extra."""
    monkeypatch.chdir(tmp_path)  # blocks may write files
    blocks = _doc_blocks()
    markers = [m for m, _ in blocks]
    assert markers.count("plain") == 1 and markers.count("segformer") == 1 and markers.count("lightning") == 2
    assert markers.count("ddp") == 1 and markers.count("lightning-ddp") == 1
    assert markers.count("hf-trainer") == 1
    assert markers.count("zoo") == 2  # run by tests/integrations_zoo in .venv-integrations
    assert set(markers) == {"plain", "ddp", "lightning-ddp", "segformer", "hf-trainer", "lightning", "zoo"}, markers
    for marker, code in blocks:
        if marker in ("ddp", "lightning-ddp"):  # a torchrun script: tests/test_ddp_user_loop.py runs it with 1 and 2 processes
            continue
        if marker == "zoo":
            compile(code, "docs/integrations.md[zoo]", "exec")  # at least valid Python
            continue
        if (marker == "segformer" and not HAS_TRANSFORMERS or marker == "hf-trainer" and not HAS_HF_TRAINER
                or marker == "lightning" and not HAS_LIGHTNING):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exec(compile(code, f"docs/integrations.md[{marker}]", "exec"), {"__name__": "pixreg_docs"})
