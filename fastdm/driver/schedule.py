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


def extension_step(step: int, steps: int, segment: int) -> tuple[int, int]:
    """(j, i) of step ``step`` (0-based) of an extended edit: j = 0 in the ``steps`` of the schedule itself,
    j >= 1 in the j-th continuation segment of ``segment`` steps; i = the step's place in its part."""
    if step < steps:
        return 0, step
    j, i = divmod(step - steps, segment)
    return j + 1, i


def extension_timestep(step: int, steps: int, segment: int, cfg: VDDSConfig, gen: torch.Generator, span: str = "full") -> int:
    """t of a continuation step. ``span="full"``: the segment anneals over the whole range in its own ``segment``
    strata (a warm restart of the schedule, t_max down to t_min); ``"low"``: segment step i draws from the
    schedule's stratum ``steps - segment + i``, repeating its low-t end. Segments draw from the same strata as
    each other, so decisions after the second segment compare t-matched steps; the first decisions compare the
    schedule's tail with the steps before it (``"full"``: the first segment with that tail), which are not."""
    _, i = extension_step(step, steps, segment)
    if span == "full":
        return draw_timestep("anneal", i, segment, cfg, gen)
    return draw_timestep("anneal", steps - segment + i, steps, cfg, gen)


def extension_lr_factor(step: int, steps: int, segment: int, first: float) -> float:
    """Learning-rate multiplier of a continuation step: segment j restarts at ``first * 0.5 ** (j - 1)`` of the
    learning rate and decays on a cosine over its own steps."""
    j, i = extension_step(step, steps, segment)
    return first * 0.5 ** (j - 1) * lr_factor("cosine", i, segment)


class ExtensionRule:
    """``stop="extend"``: an edit that is still changing at the end of its schedule goes on, segment by segment.

    After the schedule's ``steps`` and after every continuation segment of ``segment`` steps (at most
    ``max_segments``) it decides from what the loop already computed: per step the timestep, the masked
    V-DDS residual ``mean((e_tgt - e_src)^2)`` and the movement of the edit ``||dx||`` (inside the mask)
    over the learning rate that made it. Its state is a plain list of per-step records, so a
    checkpoint carries it and a resumed edit decides the same."""

    def __init__(self, steps: int, segment: int, max_segments: int, tol: float, on: str = "speed"):
        self.steps, self.segment, self.max_segments, self.tol, self.on = steps, segment, max_segments, tol, on
        self.records: list[list[float]] = []  # [t, vdds, moved, lr] per step
        self.force: bool | None = None  # benchmarks: continue (True) or stop (False) whatever the signal says

    @property
    def planned(self) -> int:
        """Steps the edit runs as decided so far (each decision is a pure function of the records)."""
        n = self.steps
        for _ in range(self.max_segments):
            if len(self.records) < n or not self.decide(n):
                return n
            n += self.segment
        return n

    @property
    def cap(self) -> int:
        return self.steps + self.max_segments * self.segment

    def observe(self, t: int, vdds: float, moved: float, lr: float) -> None:
        self.records.append([float(t), float(vdds), float(moved), float(lr)])

    def signals(self, n: int) -> dict:
        """What the decision after step ``n`` reads: the last ``segment`` steps' mean V-DDS residual and mean
        movement per unit learning rate, and the same of the ``segment`` steps before them."""
        s = self.segment
        last, before = self.records[n - s:n], self.records[max(0, n - 2 * s):n - s]

        def mean(rs, k):
            return sum(r[k] for r in rs) / len(rs) if rs else float("nan")

        def speed(rs):
            lr = sum(r[3] for r in rs)
            return sum(r[2] for r in rs) / lr if lr > 0 else float("nan")

        return {"vdds": mean(last, 1), "vdds_before": mean(before, 1), "speed": speed(last), "speed_before": speed(before)}

    @staticmethod
    def continues(signals: dict, tol: float, on: str = "speed") -> bool:
        """The rule: continue while the last segment's ``on`` (``speed`` or ``vdds``) is at least ``tol`` times the
        segment's before it (the edit has not slowed down / the residual has not fallen)."""
        last, before = signals[on], signals[f"{on}_before"]
        if not before > 0:  # (nothing moved before: continue only if it moves now)
            return last > 0
        return last / before >= tol

    def decide(self, n: int) -> bool:
        """True: the edit after step ``n`` continues with one more segment."""
        if self.force is not None:
            return self.force
        return self.continues(self.signals(n), self.tol, self.on)

    def report(self) -> dict:
        """Segments run and why the edit stopped where it did (the decision at its last step, in numbers)."""
        n = len(self.records)
        segments = max(0, (n - self.steps) // self.segment) if n >= self.steps else 0
        sig = self.signals(n) if n >= self.segment else None
        if n < self.planned:
            why = "cut short (a callback stopped it)"
        elif self.force is not None:
            why = "forced" + (" to the cap" if self.force else "")
        elif segments >= self.max_segments:
            why = f"cap: {self.max_segments} segment(s) run"
        else:
            ratio = sig[self.on] / sig[f"{self.on}_before"] if sig[f"{self.on}_before"] > 0 else 0.0
            why = (f"settled: the last {self.segment} steps moved the edit {ratio:.2f}x as fast as the {self.segment} before (< {self.tol:g})"
                   if self.on == "speed" else
                   f"settled: the last {self.segment} steps' masked V-DDS residual was {ratio:.2f}x the {self.segment} before's (< {self.tol:g})")
        return {"segment": self.segment, "max_segments": self.max_segments, "tol": self.tol, "on": self.on, "segments_run": segments,
                "why": why, "last_signals": {k: round(v, 6) for k, v in sig.items()} if sig else None}
