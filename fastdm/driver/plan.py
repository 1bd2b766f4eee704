"""Execution plans: how one DreamMotion step spends time and memory.

A step evaluates the UNet four times: (x_t, target) — the only one that needs autograd, since
S-SSM/T-SSM backpropagate from its tapped keys — and (x_t, ""), (x^_t, source), (x^_t, "").

``naive``  the straightforward implementation, as a diffusers pipeline batches classifier-free
           guidance: one eager call on the batch of all four evaluations with autograd on, so
           the whole forward of all four stays recorded until the loss backward; materialized
           self-similarity.
``fast``   the memory plan: the three no-grad evaluations in inference mode, batched (or one at a
           time under a memory budget); the grad branch records its graph only up to the last
           tapped layer (truncated backprop: the rest of the UNet runs without autograd);
           the fastest loss backend.
``fast-seq`` fast, but the three no-grad evaluations one at a time.
``lean``   fast, but the no-grad evaluations one at a time and the UNet blocks gradient-
           checkpointed, the VAE tiled: the least memory, some extra compute.

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
    checkpoint_blocks: bool = False  # recompute UNet block activations in the backward
    vae_tiling: bool = False  # decode/encode latents tile by tile (latent models)
    loss_backend: str | None = None  # overrides EditConfig.loss_backend when set

    def to_dict(self) -> dict:
        return asdict(self)


NAIVE = ExecutionPlan(name="naive", batch_nograd=True, grad_all=True, inference_mode=False, truncate_backprop=False,
                      checkpoint_blocks=False, loss_backend="naive")
FAST = ExecutionPlan()
FAST_SEQ = replace(FAST, name="fast-seq", batch_nograd=False)
LEAN = replace(FAST, name="lean", batch_nograd=False, checkpoint_blocks=True, vae_tiling=True)
PLANS = {"naive": NAIVE, "fast": FAST, "fast-seq": FAST_SEQ, "lean": LEAN}
