"""Backbone for HunyuanVideo text-to-video (13B, guidance-distilled): diffusers ``HunyuanVideoTransformer3DModel``
(an MM-DiT: dual-stream blocks, then single-stream blocks), ``AutoencoderKLHunyuanVideo`` (a causal video VAE: 8x in
space, 4x in time, 16 channels), a Llama text encoder with its prompt template, a CLIP text encoder for the pooled
embedding, and ``FlowMatchEulerDiscreteScheduler`` (shift 7). This is the only module touching these classes.

* **Noise and prediction** as every flow-matching family here (:mod:`fastdm.backbone.flow`): integer t ->
  ``s(t)`` on the scheduler's shifted schedule, ``x_t = (1 - s) x + s e``, the transformer fed ``s * T`` and
  predicting the velocity ``e - x``.
* **Guidance-distilled.** The released transformer has ``guidance_embeds``: the guidance scale is an *input*
  (``guidance = scale * 1000``, as HunyuanVideoPipeline passes it) and one pass per prompt is already the guided
  prediction. So a DreamMotion step makes two evaluations, not four: the edited video with the target prompt and
  the source video with the source prompt, both at the step's embedded guidance
  (:attr:`Backbone.guidance_distilled`; the step sets :attr:`embedded_guidance`). A folder whose transformer has
  no guidance embedding runs classifier-free guidance with the negative prompt, as the other families.
* **Text.** The Llama encoder reads the prompt inside the pipeline's template (``DEFAULT_PROMPT_TEMPLATE``), its
  third-to-last hidden state is kept and the template's first ``crop_start`` tokens (95) cut off, then padded to
  ``max_sequence_length`` (256) with an attention mask; CLIP's pooled output (768) conditions the timestep
  embedding. fastdm passes one tensor per prompt: ``[L + 1, D]``, the ``L`` Llama rows (padding rows zeroed: they
  carry the mask, read back from the rows that are not zero) and one row holding the pooled CLIP vector in its
  first channels. A folder's ``fastdm.json`` may set ``crop_start`` and ``max_sequence_length`` (a fine-tune with
  another tokenizer).
* **Keys**, before RoPE: dual-stream blocks ``transformer_blocks.N.attn`` project the video tokens alone
  (``to_k`` -> per-head ``norm_k``; text has its own ``add_k_proj``): the capture point is ``norm_k``'s output,
  heads merged. Single-stream blocks ``single_transformer_blocks.N.attn`` project ``[video; text]`` together: the
  capture point is ``norm_k``'s output cut to its first ``N_video`` tokens (RoPE is applied to exactly that
  part next). The automatic mask reads the video-to-text block of each joint attention (video queries after
  ``norm_q``; text keys after ``norm_added_k`` or the text part of ``norm_k``).
* **Frames**: 4k+1 (the VAE keeps frame 0 alone). Working tensor: the VAE latent times ``scaling_factor``.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import FastDMError, Unsupported
from .base import Backbone, BackboneInfo, checkpoint_forwards
from .dit import ScaledLatent, TapSlice as _Slice, VideoTransformer
from .flow import (
    FlowNoise,
    causal_frame_problem,
    causal_mask_frames,
    causal_video_range,
    cast_module,
    flow_shift,
    latent_frames,
    shifted_sigma,
)

MAX_TEXT_TOKENS = 256  # HunyuanVideoPipeline's max_sequence_length (after the template's crop)
CLIP_TOKENS = 77  # its CLIP max_sequence_length
HIDDEN_LAYERS_TO_SKIP = 2  # the Llama hidden state it keeps: hidden_states[-(2 + 1)]


def _heads_merged(x: torch.Tensor) -> torch.Tensor:
    """``[B, N, heads, d]`` (the processor's layout) -> ``[B, N, heads * d]``; ``[B, N, C]`` passes through."""
    return x.flatten(2) if x.dim() == 4 else x


def _template():
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    return DEFAULT_PROMPT_TEMPLATE


class HunyuanVideoBackbone(ScaledLatent, VideoTransformer, FlowNoise, Backbone):
    denoiser_class = "HunyuanVideoTransformer3DModel"
    edit_defaults = {"guidance_scale": 6.0}  # HunyuanVideoPipeline's (embedded)
    family = "HunyuanVideo (13B, guidance-distilled)"
    denoiser_keyword = "transformer"

    def __init__(self, *, transformer, text_encoder, tokenizer, scheduler, vae, path: str, native_size, device, dtype,
                 text_encoder_2=None, tokenizer_2=None):
        if vae is None:
            raise Unsupported("a HunyuanVideo folder needs its vae/ (AutoencoderKLHunyuanVideo): the transformer works on its latents")
        if text_encoder_2 is None or tokenizer_2 is None:
            raise Unsupported("a HunyuanVideo folder needs text_encoder_2/ and tokenizer_2/ (CLIP): the transformer is "
                              "conditioned on CLIP's pooled prompt embedding")
        tc = transformer.config
        if tc.get("image_condition_type"):
            raise Unsupported(f"this HunyuanVideo transformer is an image-to-video model (image_condition_type "
                              f"{tc.image_condition_type!r}); fastdm edits with text-to-video models")
        if int(tc.in_channels) != int(vae.config.latent_channels):
            raise Unsupported(f"the transformer takes {tc.in_channels} input channels and the VAE gives "
                              f"{vae.config.latent_channels}; fastdm edits with text-to-video models whose transformer reads the VAE's latents")
        if int(tc.pooled_projection_dim) > int(tc.text_embed_dim):
            raise Unsupported(f"pooled_projection_dim {tc.pooled_projection_dim} > text_embed_dim {tc.text_embed_dim}: "
                              "fastdm carries the pooled CLIP vector in a row of the text embedding")
        self._place(transformer, text_encoder, vae, device, dtype)
        te_device = "meta" if self.device.type == "meta" else "cpu"
        self.text_encoder_2 = cast_module(text_encoder_2, te_device, torch.float32 if dtype == torch.float32 else torch.bfloat16)
        self.text_encoder_2.eval().requires_grad_(False)
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.shift = flow_shift(scheduler)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.spatial_ratio = int(vae.spatial_compression_ratio)
        self.temporal_ratio = int(vae.temporal_compression_ratio)
        self.patch, self.patch_t = int(tc.patch_size), int(tc.patch_size_t)
        self._scale = float(vae.config.scaling_factor)
        self.guidance_distilled = bool(tc.guidance_embeds)
        self.embedded_guidance = 6.0  # HunyuanVideoPipeline's default guidance_scale
        self.info = BackboneInfo(
            name=type(transformer).__name__,
            space="latent",
            path=path,
            native_size=tuple(native_size or (1280, 720)),  # the pipeline's default 720 x 1280 (height x width)
            size_multiple=self.spatial_ratio * self.patch,
            spatial_factor=self.spatial_ratio,
            num_train_timesteps=self.num_train_timesteps,
            prediction_type="flow",
        )

    @staticmethod
    def accepts(denoiser) -> bool:
        from diffusers import HunyuanVideoTransformer3DModel

        return isinstance(denoiser, HunyuanVideoTransformer3DModel)

    # -- text -------------------------------------------------------------------------------
    def _setting(self, name: str, default: int) -> int:
        value = getattr(self, "settings", {}).get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise FastDMError(f"fastdm.json: {name} must be a whole number >= 0, got {value!r}")
        return value

    @property
    def crop_start(self) -> int:
        """Template tokens cut off the Llama output (the pipeline's 95 for the released tokenizer)."""
        return self._setting("crop_start", int(_template()["crop_start"]))

    def text_length(self) -> int:
        return self._setting("max_sequence_length", MAX_TEXT_TOKENS)

    def _pooled_dim(self) -> int:
        return int(self.transformer.config.pooled_projection_dim)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """``[B, L + 1, D]``: the Llama embeddings of each prompt in the template, cropped and padded as
        HunyuanVideoPipeline's ``_get_llama_prompt_embeds`` (padding rows zeroed), then CLIP's pooled output
        (``_get_clip_prompt_embeds``) in the last row."""
        if self.text_encoder is None:
            raise Unsupported("the text encoder was released; encode prompts before releasing it")
        crop, length = self.crop_start, self.text_length()
        template = _template()["template"]
        enc = self.tokenizer([template.format(p) for p in prompts], max_length=length + crop, padding="max_length",
                             truncation=True, return_attention_mask=True, return_tensors="pt")
        te_device = next(self.text_encoder.parameters()).device
        hidden = self.text_encoder(input_ids=enc.input_ids.to(te_device), attention_mask=enc.attention_mask.to(te_device),
                                   output_hidden_states=True).hidden_states[-(HIDDEN_LAYERS_TO_SKIP + 1)]
        hidden = hidden[:, crop:] * enc.attention_mask[:, crop:].to(te_device, hidden.dtype)[..., None]
        clip_len = int(min(CLIP_TOKENS, self.tokenizer_2.model_max_length))
        ids = self.tokenizer_2(list(prompts), padding="max_length", max_length=clip_len, truncation=True, return_tensors="pt").input_ids
        pooled = self.text_encoder_2(ids.to(next(self.text_encoder_2.parameters()).device), output_hidden_states=False).pooler_output
        out = torch.zeros(len(prompts), length + 1, hidden.shape[-1], device=self.device, dtype=self.dtype)
        out[:, :length] = hidden.to(self.device, self.dtype)
        out[:, length, :pooled.shape[-1]] = pooled.to(self.device, self.dtype)
        return out

    def text_embedding_shape(self) -> tuple[int, int]:
        return self.text_length() + 1, int(self.transformer.config.text_embed_dim)

    def release_text_encoder(self) -> None:
        self.text_encoder = self.text_encoder_2 = None

    # -- frames and working space -----------------------------------------------------------
    def latent_frames(self, num_frames: int) -> int:
        return latent_frames(num_frames, self.temporal_ratio)

    def frame_count_problem(self, num_frames: int) -> str | None:
        return causal_frame_problem(num_frames, self.temporal_ratio, "this HunyuanVideo model")

    def working_to_video_range(self, start: int, stop: int) -> tuple[int, int]:
        return causal_video_range(start, stop, self.temporal_ratio)

    def native_frames(self) -> int:
        frames = getattr(self, "_native_frames", None)
        return self.latent_frames(int(frames) if frames else 129)  # the pipeline's default 129 frames

    def mask_frames_to_working(self, mask: torch.Tensor) -> torch.Tensor:
        return causal_mask_frames(mask, self.temporal_ratio)

    # -- denoiser ---------------------------------------------------------------------------
    def denoiser_forward(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The transformer's velocity for ``sample`` ``[B, C, F', h, w]`` at integer timesteps (fed as ``s(t) * T``),
        the text unpacked (Llama rows, their mask, the pooled CLIP row) and, for a guidance-distilled model,
        ``guidance = embedded_guidance * 1000``."""
        T = self.num_train_timesteps
        model_t = shifted_sigma(timestep.to(torch.float32) / T, self.shift) * T
        length = text.shape[1] - 1
        words, pooled = text[:, :length], text[:, length, :self._pooled_dim()]
        mask = (words.abs().amax(-1) > 0).to(sample.dtype)
        mask[:, 0] = 1  # (a prompt has at least its end token; keeps an all-zero row from masking every key)
        guidance = None
        if self.guidance_distilled:
            guidance = torch.full((sample.shape[0],), float(self.embedded_guidance) * 1000.0, device=sample.device,
                                  dtype=sample.dtype)
        return self.transformer(hidden_states=sample, timestep=model_t, encoder_hidden_states=words,
                                encoder_attention_mask=mask, pooled_projections=pooled, guidance=guidance, return_dict=False)[0]

    def engine_problem(self) -> str | None:
        if self.guidance_distilled:
            return ("HunyuanVideo takes the guidance scale as an input (guidance-distilled) and fastdm's traced engines take "
                    "only the latents, timestep and text; run it eager")
        return None

    # -- blocks and taps --------------------------------------------------------------------
    def _attentions(self) -> dict[str, torch.nn.Module]:
        tr = self.transformer
        out = {f"transformer_blocks.{i}.attn": b.attn for i, b in enumerate(tr.transformer_blocks)}
        out.update({f"single_transformer_blocks.{i}.attn": b.attn for i, b in enumerate(tr.single_transformer_blocks)})
        return out

    def spatial_self_attention_layers(self) -> dict[str, torch.nn.Module]:
        """Every block's joint attention, dual-stream blocks first, in forward order."""
        return self._attentions()

    def default_tap_layers(self) -> list[str]:
        """The attention at 1/6 of the depth counted over both kinds of block, never block 0 (the rule of the
        other transformers; HunyuanVideo's 20 + 40 blocks: dual-stream block 10)."""
        names = list(self._attentions())
        return [names[min(len(names) - 1, max(1, round(len(names) / 6)))]]

    @contextlib.contextmanager
    def block_checkpointing(self, enabled: bool):
        if not enabled:
            yield
            return
        with checkpoint_forwards([*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]):
            yield

    @staticmethod
    def _single(layer: str) -> bool:
        return layer.startswith("single_")

    def _video_part(self, o: torch.Tensor) -> torch.Tensor:
        """The video tokens of a single-stream block's ``[video; text]`` tensor, heads merged."""
        return _heads_merged(o[:, : o.shape[1] - self.text_length()])

    def _text_part(self, o: torch.Tensor) -> torch.Tensor:
        return _heads_merged(o[:, o.shape[1] - self.text_length():])

    def key_module(self, layer: str):
        """``norm_k``'s output (per-head RMS norm after ``to_k``), before RoPE: all of it in a dual-stream block
        (video only), its video part in a single-stream block; heads merged."""
        attn = self._attentions()[layer]
        module = attn.norm_k if attn.norm_k is not None else attn.to_k
        return _Slice(module, self._video_part if self._single(layer) else _heads_merged)

    def keys_to_frames(self, keys: torch.Tensor, num_frames: int) -> torch.Tensor:
        f = self.latent_frames(num_frames) // self.patch_t
        return keys.reshape(keys.shape[0], f, keys.shape[1] // f, keys.shape[2])

    def cross_attention_layers(self) -> dict:
        """The video-to-text block of each joint attention: video queries after ``norm_q``, text keys after
        ``norm_added_k`` (dual-stream) or the text part of ``norm_k`` (single-stream); no RoPE on either."""
        from .base import CrossAttention

        out = {}
        for name, a in self._attentions().items():
            heads, scale = int(a.heads), (a.to_q.out_features // a.heads) ** -0.5
            q = a.norm_q if a.norm_q is not None else a.to_q  # (no q/k norm: the projections)
            if self._single(name):
                k = a.norm_k if a.norm_k is not None else a.to_k
                out[name] = CrossAttention(_Slice(q, self._video_part), _Slice(k, self._text_part), heads, scale)
            else:
                k = a.norm_added_k if a.norm_added_k is not None else a.add_k_proj
                out[name] = CrossAttention(_Slice(q, _heads_merged), _Slice(k, _heads_merged), heads, scale)
        return out

    def text_key_mask(self, text: torch.Tensor) -> torch.Tensor:
        """The mask :meth:`denoiser_forward` gives the transformer: the Llama rows that are not zero (and the first)."""
        mask = text[:, :text.shape[1] - 1].abs().amax(-1) > 0
        mask[:, 0] = True
        return mask

    def word_token_positions(self, prompt: str) -> list[list[int]]:
        """Positions of each word's tokens in the cropped Llama sequence: the prompt's tokens start after the template's
        prefix, which begins ``crop_start`` tokens earlier (0 when the crop is the prefix, as the pipeline's is)."""
        template = _template()["template"]
        words = prompt.split()

        def count(text: str) -> int:
            return len(self.tokenizer(text, add_special_tokens=True, truncation=False).input_ids)

        empty, length = count(template.format("")), self.text_length()
        first = count(template.split("{}")[0]) - self.crop_start  # where the prompt's first token sits after the crop
        out, prev = [], 0
        for k in range(1, len(words) + 1):
            end = count(template.format(" ".join(words[:k]))) - empty
            out.append([first + i for i in range(prev, end) if 0 <= first + i < length])
            prev = end
        return out


LLAMA_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def write_llama_tokenizer(folder, words, max_length: int = 512) -> int:
    """A real fast tokenizer with Llama 3's special tokens (a SentencePiece-style Unigram model of whole words,
    characters as the fallback, built here without downloads), for tiny HunyuanVideo models and the presets.
    The words of the prompt template get their own pieces. Returns the template's ``crop_start`` for it: the
    tokens before the prompt, the begin-of-text token included."""
    import re
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    template = _template()["template"]
    words = [*words, *re.findall(r"[A-Za-z]+", template)]
    vocab = [(s, 0.0) for s in LLAMA_SPECIAL] + [("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w.lower(), -1.0) for w in dict.fromkeys(words)] + [(w.lower(), -1.5) for w in dict.fromkeys(words)]
    vocab += [(c, -5.0) for c in string.ascii_lowercase + string.digits + string.punctuation + "\n"]
    tk = Tokenizer(models.Unigram(vocab, unk_id=len(LLAMA_SPECIAL)))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.add_special_tokens(list(LLAMA_SPECIAL))
    tk.post_processor = processors.TemplateProcessing(single=f"{LLAMA_SPECIAL[0]} $A", special_tokens=[(LLAMA_SPECIAL[0], 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=LLAMA_SPECIAL[0], eos_token=LLAMA_SPECIAL[1],
                                  pad_token=LLAMA_SPECIAL[1], unk_token="<unk>", model_max_length=max_length)
    tok.save_pretrained(str(folder))
    return len(tok(template.split("{}")[0]).input_ids)
