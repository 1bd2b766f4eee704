"""Triton kernels of fastdm, installed as ``fastdm.kernels``.

One file per op, each holding its Triton kernels and ``torch.autograd.Function``:

* ``ssm_spatial``  fused S-SSM loss, forward + backward, never writes an N x N matrix
* ``ssm_temporal`` fused T-SSM loss, one pass over the keys
* ``key_stats``    one pass over keys and source keys giving what both losses need
* ``launch``       block sizes / warps / stages (:func:`launch.config_for`, deterministic), autotune
                   alternatives, dot precision (TF32x3 / native half), splits, the CUDA device guard
* ``algebra``      plain-torch helpers (a deliberate copy of ``fastdm.losses.ssm.normalized_difference``:
                   this package imports nothing from the rest of ``fastdm``)
* ``aot``          ``python -m fastdm.kernels.aot``: compiles every launched specialization for
                   sm_80/86/89/90a on the CPU and checks shared memory and register spills

Their plain-PyTorch twins are the ``"torch"`` backends of ``fastdm.losses``. Like xformers'
operators, the Triton backend says why it refuses an input (:func:`not_supported_reasons`);
``fastdm.losses`` dispatches on that.

Triton runs on CUDA GPUs, or on the CPU through its interpreter when ``TRITON_INTERPRET=1`` is set
before triton is imported (tests do this when no CUDA GPU is present; it is slow and has no bf16
arithmetic). The kernels take row-major contiguous (G, N, C) keys; the dispatch makes them so.
"""

from __future__ import annotations

import os

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"triton is not importable ({type(e).__name__}: {e}); pip install triton"
    return None


def not_supported_reasons(keys: torch.Tensor, keys_ref: torch.Tensor | None = None) -> list[str]:
    """Why the Triton SSM kernels cannot take these inputs (empty list = supported)."""
    reasons = []
    err = triton_import_error()
    if err:
        reasons.append(err)
    if keys.device.type != "cuda" and not interpreting():
        reasons.append(f"keys are on {keys.device.type}; the Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 on the CPU)")
    if keys.dtype not in DTYPES:
        reasons.append(f"dtype {keys.dtype} is not supported (fp32, fp16, bf16)")
    elif keys.dtype == torch.bfloat16 and keys.device.type != "cuda" and interpreting():
        reasons.append("the Triton interpreter has no bf16 arithmetic; use a GPU or the torch backend")
    if keys_ref is not None and (keys_ref.dtype != keys.dtype or keys_ref.device != keys.device):
        reasons.append("keys and keys_ref must share dtype and device")
    if keys.numel() >= 2**31:
        reasons.append(f"{keys.numel()} elements exceed the kernels' 32-bit indexing")
    return reasons


def spatial_ssm_loss(keys: torch.Tensor, keys_ref: torch.Tensor) -> torch.Tensor:
    from .ssm_spatial import spatial_ssm_loss_triton

    return spatial_ssm_loss_triton(keys.reshape(-1, *keys.shape[-2:]), keys_ref.reshape(-1, *keys.shape[-2:]))


def temporal_ssm_loss(keys: torch.Tensor, keys_ref: torch.Tensor) -> torch.Tensor:
    from .ssm_temporal import temporal_ssm_loss_triton

    if keys.dim() == 3:
        keys, keys_ref = keys[None], keys_ref[None]
    return temporal_ssm_loss_triton(keys, keys_ref)


def ssm_losses(keys: torch.Tensor, keys_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S-SSM, T-SSM) of ``(B, F, N, C)`` keys from one shared statistics pass over the keys."""
    from .key_stats import pair_stats
    from .ssm_spatial import spatial_ssm_loss_triton
    from .ssm_temporal import temporal_ssm_loss_triton

    if keys.dim() == 3:
        keys, keys_ref = keys[None], keys_ref[None]
    bsz, f, n, c = keys.shape
    k = keys.reshape(bsz * f, n, c).contiguous()
    r = keys_ref.reshape(bsz * f, n, c).contiguous().detach()
    rows, sums = pair_stats(k.detach(), r)
    return spatial_ssm_loss_triton(k, r, rows), temporal_ssm_loss_triton(k.view(bsz, f, n, c), r.view(bsz, f, n, c), sums)
