"""pixreg in a plain PyTorch training loop: model, hooks, criterion, optimiser step.

Runs as it stands on CPU in seconds (generated data): ``python examples/plain_loop.py``.
Replace ``TinySegNet`` by your network and ``feature_layer`` by the name (as in
``model.named_modules()``) of the module whose output is the pixel feature map.
"""
from __future__ import annotations

import torch
from torch import nn

from pixreg.criterion import RegularizedCriterion, RegularizedModel, Term
from pixreg.losses.car import CARLoss
from pixreg.losses.cplus1 import CPlus1Loss
from pixreg.losses.lall import LocallyAdaptiveLoss
from pixreg.losses.rch import RCHLoss

NUM_CLASSES, FEAT_DIM = 4, 16


class TinySegNet(nn.Module):
    """Stand-in for your network: features at 1/2 resolution, logits at 1/2 resolution."""

    def __init__(self, num_classes: int = NUM_CLASSES, feat_dim: int = FEAT_DIM) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, feat_dim, 3, stride=2, padding=1), nn.BatchNorm2d(feat_dim), nn.ReLU(),
            nn.Conv2d(feat_dim, feat_dim, 1), nn.BatchNorm2d(feat_dim), nn.ReLU(),
        )
        self.classifier = nn.Conv2d(feat_dim, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def make_batch(batch: int = 4, size: int = 32, num_classes: int = NUM_CLASSES, seed: int = 0):
    """Blocky label maps and images whose colour depends on the label, plus ignored pixels."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, num_classes, (batch, size // 8, size // 8), generator=g)
    labels = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)
    colours = 1.5 * torch.randn(num_classes, 3, generator=g)
    images = colours[labels].permute(0, 3, 1, 2) + 0.5 * torch.randn(batch, 3, size, size, generator=g)
    labels[:, :2] = 255  # ignore_index
    return images, labels


def main(steps: int = 20) -> nn.Module:
    torch.manual_seed(0)
    model = TinySegNet()
    criterion = RegularizedCriterion({
        "cplus1": Term(CPlus1Loss(NUM_CLASSES, FEAT_DIM)),                    # background = class 0
        "car": Term(CARLoss(NUM_CLASSES), loss_weight=1.0, warmup=5),              # off for 5 steps
        "lall": Term(LocallyAdaptiveLoss(num_classes=NUM_CLASSES), loss_weight=0.1),  # logits only
        "rch": Term(RCHLoss(NUM_CLASSES, FEAT_DIM)),                          # owns a training-only head
    }, ignore_index=255)
    wrapped = RegularizedModel(model, criterion, layers="features")  # hooks the features' output
    # wrapped.parameters() = the model's + the criterion's (RCH's head): optimise both.
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-2)
    images, labels = make_batch()

    wrapped.train()
    for step in range(steps):
        logits = wrapped(images)                 # the model's own forward; hooks record features
        out = wrapped.loss(logits, labels)       # logits are upsampled to the labels' size
        optimizer.zero_grad()
        out.total.backward()
        optimizer.step()
        if step % 5 == 0 or step == steps - 1:
            print(f"step {step:2d}  " + "  ".join(f"{k}={v.item():.4f}" for k, v in out.terms.items()))

    # To resume training later, save the criterion's state (centres, prototypes, step) too:
    # torch.save({"model": model.state_dict(), "criterion": criterion.state_dict()}, path)
    return wrapped.unwrap()                      # hooks removed: the plain model, for inference


if __name__ == "__main__":
    main()
