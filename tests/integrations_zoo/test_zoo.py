"""pixreg on segmentation_models_pytorch, timm and torchvision models (random weights).

Run by ``scripts/test_integrations.sh`` in its own environment (.venv-integrations:
torch + torchvision + timm + smp), not by the main suite. For each model: the hooked
layer is the classifier's input (checked with a pre-hook on the classifier), a few
training steps with the feature and logit regularizers (C+1, CAR, LALL, RCH) report every
term, train the model and RCH's head and lower the loss, ``model(images, labels)``
works, and after ``unwrap()`` the model carries no hook and gives the outputs of a copy
that was never hooked.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pixreg

smp = pytest.importorskip("segmentation_models_pytorch")
timm = pytest.importorskip("timm")
tv_seg = pytest.importorskip("torchvision.models.segmentation")

K = 4


def blocky_batch(batch: int = 2, size: int = 64, seed: int = 0):
    """Labels constant on 16x16 blocks, colour = f(label) + noise, two ignored rows."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, K, (batch, size // 16, size // 16), generator=g)
    labels = blocks.repeat_interleave(16, 1).repeat_interleave(16, 2)
    images = (1.5 * torch.randn(K, 3, generator=g))[labels].permute(0, 3, 1, 2)
    images = images + 0.5 * torch.randn(batch, 3, size, size, generator=g)
    labels = labels.clone()
    labels[:, :2] = 255
    return images, labels


class TimmSegmenter(nn.Module):
    """A timm ``features_only`` backbone with a small head: the user's own model."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(2, 3))
        c2, c3 = self.backbone.feature_info.channels()
        self.head = nn.Sequential(nn.Conv2d(c2 + c3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.classifier = nn.Conv2d(32, K, 1)

    def forward(self, x):
        f2, f3 = self.backbone(x)
        f3 = nn.functional.interpolate(f3, size=f2.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.head(torch.cat([f2, f3], 1)))


# name -> (builder, layers, classifier module, feature channels, features stride)
MODELS = {
    "smp_unet": (lambda: smp.Unet("resnet18", encoder_weights=None, classes=K), "decoder", "segmentation_head.0", 16, 1),
    "smp_fpn": (lambda: smp.FPN("resnet18", encoder_weights=None, classes=K), "decoder", "segmentation_head.0", 128, 4),
    "smp_deeplabv3plus": (lambda: smp.DeepLabV3Plus("resnet18", encoder_weights=None, classes=K), "decoder",
                          "segmentation_head.0", 256, 4),
    "timm_features_only": (TimmSegmenter, "head.2", "classifier", 32, 8),
    "tv_deeplabv3_resnet50": (lambda: tv_seg.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=K),
                              "classifier.3", "classifier.4", 256, 8),
}


def logits_of(output):
    return pixreg.criterion.default_logits(output)


def criterion(feat_dim: int) -> pixreg.RegularizedCriterion:
    return pixreg.RegularizedCriterion({
        "cplus1": pixreg.CPlus1Loss(K, feat_dim),
        "car": pixreg.CARLoss(K),
        "lall": pixreg.Term(pixreg.LocallyAdaptiveLoss(num_classes=K), 0.1),
        "rch": pixreg.Term(pixreg.RCHLoss(K, feat_dim, embed_dim=16), warmup=1),
    })


def hooks(model: nn.Module):
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_trains_with_every_regularizer_and_unwraps(name):
    build, layer, classifier, feat_dim, stride = MODELS[name]
    torch.manual_seed(0)
    model = build()
    twin = copy.deepcopy(model)  # never hooked
    bare_hooks = hooks(model)
    crit = criterion(feat_dim)
    wrapped = pixreg.RegularizedModel(model, crit, layers=layer)
    images, labels = blocky_batch()

    # the hooked layer is what the classifier reads
    seen = {}
    handle = model.get_submodule(classifier).register_forward_pre_hook(lambda m, inp: seen.update(x=inp[0]))
    model.eval()
    with torch.no_grad():
        out = logits_of(wrapped(images))
    handle.remove()
    feats = wrapped.capture.features[layer]
    assert torch.equal(feats, seen["x"]), "the hooked layer is not the classifier's input"
    assert tuple(feats.shape) == (2, feat_dim, 64 // stride, 64 // stride)
    assert tuple(out.shape[:2]) == (2, K)
    wrapped.capture.clear()

    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
    head0 = crit.losses["rch"].head.weight.detach().clone()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrapped.train()
    totals = []
    for step in range(4):
        out = wrapped(images, labels)  # forward + criterion (the DDP-safe form)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        totals.append(float(out.total.detach()))
        assert all(torch.isfinite(v) for v in out.terms.values())
        for term in ("cplus1", "car", "lall"):
            assert float(out.terms[term]) > 0, (step, term)
    assert float(out.terms["rch"]) > 0  # on after its warm-up (and its first prototype update)
    assert totals[-1] < totals[0], totals
    assert not torch.equal(head0, crit.losses["rch"].head.weight)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())

    model.eval()
    with torch.no_grad():
        hooked = logits_of(wrapped(images))
    trained = wrapped.unwrap()
    assert trained is model and hooks(trained) == bare_hooks
    twin.load_state_dict(trained.state_dict())
    twin.eval()
    with torch.no_grad():
        ref = logits_of(twin(images))
        assert torch.equal(logits_of(trained(images)), ref)
    assert torch.equal(hooked, ref)


def test_smp_aux_params_tuple_output():
    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None, classes=K, aux_params={"classes": K})
    wrapped = pixreg.RegularizedModel(model, criterion(16), layers="decoder")
    images, labels = blocky_batch()
    out = wrapped(images, labels)  # default logits_fn takes masks from (masks, labels)
    assert isinstance(out.output, tuple) and out.output[0].shape == (2, K, 64, 64)
    out.total.backward()


def test_docs_blocks_run(tmp_path, monkeypatch):
    """The ``<!-- zoo -->`` blocks of docs/integrations.md run as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "integrations.md").read_text()
    blocks = re.findall(r"<!-- zoo -->\n```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/integrations.md[zoo {i}]", "exec"), {"__name__": "pixreg_docs"})
