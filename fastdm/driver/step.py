"""One DreamMotion step: the four UNet evaluations, V-DDS, S-SSM and T-SSM, as an execution plan says.

Shared by the editor loop and the benchmark harness (which also runs it on the meta device to
count FLOPs), so both measure exactly the same work.
"""

from __future__ import annotations

import math

import torch

from ..backbone import Backbone
from ..losses import VDDSConfig, guided_noise, ssm_losses, vdds_gradient
from ..taps import KeyTaps
from .config import EditConfig
from .plan import ExecutionPlan


class DreamMotionStep:
    """Callable: ``step(x, x_src, t, noise)`` fills ``x.grad`` and returns the loss terms (0-dim tensors).

    ``text`` holds the embeddings of (target, negative, source) prompts; ``mask`` is the working-space
    mask ``(1, 1, F, h, w)`` or None.
    """

    def __init__(self, backbone: Backbone, config: EditConfig, plan: ExecutionPlan, vdds: VDDSConfig,
                 layers: list[str], num_frames: int, text: torch.Tensor, mask: torch.Tensor | None, engine=None,
                 grad_engine=None):
        self.bb, self.config, self.plan, self.vdds = backbone, config, plan, vdds
        self.layers, self.num_frames, self.mask = layers, num_frames, mask
        self.emb_tgt, self.emb_neg, self.emb_src = text[0:1], text[1:2], text[2:3]
        self.emb_nograd = torch.cat([self.emb_neg, self.emb_src, self.emb_neg])
        self.need_keys = bool(layers)
        self.taps = KeyTaps(backbone, layers) if layers else None
        self.loss_backend = plan.loss_backend or config.loss_backend
        self.grad_until = layers[-1] if layers and plan.truncate_backprop else None
        # an inference engine (fastdm.backbone.engines) for the batched no-grad call, if any
        self.engine = engine if plan.inference_mode and plan.batch_nograd else None
        # the grad branch compiled with its backward (engines.CompiledUNet with grad_until), if any
        self.grad_engine = grad_engine if self.grad_until is not None else None
        backbone.set_block_checkpointing(plan.checkpoint_blocks)
        backbone.set_vae_tiling(plan.vae_tiling)

    def __call__(self, x: torch.Tensor, x_src: torch.Tensor, t: int, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        bb, plan, cfg = self.bb, self.plan, self.config
        a_t = float(bb.alphas_cumprod[t])
        sa, sb = math.sqrt(a_t), math.sqrt(1.0 - a_t)
        xs_t = sa * x_src + sb * noise
        if self.need_keys and plan.grad_all:
            x_t = sa * x + sb * noise
            with self.taps, torch.enable_grad():  # naive: everything recorded, in one batched call
                eps = bb.predict_noise(torch.cat([x_t, x_t, xs_t, xs_t]), t, torch.cat([self.emb_tgt, self.emb_nograd]))
                keys = self.taps.take(self.num_frames)
            keys_edit = {k: v[0:1] for k, v in keys.items()}
            keys_src = {k: v[2:3].detach() for k, v in keys.items()}
            eps = eps.detach()
            eps_tgt_c, eps_tgt_u, eps_src_c, eps_src_u = eps[0:1], eps[1:2], eps[2:3], eps[3:4]
        elif self.need_keys and self.grad_engine is not None:  # the compiled grad branch
            x_t = sa * x + sb * noise
            with torch.enable_grad():
                eps_c, keys = self.grad_engine(x_t.to(bb.dtype), t, self.emb_tgt)
            eps_tgt_c = eps_c.detach()
            keys_edit = {n: k.reshape(-1, self.num_frames, *k.shape[1:]) for n, k in zip(self.layers, keys)}
            eps_tgt_u, eps_src_c, eps_src_u, keys_src = self._nograd_branches(x_t, xs_t, t)
        elif self.need_keys:
            x_t = sa * x + sb * noise
            with self.taps, torch.enable_grad():  # the grad branch, recorded up to the last tapped layer
                eps_tgt_c = bb.predict_noise(x_t, t, self.emb_tgt, grad_until=self.grad_until).detach()
                keys_edit = self.taps.take(self.num_frames)
            eps_tgt_u, eps_src_c, eps_src_u, keys_src = self._nograd_branches(x_t, xs_t, t)
        else:
            nograd = torch.inference_mode if plan.inference_mode else torch.no_grad
            with nograd():
                x_t = sa * x.detach() + sb * noise
                if plan.batch_nograd:
                    eps = bb.predict_noise(torch.cat([x_t, x_t, xs_t, xs_t]), t, torch.cat([self.emb_tgt, self.emb_nograd]))
                else:
                    eps = torch.cat([bb.predict_noise(v, t, e) for v, e in
                                     ((x_t, self.emb_tgt), (x_t, self.emb_neg), (xs_t, self.emb_src), (xs_t, self.emb_neg))])
            eps_tgt_c, eps_tgt_u, eps_src_c, eps_src_u = eps[0:1], eps[1:2], eps[2:3], eps[3:4]
        e_tgt = guided_noise(eps_tgt_u, eps_tgt_c, self.vdds.guidance_scale)
        e_src = guided_noise(eps_src_u, eps_src_c, self.vdds.guidance_scale)
        g = vdds_gradient(e_tgt, e_src, a_t, self.vdds, self.mask)
        diff2 = (e_tgt - e_src).pow(2)
        if self.mask is not None:
            diff2 = diff2 * self.mask
        losses = {"vdds": diff2.mean().detach()}
        if self.need_keys:
            pairs = [ssm_losses(keys_edit[n], keys_src[n], self.loss_backend) for n in self.layers]
            l_s = sum(p[0] for p in pairs) / len(self.layers)
            l_t = sum(p[1] for p in pairs) / len(self.layers)
            (cfg.s_ssm_weight * l_s + cfg.t_ssm_weight * l_t).backward()
            losses["s_ssm"], losses["t_ssm"] = l_s.detach(), l_t.detach()
            if self.mask is not None and cfg.mask_scope == "all":
                x.grad.mul_(self.mask)  # the structure/motion gradient stays inside the mask too
            x.grad.add_(g)
        else:
            x.grad = g
        return losses

    def _nograd_branches(self, x_t: torch.Tensor, xs_t: torch.Tensor, t: int):
        """UNet(x_t, ""), UNet(x^_t, source), UNet(x^_t, ""), with the source keys tapped.

        fast: inference mode, one batched call; lean: one call at a time; without inference mode
        (a plan between naive and fast): plain no_grad.
        """
        bb, plan, taps, num_frames = self.bb, self.plan, self.taps, self.num_frames
        emb_neg, emb_src, emb_nograd = self.emb_neg, self.emb_src, self.emb_nograd
        if self.engine is not None and taps is not None:
            with torch.inference_mode():
                eps, keys = self.engine(torch.cat([x_t.detach(), xs_t, xs_t]).to(bb.dtype), t, emb_nograd)
            keys_src = {n: k.reshape(-1, num_frames, *k.shape[1:])[1:2].clone() for n, k in zip(self.layers, keys)}
            return eps[0:1].clone(), eps[1:2].clone(), eps[2:3].clone(), keys_src
        with torch.inference_mode() if plan.inference_mode else torch.no_grad():
            if plan.batch_nograd:
                with taps:
                    eps = bb.predict_noise(torch.cat([x_t.detach(), xs_t, xs_t]), t, emb_nograd)
                    keys_src = {k: v[1:2] for k, v in taps.take(num_frames).items()}
                eps_tgt_u, eps_src_c, eps_src_u = eps[0:1], eps[1:2], eps[2:3]
            else:
                eps_tgt_u = bb.predict_noise(x_t.detach(), t, emb_neg)
                with taps:
                    eps_src_c = bb.predict_noise(xs_t, t, emb_src)
                    keys_src = taps.take(num_frames)
                eps_src_u = bb.predict_noise(xs_t, t, emb_neg)
        # inference tensors cannot be saved for backward: the losses get ordinary copies
        return eps_tgt_u, eps_src_c, eps_src_u, {k: v.clone() for k, v in keys_src.items()}

