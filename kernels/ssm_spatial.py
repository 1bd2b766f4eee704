"""Fused S-SSM loss (Triton): forward and backward, no N x N matrix larger than the keys.

Loss (per frame g, normalized key rows A = K/|K|, B = K_ref/|K_ref|, D = A - B):

    L = sum_g ||A A^T - B B^T||_F^2 / (G N^2),   A A^T - B B^T = D A^T + B D^T =: X

D is formed without cancellation (:func:`fastdm.kernels.algebra.normalized_difference`): per row,
``D = E/|k| - k_ref * (E . (k + k_ref)) / (|k| |k_ref| (|k| + |k_ref|))`` with E = k - k_ref.

Two algorithms, chosen by shape:

* N > C ("gram"): three C x C products accumulated over N in fp32,
  G_B = B^T B, Q = D^T B, G_D = D^T D, then
  ||X||^2 = 2<G_D, G_B> + 4<G_D, Q> + ||G_D||^2 + 2<Q, Q^T>;
  backward: dL/dA = 4 (D G_A + B P) / (G N^2) with G_A = G_B + Q + Q^T + G_D, P = Q + G_D.
  When G * (C / BC)^2 programs fill few SMs, the N reduction is split over more programs and
  the partial grams are summed afterwards (deterministic, no atomics).
* N <= C ("tiles"): X (G x N x N, symmetric, no larger than the keys since N <= C; 2 MB at
  N = 180, G = 16) is computed tile by tile, upper-triangle tiles only, the C contraction split
  over more programs when few tiles exist; the backward is one batched product
  dL/dA = 4 X A / (G N^2) from the saved X (no recomputation).

Both end with the fused row-normalization backward ``dK = (dA - A (dA . A)) / |k|``.

Precision (see :mod:`fastdm.kernels.launch`): on sm_80+ every product that involves D (or X) is a
TF32x3 tensor-core dot (about fp32 accuracy, D keeps full relative precision); with fp16 / bf16
keys G_B = B^T B is a native half tensor-core dot with fp32 accumulation; all accumulation,
row statistics and reductions are fp32. Measured against float64 (interpreter, see the table in
``tests/test_kernels.py``): fp32 keys 1e-7..1e-6 relative loss error at any perturbation size
(keys_ref = keys + 1e-5 noise included), TF32x3 emulated ~1e-6; fp16 keys ~1e-5..1e-4 (B rounded
to fp16 in G_B). On-GPU tensor-core error is measured by the CUDA-only tests.

Inputs: (G, N, C) keys and keys_ref of one dtype (fp32/fp16/bf16), made contiguous by the
dispatch (the kernels assume row-major contiguous (G, N, C), C innermost). The scalar scale of
the backward stays a device tensor (no host-device sync).
Its plain-PyTorch twin is ``fastdm.losses.ssm._SpatialSSMTorch`` (same algebra, same D).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .algebra import EPS
from .launch import config_for, dot_precision, launch, split_count


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
def _gram3_kernel(k_ptr, r_ptr, inv_k_ptr, inv_r_ptr, coef_ptr, gb_ptr, q_ptr, gd_ptr, N, C, n_per,
                  PREC: tl.constexpr, HALF: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr):
    """Frame g, C x C tile t, N slice s: partial G_B = B^T B, Q = D^T B, G_D = D^T D."""
    g = tl.program_id(0)
    t = tl.program_id(1)
    s = tl.program_id(2)
    cb = tl.cdiv(C, BC)
    ci = (t // cb) * BC + tl.arange(0, BC)
    cj = (t % cb) * BC + tl.arange(0, BC)
    acc_gb = tl.zeros([BC, BC], dtype=tl.float32)
    acc_q = tl.zeros([BC, BC], dtype=tl.float32)
    acc_gd = tl.zeros([BC, BC], dtype=tl.float32)
    row0 = g * N
    n_lo = s * n_per
    for n0 in range(n_lo, tl.minimum(n_lo + n_per, N), BN):
        offs_n = n0 + tl.arange(0, BN)
        a_i, b_i, d_i = _abd(k_ptr, r_ptr, inv_k_ptr, inv_r_ptr, coef_ptr, row0, offs_n, ci, N, C)
        a_j, b_j, d_j = _abd(k_ptr, r_ptr, inv_k_ptr, inv_r_ptr, coef_ptr, row0, offs_n, cj, N, C)
        b_it = tl.trans(b_i)
        d_it = tl.trans(d_i)
        if HALF:  # O(1) x O(1): native fp16 / bf16 tensor-core dot, fp32 accumulation
            acc_gb = tl.dot(b_it.to(k_ptr.dtype.element_ty), b_j.to(k_ptr.dtype.element_ty), acc_gb)
        else:
            acc_gb = tl.dot(b_it, b_j, acc_gb, input_precision=PREC)
        acc_q = tl.dot(d_it, b_j, acc_q, input_precision=PREC)
        acc_gd = tl.dot(d_it, d_j, acc_gd, input_precision=PREC)
    m = (ci[:, None] < C) & (cj[None, :] < C)
    out = (s * tl.num_programs(0) + g) * C * C + ci[:, None] * C + cj[None, :]
    tl.store(gb_ptr + out, acc_gb, mask=m)
    tl.store(q_ptr + out, acc_q, mask=m)
    tl.store(gd_ptr + out, acc_gd, mask=m)


@triton.jit
def _grad_gram_kernel(k_ptr, r_ptr, inv_k_ptr, inv_r_ptr, coef_ptr, ga_ptr, p_ptr, out_ptr, N, C,
                      PREC: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """dA rows = D G_A + B P for a row block and an output column block (G_A, P pre-scaled)."""
    g = tl.program_id(0)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    co = tl.program_id(2) * BC + tl.arange(0, BC)
    acc = tl.zeros([BN, BC], dtype=tl.float32)
    row0 = g * N
    for c0 in range(0, C, BK):
        cc = c0 + tl.arange(0, BK)
        a, b, d = _abd(k_ptr, r_ptr, inv_k_ptr, inv_r_ptr, coef_ptr, row0, offs_n, cc, N, C)
        mm = (cc[:, None] < C) & (co[None, :] < C)
        idx = g * C * C + cc[:, None] * C + co[None, :]
        ga = tl.load(ga_ptr + idx, mask=mm, other=0.0)
        p = tl.load(p_ptr + idx, mask=mm, other=0.0)
        acc = tl.dot(d, ga, acc, input_precision=PREC)
        acc = tl.dot(b, p, acc, input_precision=PREC)
    m = (offs_n[:, None] < N) & (co[None, :] < C)
    tl.store(out_ptr + (row0 + offs_n)[:, None] * C + co[None, :], acc, mask=m)


@triton.jit
def _tiles_fwd_kernel(k_ptr, r_ptr, inv_k_ptr, inv_r_ptr, coef_ptr, x_ptr, N, C, c_per,
                      PREC: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Partial X_ij = D_i A_j^T + B_i D_j^T over one C slice, for upper-triangle tiles j >= i;
    written to X[s, g, i, j] and (transposed, i != j) X[s, g, j, i]."""
    g = tl.program_id(0)
    t = tl.program_id(1)
    s = tl.program_id(2)
    nb = tl.cdiv(N, BN)
    i = t // nb
    j = t % nb
    if j >= i:
        ni = i * BN + tl.arange(0, BN)
        nj = j * BN + tl.arange(0, BN)
        row0 = g * N
        acc = tl.zeros([BN, BN], dtype=tl.float32)
        c_lo = s * c_per
        for c0 in range(c_lo, tl.minimum(c_lo + c_per, C), BK):
            cc = c0 + tl.arange(0, BK)
            a_i, b_i, d_i = _abd(k_ptr, r_ptr, inv_k_ptr, inv_r_ptr, coef_ptr, row0, ni, cc, N, C)
            a_j, b_j, d_j = _abd(k_ptr, r_ptr, inv_k_ptr, inv_r_ptr, coef_ptr, row0, nj, cc, N, C)
            acc = tl.dot(d_i, tl.trans(a_j), acc, input_precision=PREC)
            acc = tl.dot(b_i, tl.trans(d_j), acc, input_precision=PREC)
        base = x_ptr + (s * tl.num_programs(0) + g) * N * N
        m = (ni[:, None] < N) & (nj[None, :] < N)
        tl.store(base + ni[:, None] * N + nj[None, :], acc, mask=m)
        if i != j:  # (a scalar branch, not `m & (i != j)`: Triton 3.9's interpreter refuses a mask mixed with a scalar)
            tl.store(base + nj[None, :] * N + ni[:, None], acc, mask=m)


@triton.jit
def _tiles_bwd_kernel(k_ptr, inv_k_ptr, x_ptr, scale_ptr, out_ptr, N, C,
                      PREC: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """dA_i[:, cols] = scale * sum_j X_ij A_j[:, cols] from the saved X (scale: a device scalar)."""
    g = tl.program_id(0)
    ni = tl.program_id(1) * BN + tl.arange(0, BN)
    co = tl.program_id(2) * BC + tl.arange(0, BC)
    row0 = g * N
    mi = ni < N
    mc = co < C
    acc = tl.zeros([BN, BC], dtype=tl.float32)
    for j0 in range(0, N, BK):
        nj = j0 + tl.arange(0, BK)
        mj = nj < N
        x = tl.load(x_ptr + g * N * N + ni[:, None] * N + nj[None, :], mask=mi[:, None] & mj[None, :], other=0.0)
        k = tl.load(k_ptr + (row0 + nj)[:, None] * C + co[None, :], mask=mj[:, None] & mc[None, :], other=0.0)
        ik = tl.load(inv_k_ptr + row0 + nj, mask=mj, other=0.0)
        acc = tl.dot(x, k.to(tl.float32) * ik[:, None], acc, input_precision=PREC)
    scale = tl.load(scale_ptr)
    tl.store(out_ptr + (row0 + ni)[:, None] * C + co[None, :], acc * scale, mask=mi[:, None] & mc[None, :])


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


def row_stats(k: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, c = k.shape[0] * k.shape[1], k.shape[2]
    out = [torch.empty(rows, device=k.device, dtype=torch.float32) for _ in range(3)]
    cfg = config_for("row_stats", k.shape[1], c, k.dtype)
    launch("row_stats", _row_stats_kernel, lambda m: (triton.cdiv(rows, m["BR"]),), [k, r, *out, rows, c, EPS], cfg)
    return tuple(out)


def _row_fixup(k: torch.Tensor, inv_k: torch.Tensor, grad_a: torch.Tensor) -> torch.Tensor:
    rows, c = k.shape[0] * k.shape[1], k.shape[2]
    out = torch.empty_like(k)
    cfg = config_for("row_fixup", k.shape[1], c, k.dtype)
    launch("row_fixup", _row_fixup_kernel, lambda m: (triton.cdiv(rows, m["BR"]),), [k, inv_k, grad_a, out, rows, c], cfg)
    return out


def _half_dot(k: torch.Tensor, prec: str) -> bool:
    return k.dtype in (torch.float16, torch.bfloat16) and prec != "ieee"


class SpatialSSMTriton(torch.autograd.Function):
    """S-SSM loss on (G, N, C) keys (made contiguous); returns an fp32 scalar."""

    @staticmethod
    def forward(ctx, keys: torch.Tensor, keys_ref: torch.Tensor, stats=None) -> torch.Tensor:
        k, r = keys.contiguous(), keys_ref.contiguous()
        g, n, c = k.shape
        inv_k, inv_r, coef = row_stats(k, r) if stats is None else stats
        prec = dot_precision(k)
        f32 = dict(device=k.device, dtype=torch.float32)
        if n > c:
            cfg = config_for("gram3", n, c, k.dtype)
            tiles = triton.cdiv(c, cfg.meta["BC"]) ** 2
            splits, n_per = split_count(g * tiles, n, k)
            gb, q, gd = (torch.empty(splits, g, c, c, **f32) for _ in range(3))
            launch("gram3", _gram3_kernel, lambda m: (g, triton.cdiv(c, m["BC"]) ** 2, splits),
                   [k, r, inv_k, inv_r, coef, gb, q, gd, n, c, n_per], cfg,
                   {"PREC": prec, "HALF": _half_dot(k, prec)})
            gb, q, gd = (x[0] if splits == 1 else x.sum(0) for x in (gb, q, gd))
            qt = q.transpose(1, 2)
            total = 2 * (gd * gb).sum() + 4 * (gd * q).sum() + (gd * gd).sum() + 2 * (q * qt).sum()
            ctx.save_for_backward(k, r, inv_k, inv_r, coef, gb + q + qt + gd, q + gd)
        else:
            cfg = config_for("tiles_fwd", n, c, k.dtype)
            nb = triton.cdiv(n, cfg.meta["BN"])
            splits, c_per = split_count(g * nb * (nb + 1) // 2, c, k)
            x = torch.empty(splits, g, n, n, **f32)
            launch("tiles_fwd", _tiles_fwd_kernel, lambda m: (g, triton.cdiv(n, m["BN"]) ** 2, splits),
                   [k, r, inv_k, inv_r, coef, x, n, c, c_per], cfg, {"PREC": prec})
            x = x[0] if splits == 1 else x.sum(0)
            total = (x * x).sum()
            ctx.save_for_backward(k, r, inv_k, inv_r, coef, x)
        ctx.shape = (g, n, c)
        ctx.prec = prec
        return total / (g * n * n)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        g, n, c = ctx.shape
        k, r, inv_k, inv_r, coef, *mats = ctx.saved_tensors
        s = grad_out.float() * (4.0 / (g * n * n))  # a device scalar: no host-device sync
        grad_a = torch.empty(g, n, c, device=k.device, dtype=torch.float32)
        if n > c:
            ga, p = mats
            cfg = config_for("grad_gram", n, c, k.dtype)
            launch("grad_gram", _grad_gram_kernel, lambda m: (g, triton.cdiv(n, m["BN"]), triton.cdiv(c, m["BC"])),
                   [k, r, inv_k, inv_r, coef, (ga * s).contiguous(), (p * s).contiguous(), grad_a, n, c], cfg,
                   {"PREC": ctx.prec})
        else:
            (x,) = mats
            cfg = config_for("tiles_bwd", n, c, k.dtype)
            launch("tiles_bwd", _tiles_bwd_kernel, lambda m: (g, triton.cdiv(n, m["BN"]), triton.cdiv(c, m["BC"])),
                   [k, inv_k, x, s.reshape(1).contiguous(), grad_a, n, c], cfg, {"PREC": ctx.prec})
        return _row_fixup(k, inv_k, grad_a), None, None


def spatial_ssm_loss_triton(keys: torch.Tensor, keys_ref: torch.Tensor, stats=None) -> torch.Tensor:
    """S-SSM on ``(G, N, C)`` keys (batch and frames flattened into G); ``stats`` = precomputed
    ``(1/|k|, 1/|k_ref|, coef)`` rows from :func:`fastdm.kernels.key_stats.pair_stats`."""
    return SpatialSSMTriton.apply(keys, keys_ref, stats)
