"""pixreg on a Hugging Face transformers SegFormer (needs the ``segformer`` extra: ``pip install -e '.[segformer]'``).

Runs as it stands on CPU in seconds: ``python examples/segformer_example.py``. The model
is built from a small config with random weights (nothing is downloaded); with your own
model, use ``SegformerForSemanticSegmentation.from_pretrained(...)`` instead.
"""
from __future__ import annotations

import torch
from transformers import SegformerConfig, SegformerForSemanticSegmentation

from pixreg.criterion import RegularizedCriterion, Term
from pixreg.integrations.segformer import FEATURE_LAYER, attach
from pixreg.losses.car import CARLoss
from pixreg.losses.cplus1 import CPlus1Loss
from pixreg.losses.lall import LocallyAdaptiveLoss
from pixreg.losses.rch import RCHLoss

NUM_CLASSES = 4


def make_batch(batch: int = 2, size: int = 32, num_classes: int = NUM_CLASSES, seed: int = 0):
    """Blocky label maps and images whose colour depends on the label, plus ignored pixels."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, num_classes, (batch, size // 8, size // 8), generator=g)
    labels = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)
    colours = 1.5 * torch.randn(num_classes, 3, generator=g)
    images = colours[labels].permute(0, 3, 1, 2) + 0.5 * torch.randn(batch, 3, size, size, generator=g)
    labels[:, :2] = 255
    return images, labels


def main(steps: int = 10) -> SegformerForSemanticSegmentation:
    torch.manual_seed(0)
    config = SegformerConfig(  # a tiny MiT; SegformerConfig() alone is MiT-b0
        num_labels=NUM_CLASSES, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
        num_attention_heads=[1, 1, 2, 4], decoder_hidden_size=32,
    )
    model = SegformerForSemanticSegmentation(config)
    dim = config.decoder_hidden_size  # channels of the fused features at FEATURE_LAYER
    criterion = RegularizedCriterion({
        "cplus1": CPlus1Loss(NUM_CLASSES, dim),
        "car": CARLoss(NUM_CLASSES),
        "lall": Term(LocallyAdaptiveLoss(num_classes=NUM_CLASSES), loss_weight=0.1),
        "rch": RCHLoss(NUM_CLASSES, dim),
    })
    wrapped = attach(model, criterion)  # hooks "decode_head.activation" (1/4 resolution)
    print("hooked:", FEATURE_LAYER)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-2)  # model + RCH's head
    images, labels = make_batch()

    wrapped.train()
    for step in range(steps):
        logits = wrapped(pixel_values=images).logits  # (B, K, H/4, W/4)
        out = wrapped.loss(logits, labels)            # upsampled to the labels' size inside
        optimizer.zero_grad()
        out.total.backward()
        optimizer.step()
        print(f"step {step}  total={out.total.item():.4f}  " + "  ".join(f"{k}={v.item():.4f}" for k, v in out.terms.items() if "/" not in k))

    model = wrapped.unwrap()  # a plain SegformerForSemanticSegmentation: save_pretrained() it as usual
    return model


if __name__ == "__main__":
    main()
