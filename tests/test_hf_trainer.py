"""The Hugging Face ``Trainer`` with pixreg (:class:`pixreg.integrations.hf_trainer.PixregTrainer`).

A SegFormer built from a tiny config trains 4 steps with C+1 (moving centres), CAR and
RCH (learnable head, prototypes, a 1-step warm-up) under ``Trainer``; the criterion's
parameters are in the Trainer's optimiser and change; every checkpoint holds the
criterion's parameters and buffers; resuming from the step-2 checkpoint with a fresh
model and criterion ends where the uninterrupted run ended (parameters, criterion state,
step counter), and the logged history holds every named term.
"""
from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from safetensors.torch import load_file  # noqa: E402
from transformers import SegformerConfig, SegformerForSemanticSegmentation, TrainingArguments  # noqa: E402

from pixreg import CARLoss, CPlus1Loss, RCHLoss, RegularizedCriterion, Term  # noqa: E402
from pixreg.integrations.hf_trainer import PixregTrainer  # noqa: E402
from pixreg.integrations.segformer import attach  # noqa: E402

K, HID = 4, 32
TINY = dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 4],
            decoder_hidden_size=HID, drop_path_rate=0.0, classifier_dropout_prob=0.0)


class Blocks(torch.utils.data.Dataset):
    """8 images whose labels are constant on 8x8 blocks, colour = f(label) + noise."""

    def __init__(self, n: int = 8, size: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        blocks = torch.randint(0, K, (n, size // 8, size // 8), generator=g)
        self.labels = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)
        self.labels[:, :2] = 255
        colours = 1.5 * torch.randn(K, 3, generator=g)
        self.images = colours[self.labels.clamp(max=K - 1)].permute(0, 3, 1, 2) + 0.5 * torch.randn(n, 3, size, size, generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


def wrapped_segformer(seed: int):
    torch.manual_seed(seed)
    model = SegformerForSemanticSegmentation(SegformerConfig(num_labels=K, **TINY))
    criterion = RegularizedCriterion({
        "cplus1": CPlus1Loss(K, HID),
        "car": CARLoss(K),
        "rch": Term(RCHLoss(K, HID, embed_dim=16), warmup=1),
    })
    return attach(model, criterion)


def trainer_for(wrapped, out_dir, steps: int = 4):
    args = TrainingArguments(output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-3, save_steps=2, save_strategy="steps", logging_steps=1,
                             report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    return PixregTrainer(wrapped, args=args, train_dataset=Blocks())


def train(wrapped, out_dir, resume=None):
    trainer = trainer_for(wrapped, out_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def state(wrapped):
    return {k: v.detach().clone() for k, v in wrapped.state_dict().items()}


def test_segformer_trains_saves_and_resumes_under_the_hf_trainer(tmp_path):
    wrapped = wrapped_segformer(seed=0)
    init = state(wrapped)
    trainer = train(wrapped, tmp_path / "full")
    final = state(wrapped)
    crit = wrapped.criterion

    # the criterion's parameters were optimised by the Trainer's optimiser
    opt_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in crit.parameters()} <= opt_ids and len(list(crit.parameters())) > 0
    for name in ("criterion.losses.rch.head.weight", "criterion.losses.rch.prototypes",
                 "criterion.losses.cplus1.centres", "model.decode_head.classifier.weight"):
        assert not torch.equal(init[name], final[name]), f"{name} did not change"
    assert int(crit.step) == 4

    # every named term was logged, averaged between logging steps
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4
    want = {"pixreg/ce"} | {f"pixreg/{n}" for n in crit.losses}
    want |= {f"pixreg/{n}/{t}" for n, loss in crit.losses.items() for t in loss.terms}
    for rec in logged[1:]:  # from step 2 on every term is reported (RCH's own terms once it is on)
        assert want <= set(rec), want - set(rec)
    assert logged[0]["pixreg/rch"] == 0.0 and logged[-1]["pixreg/rch"] > 0  # RCH's warm-up, then on

    # each checkpoint holds the criterion's parameters and buffers
    saved = load_file(str(tmp_path / "full" / "checkpoint-4" / "model.safetensors"))
    for k, v in final.items():
        assert torch.equal(saved[k], v), k
    assert int(load_file(str(tmp_path / "full" / "checkpoint-2" / "model.safetensors"))["criterion.step"]) == 2

    # resume from step 2 with a fresh model and criterion: same end point
    again = wrapped_segformer(seed=1)
    train(again, tmp_path / "full", resume=str(tmp_path / "full" / "checkpoint-2"))
    resumed = state(again)
    assert int(again.criterion.step) == 4
    for k, v in final.items():
        torch.testing.assert_close(resumed[k], v, rtol=1e-5, atol=1e-6, msg=k)

    # the plain SegFormer comes back for save_pretrained
    model = wrapped.unwrap()
    assert isinstance(model, SegformerForSemanticSegmentation)


def test_pixreg_trainer_refuses_a_bare_model(tmp_path):
    torch.manual_seed(0)
    model = SegformerForSemanticSegmentation(SegformerConfig(num_labels=K, **TINY))
    with pytest.raises(TypeError, match="RegularizedModel"):
        PixregTrainer(model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))
