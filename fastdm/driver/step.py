"""One DreamMotion step: the four denoiser evaluations (two for a guidance-distilled model: no unconditional
branch), V-DDS, S-SSM and T-SSM, as a plan says.

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

    rescale_fp16 = True  # fp16 models: structure gradients through fp32 keys and a power-of-two scale (a test turns it off to show the loss)

    def __init__(self, backbone: Backbone, config: EditConfig, plan: ExecutionPlan, vdds: VDDSConfig,
                 layers: list[str], num_frames: int, text: torch.Tensor, mask: torch.Tensor | None, engine=None,
                 grad_engine=None, split_gradients: bool = False):
        self.bb, self.config, self.plan, self.vdds = backbone, config, plan, vdds
        self.layers, self.num_frames, self.mask = layers, num_frames, mask
        self.emb_tgt, self.emb_neg, self.emb_src = text[0:1], text[1:2], text[2:3]
        # the no-grad calls: (x_t, negative), (x^_t, source), (x^_t, negative); a guidance-distilled model has
        # no unconditional branch: (x^_t, source) alone. ``src_call``: the one whose keys are the source's.
        self.distilled = bool(getattr(backbone, "guidance_distilled", False))
        self.nograd_inputs = (1,) if self.distilled else (0, 1, 1)  # 0: the edited x_t, 1: the source x^_t
        self.emb_nograd = self.emb_src if self.distilled else torch.cat([self.emb_neg, self.emb_src, self.emb_neg])
        self.src_call = 0 if self.distilled else 1
        self.need_keys = bool(layers)
        self.taps = KeyTaps(backbone, layers) if layers else None
        self.loss_backend = plan.loss_backend or config.loss_backend
        self.grad_until = layers[-1] if layers and plan.truncate_backprop else None
        self.engine, self.grad_engine = engine, grad_engine
        self.split_gradients = split_gradients
        self.grad_parts: dict[str, torch.Tensor] = {}
        self.fp16_dropped = 0  # fp16 models: steps whose structure gradient overflowed (see _fp16_structure_gradients)
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
        scale = self.bb.guidance_at(t, self.vdds.guidance_scale, self.config.guidance_scale_2)
        if self.distilled:
            self.bb.embedded_guidance = scale
        with self.bb.block_checkpointing(self.plan.checkpoint_blocks):
            eps, keys_edit, keys_src = self.evaluate(x, a * x_src + b * noise, a, b, t, noise)
        if self.distilled:  # each pass is already guided
            e_tgt, e_src = eps
        else:
            eps_tgt_c, eps_tgt_u, eps_src_c, eps_src_u = eps
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
        cfg = self.config
        masked = self.mask is not None and cfg.mask_scope == "all"
        if self.rescale_fp16 and self.bb.dtype == torch.float16:
            l_s, l_t, g_s, g_t = self._fp16_structure_gradients(x, keys_edit, keys_src)
        else:
            l_s, l_t = self._structure_losses(keys_edit, keys_src)
            if self.split_gradients:  # each SSM term's gradient at unit weight, then combined as applied
                g_s = torch.autograd.grad(l_s, x, retain_graph=True, allow_unused=True, materialize_grads=True)[0]
                g_t = torch.autograd.grad(l_t, x, allow_unused=True, materialize_grads=True)[0]
            else:
                g_s = g_t = None
                (cfg.s_ssm_weight * l_s + cfg.t_ssm_weight * l_t).backward()
        self.evaluations["backward"] += 2 if self.split_gradients else 1
        if self.split_gradients:
            if masked:
                g_s, g_t = g_s * self.mask, g_t * self.mask
            self.grad_parts = {"vdds": g, "s_ssm": g_s, "t_ssm": g_t}
            x.grad = cfg.s_ssm_weight * g_s + cfg.t_ssm_weight * g_t
        else:
            if g_s is not None:  # fp16: the weighted gradient, already combined
                x.grad = g_s if x.grad is None else x.grad + g_s
            if masked:
                x.grad.mul_(self.mask)  # the structure/motion gradient stays inside the mask too
        x.grad.add_(g)
        losses["s_ssm"], losses["t_ssm"] = l_s.detach(), l_t.detach()
        return losses

    def _structure_losses(self, keys_edit, keys_src):
        pairs = [ssm_losses(keys_edit[n], keys_src[n], self.loss_backend) for n in self.layers]
        return sum(p[0] for p in pairs) / len(self.layers), sum(p[1] for p in pairs) / len(self.layers)

    def _fp16_structure_gradients(self, x, keys_edit, keys_src):
        """S-SSM / T-SSM gradients of an fp16 model, which would underflow in fp16.

        The loss is a mean over F x N x N similarities: near the source its gradient in the keys is
        3e-7 to 6e-16 at ZeroScope's sizes, mostly under fp16's smallest subnormal (6e-8), so a plain
        backward hands the model zeros. Here the losses run on fp32 copies of the keys, their
        gradients stay fp32, and the backward through the model starts from them scaled by a power
        of two S that brings their largest entry into [0.5, 1) (fp16's range leaves 65504x headroom
        for the model's backward); the result, fp32 in ``x``, is divided by S. A call whose gradient
        still overflows drops it (counted in :attr:`fp16_dropped`, once per call). Nothing is
        synchronized with the host: S and the check stay on the device. Returns (l_s, l_t, g_s, g_t);
        without ``split_gradients`` g_s is the weighted sum and g_t None.
        """
        cfg = self.config
        names = list(self.layers)
        kf = [keys_edit[n].detach().float().requires_grad_(True) for n in names]
        l_s, l_t = self._structure_losses(dict(zip(names, kf)), {n: keys_src[n].float() for n in names})
        if self.split_gradients:
            grads = [torch.autograd.grad(l_s, kf, retain_graph=True, allow_unused=True, materialize_grads=True),
                     torch.autograd.grad(l_t, kf, allow_unused=True, materialize_grads=True)]
        else:
            grads = [torch.autograd.grad(cfg.s_ssm_weight * l_s + cfg.t_ssm_weight * l_t, kf, allow_unused=True,
                                         materialize_grads=True)]
        l_s, l_t = l_s.detach(), l_t.detach()
        del kf  # (the fp32 copies and the losses' graph are not held through the model's backward)
        outs = [keys_edit[n] for n in names]
        parts, ok = [], None
        for i, gk in enumerate(grads):
            peak = torch.stack([g.abs().amax() for g in gk]).amax()
            scale = torch.where(peak > 0, torch.exp2(-torch.floor(torch.log2(peak)) - 1), torch.ones_like(peak))
            scale = scale.clamp(2.0**-100, 2.0**100)  # (powers of two: the division below is exact)
            scaled = [(g * scale).to(o.dtype) for g, o in zip(gk, outs)]
            grads[i] = gk = None
            gx = torch.autograd.grad(outs, x, scaled, retain_graph=i + 1 < len(grads), allow_unused=True,
                                     materialize_grads=True)[0] / scale
            finite = torch.isfinite(gx).all()
            ok = finite if ok is None else ok & finite
            parts.append(torch.where(finite, gx, torch.zeros_like(gx)))
        self.fp16_dropped = self.fp16_dropped + (~ok).to(torch.int32)
        return (l_s, l_t, *parts) if self.split_gradients else (l_s, l_t, parts[0], None)

    # -- evaluation forms ---------------------------------------------------------------------
    def _keys(self, keys: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: self.bb.keys_to_frames(k, self.num_frames) for n, k in zip(self.layers, keys)}

    def _inputs(self, x_t: torch.Tensor, xs_t: torch.Tensor) -> list[torch.Tensor]:
        """The no-grad calls' inputs, in the order of ``emb_nograd``."""
        return [(x_t, xs_t)[i] for i in self.nograd_inputs]

    def _joint(self, x, xs_t, a, b, t, noise):
        """naive: all evaluations recorded, in one batched call."""
        x_t = a * x + b * noise
        n = 1 + len(self.nograd_inputs)
        with self.taps, torch.enable_grad():
            eps = self._forward(torch.cat([x_t, *self._inputs(x_t, xs_t)]), t, torch.cat([self.emb_tgt, self.emb_nograd]))
            keys = self.taps.take(self.num_frames)
        keys_edit = {k: v[0:1] for k, v in keys.items()}
        s = 1 + self.src_call
        keys_src = {k: v[s:s + 1].detach() for k, v in keys.items()}
        return eps.detach().chunk(n), keys_edit, keys_src

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
        *eps, keys_src = self._nograd_branches(x_t.detach(), xs_t, t)
        return (eps_tgt_c, *eps), keys_edit, keys_src

    def _all_nograd(self, x, xs_t, a, b, t, noise):
        """S-SSM and T-SSM off: all four evaluations without autograd."""
        plan = self.plan
        nograd = torch.inference_mode if plan.inference_mode else torch.no_grad
        with nograd():
            x_t = a * x.detach() + b * noise
            inputs, embs = [x_t, *self._inputs(x_t, xs_t)], torch.cat([self.emb_tgt, self.emb_nograd])
            if plan.batch_nograd:
                eps = self._forward(torch.cat(inputs), t, embs).chunk(len(inputs))
            else:
                eps = [self._forward(v, t, embs[i:i + 1]) for i, v in enumerate(inputs)]
        return eps, {}, {}

    def _nograd_branches(self, x_t: torch.Tensor, xs_t: torch.Tensor, t: int):
        """The no-grad calls ((x_t, ""), (x^_t, source), (x^_t, ""); distilled: (x^_t, source)) with the source
        keys tapped: batched or one at a time, in an engine or eager, in inference mode (fast plans) or under
        no_grad (plain)."""
        bb, taps, n = self.bb, self.taps, self.num_frames
        inputs, src = self._inputs(x_t, xs_t), self.src_call
        calls = [(v, self.emb_nograd[i:i + 1]) for i, v in enumerate(inputs)]
        with torch.inference_mode() if self.plan.inference_mode else torch.no_grad():
            if self.engine is not None:
                if self.plan.batch_nograd:
                    batch = torch.cat(inputs)
                    out, keys = self._engine(self.engine, batch.to(bb.dtype), t, self.emb_nograd)
                    eps = bb.to_noise_prediction(out, batch, t).chunk(len(inputs))
                    keys_src = {k: v[src:src + 1] for k, v in self._keys(keys).items()}
                else:
                    eps, keys_src = [], {}
                    for i, (v, e) in enumerate(calls):
                        out, keys = self._engine(self.engine, v.to(bb.dtype), t, e)
                        eps.append(bb.to_noise_prediction(out, v, t))
                        if i == src:
                            keys_src = self._keys(keys)
            elif self.plan.batch_nograd:
                with taps:
                    eps = self._forward(torch.cat(inputs), t, self.emb_nograd).chunk(len(inputs))
                    keys_src = {k: v[src:src + 1] for k, v in taps.take(n).items()}
            else:
                eps, keys_src = [], {}
                for i, (v, e) in enumerate(calls):
                    if i == src:
                        with taps:
                            eps.append(self._forward(v, t, e))
                            keys_src = taps.take(n)
                    else:
                        eps.append(self._forward(v, t, e))
        # inference tensors cannot be saved for backward: the losses get ordinary copies
        return (*eps, {k: v.clone() for k, v in keys_src.items()})
