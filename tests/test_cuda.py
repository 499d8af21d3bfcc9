"""The losses and the criterion on CUDA give what they give on CPU (skipped without a GPU).

float64 on both devices, so that the comparison is tight: loss values, gradients with
respect to every input, and the state buffers (C+1 centres, RCH prototypes) after a few
training steps. Then one float16 autocast step each: finite, float32 losses.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

import pixreg
from pixreg.models import build_model

#: PIXREG_TEST_DEVICE=cpu runs these tests' logic on CPU against itself (a dry run of the file).
DEV = os.environ.get("PIXREG_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")

K, C, IGN = 5, 8, 255


def _batch(seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(3, C, 6, 7, generator=g, dtype=dtype)
    logits = torch.randn(3, K, 24, 28, generator=g, dtype=dtype)
    labels = torch.randint(0, K - 1, (3, 24, 28), generator=g)  # class K-1 absent
    labels[torch.rand(3, 24, 28, generator=g) < 0.15] = IGN
    labels[2] = 1  # an image holding one class only
    return feats, logits, labels


def _modules():
    torch.manual_seed(0)
    return {
        "cplus1": pixreg.CPlus1Loss(K, C),
        "car": pixreg.CARLoss(K),
        "lall": pixreg.LocallyAdaptiveLoss(window=5),
        "rch": pixreg.RCHLoss(K, C, embed_dim=6),
    }


def _call(name, mod, feats, logits, labels):
    if name == "lall":
        return mod(logits, labels)
    if name == "rch":
        return mod(feats, logits, labels)
    return mod(feats, labels)


@pytest.mark.parametrize("name", ["cplus1", "car", "lall", "rch"])
def test_cuda_matches_cpu_float64(name):
    cpu = _modules()[name].double().train()
    gpu = copy.deepcopy(cpu).to(DEV)
    for step in range(3):
        feats, logits, labels = _batch(10 + step)
        a_in = [t.clone().requires_grad_(True) for t in (feats, logits)]
        b_in = [t.to(DEV).requires_grad_(True) for t in (feats, logits)]
        a = _call(name, cpu, *a_in, labels)
        b = _call(name, gpu, *b_in, labels.to(DEV))
        torch.testing.assert_close(b.cpu(), a, rtol=1e-9, atol=1e-11)
        ga = torch.autograd.grad(a, a_in, allow_unused=True)
        gb = torch.autograd.grad(b, b_in, allow_unused=True)
        for x, y in zip(ga, gb):
            assert (x is None) == (y is None)
            if x is not None:
                torch.testing.assert_close(y.cpu(), x, rtol=1e-9, atol=1e-11)
    for (ka, va), (kb, vb) in zip(cpu.state_dict().items(), gpu.state_dict().items()):
        assert ka == kb and vb.device.type == DEV
        torch.testing.assert_close(vb.cpu(), va, rtol=1e-9, atol=1e-11, msg=ka)


@pytest.mark.parametrize("name", ["cplus1", "car", "lall", "rch"])
def test_cuda_float16_autocast_is_finite(name):
    mod = _modules()[name].to(DEV).train()
    feats, logits, labels = _batch(20, dtype=torch.float32)
    feats, logits = feats.to(DEV).requires_grad_(True), logits.to(DEV).requires_grad_(True)
    with torch.autocast(DEV, dtype=torch.float16):
        out = _call(name, mod, F.relu(feats), logits * 1.0, labels.to(DEV))
    assert out.dtype == torch.float32 and torch.isfinite(out)
    out.backward()
    for t in (feats, logits):
        assert t.grad is None or torch.isfinite(t.grad).all()


def test_criterion_step_on_cuda_matches_cpu():
    model = build_model("fcn_resnet", K, width=8, depth=10, head_channels=C).double()
    crit = pixreg.RegularizedCriterion({"car": pixreg.CARLoss(K), "lall": pixreg.LocallyAdaptiveLoss()}).double()
    x = torch.randn(2, 3, 24, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    labels = _batch(4)[2][:2]
    outs = []
    for dev in ("cpu", DEV):
        m = copy.deepcopy(model).to(dev).train()
        wrapped = pixreg.RegularizedModel(m, copy.deepcopy(crit).to(dev), layers=m.feature_layer)
        loss = wrapped.loss(wrapped(x.to(dev)), labels.to(dev)).total
        loss.backward()
        outs.append((loss.detach().cpu(), [p.grad.detach().cpu() for p in m.parameters()]))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-8, atol=1e-10)
    for ga, gb in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(gb, ga, rtol=1e-6, atol=1e-8)
