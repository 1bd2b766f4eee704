"""What changes from step to step of an edit: the timestep, the learning rate, and when to stop.

All three are functions of the step index, the step count N and the run's own CPU generator, so a
checkpointed edit resumes exactly. The paper's schedule is ``uniform`` t, ``constant`` lr, all N
steps; the others are measured against it in ``benchmarks/cost.py``.
"""

from __future__ import annotations

import math

import torch

from ..losses import VDDSConfig, sample_timestep


def draw_timestep(schedule: str, step: int, steps: int, cfg: VDDSConfig, gen: torch.Generator,
                  order: list[int] | None = None) -> int:
    """t for step ``step`` (0-based) of ``steps``.

    * ``uniform``: t ~ U{t_min..t_max} (the paper; the draw is the one it always was);
    * ``anneal``: uniform inside the step's own stratum of [t_min, t_max], strata descending from t_max
      to t_min over the N steps (DreamTime / DVRF: coarse structure first, detail last);
    * ``stratified``: the same strata, each once per N steps, in the random ``order`` of the run.
    """
    if schedule == "uniform":
        return sample_timestep(cfg, gen)
    u = float(torch.rand((1,), generator=gen, dtype=torch.float64).item())
    k = step % steps
    stratum = k if schedule == "anneal" else order[k]
    frac = (stratum + u) / steps  # in [0, 1): 0 = t_max
    t = cfg.t_max - frac * (cfg.t_max - cfg.t_min)
    return int(min(cfg.t_max, max(cfg.t_min, round(t))))


def strata_order(steps: int, seed: int) -> list[int]:
    """The ``stratified`` schedule's order of strata (its own generator: the run's draws are unchanged)."""
    g = torch.Generator("cpu").manual_seed(seed + 0x5EED)
    return torch.randperm(steps, generator=g).tolist()


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """Learning-rate multiplier of step ``step`` (0-based) of ``steps``: constant 1, or decaying to near 0
    (cosine, linear), each step at its midpoint so the last step still moves."""
    if schedule == "constant" or steps <= 1:
        return 1.0
    x = (step + 0.5) / steps
    return 0.5 * (1.0 + math.cos(math.pi * x)) if schedule == "cosine" else 1.0 - x


class ConvergenceRule:
    """``stop="converged"``: stop when the edit has stopped moving.

    After every step it measures how far the edited tensor moved over the last ``window`` steps,
    ``d_k = ||x_k - x_{k-window}||`` (inside the mask), and compares it with the largest such
    window seen so far. The edit has converged when ``d_k < tol * max_j d_j`` for two checks in a
    row, no earlier than after ``2 * window`` steps. On an edit that keeps moving at its pace (even
    slowly but steadily) ``d_k`` stays near its peak and the edit runs on to the cap; once the
    updates shrink or cancel out (the guided noise difference vanishes on the target, or the
    decaying learning rate ends the work) it stops. The update is what the loop already computes:
    the rule needs one copy of the edited tensor per window step, no model call.
    """

    def __init__(self, window: int, tol: float, mask: torch.Tensor | None = None):
        self.window, self.tol, self.mask = window, tol, mask
        self.history: list[torch.Tensor] = []
        self.peak = 0.0
        self.below = 0
        self.progress: list[float] = []  # d_k / peak per step once measured

    def update(self, x: torch.Tensor) -> bool:
        """Record the tensor after a step; True when the edit has converged."""
        x = x.detach()
        if self.mask is not None:
            x = x * self.mask
        self.history.append(x.clone())
        if len(self.history) <= self.window:
            return False
        old = self.history.pop(0)
        d = float((x - old).float().norm())
        self.peak = max(self.peak, d)
        ratio = d / self.peak if self.peak > 0 else 0.0
        self.progress.append(ratio)
        steps_seen = len(self.progress) + self.window
        self.below = self.below + 1 if ratio < self.tol else 0
        return steps_seen >= 2 * self.window and self.below >= 2

    def report(self) -> dict:
        return {"window": self.window, "tol": self.tol, "last_progress": round(self.progress[-1], 4) if self.progress else None,
                "progress": [round(p, 4) for p in self.progress]}
