"""Train shapes-upscale: the shapes world's super-resolution stage for ``fastdm-edit --cascade shapes``.

A pixel-space diffusers ``UNet3DConditionModel`` whose input is [noisy 64x64 clip, the 32x32 clip
upsampled bilinearly to 64x64 and noise-augmented] (6 channels, 3 out), a small transformers
``CLIPTextModel`` trained from scratch and the shapes ``CLIPTokenizer``; epsilon prediction on the
shapes model's DDIM schedule; 10% conditioning dropout (prompt only: the low-res clip is always
given) so classifier-free guidance works. Data: procedural clips from :mod:`fastdm.shapes`: one
random clip drawn at 32x32 exactly as the base model's training data (``sample_clip``), and the
same object, path and speed rendered at twice the size as the target. Noise augmentation: the
upsampled clip is noised to a level drawn uniformly in [0, ``--max-aug``] per clip (the UNet3D
class has no input for the level, so the model learns to take any level up to it; the cascade
stage uses a fixed ``noise_level``). ``--crop`` (default 32) trains on aligned random crops
(high-res crop ``--crop`` px, low-res half of it): whole 64x64 clips cost about 9x more per step, too
much for a 90-minute CPU budget; the UNet is convolutional (no spatial position embedding) and is
used at 64x64.

Seeded and resumable exactly like ``tools/train_shapes.py`` (whose state format and helpers it
uses): ``--state`` (``state.json``) plus ``state-STEP.safetensors`` hold model, EMA, optimizer and
RNG states and the loss log; no pickle; rerunning the same command continues where it stopped,
and a run split by a resume ends bit-identical to an uninterrupted one (on the CPU, same threads; the
dropout of UNet3D's temporal convolutions draws from torch's global generator, seeded per step).
At the end (or with ``--export-only``) the EMA weights go to ``--export`` as a diffusers-format
folder that the cascade's ``upscale`` stage loads (``unet/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``; no ``vae/``).

    python tools/train_shapes_upscale.py --minutes 90       # the planned bundled model (not trained yet)
    python tools/train_shapes_upscale.py --steps 4 --batch 2 --frames 2 --size 16 --channels 8,16 \\
        --state /tmp/u/state.json --log /tmp/u/loss.csv --export /tmp/u/model   # a smoke run
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastdm.io.atomic import atomic_output  # noqa: E402
from fastdm.shapes import SCHEDULER, TEXT, WORDS, render_clip, sample_clip  # noqa: E402
from train_shapes import ema_of, load_ema, lr_at, optimizer_state, read_state, save_state  # noqa: E402

MODEL_NAME = "shapes-upscale"
DEFAULT_DIR = ROOT / "tools" / "checkpoints" / MODEL_NAME
DEFAULT_EXPORT = ROOT / "fastdm" / "assets" / "models" / MODEL_NAME


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


def export(folder: Path, tok_dir: Path, text, unet, ema: dict, scheduler, info: dict) -> None:
    """Write the EMA weights as a diffusers-format folder (atomically, via a temp folder)."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    live = ema_of(unet, text)
    load_ema(unet, text, ema)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    text.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    load_ema(unet, text, live)
    shutil.copytree(tok_dir, tmp / "tokenizer")
    scheduler.save_pretrained(tmp / "scheduler")
    index = {"_class_name": "FastDMShapesUpscale", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet3DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"], "vae": [None, None]}
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    (tmp / "fastdm.json").write_text(json.dumps({"native_size": [info["size"], info["size"]], **info}, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100_000, help="stop after this many optimizer steps in total")
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-time budget of this run")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=64, help="high-res size (the low-res input is half of it)")
    ap.add_argument("--crop", type=int, default=32,
                    help="train on aligned random high-res crops of this size (0: whole clips); 32 costs about a ninth of a "
                         "whole-clip step (3-step smoke runs on the 2-core CPU)")
    ap.add_argument("--channels", default="32,64,64", help="UNet block channels, comma-separated")
    ap.add_argument("--max-aug", type=int, default=300, help="noise augmentation of the low-res clip: level ~ U{0..N}")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--decay-start", type=int, default=None,
                    help="from this step, anneal the lr along a cosine to --min-lr over --decay-steps steps")
    ap.add_argument("--decay-steps", type=int, default=500)
    ap.add_argument("--min-lr", type=float, default=1e-5)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--p-uncond", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ckpt-minutes", type=float, default=10.0)
    ap.add_argument("--state", default=str(DEFAULT_DIR / "state.json"))
    ap.add_argument("--log", default=str(DEFAULT_DIR / "loss.csv"))
    ap.add_argument("--export", default=str(DEFAULT_EXPORT))
    ap.add_argument("--export-only", action="store_true")
    ap.add_argument("--no-export", action="store_true", help="do not export at the end (e.g. a short check run)")
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
    state_path, log_path = Path(args.state), Path(args.log)
    tok_dir = state_path.parent / "tokenizer"
    torch.manual_seed(args.seed)
    tok, text, unet, scheduler = build(tok_dir, args.size, channels)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    step, seconds, ema = 0, 0.0, ema_of(unet, text)
    loss_log, run_loss = [], []
    if state_path.is_file():
        meta, tensors = read_state(state_path)
        if meta.get("args", {}).get("model") != MODEL_NAME:
            raise SystemExit(f"train_shapes_upscale: error: --state {state_path} is not a {MODEL_NAME} state (the base "
                             "model's states come from tools/train_shapes.py); give another --state")
        for key in ("size", "frames", "channels", "crop", "max_aug"):
            if meta["args"].get(key) != getattr(args, key):
                flag = "--" + key.replace("_", "-")
                raise SystemExit(f"train_shapes_upscale: error: {flag} {getattr(args, key)} differs from the state's "
                                 f"{meta['args'].get(key)}; resume with the same value")
        unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet/")})
        text.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("text/")})
        opt.load_state_dict(optimizer_state(meta, tensors))
        ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema/")}
        rng.bit_generator.state = meta["np_rng"]
        gen.set_state(tensors["rng/torch"])
        step, seconds = meta["step"], meta["seconds"]
        loss_log, run_loss = [tuple(r) for r in meta["loss_log"]], list(meta["pending_losses"])
        print(f"resumed at step {step} ({seconds / 60:.1f} min trained)", flush=True)
    n_unet = sum(p.numel() for p in unet.parameters())
    n_text = sum(p.numel() for p in text.parameters())
    info = {"model": MODEL_NAME, "trained_steps": step, "train_minutes_2core_cpu": round(seconds / 60, 1),
            "unet_params": n_unet, "text_params": n_text, "batch": args.batch, "frames": args.frames, "size": args.size,
            "crop": args.crop, "max_aug": args.max_aug, "low_res_size": args.size // 2}

    def checkpoint():
        save_state(state_path, unet=unet, text=text, opt=opt, ema=ema, rng=rng, gen=gen, step=step, seconds=seconds,
                   args={**vars(args), "model": MODEL_NAME}, loss_log=loss_log, pending_losses=run_loss)

    if not args.export_only:
        print(f"upscale unet {n_unet / 1e6:.2f} M params, text encoder {n_text / 1e6:.2f} M", flush=True)
        alphas = scheduler.alphas_cumprod.float()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(log_path) as tmp:  # the log as of the state: drops rows of steps run after the last checkpoint
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([["step", "loss", "train_seconds"]] + [[a, f"{b:.5f}", f"{c:.1f}"] for a, b, c in loss_log])
        logf = open(log_path, "a", newline="")
        writer = csv.writer(logf)
        t_run, t_ckpt = time.time(), time.time()
        stop = []  # SIGTERM/SIGINT: finish the current step, checkpoint, export, exit
        previous = {sig: signal.signal(sig, lambda *_: stop.append(1)) for sig in (signal.SIGTERM, signal.SIGINT)}
        unet.train()
        text.train()
        try:
            while step < args.steps and (time.time() - t_run) < args.minutes * 60 and not stop:
                t0 = time.time()
                # the UNet's temporal convolutions have dropout (0.1), drawn from torch's global generator: seeded
                # per step, so a resumed run draws what an uninterrupted one does
                torch.manual_seed(args.seed * 1_000_003 + step)
                x0, cond, prompts = batch(rng, gen, alphas, args)
                ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="pt").input_ids
                t = torch.randint(0, SCHEDULER["num_train_timesteps"], (args.batch,), generator=gen)
                noise = torch.randn(x0.shape, generator=gen)
                a = alphas[t].view(-1, 1, 1, 1, 1)
                x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
                pred = unet(torch.cat([x_t, cond], 1), t, encoder_hidden_states=text(ids)[0], return_dict=False)[0]
                loss = F.mse_loss(pred, noise)
                lr = lr_at(step, args)
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                step += 1
                with torch.no_grad():
                    d = min(args.ema, (1 + step) / (10 + step))
                    live = {**{"u." + k: v for k, v in unet.state_dict().items()},
                            **{"t." + k: v for k, v in text.state_dict().items()}}
                    for k, v in ema.items():
                        if v.dtype.is_floating_point:
                            v.mul_(d).add_(live[k], alpha=1 - d)
                        else:
                            v.copy_(live[k])
                seconds += time.time() - t0
                run_loss.append(loss.item())
                if step % 25 == 0:
                    loss_log.append((step, float(np.mean(run_loss)), seconds))
                    writer.writerow([step, f"{np.mean(run_loss):.5f}", f"{seconds:.1f}"])
                    logf.flush()
                    print(f"step {step} loss {np.mean(run_loss):.4f} ({seconds / step:.2f} s/step, {seconds / 60:.1f} min)", flush=True)
                    run_loss = []
                if time.time() - t_ckpt > args.ckpt_minutes * 60:
                    checkpoint()
                    t_ckpt = time.time()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            logf.close()
        checkpoint()
        info.update(trained_steps=step, train_minutes_2core_cpu=round(seconds / 60, 1))
    if args.no_export:
        return
    unet.eval()
    text.eval()
    export(Path(args.export), tok_dir, text, unet, ema, scheduler, info)
    print(f"exported {args.export} at step {step}", flush=True)


if __name__ == "__main__":
    main()
