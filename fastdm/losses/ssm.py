"""Space-time self-similarity matching losses (S-SSM and T-SSM) of DreamMotion.

Shapes: ``keys`` and ``keys_ref`` are ``(F, N, C)`` or ``(B, F, N, C)``: F frames, N = H*W tokens
of one frame, C channels. ``keys_ref`` (the source video's keys) is a constant; gradients flow
to ``keys`` only.

* S-SSM: per frame, S = cos-similarity matrix (N x N) of the token rows;
  loss = mean over all frames and all N*N entries of (S - S_ref)^2.
* T-SSM: per frame the mean over the N tokens (an F x C matrix), then the F x F cosine
  similarity TS; loss = mean over the F*F entries (and the batch) of (TS - TS_ref)^2.

Backends
--------
``"naive"``  materializes S and S_ref in the input precision (upcast to fp32) and lets autograd
             differentiate. It is the textbook baseline; near ``keys ~= keys_ref`` it suffers
             from cancellation in ``S - S_ref`` (relative error ~1e-2 at 1e-5 perturbations).
``"torch"``  never forms ``S`` or ``S_ref``. It writes the difference of the normalized keys
             ``D = A - B`` in a cancellation-free way and expands

                 S - S_ref = A A^T - B B^T = D A^T + B D^T

             so every term is computed from ``D`` directly. For N > C the squared Frobenius norm
             is taken through C x C products only (no N x N matrix at all): with
             G_B = B^T B, Q = D^T B, G_D = D^T D,

                 ||S - S_ref||^2 = 2<G_D, G_B> + 4<G_D, Q> + ||G_D||^2 + 2<Q, Q^T>

             and the analytic gradient is ``dL/dA = 4 (D G_A + B P) / (G N^2)`` with
             G_A = A^T A = G_B + Q + Q^T + G_D and P = D^T A = Q + G_D. For N <= C the N x N
             difference (no larger than a C x C product) is formed per chunk of frames.
``"triton"`` fused Triton kernels (``fastdm.kernels``): same algebra, never an N x N matrix in
             memory; refuses inputs it cannot take with the reasons (device, dtype, shape).
``"auto"``   ``"triton"`` for CUDA inputs it supports, otherwise ``"torch"``.
"""

from __future__ import annotations

import torch

from ..errors import FastDMError

_EPS = 1e-12
BACKENDS = ("auto", "naive", "torch", "triton")


def _flatten(keys: torch.Tensor, keys_ref: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if keys.dim() not in (3, 4):
        raise FastDMError(f"{name}: keys must be shaped (F, N, C) or (B, F, N, C), got {tuple(keys.shape)}")
    if keys_ref.shape != keys.shape:
        raise FastDMError(
            f"{name}: keys {tuple(keys.shape)} and keys_ref {tuple(keys_ref.shape)} must have the same shape"
        )
    if keys.shape[-1] < 1 or keys.shape[-2] < 1 or keys.shape[-3] < 1:
        raise FastDMError(f"{name}: empty keys tensor {tuple(keys.shape)}")
    if keys.dim() == 3:
        keys, keys_ref = keys.unsqueeze(0), keys_ref.unsqueeze(0)
    return keys, keys_ref.detach()


def _resolve(backend: str, name: str, keys: torch.Tensor, keys_ref: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise FastDMError(f"{name}: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if keys.device.type != "cuda":
            return "torch"
        from fastdm.kernels.dispatch import not_supported_reasons

        return "torch" if not_supported_reasons(keys, keys_ref) else "triton"
    if backend == "triton":
        from fastdm.kernels.dispatch import not_supported_reasons

        reasons = not_supported_reasons(keys, keys_ref)
        if reasons:
            raise FastDMError(f"{name}: backend 'triton' cannot take this input: {'; '.join(reasons)}")
    return backend


def normalized_difference(
    k: torch.Tensor, kr: torch.Tensor, e: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(A, B, D)`` with A = k/|k|, B = kr/|kr| row-wise and D = A - B without cancellation.

    ``D = E/|k| - kr * (E . (k + kr)) / (|k| |kr| (|k| + |kr|))`` with ``E = k - kr``: for nearby
    fp32 inputs E is exact (Sterbenz), so D keeps full relative precision even when |D| ~ 1e-5.
    Pass ``e`` when k and kr are themselves derived (e.g. means) and k - kr would cancel.
    """
    nk = k.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    nr = kr.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    if e is None:
        e = k - kr
    a = k / nk
    b = kr / nr
    d = e / nk - kr * ((e * (k + kr)).sum(-1, keepdim=True) / (nk * nr * (nk + nr)))
    return a, b, d


_CHUNK_ELEMS = 1 << 20  # frames are processed in chunks of about this many key elements (4 MB of fp32 a temporary)
# on a GPU one frame per chunk makes the loss launch-bound (a ZeroScope layer is 0.9M elements a frame): chunks
# of up to 16M elements (64 MB a temporary; all 16 frames of ZeroScope's largest layer at once)
_CHUNK_ELEMS_CUDA = 1 << 24


def _chunks(g: int, n: int, c: int, device: torch.device | str = "cpu"):
    budget = _CHUNK_ELEMS_CUDA if torch.device(device).type == "cuda" else _CHUNK_ELEMS
    step = max(1, budget // max(1, n * c))
    return [(i, min(g, i + step)) for i in range(0, g, step)]


class _SpatialSSMTorch(torch.autograd.Function):
    """S-SSM loss with the C x C (or small N x N) algebra and an analytic backward.

    The same algebra as the Triton kernels (``fastdm.kernels.ssm_spatial``), in PyTorch: frames are
    processed in chunks so that temporaries stay at a few MB; for N > C it keeps only the two
    C x C matrices per frame that the backward needs (G_A, P), for N <= C nothing but the keys.
    """

    @staticmethod
    def forward(ctx, keys: torch.Tensor, keys_ref: torch.Tensor) -> torch.Tensor:
        g, n, c = keys.shape
        total = torch.zeros((), dtype=torch.float32, device=keys.device)
        gram = n > c
        if gram:
            ga = torch.empty(g, c, c, dtype=torch.float32, device=keys.device)
            p = torch.empty_like(ga)
        for i, j in _chunks(g, n, c, keys.device):
            a, b, d = normalized_difference(keys[i:j].float(), keys_ref[i:j].float())
            if gram:
                dt = d.transpose(1, 2)
                gb, q, gd = b.transpose(1, 2) @ b, dt @ b, dt @ d
                qt = q.transpose(1, 2)
                total += 2 * (gd * gb).sum() + 4 * (gd * q).sum() + (gd * gd).sum() + 2 * (q * qt).sum()
                ga[i:j] = gb + q + qt + gd
                p[i:j] = q + gd
            else:
                x = d @ a.transpose(1, 2) + b @ d.transpose(1, 2)  # (chunk, N, N) = S - S_ref
                total += (x * x).sum()
        ctx.save_for_backward(keys, keys_ref, *((ga, p) if gram else ()))
        return total / (g * n * n)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        keys, keys_ref, *mats = ctx.saved_tensors
        g, n, c = keys.shape
        scale = grad_out.float() * (4.0 / (g * n * n))
        grad = torch.empty_like(keys)
        for i, j in _chunks(g, n, c, keys.device):
            k = keys[i:j].float()
            a, b, d = normalized_difference(k, keys_ref[i:j].float())
            if mats:  # dL/dA = 4 (D G_A + B P) / (G N^2)
                ga = torch.baddbmm(b @ mats[1][i:j], d, mats[0][i:j])
            else:  # dL/dA = 4 X A / (G N^2)
                ga = (d @ a.transpose(1, 2) + b @ d.transpose(1, 2)) @ a
            ga.mul_(scale)
            nk = k.norm(dim=-1, keepdim=True).clamp_min(_EPS)
            ga.sub_(a * (ga * a).sum(-1, keepdim=True)).div_(nk)  # backward of row normalization
            grad[i:j] = ga.to(keys.dtype)
        return grad, None


def _spatial_naive(k: torch.Tensor, kr: torch.Tensor) -> torch.Tensor:
    a = torch.nn.functional.normalize(k.float(), dim=-1, eps=_EPS)
    b = torch.nn.functional.normalize(kr.float(), dim=-1, eps=_EPS)
    s = a @ a.transpose(-1, -2)
    s_ref = b @ b.transpose(-1, -2)
    return ((s - s_ref) ** 2).mean()


def spatial_ssm_loss(keys: torch.Tensor, keys_ref: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """S-SSM: mean squared difference of per-frame cosine self-similarity matrices (fp32 scalar)."""
    k, kr = _flatten(keys, keys_ref, "spatial_ssm_loss")
    backend = _resolve(backend, "spatial_ssm_loss", k, kr)
    if backend == "triton":
        from fastdm.kernels.dispatch import spatial_ssm_loss as triton_loss

        return triton_loss(k, kr)
    if backend == "naive":
        return _spatial_naive(k, kr)
    return _SpatialSSMTorch.apply(k.flatten(0, 1), kr.flatten(0, 1))


def temporal_ssm_loss(keys: torch.Tensor, keys_ref: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """T-SSM: mean squared difference of the F x F cosine similarity of per-frame mean keys."""
    k, kr = _flatten(keys, keys_ref, "temporal_ssm_loss")
    backend = _resolve(backend, "temporal_ssm_loss", k, kr)
    if backend == "triton":
        from fastdm.kernels.dispatch import temporal_ssm_loss as triton_loss

        return triton_loss(k, kr)
    m, mr = k.float().mean(dim=-2), kr.float().mean(dim=-2)  # (B, F, C)
    if backend == "naive":
        a = torch.nn.functional.normalize(m, dim=-1, eps=_EPS)
        b = torch.nn.functional.normalize(mr, dim=-1, eps=_EPS)
        ts = a @ a.transpose(-1, -2)
        ts_ref = b @ b.transpose(-1, -2)
        return ((ts - ts_ref) ** 2).mean()
    # The F x F matrices are tiny: form their difference without cancellation, let autograd
    # differentiate (every term is already O(|D|), so the gradient is accurate too).
    with torch.no_grad():  # mean of K - K_ref, exact near K_ref, frame by frame (no N x C temporary kept)
        e = torch.stack([(k[:, i].float() - kr[:, i].float()).mean(dim=-2) for i in range(k.shape[1])], dim=1)
    e = e + (m - m.detach())  # value of mean(K - K_ref), gradient of mean(K): d/dK of both is 1/N
    a, b, d = normalized_difference(m, mr, e=e)
    x = d @ a.transpose(-1, -2) + b @ d.transpose(-1, -2)
    return (x * x).mean()


def ssm_losses(keys: torch.Tensor, keys_ref: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(S-SSM, T-SSM) of the same keys. With Triton both share one statistics pass over the keys."""
    k, kr = _flatten(keys, keys_ref, "ssm_losses")
    if _resolve(backend, "ssm_losses", k, kr) == "triton":
        from fastdm.kernels.dispatch import ssm_losses as fused

        return fused(k, kr)
    return spatial_ssm_loss(k, kr, backend), temporal_ssm_loss(k, kr, backend)
