"""Execution plans: how one DreamMotion step spends time and memory.

A step evaluates the denoiser four times: (x_t, target) — the only one that needs autograd,
since S-SSM/T-SSM backpropagate from its tapped keys — and (x_t, ""), (x^_t, source), (x^_t, "").

``naive``  the straightforward implementation, as a diffusers pipeline batches classifier-free
           guidance: one eager call on the batch of all four evaluations with autograd on, so
           the whole forward of all four stays recorded until the loss backward; materialized
           self-similarity.
``plain``  what a careful user writes without fastdm: the three no-grad evaluations batched under
           ``torch.no_grad``, the grad branch with full backprop through the denoiser, materialized
           self-similarity. The second baseline.
``fast``   the three no-grad evaluations in inference mode, batched; the grad branch records its
           graph only up to the last tapped layer (truncated backprop: the rest of the denoiser
           runs without autograd); the fastest loss backend.
``fast-seq`` fast, but the three no-grad evaluations one at a time.
``lean``   fast, but the no-grad evaluations one at a time and the denoiser blocks gradient-
           checkpointed, the VAE tiled: the least memory, some extra compute.

A plan says why it refuses an engine or option (:meth:`ExecutionPlan.not_supported_reasons`);
the pipeline turns the reasons into a one-line error instead of dropping anything silently.
``fastdm.driver.budget`` picks among fast, fast-seq and lean under a ``--memory-budget``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class ExecutionPlan:
    name: str = "fast"
    batch_nograd: bool = True  # the three no-grad evaluations in one batched call
    grad_all: bool = False  # naive: all four evaluations in one batched call with autograd on
    inference_mode: bool = True  # torch.inference_mode for them (else torch.no_grad)
    truncate_backprop: bool = True  # grad branch: autograd only up to the last tapped layer
    checkpoint_blocks: bool = False  # recompute denoiser block activations in the backward
    vae_tiling: bool = False  # decode/encode latents tile by tile (latent models)
    loss_backend: str | None = None  # overrides EditConfig.loss_backend when set
    baseline: bool = False  # a baseline the benchmarks compare with: runs no engine

    @property
    def nograd_batch(self) -> int:
        """Batch of one no-grad denoiser call (an engine is built for it)."""
        return 3 if self.batch_nograd else 1

    def not_supported_reasons(self, *, backend: str = "eager", compile_grad: bool = False, need_keys: bool = True) -> list[str]:
        """Why this plan cannot run with ``backend`` / ``compile_grad`` ([] = it can)."""
        reasons = []
        if backend != "eager":
            if self.baseline:
                reasons.append(f"plan {self.name} is a baseline that runs eager PyTorch only; use `plan=fast`, fast-seq or lean "
                               f"with `backend={backend}`")
            if not need_keys:
                reasons.append(f"`backend={backend}` runs the no-grad calls beside the S-SSM/T-SSM grad branch; with both "
                               "weights 0 use `backend=eager`")
        if compile_grad:
            if self.baseline or not self.truncate_backprop:
                reasons.append(f"`compile_grad` compiles the truncated grad branch, which plan {self.name} does not have; "
                               "use `plan=fast`, fast-seq or lean")
            if not need_keys:
                reasons.append("`compile_grad` compiles the S-SSM/T-SSM grad branch; it needs an S-SSM or T-SSM weight above 0")
        return reasons

    def to_dict(self) -> dict:
        return asdict(self)


NAIVE = ExecutionPlan(name="naive", batch_nograd=True, grad_all=True, inference_mode=False, truncate_backprop=False,
                      loss_backend="naive", baseline=True)
PLAIN = ExecutionPlan(name="plain", batch_nograd=True, inference_mode=False, truncate_backprop=False,
                      loss_backend="naive", baseline=True)
FAST = ExecutionPlan()
FAST_SEQ = replace(FAST, name="fast-seq", batch_nograd=False)
LEAN = replace(FAST, name="lean", batch_nograd=False, checkpoint_blocks=True, vae_tiling=True)
PLANS = {p.name: p for p in (FAST, FAST_SEQ, LEAN, PLAIN, NAIVE)}
