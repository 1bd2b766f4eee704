"""Triton kernels of fastdm, installed as ``fastdm.kernels``.

This folder is filled by the kernels work (fused self-similarity losses, fused key extraction).
Each op will live in one file holding the Triton kernel and its ``torch.autograd.Function``,
with its plain-PyTorch twin beside it. Until then the PyTorch forms in ``fastdm.losses`` are
the only backends.
"""

AVAILABLE: tuple[str, ...] = ()
