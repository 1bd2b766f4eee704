"""Fused S-SSM loss (Triton): forward and backward without ever writing an N x N matrix.

Loss (per frame g, normalized key rows A = K/|K|, B = K_ref/|K_ref|, D = A - B):

    L = sum_g ||A A^T - B B^T||_F^2 / (G N^2),   A A^T - B B^T = D A^T + B D^T

D is formed without cancellation (``fastdm.losses.ssm.normalized_difference``): per row,
``D = E/|k| - k_ref * (E . (k + k_ref)) / (|k| |k_ref| (|k| + |k_ref|))`` with E = k - k_ref.

Two algorithms, chosen by shape:

* N > C ("gram"): accumulate three C x C products over N in fp32,
  G_B = B^T B, Q = D^T B, G_D = D^T D, then
  ||.||^2 = 2<G_D, G_B> + 4<G_D, Q> + ||G_D||^2 + 2<Q, Q^T>;
  backward: dL/dA = 4 (D G_A + B P) / (G N^2) with G_A = G_B + Q + Q^T + G_D, P = Q + G_D.
* N <= C ("tiles"): similarity-difference tiles X_ij = D_i A_j^T + B_i D_j^T computed on the fly,
  squared and summed (flash-attention style); the backward recomputes the tiles:
  dL/dA_i = 4 sum_j X_ij A_j / (G N^2).

Both end with the fused row-normalization backward ``dK = (dA - A (dA . A)) / |k|``.
Inputs fp32/fp16/bf16; all arithmetic in fp32 with IEEE fp32 dot products (no TF32).
Its plain-PyTorch twin is ``fastdm.losses.ssm._SpatialSSMTorch`` (same algebra, same D).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

EPS = 1e-12


@triton.jit
def _row_stats_kernel(k_ptr, r_ptr, inv_k_ptr, inv_r_ptr, coef_ptr, rows, C, eps,
                      BR: tl.constexpr, BC: tl.constexpr):
    """Per row: 1/|k|, 1/|k_ref|, (E.(k+k_ref)) / (|k||k_ref|(|k|+|k_ref|))."""
    pid = tl.program_id(0)
    offs_r = pid * BR + tl.arange(0, BR)
    mr = offs_r < rows
    sk = tl.zeros([BR], dtype=tl.float32)
    sr = tl.zeros([BR], dtype=tl.float32)
    se = tl.zeros([BR], dtype=tl.float32)
    for c0 in range(0, C, BC):
        offs_c = c0 + tl.arange(0, BC)
        m = mr[:, None] & (offs_c[None, :] < C)
        idx = offs_r[:, None] * C + offs_c[None, :]
        k = tl.load(k_ptr + idx, mask=m, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + idx, mask=m, other=0.0).to(tl.float32)
        sk += tl.sum(k * k, axis=1)
        sr += tl.sum(r * r, axis=1)
        se += tl.sum((k - r) * (k + r), axis=1)
    nk = tl.maximum(tl.sqrt(sk), eps)
    nr = tl.maximum(tl.sqrt(sr), eps)
    tl.store(inv_k_ptr + offs_r, 1.0 / nk, mask=mr)
    tl.store(inv_r_ptr + offs_r, 1.0 / nr, mask=mr)
    tl.store(coef_ptr + offs_r, se / (nk * nr * (nk + nr)), mask=mr)


@triton.jit
def _abd(k_ptr, r_ptr, inv_k_ptr, inv_r_ptr, coef_ptr, row0, offs_n, offs_c, N, C):
    """Load a (rows x cols) tile of K, K_ref and return A, B, D tiles in fp32."""
    mn = offs_n < N
    m = mn[:, None] & (offs_c[None, :] < C)
    idx = (row0 + offs_n)[:, None] * C + offs_c[None, :]
    k = tl.load(k_ptr + idx, mask=m, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + idx, mask=m, other=0.0).to(tl.float32)
    ik = tl.load(inv_k_ptr + row0 + offs_n, mask=mn, other=0.0)[:, None]
    ir = tl.load(inv_r_ptr + row0 + offs_n, mask=mn, other=0.0)[:, None]
    cf = tl.load(coef_ptr + row0 + offs_n, mask=mn, other=0.0)[:, None]
    return k * ik, r * ir, (k - r) * ik - r * cf


@triton.jit
def _gram3_kernel(k_ptr, r_ptr, inv_k_ptr, inv_r_ptr, coef_ptr, gb_ptr, q_ptr, gd_ptr, N, C,
                  BN: tl.constexpr, BC: tl.constexpr):
    """Per frame g and C x C tile (i, j): G_B = B^T B, Q = D^T B, G_D = D^T D, summed over N."""
    g = tl.program_id(0)
    ci = tl.program_id(1) * BC + tl.arange(0, BC)
    cj = tl.program_id(2) * BC + tl.arange(0, BC)
    acc_gb = tl.zeros([BC, BC], dtype=tl.float32)
    acc_q = tl.zeros([BC, BC], dtype=tl.float32)
    acc_gd = tl.zeros([BC, BC], dtype=tl.float32)
    row0 = g * N
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        a_i, b_i, d_i = _abd(k_ptr, r_ptr, inv_k_ptr, inv_r_ptr, coef_ptr, row0, offs_n, ci, N, C)
        a_j, b_j, d_j = _abd(k_ptr, r_ptr, inv_k_ptr, inv_r_ptr, coef_ptr, row0, offs_n, cj, N, C)
        b_it = tl.trans(b_i)
        d_it = tl.trans(d_i)
        acc_gb += tl.dot(b_it, b_j, input_precision="ieee")
        acc_q += tl.dot(d_it, b_j, input_precision="ieee")
        acc_gd += tl.dot(d_it, d_j, input_precision="ieee")
    m = (ci[:, None] < C) & (cj[None, :] < C)
    out = g * C * C + ci[:, None] * C + cj[None, :]
    tl.store(gb_ptr + out, acc_gb, mask=m)
    tl.store(q_ptr + out, acc_q, mask=m)
    tl.store(gd_ptr + out, acc_gd, mask=m)


@triton.jit
def _grad_gram_kernel(k_ptr, r_ptr, inv_k_ptr, inv_r_ptr, coef_ptr, ga_ptr, p_ptr, out_ptr, N, C,
                      BN: tl.constexpr, BC: tl.constexpr):
    """dA rows = D G_A + B P for a row block and an output column block (G_A, P pre-scaled)."""
    g = tl.program_id(0)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    co = tl.program_id(2) * BC + tl.arange(0, BC)
    acc = tl.zeros([BN, BC], dtype=tl.float32)
    row0 = g * N
    for c0 in range(0, C, BC):
        cc = c0 + tl.arange(0, BC)
        a, b, d = _abd(k_ptr, r_ptr, inv_k_ptr, inv_r_ptr, coef_ptr, row0, offs_n, cc, N, C)
        mm = (cc[:, None] < C) & (co[None, :] < C)
        idx = g * C * C + cc[:, None] * C + co[None, :]
        ga = tl.load(ga_ptr + idx, mask=mm, other=0.0)
        p = tl.load(p_ptr + idx, mask=mm, other=0.0)
        acc += tl.dot(d, ga, input_precision="ieee")
        acc += tl.dot(b, p, input_precision="ieee")
    m = (offs_n[:, None] < N) & (co[None, :] < C)
    tl.store(out_ptr + (row0 + offs_n)[:, None] * C + co[None, :], acc, mask=m)


@triton.jit
def _x_tile(k_ptr, r_ptr, inv_k_ptr, inv_r_ptr, coef_ptr, row0, ni, nj, N, C,
            BN: tl.constexpr, BC: tl.constexpr):
    """X_ij = D_i A_j^T + B_i D_j^T for row blocks ni, nj (contracting over C)."""
    acc = tl.zeros([BN, BN], dtype=tl.float32)
    for c0 in range(0, C, BC):
        cc = c0 + tl.arange(0, BC)
        a_i, b_i, d_i = _abd(k_ptr, r_ptr, inv_k_ptr, inv_r_ptr, coef_ptr, row0, ni, cc, N, C)
        a_j, b_j, d_j = _abd(k_ptr, r_ptr, inv_k_ptr, inv_r_ptr, coef_ptr, row0, nj, cc, N, C)
        acc += tl.dot(d_i, tl.trans(a_j), input_precision="ieee")
        acc += tl.dot(b_i, tl.trans(d_j), input_precision="ieee")
    return acc


@triton.jit
def _tiles_fwd_kernel(k_ptr, r_ptr, inv_k_ptr, inv_r_ptr, coef_ptr, part_ptr, N, C, NB,
                      BN: tl.constexpr, BC: tl.constexpr):
    """Partial sums of X^2 over one N x N tile; the tile itself never leaves registers."""
    g = tl.program_id(0)
    i = tl.program_id(1)
    j = tl.program_id(2)
    ni = i * BN + tl.arange(0, BN)
    nj = j * BN + tl.arange(0, BN)
    x = _x_tile(k_ptr, r_ptr, inv_k_ptr, inv_r_ptr, coef_ptr, g * N, ni, nj, N, C, BN, BC)
    tl.store(part_ptr + (g * NB + i) * NB + j, tl.sum(tl.sum(x * x, axis=1), axis=0))


@triton.jit
def _tiles_bwd_kernel(k_ptr, r_ptr, inv_k_ptr, inv_r_ptr, coef_ptr, out_ptr, scale, N, C,
                      BN: tl.constexpr, BC: tl.constexpr):
    """dA_i[:, cols] = scale * sum_j X_ij A_j[:, cols], recomputing each X_ij."""
    g = tl.program_id(0)
    ni = tl.program_id(1) * BN + tl.arange(0, BN)
    co = tl.program_id(2) * BC + tl.arange(0, BC)
    row0 = g * N
    acc = tl.zeros([BN, BC], dtype=tl.float32)
    for j0 in range(0, N, BN):
        nj = j0 + tl.arange(0, BN)
        x = _x_tile(k_ptr, r_ptr, inv_k_ptr, inv_r_ptr, coef_ptr, row0, ni, nj, N, C, BN, BC)
        a_j, b_j, d_j = _abd(k_ptr, r_ptr, inv_k_ptr, inv_r_ptr, coef_ptr, row0, nj, co, N, C)
        acc += tl.dot(x, a_j, input_precision="ieee")
    m = (ni[:, None] < N) & (co[None, :] < C)
    tl.store(out_ptr + (row0 + ni)[:, None] * C + co[None, :], acc * scale, mask=m)


@triton.jit
def _row_fixup_kernel(k_ptr, inv_k_ptr, ga_ptr, out_ptr, rows, C, BR: tl.constexpr, BC: tl.constexpr):
    """dK = (dA - A (dA . A)) / |k|  (the backward of row normalization), written in K's dtype."""
    pid = tl.program_id(0)
    offs_r = pid * BR + tl.arange(0, BR)
    mr = offs_r < rows
    ik = tl.load(inv_k_ptr + offs_r, mask=mr, other=0.0)
    dot = tl.zeros([BR], dtype=tl.float32)
    for c0 in range(0, C, BC):
        offs_c = c0 + tl.arange(0, BC)
        m = mr[:, None] & (offs_c[None, :] < C)
        idx = offs_r[:, None] * C + offs_c[None, :]
        a = tl.load(k_ptr + idx, mask=m, other=0.0).to(tl.float32) * ik[:, None]
        ga = tl.load(ga_ptr + idx, mask=m, other=0.0)
        dot += tl.sum(ga * a, axis=1)
    for c0 in range(0, C, BC):
        offs_c = c0 + tl.arange(0, BC)
        m = mr[:, None] & (offs_c[None, :] < C)
        idx = offs_r[:, None] * C + offs_c[None, :]
        a = tl.load(k_ptr + idx, mask=m, other=0.0).to(tl.float32) * ik[:, None]
        ga = tl.load(ga_ptr + idx, mask=m, other=0.0)
        tl.store(out_ptr + idx, ((ga - a * dot[:, None]) * ik[:, None]).to(out_ptr.dtype.element_ty), mask=m)


def _blocks(n: int, c: int) -> tuple[int, int]:
    bn = max(16, min(64, triton.next_power_of_2(n)))
    bc = max(16, min(64, triton.next_power_of_2(c)))
    return bn, bc


def row_stats(k: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, c = k.shape[0] * k.shape[1], k.shape[2]
    out = [torch.empty(rows, device=k.device, dtype=torch.float32) for _ in range(3)]
    br, bc = 32, max(16, min(128, triton.next_power_of_2(c)))
    _row_stats_kernel[(triton.cdiv(rows, br),)](k, r, *out, rows, c, EPS, BR=br, BC=bc)
    return tuple(out)


def _row_fixup(k: torch.Tensor, inv_k: torch.Tensor, grad_a: torch.Tensor) -> torch.Tensor:
    rows, c = k.shape[0] * k.shape[1], k.shape[2]
    out = torch.empty_like(k)
    bc = max(16, min(128, triton.next_power_of_2(c)))
    _row_fixup_kernel[(triton.cdiv(rows, 32),)](k, inv_k, grad_a, out, rows, c, BR=32, BC=bc)
    return out


class SpatialSSMTriton(torch.autograd.Function):
    """S-SSM loss on (G, N, C) contiguous keys; returns an fp32 scalar."""

    @staticmethod
    def forward(ctx, keys: torch.Tensor, keys_ref: torch.Tensor, stats=None) -> torch.Tensor:
        k, r = keys.contiguous(), keys_ref.contiguous()
        g, n, c = k.shape
        inv_k, inv_r, coef = row_stats(k, r) if stats is None else stats
        bn, bc = _blocks(n, c)
        if n > c:
            gb, q, gd = (torch.empty(g, c, c, device=k.device, dtype=torch.float32) for _ in range(3))
            grid = (g, triton.cdiv(c, bc), triton.cdiv(c, bc))
            _gram3_kernel[grid](k, r, inv_k, inv_r, coef, gb, q, gd, n, c, BN=bn, BC=bc)
            total = 2 * (gd * gb).sum() + 4 * (gd * q).sum() + (gd * gd).sum() + 2 * (q * q.transpose(1, 2)).sum()
            ga = gb + q + q.transpose(1, 2) + gd
            p = q + gd
            ctx.save_for_backward(k, r, inv_k, inv_r, coef, ga, p)
        else:
            nb = triton.cdiv(n, bn)
            part = torch.empty(g, nb, nb, device=k.device, dtype=torch.float32)
            _tiles_fwd_kernel[(g, nb, nb)](k, r, inv_k, inv_r, coef, part, n, c, nb, BN=bn, BC=bc)
            total = part.sum()
            ctx.save_for_backward(k, r, inv_k, inv_r, coef)
        ctx.shape = (g, n, c)
        return total / (g * n * n)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        g, n, c = ctx.shape
        bn, bc = _blocks(n, c)
        scale = 4.0 / (g * n * n)
        grad_a = torch.empty(g, n, c, device=grad_out.device, dtype=torch.float32)
        if n > c:
            k, r, inv_k, inv_r, coef, ga, p = ctx.saved_tensors
            s = grad_out.float() * scale
            grid = (g, triton.cdiv(n, bn), triton.cdiv(c, bc))
            _grad_gram_kernel[grid](k, r, inv_k, inv_r, coef, (ga * s).contiguous(), (p * s).contiguous(), grad_a, n, c, BN=bn, BC=bc)
        else:
            k, r, inv_k, inv_r, coef = ctx.saved_tensors
            grid = (g, triton.cdiv(n, bn), triton.cdiv(c, bc))
            _tiles_bwd_kernel[grid](k, r, inv_k, inv_r, coef, grad_a, float(grad_out) * scale, n, c, BN=bn, BC=bc)
        return _row_fixup(k, inv_k, grad_a), None, None


def spatial_ssm_loss_triton(keys: torch.Tensor, keys_ref: torch.Tensor, stats=None) -> torch.Tensor:
    """S-SSM on ``(G, N, C)`` keys (batch and frames flattened into G); ``stats`` = precomputed
    ``(1/|k|, 1/|k_ref|, coef)`` rows from :func:`fastdm.kernels.key_stats.pair_stats`."""
    return SpatialSSMTriton.apply(keys, keys_ref, stats)
