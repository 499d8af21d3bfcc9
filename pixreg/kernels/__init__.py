"""Optional fused GPU kernels (need Triton: ``pip install 'pixreg[triton]'``).

Outside the core (which needs only torch and numpy): the losses import a kernel module
lazily, only when it is used (:mod:`pixreg.kernels.lall_triton` for LALL on CUDA), and fall
back to their PyTorch implementations otherwise.
"""
