"""Every ```python block of docs/recipes.md runs as written."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"
BLOCKS = re.findall(r"```python\n(.*?)```", RECIPES.read_text(), flags=re.S)


def test_recipes_have_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_recipe_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"docs/recipes.md block {index}", "exec"), {"__name__": "__recipes__"})


def test_released_recipes_through_the_config_options():
    """The recipes' keywords reach the losses from a config (``methods.<name>`` options) and train."""
    import torch

    from pixreg.criterion import RegularizedModel
    from pixreg.models import build_model
    from pixreg.train.methods import build_criterion

    model = build_model("fcn_resnet", 4, width=4, depth=10, head_channels=8)
    rch = dict(calibration="cosine_to_mean", prototype_grad=True, head_norm=True, sets="image",
               ce_resolution="label", ohem_thresh=0.7, ohem_min_kept=50, reduction="all_pixels")
    crit, layers = build_criterion("car+rch", model, num_classes=4,
                                   options={"rch": rch, "car": {"variant": "released"}})
    assert crit.losses["rch"].ce_resolution == "label" and crit.losses["car"].label_sampling == "align_corners"
    wrapped = RegularizedModel(model, crit, layers).train()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    y[0] = 255  # an all-ignored image
    for _ in range(2):
        out = wrapped.loss(wrapped(x), y)
        assert torch.isfinite(out.total)
        out.total.backward()
    wrapped.unwrap()
