"""Train shapes-upscale: the shapes world's super-resolution stage for ``fastdm-edit --cascade shapes``.

A pixel-space diffusers ``UNet3DConditionModel`` whose input is [noisy 64x64 clip, the 32x32 clip
upsampled bilinearly to 64x64 and noise-augmented] (6 channels, 3 out), a small transformers
``CLIPTextModel`` trained from scratch and the shapes ``CLIPTokenizer``; epsilon prediction on the
shapes model's DDIM schedule; 10% conditioning dropout (prompt only: the low-res clip is always
given) so classifier-free guidance works. Data: procedural clips from :mod:`fastdm.toyworld.world`: one
random clip drawn at 32x32 exactly as the base model's training data (``sample_clip``), and the
same object, path and speed rendered at twice the size as the target. Noise augmentation: the
upsampled clip is noised to a level drawn uniformly in [0, ``--max-aug``] per clip (the UNet3D
class has no input for the level, so the model learns to take any level up to it; the cascade
stage uses a fixed ``noise_level``). ``--crop`` (default 24) trains on aligned random crops
(high-res crop ``--crop`` px, low-res half of it): whole 64x64 clips cost many times more per step,
too much for a 90-minute CPU budget (channels 16,32,32 at crop 24: 2.4 s per step on one core); the UNet is convolutional (no spatial position embedding) and is
used at 64x64.

Seeded and resumable exactly like ``tools/train_shapes.py`` (the state format, step loop and export
of ``tools/training_state.py``): ``--state`` (``state.json``) plus ``state-STEP.safetensors`` hold model, EMA, optimizer and
RNG states and the loss log; no pickle; rerunning the same command continues where it stopped,
and a run split by a resume ends bit-identical to an uninterrupted one (on the CPU, same threads; the
dropout of UNet3D's temporal convolutions draws from torch's global generator, seeded per step).
At the end (or with ``--export-only``) the EMA weights go to ``--export`` as a diffusers-format
folder that the cascade's ``upscale`` stage loads (``unet/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``; no ``vae/``).

    # the bundled model (fastdm/assets/models/shapes-upscale), 85.5 min in all, 1 thread beside another job:
    python tools/train_shapes_upscale.py --threads 1 --steps 1200 --decay-start 900 --decay-steps 300 --minutes 65
    python tools/train_shapes_upscale.py --threads 1 --steps 2000 --lr 5e-4 --decay-start 1600 --decay-steps 400 --minutes 38
                                                            # resumed from step 1200 with a second, smaller lr cycle
    python tools/train_shapes_upscale.py --steps 4 --batch 2 --frames 2 --size 16 --channels 8,16 \\
        --state /tmp/u/state.json --log /tmp/u/loss.csv --export /tmp/u/model   # a smoke run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastdm.toyworld.world import SCHEDULER, TEXT, WORDS, render_clip, sample_clip  # noqa: E402
from training_state import Training, add_run_args, add_schedule_args, add_state_args, export_folder  # noqa: E402

MODEL_NAME = "shapes-upscale"
INDEX = {"_class_name": "FastDMShapesUpscale", "_diffusers_version": "0.42.1",
         "unet": ["diffusers", "UNet3DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
         "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"], "vae": [None, None]}


def unet_config(size: int, channels: tuple[int, ...]) -> dict:
    n = len(channels)
    return dict(sample_size=size, in_channels=6, out_channels=3,
                down_block_types=("DownBlock3D",) * (n - 1) + ("CrossAttnDownBlock3D",),
                up_block_types=("CrossAttnUpBlock3D",) + ("UpBlock3D",) * (n - 1),
                block_out_channels=channels, layers_per_block=1, norm_num_groups=8,
                cross_attention_dim=TEXT["hidden_size"], attention_head_dim=8)


def build(tok_dir: Path, size: int, channels: tuple[int, ...]):
    """(tokenizer, text encoder, upscale UNet, scheduler), random weights; tokenizer files go to ``tok_dir``."""
    from diffusers import DDIMScheduler, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from fastdm.testing import write_clip_tokenizer

    write_clip_tokenizer(tok_dir, words=WORDS, max_length=TEXT["max_position_embeddings"])
    tok = CLIPTokenizer.from_pretrained(str(tok_dir))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id, **TEXT))
    return tok, text, UNet3DConditionModel(**unet_config(size, channels)), DDIMScheduler(**SCHEDULER)


def pair(rng: np.random.Generator, size: int, frames: int):
    """One training pair: (low-res clip (F, size/2, size/2, 3), high-res clip (F, size, size, 3), prompt)."""
    low, prompt, meta = sample_clip(rng, size=size // 2, frames=frames)
    start = (meta["start"][0] * 2, meta["start"][1] * 2)
    high = render_clip(meta["colour"], meta["shape"], meta["direction"], size=size, frames=frames, radius=meta["radius"] * 2,
                       speed=meta["speed"] * 2, start=start, supersample=2)
    return low, high, prompt


def batch(rng, gen, alphas, args):
    """(x0 high-res (B, 3, F, c, c), cond (B, 3, F, c, c), prompts) with c = --crop or --size."""
    lows, highs, prompts = [], [], []
    crop = args.crop or args.size
    for _ in range(args.batch):
        low, high, p = pair(rng, args.size, args.frames)
        if crop < args.size:  # aligned crop: high-res offset = 2 x low-res offset
            oy, ox = (int(v) for v in rng.integers(0, (args.size - crop) // 2 + 1, size=2))
            low = low[:, oy:oy + crop // 2, ox:ox + crop // 2]
            high = high[:, 2 * oy:2 * oy + crop, 2 * ox:2 * ox + crop]
        lows.append(low)
        highs.append(high)
        prompts.append("" if rng.random() < args.p_uncond else p)

    def t(a):
        return torch.from_numpy(np.stack(a)).float().div(127.5).sub(1.0).permute(0, 4, 1, 2, 3).contiguous()

    x0, lo = t(highs), t(lows)  # (B, 3, F, h, w)
    b, c, f, h, w = lo.shape
    up = F.interpolate(lo.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w), scale_factor=2, mode="bilinear",
                       align_corners=False).reshape(b, f, c, 2 * h, 2 * w).permute(0, 2, 1, 3, 4)
    level = torch.randint(0, args.max_aug + 1, (b,), generator=gen)
    a = alphas[level].view(-1, 1, 1, 1, 1)
    cond = a.sqrt() * up + (1 - a).sqrt() * torch.randn(up.shape, generator=gen)
    return x0, cond.contiguous(), prompts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap, size=64, size_help="high-res size (the low-res input is half of it)")
    ap.add_argument("--crop", type=int, default=24,
                    help="train on aligned random high-res crops of this size (0: whole clips)")
    ap.add_argument("--channels", default="16,32,32", help="UNet block channels, comma-separated")
    ap.add_argument("--max-aug", type=int, default=300, help="noise augmentation of the low-res clip: level ~ U{0..N}")
    add_schedule_args(ap)
    add_state_args(ap, MODEL_NAME)
    args = ap.parse_args(argv)
    try:
        channels = tuple(int(c) for c in args.channels.split(","))
    except ValueError:
        raise SystemExit(f"train_shapes_upscale: error: --channels {args.channels!r}: give integers like 32,64,64") from None
    if args.size % 2 or (args.crop and (args.crop % 2 or args.crop > args.size)):
        raise SystemExit("train_shapes_upscale: error: --size and --crop must be even and --crop <= --size")
    if not 0 <= args.max_aug < SCHEDULER["num_train_timesteps"]:
        raise SystemExit(f"train_shapes_upscale: error: --max-aug must be in [0, {SCHEDULER['num_train_timesteps'] - 1}]")

    torch.set_num_threads(args.threads)
    tok_dir = Path(args.state).parent / "tokenizer"
    torch.manual_seed(args.seed)
    tok, text, unet, scheduler = build(tok_dir, args.size, channels)
    tr = Training(args, unet, text, model=MODEL_NAME)
    tr.resume(prog="train_shapes_upscale", others="the base model's", same=("size", "frames", "channels", "crop", "max_aug"))
    n_unet = sum(p.numel() for p in unet.parameters())
    n_text = sum(p.numel() for p in text.parameters())
    info = {"model": MODEL_NAME, "trained_steps": tr.step, "train_minutes_2core_cpu": round(tr.seconds / 60, 1),
            "unet_params": n_unet, "text_params": n_text, "batch": args.batch, "frames": args.frames, "size": args.size,
            "crop": args.crop, "max_aug": args.max_aug, "low_res_size": args.size // 2, "threads": args.threads}

    if not args.export_only:
        print(f"upscale unet {n_unet / 1e6:.2f} M params, text encoder {n_text / 1e6:.2f} M", flush=True)
        alphas = scheduler.alphas_cumprod.float()

        def loss():
            x0, cond, prompts = batch(tr.rng, tr.gen, alphas, args)
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            t = torch.randint(0, SCHEDULER["num_train_timesteps"], (args.batch,), generator=tr.gen)
            noise = torch.randn(x0.shape, generator=tr.gen)
            a = alphas[t].view(-1, 1, 1, 1, 1)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            pred = unet(torch.cat([x_t, cond], 1), t, encoder_hidden_states=text(ids)[0], return_dict=False)[0]
            return F.mse_loss(pred, noise)

        tr.run(loss)
        info.update(trained_steps=tr.step, train_minutes_2core_cpu=round(tr.seconds / 60, 1))
    tr.finish(lambda: export_folder(Path(args.export), tok_dir=tok_dir, denoiser_dir="unet", denoiser=unet, text=text,
                                    ema=tr.ema, scheduler=scheduler, index=INDEX, info=info,
                                    native_size=[args.size, args.size]))


if __name__ == "__main__":
    main()
