"""Run ``pixreg train`` (the real CLI) and keep the model and criterion it trained.

``python tests/_capture_train.py STATE_DIR train ...`` (also under ``torchrun``) runs
``pixreg.cli.main(["train", ...])`` and saves ``STATE_DIR/rank{RANK}.pt`` with the final
``{"model": state_dict, "criterion": state_dict}`` of this process. Used by
``tests/test_distributed_train.py``.
"""
from __future__ import annotations

import os
import sys
from typing import Dict

from torch import nn


def capture_builds(built: Dict[str, nn.Module]):
    """Wrap ``pixreg.train.run.build_run`` so that ``built`` receives the run's model and
    criterion; returns ``(run module, original build_run)`` to restore it."""
    import pixreg.train.run as trainer

    original = trainer.build_run

    def build_run(*args, **kwargs):
        model, criterion, layers = original(*args, **kwargs)
        built.update(model=model, criterion=criterion)  # sync_bn converts the model's children in place
        return model, criterion, layers

    trainer.build_run = build_run
    return trainer, original


if __name__ == "__main__":
    import torch

    from pixreg.cli import main

    built: Dict[str, nn.Module] = {}
    capture_builds(built)
    rc = main(sys.argv[2:])
    rank = int(os.environ.get("RANK", "0"))
    torch.save({k: m.state_dict() for k, m in built.items()}, os.path.join(sys.argv[1], f"rank{rank}.pt"))
    sys.exit(rc)
