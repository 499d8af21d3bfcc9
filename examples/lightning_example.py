"""pixreg with PyTorch Lightning (needs the ``lightning`` extra: ``pip install -e '.[lightning]'``).

Runs as it stands on CPU in seconds: ``python examples/lightning_example.py``. Trains a
small network with two regularizers, saves a Lightning checkpoint (the criterion's
centres, prototypes and step counter are in it), restores it and unwraps the model.
"""
from __future__ import annotations

import os
import tempfile

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pixreg.criterion import RegularizedCriterion, Term
from pixreg.integrations.lightning import PixregLightningModule
from pixreg.losses.car import CARLoss
from pixreg.losses.rch import RCHLoss

NUM_CLASSES, FEAT_DIM = 4, 16


class TinySegNet(nn.Module):
    """Stand-in for your network; ``feature_layer`` tells pixreg which module to hook."""

    feature_layer = "features"

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, FEAT_DIM, 3, stride=2, padding=1), nn.BatchNorm2d(FEAT_DIM), nn.ReLU(),
            nn.Conv2d(FEAT_DIM, FEAT_DIM, 1), nn.BatchNorm2d(FEAT_DIM), nn.ReLU(),
        )
        self.classifier = nn.Conv2d(FEAT_DIM, NUM_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def make_criterion() -> RegularizedCriterion:
    return RegularizedCriterion({
        "car": Term(CARLoss(NUM_CLASSES), loss_weight=1.0),
        "rch": Term(RCHLoss(NUM_CLASSES, FEAT_DIM), warmup=2),
    })


def make_data(n: int = 8, size: int = 32, seed: int = 0) -> TensorDataset:
    colours = 1.5 * torch.randn(NUM_CLASSES, 3, generator=torch.Generator().manual_seed(0))  # the task
    g = torch.Generator().manual_seed(seed)  # the samples
    blocks = torch.randint(0, NUM_CLASSES, (n, size // 8, size // 8), generator=g)
    labels = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)
    images = colours[labels].permute(0, 3, 1, 2) + 0.5 * torch.randn(n, 3, size, size, generator=g)
    labels[:, :2] = 255
    return TensorDataset(images, labels)


def main(steps: int = 10, workdir: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    workdir = workdir or tempfile.mkdtemp(prefix="pixreg_lightning_")
    module = PixregLightningModule(TinySegNet(), make_criterion(), lr=1e-2)  # hooks model.feature_layer
    loader = DataLoader(make_data(), batch_size=4, shuffle=True)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    val_loader = DataLoader(make_data(n=4, seed=1), batch_size=4)
    trainer.fit(module, loader, val_loader)  # logs train/<term>, train/loss and val/ce
    print({k: round(float(v), 4) for k, v in trainer.callback_metrics.items()})

    path = os.path.join(workdir, "last.ckpt")
    trainer.save_checkpoint(path)
    restored = PixregLightningModule.load_from_checkpoint(
        path, model=TinySegNet(), criterion=make_criterion(), weights_only=True)
    print("criterion step after restore:", int(restored.criterion.step))
    return restored.unwrap()  # the plain TinySegNet, hooks removed


if __name__ == "__main__":
    main()
