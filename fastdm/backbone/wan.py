"""Backbone for Wan 2.1 text-to-video: diffusers ``WanTransformer3DModel`` (a flow-matching video
diffusion transformer), ``AutoencoderKLWan`` (a 3D causal VAE, 4x in time, 8x in space), a UMT5
text encoder and a flow-matching scheduler (``UniPCMultistepScheduler`` with flow sigmas, or
``FlowMatchEulerDiscreteScheduler``). Without ``vae/`` the transformer works on pixels (the
shapes-dit model). This is the only module touching these classes.

Timesteps and noise (the decision is argued in ARCHITECTURE.md, "Wan 2.1"):

* The driver's integer timestep ``t`` in ``[0, T)`` (T = ``num_train_timesteps``, 1000) is a
  position on the scheduler's own schedule: ``u = t / T``, shifted as the scheduler shifts it,
  ``s = shift * u / (1 + (shift - 1) * u)`` (``flow_shift`` of UniPC / ``shift`` of FlowMatchEuler;
  Wan 2.1 at 480p: 3.0). ``x_t = (1 - s) x + s e`` and the transformer is fed ``s * T``, exactly
  what the diffusers sampler feeds it at noise level ``s``. With the default ``t ~ U{50..950}``
  and shift 3, ``s`` lies in ``[0.136, 0.983]`` with density ``shift / (shift - (shift-1) s)^2 / 0.9``.
* The transformer predicts the velocity ``v = e - x``; :meth:`Backbone.to_noise_prediction`
  turns it into ``e_hat = x_t + (1 - s) v_hat`` and V-DDS runs unchanged on noise predictions.

Wan 2.2 (the same classes): **A14B** folders hold two experts, ``transformer`` (high noise) and
``transformer_2`` (low noise), and the pipeline's ``boundary_ratio`` (0.875 for T2V). As diffusers'
``WanPipeline`` does, the expert is chosen per step by the scheduler timestep the transformer is fed,
``s(t) * T >= boundary_ratio * T``: the high-noise expert, else the low-noise one; every evaluation of
one step (edited and source, both prompts) is at one t, so goes through one expert, and the S-SSM /
T-SSM keys it compares come from that expert's tapped layer (the hooks sit on both experts' key
modules; one runs per call). The low-noise expert may have its own guidance (``guidance_scale_2``,
as the pipeline's). On CUDA the inactive expert waits in host memory and is moved in when its noise
range comes (an expert is 14.3 B parameters: 28.6 GB in bf16). **TI2V-5B**: one transformer with 48
input channels on the 48-channel ``AutoencoderKLWan`` that patchifies 2x2 inside (16x in space); the
transformer takes the plain per-sample timestep. Folders whose transformer channels do not match the
VAE's latent channels (image-to-video models carry the conditioning image in extra channels) are
refused with the reason.

Keys: ``attn1`` of each transformer block attends over the joint space-time token sequence
(frame-major: Conv3d patches flattened over (frames, height, width)). The capture point is the
output of ``attn1.norm_k`` — after the key projection and its RMS norm, before the rotary
position embedding is applied (diffusers' ``WanAttnProcessor`` applies ``norm_k`` and then the
rotary embedding), so positions do not enter the self-similarities.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import FastDMError, Unsupported
from .base import Backbone, BackboneInfo, checkpoint_forwards, tiled_vae
from .flow import cast_module as _cast
from .flow import clean_prompt as _clean
from .flow import causal_mask_frames, causal_video_range, latent_frames
from .flow import FlowNoise, flow_shift, shifted_sigma, write_t5_tokenizer  # noqa: F401  (re-exported: tools and tests import them here)

MAX_TEXT_TOKENS = 512  # Wan's text length: the embeddings are zero-padded to it


def _check_experts(transformer, transformer_2, boundary_ratio) -> None:
    """A two-expert (Wan 2.2 A14B) folder: both experts alike and a boundary in (0, 1)."""
    if transformer_2 is None:
        return
    if boundary_ratio is None:
        raise Unsupported("this Wan folder has a second expert (transformer_2) but model_index.json gives no boundary_ratio, "
                          "so which expert serves which noise level is unknown; add the pipeline's boundary_ratio (0.875 for "
                          "Wan 2.2 T2V-A14B)")
    if not 0 < float(boundary_ratio) < 1:
        raise Unsupported(f"boundary_ratio must lie between 0 and 1, model_index.json gives {boundary_ratio}")
    a, b = transformer.config, transformer_2.config
    for key in ("in_channels", "out_channels", "patch_size", "text_dim", "num_attention_heads", "attention_head_dim", "num_layers"):
        if a.get(key) != b.get(key):
            raise Unsupported(f"the two experts differ in {key} ({a.get(key)} and {b.get(key)}); fastdm needs two experts of "
                              "one architecture, as Wan 2.2 A14B has")


def _check_vae(transformer, vae) -> None:
    """The transformer's input channels are the VAE's latent channels (16 for Wan 2.1 and A14B, 48 for TI2V-5B)."""
    z = int(vae.config.z_dim)
    c = int(transformer.config.in_channels)
    if c != z:
        kind = " (an image-to-video model: its extra channels carry the conditioning image)" if c > z else ""
        raise Unsupported(f"the transformer takes {c} input channels and the VAE gives {z} latent channels{kind}; fastdm edits "
                          "with text-to-video models whose transformer reads the VAE's latents")
    for name in ("latents_mean", "latents_std"):
        if len(vae.config.get(name) or []) != z:
            raise Unsupported(f"the VAE's {name} has {len(vae.config.get(name) or [])} entries for {z} latent channels; "
                              "fix vae/config.json")


class _EitherExpert:
    """One tap point in both experts (the same layer name in each): hooks go on both modules, and
    only the expert that runs fires them."""

    def __init__(self, *modules: torch.nn.Module):
        self.modules = modules

    def register_forward_hook(self, hook):
        return _Handles([m.register_forward_hook(hook) for m in self.modules])


class _Handles:
    def __init__(self, handles):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class WanBackbone(FlowNoise, Backbone):
    denoiser_class = "WanTransformer3DModel"
    edit_defaults = {"guidance_scale": 5.0}  # WanPipeline's
    family = "Wan 2.1; Wan 2.2 T2V-A14B and TI2V-5B"
    denoiser_keyword = "transformer"
    text_encoder_on_cpu = True  # never on the accelerator (memory projections leave it out)

    def __init__(self, *, transformer, text_encoder, tokenizer, scheduler, vae, path: str, native_size, device, dtype,
                 transformer_2=None, boundary_ratio: float | None = None):
        self.device = torch.device(device)
        self.dtype = dtype
        _check_experts(transformer, transformer_2, boundary_ratio)
        self.boundary_ratio = None if transformer_2 is None else float(boundary_ratio)
        # on CUDA the inactive expert waits in host memory (moved in at the boundary); elsewhere both stay put
        self.offload_experts = transformer_2 is not None and self.device.type == "cuda"
        self.transformer = _cast(transformer, device, dtype).eval().requires_grad_(False)
        self.transformer_2 = None if transformer_2 is None else \
            _cast(transformer_2, "cpu" if self.offload_experts else device, dtype).eval().requires_grad_(False)
        self._active = self.transformer
        # The text encoder never occupies the accelerator (UMT5-XXL has 4x the transformer's
        # parameters): it stays on the CPU (meta for FLOP counting), in bf16 unless fp32 was asked
        # for (T5-family encoders overflow in fp16), and is released after the prompts are encoded.
        te_device = "meta" if self.device.type == "meta" else "cpu"
        te_dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16
        self.text_encoder = _cast(text_encoder, te_device, te_dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.vae = None if vae is None else _cast(vae, device, dtype).eval().requires_grad_(False)
        self.shift = flow_shift(scheduler)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        cfg = transformer.config
        self.patch = tuple(int(p) for p in cfg.patch_size)
        if vae is None:
            factor, self.temporal_factor = 1, 1
            if cfg.in_channels != 3:
                raise Unsupported(f"a pixel-space Wan transformer needs 3 input channels, this one has {cfg.in_channels}")
        else:
            _check_vae(transformer, vae)
            factor = int(vae.config.scale_factor_spatial)
            self.temporal_factor = int(vae.config.scale_factor_temporal)
            self._lat_mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
            self._lat_std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._wan22_vae = vae is not None and int(vae.config.z_dim) == 48  # TI2V-5B's VAE: 1280x704, 121 frames
        if native_size is None:
            native_size = ((1280, 704) if self._wan22_vae else (832, 480)) if vae is not None else (32, 32)
        self.info = BackboneInfo(
            name=type(transformer).__name__,
            space="pixel" if vae is None else "latent",
            path=path,
            native_size=tuple(native_size),
            size_multiple=factor * max(self.patch[1], self.patch[2]),
            spatial_factor=factor,
            num_train_timesteps=self.num_train_timesteps,
            prediction_type="flow",
        )

    @staticmethod
    def accepts(denoiser) -> bool:
        from diffusers import WanTransformer3DModel

        return isinstance(denoiser, WanTransformer3DModel)

    # -- text -------------------------------------------------------------------------------
    def text_length(self) -> int:
        return int(min(self.tokenizer.model_max_length, MAX_TEXT_TOKENS))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """UMT5 embeddings, zero beyond each prompt's tokens, padded to :meth:`text_length` (as the
        diffusers Wan pipeline does). Only the longest prompt's tokens are run through the encoder:
        with its attention mask and relative positions the padded positions change nothing."""
        if self.text_encoder is None:
            raise Unsupported("the text encoder was released; encode prompts before releasing it")
        length = self.text_length()
        enc = self.tokenizer([_clean(p) for p in prompts], padding="longest", max_length=length, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        te_device = next(self.text_encoder.parameters()).device
        hidden = self.text_encoder(enc.input_ids.to(te_device), attention_mask=enc.attention_mask.to(te_device)).last_hidden_state
        out = torch.zeros(len(prompts), length, hidden.shape[-1], device=te_device, dtype=hidden.dtype)
        for i, n in enumerate(enc.attention_mask.sum(1).tolist()):
            out[i, :n] = hidden[i, :n]
        return out.to(self.device, self.dtype)

    def text_embedding_shape(self) -> tuple[int, int]:
        return self.text_length(), int(self.transformer.config.text_dim)

    def release_text_encoder(self) -> None:
        self.text_encoder = None

    # -- frames and working space -----------------------------------------------------------
    def latent_frames(self, num_frames: int) -> int:
        """Latent frames of a ``num_frames`` video (the VAE keeps frame 0 and packs 4 per latent frame)."""
        return latent_frames(num_frames, self.temporal_factor)

    def frame_count_problem(self, num_frames: int) -> str | None:
        k = self.temporal_factor
        if k > 1 and (num_frames - 1) % k:
            fit = (num_frames - 1) // k * k + 1
            return (f"this Wan model's VAE takes {k}k+1 frames (1, {k + 1}, {2 * k + 1}, ..., 33, ..., 81) and the video has "
                    f"{num_frames}; pass `frames={fit}`")
        if self.patch[0] > 1 and self.latent_frames(num_frames) % self.patch[0]:
            return f"the transformer patches {self.patch[0]} latent frames together; {num_frames} frames do not divide"
        return None

    default_window = 21  # Wan 2.1: 81 frames, 21 latent frames

    def working_to_video_range(self, start: int, stop: int) -> tuple[int, int]:
        """Latent frame 0 holds frame 0; latent frame j >= 1 frames 4j-3..4j."""
        return causal_video_range(start, stop, self.temporal_factor)

    def native_frames(self) -> int:
        frames = getattr(self, "_native_frames", None)
        if frames:
            return self.latent_frames(int(frames))
        return 31 if self._wan22_vae else self.default_window  # (TI2V-5B: 121 frames, 31 latent frames)

    def mask_frames_to_working(self, mask: torch.Tensor) -> torch.Tensor:
        """A per-frame mask ``(F, ...)`` -> per latent frame: latent frame 0 holds frame 0, latent
        frame j >= 1 frames 4j-3..4j; a latent cell is editable when any of its frames is."""
        return causal_mask_frames(mask, self.temporal_factor)

    @torch.no_grad()
    def to_working(self, frames: torch.Tensor) -> torch.Tensor:
        problem = self.frame_count_problem(frames.shape[0])
        if problem:
            raise FastDMError(problem)
        video = frames.to(self.device).permute(1, 0, 2, 3).unsqueeze(0)  # (1, 3, F, H, W)
        if self.vae is None:
            return video.float().contiguous()
        # the causal encoder runs frame 0, then 4 frames at a time, with a feature cache (so time
        # is already sliced); spatial tiles under vae_tiling
        z = self.vae.encode(video.to(self.dtype)).latent_dist.mode().float()
        return ((z - self._lat_mean.to(z.device)) / self._lat_std.to(z.device)).contiguous()

    @torch.no_grad()
    def decode_working(self, x: torch.Tensor) -> torch.Tensor:
        """Working tensor -> frames ``(F, 3, H, W)`` in [-1, 1] on the backbone's device (fp32)."""
        if self.vae is not None:
            z = x.float() * self._lat_std.to(x.device) + self._lat_mean.to(x.device)
            x = self.vae.decode(z.to(self.dtype)).sample
        return x[0].permute(1, 0, 2, 3).float().clamp(-1, 1)

    def from_working(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_working(x).cpu()

    def working_shape(self, num_frames: int, size: tuple[int, int]) -> tuple[int, ...]:
        w, h = size
        f = self.info.spatial_factor
        return (1, int(self.transformer.config.in_channels), self.latent_frames(num_frames), h // f, w // f)

    # -- denoiser ---------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        """The transformer (of a two-expert model: the expert of the timestep last asked for)."""
        return self._active

    @property
    def experts(self) -> int:
        return 1 if self.transformer_2 is None else 2

    def expert_for(self, t) -> torch.nn.Module:
        """The expert serving integer timestep ``t``: as diffusers' WanPipeline, the high-noise one
        (``transformer``) where the fed timestep ``s(t) T`` is at least ``boundary_ratio T``."""
        if self.transformer_2 is None:
            return self.transformer
        return self.transformer if self.sigma(float(t)) >= self.boundary_ratio else self.transformer_2

    def _activate(self, t) -> torch.nn.Module:
        expert = self.expert_for(t)
        if expert is not self._active and self.offload_experts:
            _cast(self._active, "cpu", self.dtype)  # (the inactive expert waits in host memory)
            _cast(expert, self.device, self.dtype)
        self._active = expert
        return expert

    def guidance_at(self, t: int, guidance_scale: float, guidance_scale_2: float | None = None) -> float:
        """The low-noise expert takes ``guidance_scale_2`` where given (the pipeline's rule)."""
        if self.transformer_2 is not None and guidance_scale_2 is not None and self.expert_for(t) is self.transformer_2:
            return float(guidance_scale_2)
        return float(guidance_scale)

    def predict_noise(self, x_t: torch.Tensor, t: int, text: torch.Tensor, grad_until: str | None = None) -> torch.Tensor:
        self._activate(t)  # (so that `grad_until` names a layer of the expert that runs)
        return super().predict_noise(x_t, t, text, grad_until)

    def denoiser_forward(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The transformer's velocity at integer timesteps ``timestep``, which it is fed as ``s(t) * T``
        (two experts: each element through the expert of its timestep)."""
        T = self.num_train_timesteps
        model_t = shifted_sigma(timestep.to(torch.float32) / T, self.shift) * T
        if self.transformer_2 is None:
            return self.transformer(sample, model_t, encoder_hidden_states=text, return_dict=False)[0]
        if timestep.device.type == "meta":  # (no values to read: the expert predict_noise chose from its integer t)
            return self._active(sample, model_t, encoder_hidden_states=text, return_dict=False)[0]
        ts = timestep.reshape(-1).tolist()
        if len(set(ts)) == 1:
            expert = self._activate(ts[0])
            return expert(sample, model_t, encoder_hidden_states=text, return_dict=False)[0]
        out = torch.empty_like(sample)
        for value in dict.fromkeys(ts):  # (elements at different timesteps: each group through its expert)
            idx = torch.tensor([i for i, v in enumerate(ts) if v == value], device=sample.device)
            expert = self._activate(value)
            out[idx] = expert(sample[idx], model_t[idx], encoder_hidden_states=text[idx], return_dict=False)[0]
        return out

    def modules(self) -> dict[str, torch.nn.Module]:
        mods = {"transformer": self.transformer, "transformer_2": self.transformer_2, "vae": self.vae}
        return {k: m for k, m in mods.items() if m is not None}

    def engine_problem(self) -> str | None:
        if self.transformer_2 is not None:
            return ("a two-expert model (Wan 2.2 A14B) switches experts by timestep inside the step, which a traced "
                    "engine cannot; use `backend=eager`")
        return None

    def to(self, device=None, dtype: torch.dtype | None = None) -> "WanBackbone":
        device = self.device if device is None else torch.device(device)
        dtype = dtype or self.dtype
        self.device, self.dtype = device, dtype
        self.offload_experts = self.transformer_2 is not None and device.type == "cuda"
        for name, m in self.modules().items():
            inactive = self.offload_experts and name.startswith("transformer") and m is not self._active
            _cast(m, "cpu" if inactive else device, dtype)
        return self

    @contextlib.contextmanager
    def block_checkpointing(self, enabled: bool):
        """Gradient checkpointing of every transformer block for the duration of the block: a block
        recomputes its activations in the backward instead of keeping them (the blocks' ``forward``
        is swapped on entry and restored on exit, as in the UNet3D backbone)."""
        if not enabled:
            yield
            return
        with contextlib.ExitStack() as stack:
            for expert in (self.transformer, self.transformer_2):
                if expert is not None:
                    stack.enter_context(checkpoint_forwards(expert.blocks))
            yield

    def vae_tiling(self, enabled: bool):
        return tiled_vae(self.vae, enabled)

    # -- taps -------------------------------------------------------------------------------
    def spatial_self_attention_layers(self) -> dict[str, torch.nn.Module]:
        """``blocks.<i>.attn1``: each block's self-attention over all video tokens (space and time)."""
        return {f"blocks.{i}.attn1": b.attn1 for i, b in enumerate(self.transformer.blocks)}

    def default_tap_layers(self) -> list[str]:
        """The self-attention of the block at 1/6 of the depth, never block 0 (block 1 of 6 in shapes-dit,
        block 5 of 30 in Wan 2.1 1.3B). Chosen by measurement on the trained shapes-dit
        (``benchmarks/results/loss-balance-per-layer-shapes-dit-*.md``; ARCHITECTURE.md, "Wan 2.1"):
        block 1 is the most structure-selective layer (its S-SSM reacts 6.8x more to a shift, another
        shape or frozen motion than to a recolouring; the middle block 1.5x, the last two < 1, i.e. they
        would resist the colour edit) and carries the second-largest gradient share."""
        n = len(self.transformer.blocks)
        return [f"blocks.{min(n - 1, max(1, round(n / 6)))}.attn1"]

    def cross_attention_layers(self) -> dict:
        """``blocks.<i>.attn2``: video tokens attending to the text; queries and keys after their RMS
        norms (no rotary embedding in cross-attention)."""
        from .base import CrossAttention

        def scale(a) -> float:  # SDPA's default, which the Wan processor uses
            return (a.to_q.out_features // a.heads) ** -0.5

        def both(i: int, name: str):
            mods = [getattr(e.blocks[i].attn2, name) for e in (self.transformer, self.transformer_2) if e is not None]
            return mods[0] if len(mods) == 1 else _EitherExpert(*mods)

        return {f"blocks.{i}.attn2": CrossAttention(both(i, "norm_q"), both(i, "norm_k"), int(b.attn2.heads), scale(b.attn2))
                for i, b in enumerate(self.transformer.blocks)}

    def word_token_positions(self, prompt: str) -> list[list[int]]:
        from .base import word_token_positions

        return word_token_positions(self.tokenizer, _clean(prompt), self.text_length())

    def key_module(self, layer: str) -> torch.nn.Module:
        """``attn1.norm_k``: keys after their RMS norm, before the rotary embedding (two experts: that
        module in both, see :class:`_EitherExpert`)."""
        module = self.spatial_self_attention_layers()[layer].norm_k
        if self.transformer_2 is None:
            return module
        return _EitherExpert(module, self.transformer_2.get_submodule(layer).norm_k)

    def keys_to_frames(self, keys: torch.Tensor, num_frames: int) -> torch.Tensor:
        """``(B, F' * N, C)`` frame-major tokens -> ``(B, F', N, C)``; ``num_frames`` is the video's
        frame count, F' its latent frames over the transformer's temporal patch."""
        f = self.latent_frames(num_frames) // self.patch[0]
        return keys.reshape(keys.shape[0], f, keys.shape[1] // f, keys.shape[2])
