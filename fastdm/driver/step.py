"""One DreamMotion step: the four denoiser evaluations, V-DDS, S-SSM and T-SSM, as a plan says.

Built by :class:`fastdm.driver.pipeline.EditRun` (the one step loop) and observed, never copied,
by the benchmarks (FLOP counting runs the same step on the meta device; the loss split comes
from ``split_gradients``).

Evaluation forms, chosen once at construction:

* ``joint`` (naive): all four evaluations in one batched call with autograd on;
* ``split`` (plain, fast, fast-seq, lean): the grad branch (eager, or compiled with its
  backward) plus the three no-grad evaluations (eager batched / one at a time, or an engine);
* ``nograd`` (S-SSM and T-SSM both off): all four without autograd.
"""

from __future__ import annotations

import torch

from ..backbone import Backbone
from ..losses import VDDSConfig, guided_noise, ssm_losses, vdds_gradient
from ..taps import KeyTaps
from .config import EditConfig
from .plan import ExecutionPlan


class DreamMotionStep:
    """Callable: ``step(x, x_src, t, noise)`` fills ``x.grad`` and returns the loss terms (0-dim
    tensors; nothing is synchronized with the device).

    ``text`` holds the embeddings of (target, negative, source) prompts; ``mask`` is the
    working-space mask ``(1, 1, F, h, w)`` or None. ``engine``: serves the no-grad evaluations
    (batch ``plan.nograd_batch``); ``grad_engine``: the compiled truncated grad branch.
    ``split_gradients``: also keep the V-DDS, S-SSM and T-SSM parts of the update in
    :attr:`grad_parts` (S-SSM/T-SSM at unit weight, masked as applied); costs a second backward.
    """

    def __init__(self, backbone: Backbone, config: EditConfig, plan: ExecutionPlan, vdds: VDDSConfig,
                 layers: list[str], num_frames: int, text: torch.Tensor, mask: torch.Tensor | None, engine=None,
                 grad_engine=None, split_gradients: bool = False):
        self.bb, self.config, self.plan, self.vdds = backbone, config, plan, vdds
        self.layers, self.num_frames, self.mask = layers, num_frames, mask
        self.emb_tgt, self.emb_neg, self.emb_src = text[0:1], text[1:2], text[2:3]
        self.emb_nograd = torch.cat([self.emb_neg, self.emb_src, self.emb_neg])
        self.need_keys = bool(layers)
        self.taps = KeyTaps(backbone, layers) if layers else None
        self.loss_backend = plan.loss_backend or config.loss_backend
        self.grad_until = layers[-1] if layers and plan.truncate_backprop else None
        self.engine, self.grad_engine = engine, grad_engine
        self.split_gradients = split_gradients
        self.grad_parts: dict[str, torch.Tensor] = {}
        # denoiser work, counted where it is done: forward batch elements (eager, engine or compiled)
        # and backward passes through the model (autograd into the tapped prefix)
        self.evaluations = {"forward": 0, "backward": 0}
        if not self.need_keys:
            self.evaluate = self._all_nograd
        elif plan.grad_all:
            self.evaluate = self._joint
        else:
            self.evaluate = self._split

    def _forward(self, x_t: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``backbone.predict_noise``, counted."""
        self.evaluations["forward"] += x_t.shape[0]
        return self.bb.predict_noise(x_t, *args, **kwargs)

    def _engine(self, engine, x_t: torch.Tensor, *args):
        self.evaluations["forward"] += x_t.shape[0]
        return engine(x_t, *args)

    def __call__(self, x: torch.Tensor, x_src: torch.Tensor, t: int, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        a, b = self.bb.noise_coefficients(t)
        with self.bb.block_checkpointing(self.plan.checkpoint_blocks):
            eps, keys_edit, keys_src = self.evaluate(x, a * x_src + b * noise, a, b, t, noise)
        eps_tgt_c, eps_tgt_u, eps_src_c, eps_src_u = eps
        scale = self.bb.guidance_at(t, self.vdds.guidance_scale, self.config.guidance_scale_2)
        e_tgt = guided_noise(eps_tgt_u, eps_tgt_c, scale)
        e_src = guided_noise(eps_src_u, eps_src_c, scale)
        g = vdds_gradient(e_tgt, e_src, float(self.bb.alphas_cumprod[t]), self.vdds, self.mask)  # (DDPM: a^2; flow: same SNR)
        diff2 = (e_tgt - e_src).pow(2)
        if self.mask is not None:
            diff2 = diff2 * self.mask
        losses = {"vdds": diff2.mean().detach()}
        if not self.need_keys:
            x.grad = g
            if self.split_gradients:
                self.grad_parts = {"vdds": g}
            return losses
        pairs = [ssm_losses(keys_edit[n], keys_src[n], self.loss_backend) for n in self.layers]
        l_s = sum(p[0] for p in pairs) / len(self.layers)
        l_t = sum(p[1] for p in pairs) / len(self.layers)
        cfg = self.config
        masked = self.mask is not None and cfg.mask_scope == "all"
        if self.split_gradients:  # each SSM term's gradient at unit weight, then combined as applied
            g_s = torch.autograd.grad(l_s, x, retain_graph=True, allow_unused=True, materialize_grads=True)[0]
            g_t = torch.autograd.grad(l_t, x, allow_unused=True, materialize_grads=True)[0]
            self.evaluations["backward"] += 2
            if masked:
                g_s, g_t = g_s * self.mask, g_t * self.mask
            self.grad_parts = {"vdds": g, "s_ssm": g_s, "t_ssm": g_t}
            x.grad = cfg.s_ssm_weight * g_s + cfg.t_ssm_weight * g_t
        else:
            (cfg.s_ssm_weight * l_s + cfg.t_ssm_weight * l_t).backward()
            self.evaluations["backward"] += 1
            if masked:
                x.grad.mul_(self.mask)  # the structure/motion gradient stays inside the mask too
        x.grad.add_(g)
        losses["s_ssm"], losses["t_ssm"] = l_s.detach(), l_t.detach()
        return losses

    # -- evaluation forms ---------------------------------------------------------------------
    def _keys(self, keys: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: self.bb.keys_to_frames(k, self.num_frames) for n, k in zip(self.layers, keys)}

    def _joint(self, x, xs_t, a, b, t, noise):
        """naive: all four evaluations recorded, in one batched call."""
        x_t = a * x + b * noise
        with self.taps, torch.enable_grad():
            eps = self._forward(torch.cat([x_t, x_t, xs_t, xs_t]), t, torch.cat([self.emb_tgt, self.emb_nograd]))
            keys = self.taps.take(self.num_frames)
        keys_edit = {k: v[0:1] for k, v in keys.items()}
        keys_src = {k: v[2:3].detach() for k, v in keys.items()}
        return eps.detach().chunk(4), keys_edit, keys_src

    def _split(self, x, xs_t, a, b, t, noise):
        """The grad branch (eager or compiled), then the three no-grad evaluations."""
        bb = self.bb
        x_t = a * x + b * noise
        with torch.enable_grad():
            if self.grad_engine is not None:
                out, keys = self._engine(self.grad_engine, x_t.to(bb.dtype), t, self.emb_tgt)
                eps_tgt_c = bb.to_noise_prediction(out.detach(), x_t, t)
                keys_edit = self._keys(keys)
            else:
                with self.taps:  # recorded up to the last tapped layer (fast) or through (plain)
                    eps_tgt_c = self._forward(x_t, t, self.emb_tgt, grad_until=self.grad_until).detach()
                    keys_edit = self.taps.take(self.num_frames)
        eps_tgt_u, eps_src_c, eps_src_u, keys_src = self._nograd_branches(x_t.detach(), xs_t, t)
        return (eps_tgt_c, eps_tgt_u, eps_src_c, eps_src_u), keys_edit, keys_src

    def _all_nograd(self, x, xs_t, a, b, t, noise):
        """S-SSM and T-SSM off: all four evaluations without autograd."""
        plan = self.plan
        nograd = torch.inference_mode if plan.inference_mode else torch.no_grad
        with nograd():
            x_t = a * x.detach() + b * noise
            if plan.batch_nograd:
                eps = self._forward(torch.cat([x_t, x_t, xs_t, xs_t]), t, torch.cat([self.emb_tgt, self.emb_nograd]))
                eps = eps.chunk(4)
            else:
                eps = [self._forward(v, t, e) for v, e in
                       ((x_t, self.emb_tgt), (x_t, self.emb_neg), (xs_t, self.emb_src), (xs_t, self.emb_neg))]
        return eps, {}, {}

    def _nograd_branches(self, x_t: torch.Tensor, xs_t: torch.Tensor, t: int):
        """(x_t, ""), (x^_t, source), (x^_t, "") with the source keys tapped: batched or one at a
        time, in an engine or eager, in inference mode (fast plans) or under no_grad (plain)."""
        bb, taps, n = self.bb, self.taps, self.num_frames
        calls = [(x_t, self.emb_neg), (xs_t, self.emb_src), (xs_t, self.emb_neg)]
        with torch.inference_mode() if self.plan.inference_mode else torch.no_grad():
            if self.engine is not None:
                if self.plan.batch_nograd:
                    out, keys = self._engine(self.engine, torch.cat([x_t, xs_t, xs_t]).to(bb.dtype), t, self.emb_nograd)
                    eps = bb.to_noise_prediction(out, torch.cat([x_t, xs_t, xs_t]), t).chunk(3)
                    keys_src = {k: v[1:2] for k, v in self._keys(keys).items()}
                else:
                    eps, keys_src = [], {}
                    for i, (v, e) in enumerate(calls):
                        out, keys = self._engine(self.engine, v.to(bb.dtype), t, e)
                        eps.append(bb.to_noise_prediction(out, v, t))
                        if i == 1:
                            keys_src = self._keys(keys)
            elif self.plan.batch_nograd:
                with taps:
                    eps = self._forward(torch.cat([x_t, xs_t, xs_t]), t, self.emb_nograd).chunk(3)
                    keys_src = {k: v[1:2] for k, v in taps.take(n).items()}
            else:
                (v0, e0), (v1, e1), (v2, e2) = calls
                eps = [self._forward(v0, t, e0)]
                with taps:
                    eps.append(self._forward(v1, t, e1))
                    keys_src = taps.take(n)
                eps.append(self._forward(v2, t, e2))
        # inference tensors cannot be saved for backward: the losses get ordinary copies
        return (*eps, {k: v.clone() for k, v in keys_src.items()})
