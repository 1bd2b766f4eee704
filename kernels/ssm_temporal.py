"""Fused T-SSM loss (Triton): one pass over the keys forward, one broadcast write backward.

Per frame the spatial mean of the keys M (B, F, C), the F x F cosine similarity TS of its rows,
loss = mean over the F*F entries (and the batch) of (TS - TS_ref)^2.

The kernel reads K and K_ref once and produces, per frame, sum(K), sum(K_ref) and sum(K - K_ref)
in fp32 (the last keeps the mean difference exact when K ~= K_ref). The F x F algebra is tiny and
runs in PyTorch on those sums, differentiated analytically at forward time; the backward of the
mean is then dK[g, n, :] = (dL/dM + dL/dE)[g, :] / N for every token n, a single broadcast write.
The N reduction is split over more programs when few would run (second reduction in PyTorch);
the kernel assumes contiguous (G, N, C) keys (the dispatch makes them so).
Its plain-PyTorch twin is ``fastdm.losses.ssm.temporal_ssm_loss(backend="torch")``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .algebra import normalized_difference
from .launch import config_for, launch, split_count


@triton.jit
def _frame_sums_kernel(k_ptr, r_ptr, sk_ptr, sr_ptr, se_ptr, N, C, n_per, BN: tl.constexpr, BC: tl.constexpr):
    """Partial per-frame sums over the N slice s (program axis 2) into row (s, g) of each output."""
    g = tl.program_id(0)
    s = tl.program_id(2)
    offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
    mc = offs_c < C
    ak = tl.zeros([BC], dtype=tl.float32)
    ar = tl.zeros([BC], dtype=tl.float32)
    ae = tl.zeros([BC], dtype=tl.float32)
    n_lo = s * n_per
    for n0 in range(n_lo, tl.minimum(n_lo + n_per, N), BN):
        offs_n = n0 + tl.arange(0, BN)
        m = (offs_n[:, None] < N) & mc[None, :]
        idx = (g * N + offs_n)[:, None] * C + offs_c[None, :]
        k = tl.load(k_ptr + idx, mask=m, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + idx, mask=m, other=0.0).to(tl.float32)
        ak += tl.sum(k, axis=0)
        ar += tl.sum(r, axis=0)
        ae += tl.sum(k - r, axis=0)
    out = (s * tl.num_programs(0) + g) * C + offs_c
    tl.store(sk_ptr + out, ak, mask=mc)
    tl.store(sr_ptr + out, ar, mask=mc)
    tl.store(se_ptr + out, ae, mask=mc)


def frame_sums(k: torch.Tensor, r: torch.Tensor):
    """(G, N, C) contiguous keys -> per-frame sums of K, K_ref and K - K_ref, each (G, C) fp32.

    When G * C / BC programs fill few SMs the N reduction is split over more programs; the
    partial sums are added afterwards (deterministic)."""
    g, n, c = k.shape
    cfg = config_for("frame_sums", n, c, k.dtype)
    splits, n_per = split_count(g * triton.cdiv(c, cfg.meta["BC"]), n, k)
    out = [torch.empty(splits, g, c, device=k.device, dtype=torch.float32) for _ in range(3)]
    launch("frame_sums", _frame_sums_kernel, lambda m: (g, triton.cdiv(c, m["BC"]), splits), [k, r, *out, n, c, n_per], cfg)
    return [o[0] if splits == 1 else o.sum(0) for o in out]


def _fxf_loss(m: torch.Tensor, mr: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    a, b, d = normalized_difference(m, mr, e=e)
    x = d @ a.transpose(-1, -2) + b @ d.transpose(-1, -2)
    return (x * x).mean()


class TemporalSSMTriton(torch.autograd.Function):
    """T-SSM on (B, F, N, C) keys; returns an fp32 scalar."""

    @staticmethod
    def forward(ctx, keys: torch.Tensor, keys_ref: torch.Tensor, sums=None) -> torch.Tensor:
        bsz, f, n, c = keys.shape
        if sums is None:
            sums = frame_sums(keys.reshape(bsz * f, n, c).contiguous(), keys_ref.reshape(bsz * f, n, c).contiguous())
        sk, sr, se = sums
        m, mr, e = (s.view(bsz, f, c) / n for s in (sk, sr, se))
        with torch.enable_grad():
            m = m.detach().requires_grad_(True)
            e = e.detach().requires_grad_(True)
            loss = _fxf_loss(m, mr, e)
            gm, ge = torch.autograd.grad(loss, (m, e))
        ctx.save_for_backward((gm + ge) / n)
        ctx.meta = (keys.shape, keys.dtype)
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (g_row,) = ctx.saved_tensors
        shape, dtype = ctx.meta
        grad = (g_row * grad_out).to(dtype)  # (B, F, C)
        return grad[:, :, None, :].expand(shape), None, None


def temporal_ssm_loss_triton(keys: torch.Tensor, keys_ref: torch.Tensor, sums=None) -> torch.Tensor:
    """T-SSM on ``(B, F, N, C)`` keys; ``sums`` = precomputed per-frame (sum K, sum K_ref, sum K - K_ref)."""
    return TemporalSSMTriton.apply(keys, keys_ref, sums)
