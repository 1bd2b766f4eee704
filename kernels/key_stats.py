"""Fused key statistics (Triton): everything both SSM losses need from the keys, in one pass.

The taps hand over the keys the attention layer already computed (a forward hook on ``to_k``:
no recomputation, no copy). This kernel is then the one extra read of the keys and the source
keys: per token row it produces 1/|k|, 1/|k_ref| and the cancellation-free coefficient
``(E . (k + k_ref)) / (|k||k_ref|(|k| + |k_ref|))`` that defines D = A - B (the S-SSM kernels'
row statistics), and per frame the sums of K, K_ref and K - K_ref (the T-SSM kernel's input),
accumulated across row blocks with atomic adds. :func:`fastdm.kernels.dispatch.ssm_losses` feeds both
losses from it, so S-SSM + T-SSM together skip their own statistics passes.
Its PyTorch twin is the row/mean arithmetic of ``fastdm.losses.ssm``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .algebra import EPS
from .launch import config_for, launch


@triton.jit
def _pair_stats_kernel(k_ptr, r_ptr, inv_k_ptr, inv_r_ptr, coef_ptr, sk_ptr, sr_ptr, se_ptr, N, C, eps,
                       BR: tl.constexpr, BC: tl.constexpr):
    g = tl.program_id(0)
    offs_n = tl.program_id(1) * BR + tl.arange(0, BR)
    mn = offs_n < N
    rows = g * N + offs_n
    nk2 = tl.zeros([BR], dtype=tl.float32)
    nr2 = tl.zeros([BR], dtype=tl.float32)
    ekr = tl.zeros([BR], dtype=tl.float32)
    for c0 in range(0, C, BC):
        offs_c = c0 + tl.arange(0, BC)
        mc = offs_c < C
        m = mn[:, None] & mc[None, :]
        idx = rows[:, None] * C + offs_c[None, :]
        k = tl.load(k_ptr + idx, mask=m, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + idx, mask=m, other=0.0).to(tl.float32)
        e = k - r
        nk2 += tl.sum(k * k, axis=1)
        nr2 += tl.sum(r * r, axis=1)
        ekr += tl.sum(e * (k + r), axis=1)
        tl.atomic_add(sk_ptr + g * C + offs_c, tl.sum(k, axis=0), mask=mc)
        tl.atomic_add(sr_ptr + g * C + offs_c, tl.sum(r, axis=0), mask=mc)
        tl.atomic_add(se_ptr + g * C + offs_c, tl.sum(e, axis=0), mask=mc)
    nk = tl.maximum(tl.sqrt(nk2), eps)
    nr = tl.maximum(tl.sqrt(nr2), eps)
    tl.store(inv_k_ptr + rows, 1.0 / nk, mask=mn)
    tl.store(inv_r_ptr + rows, 1.0 / nr, mask=mn)
    tl.store(coef_ptr + rows, ekr / (nk * nr * (nk + nr)), mask=mn)


def pair_stats(k: torch.Tensor, r: torch.Tensor):
    """(G, N, C) contiguous (row-major, C innermost) keys -> ((1/|k|, 1/|k_ref|, coef) per row, (sum K, sum K_ref, sum E) per frame)."""
    g, n, c = k.shape
    rows = [torch.empty(g * n, device=k.device, dtype=torch.float32) for _ in range(3)]
    sums = [torch.zeros(g, c, device=k.device, dtype=torch.float32) for _ in range(3)]
    cfg = config_for("pair_stats", n, c, k.dtype)
    launch("pair_stats", _pair_stats_kernel, lambda m: (g, triton.cdiv(n, m["BR"])), [k, r, *rows, *sums, n, c, EPS], cfg)
    return tuple(rows), tuple(sums)
