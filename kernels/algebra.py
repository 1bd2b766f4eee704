"""Plain-PyTorch helpers the kernels need, kept inside ``kernels/`` on purpose.

``fastdm.kernels`` imports nothing from the rest of ``fastdm`` (no import cycle: ``fastdm.losses``
dispatches to the kernels, never the reverse). :func:`normalized_difference` is therefore a
deliberate copy of ``fastdm.losses.ssm.normalized_difference``; ``tests/test_kernels.py`` checks
that the two agree on random inputs.
"""

from __future__ import annotations

import torch

EPS = 1e-12


def normalized_difference(
    k: torch.Tensor, kr: torch.Tensor, e: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(A, B, D)`` with A = k/|k|, B = kr/|kr| row-wise and D = A - B without cancellation.

    ``D = E/|k| - kr * (E . (k + kr)) / (|k| |kr| (|k| + |kr|))`` with ``E = k - kr``: for nearby
    fp32 inputs E is exact (Sterbenz), so D keeps full relative precision even when |D| ~ 1e-5.
    Pass ``e`` when k and kr are themselves derived (e.g. means) and k - kr would cancel.
    """
    nk = k.norm(dim=-1, keepdim=True).clamp_min(EPS)
    nr = kr.norm(dim=-1, keepdim=True).clamp_min(EPS)
    if e is None:
        e = k - kr
    a = k / nk
    b = kr / nr
    d = e / nk - kr * ((e * (k + kr)).sum(-1, keepdim=True) / (nk * nr * (nk + nr)))
    return a, b, d
