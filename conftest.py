"""Pytest set-up shared by tests/ and the doctests of pixreg/.

Without CUDA, Triton runs kernels only in its interpreter, a mode fixed when ``triton`` is
first imported (``torch._dynamo`` imports it): set it before any test imports torch's
compiler, so that the Triton LALL kernels are tested on CPU (tests/test_lall_triton.py).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
