"""Train shapes-dit: a small pixel-space Wan-architecture text-to-video model of the shapes world.

The same classes as Wan 2.1: a small diffusers ``WanTransformer3DModel`` working directly on
pixels (3 channels, patch (1, 2, 2); no VAE), a small transformers ``UMT5EncoderModel`` trained
from scratch and a ``T5TokenizerFast`` over the shapes vocabulary (built here, no download).
Flow-matching objective: ``x_t = (1 - s) x + s e``, the transformer (fed ``s * 1000``) predicts
the velocity ``e - x``; ``s`` is ``u ~ U(0, 1)`` shifted by ``--shift`` (the shift the exported
scheduler carries, so fastdm's timestep mapping matches training); 10% conditioning dropout so
classifier-free guidance works. Text embeddings are zero past each prompt's tokens, as fastdm's
Wan backbone (and diffusers' Wan pipeline) feed them.

Seeded and resumable exactly like ``tools/train_shapes.py`` (whose state format and helpers it
uses): ``--state`` (``state.json``) plus ``state-STEP.safetensors`` hold model, EMA, optimizer and
RNG states and the loss log; no pickle; rerunning the same command continues where it stopped,
and a run split by a resume ends bit-identical to an uninterrupted one (on the CPU, same threads).
At the end (or with ``--export-only``) the EMA weights go to ``--export`` as a diffusers-format
Wan folder (``transformer/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``; no ``vae/``).

    python tools/train_shapes_dit.py --minutes 110          # the planned bundled model (not trained yet)
    python tools/train_shapes_dit.py --steps 4 --batch 2 --frames 2 --size 16 --state /tmp/s/state.json \\
        --log /tmp/s/loss.csv --export /tmp/s/model                                 # a smoke run
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

from fastdm.io.atomic import atomic_output  # noqa: E402
from fastdm.shapes import WORDS  # noqa: E402
from train_shapes import batch, lr_at, optimizer_state, read_state, save_state  # noqa: E402

MODEL_NAME = "shapes-dit"
DEFAULT_DIR = ROOT / "tools" / "checkpoints" / MODEL_NAME
DEFAULT_EXPORT = ROOT / "fastdm" / "assets" / "models" / MODEL_NAME
TEXT_TOKENS = 16
TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=24, in_channels=3, out_channels=3,
                   text_dim=64, freq_dim=64, ffn_dim=256, num_layers=6, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
TEXT = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=16,
            relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0)


def build(tok_dir: Path, shift: float):
    """(tokenizer, text encoder, transformer, scheduler) of shapes-dit, random weights."""
    from diffusers import UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

    from fastdm.backbone.wan import write_t5_tokenizer

    write_t5_tokenizer(tok_dir, WORDS, max_length=TEXT_TOKENS)
    tok = T5TokenizerFast.from_pretrained(str(tok_dir))
    text = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                       decoder_start_token_id=tok.pad_token_id, **TEXT))
    transformer = WanTransformer3DModel(**TRANSFORMER)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                        num_train_timesteps=1000)
    return tok, text, transformer, scheduler


def encode(tok, text, prompts: list[str]) -> torch.Tensor:
    """Embeddings zero past each prompt's tokens (the Wan convention fastdm's backbone follows)."""
    enc = tok(prompts, padding="max_length", max_length=TEXT_TOKENS, truncation=True, return_attention_mask=True,
              return_tensors="pt")
    hidden = text(enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
    return hidden * enc.attention_mask[..., None].to(hidden.dtype)


def export(folder: Path, tok_dir: Path, text, transformer, ema: dict, scheduler, info: dict) -> None:
    """Write the EMA weights as a diffusers-format Wan folder (atomically, via a temp folder)."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    live = ema_of(transformer, text)
    load_ema(transformer, text, ema)
    transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
    text.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    load_ema(transformer, text, live)
    shutil.copytree(tok_dir, tmp / "tokenizer")
    scheduler.save_pretrained(tmp / "scheduler")
    index = {"_class_name": "WanPipeline", "_diffusers_version": "0.42.1",
             "transformer": ["diffusers", "WanTransformer3DModel"], "text_encoder": ["transformers", "UMT5EncoderModel"],
             "tokenizer": ["transformers", "T5TokenizerFast"], "scheduler": ["diffusers", "UniPCMultistepScheduler"],
             "vae": [None, None]}
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    (tmp / "fastdm.json").write_text(json.dumps({"native_size": [info["size"], info["size"]], **info}, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def ema_of(transformer, text) -> dict:
    return {**{"u." + k: v.detach().clone() for k, v in transformer.state_dict().items()},
            **{"t." + k: v.detach().clone() for k, v in text.state_dict().items()}}


def load_ema(transformer, text, ema: dict) -> None:
    transformer.load_state_dict({k[2:]: v for k, v in ema.items() if k.startswith("u.")})
    text.load_state_dict({k[2:]: v for k, v in ema.items() if k.startswith("t.")})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100_000, help="stop after this many optimizer steps in total")
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-time budget of this run")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--decay-start", type=int, default=None,
                    help="from this step, anneal the lr along a cosine to --min-lr over --decay-steps steps")
    ap.add_argument("--decay-steps", type=int, default=500)
    ap.add_argument("--min-lr", type=float, default=1e-5)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--p-uncond", type=float, default=0.1)
    ap.add_argument("--shift", type=float, default=1.0, help="timestep shift of training and of the exported scheduler")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ckpt-minutes", type=float, default=10.0)
    ap.add_argument("--state", default=str(DEFAULT_DIR / "state.json"))
    ap.add_argument("--log", default=str(DEFAULT_DIR / "loss.csv"))
    ap.add_argument("--export", default=str(DEFAULT_EXPORT))
    ap.add_argument("--export-only", action="store_true")
    ap.add_argument("--no-export", action="store_true", help="do not export at the end (e.g. a short check run)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    state_path, log_path = Path(args.state), Path(args.log)
    tok_dir = state_path.parent / "tokenizer"
    torch.manual_seed(args.seed)
    tok, text, transformer, scheduler = build(tok_dir, args.shift)
    params = list(transformer.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    step, seconds, ema = 0, 0.0, ema_of(transformer, text)
    loss_log, run_loss = [], []
    if state_path.is_file():
        meta, tensors = read_state(state_path)
        if meta.get("args", {}).get("model") != MODEL_NAME:
            raise SystemExit(f"train_shapes_dit: error: --state {state_path} is not a {MODEL_NAME} state (the UNet model's "
                             "states come from tools/train_shapes.py); give another --state")
        for key in ("shift", "size", "frames"):
            if meta["args"].get(key) != getattr(args, key):
                raise SystemExit(f"train_shapes_dit: error: --{key} {getattr(args, key)} differs from the state's "
                                 f"{meta['args'].get(key)}; resume with the same value")
        transformer.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet/")})
        text.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("text/")})
        opt.load_state_dict(optimizer_state(meta, tensors))
        ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema/")}
        rng.bit_generator.state = meta["np_rng"]
        gen.set_state(tensors["rng/torch"])
        step, seconds = meta["step"], meta["seconds"]
        loss_log, run_loss = [tuple(r) for r in meta["loss_log"]], list(meta["pending_losses"])
        print(f"resumed at step {step} ({seconds / 60:.1f} min trained)", flush=True)
    n_tr = sum(p.numel() for p in transformer.parameters())
    n_text = sum(p.numel() for p in text.parameters())
    info = {"model": MODEL_NAME, "trained_steps": step, "train_minutes_2core_cpu": round(seconds / 60, 1),
            "transformer_params": n_tr, "text_params": n_text, "batch": args.batch, "frames": args.frames, "size": args.size,
            "shift": args.shift}

    def checkpoint():
        # the transformer goes where the UNet model keeps its denoiser ("unet/" tensors); args name the model
        save_state(state_path, unet=transformer, text=text, opt=opt, ema=ema, rng=rng, gen=gen, step=step, seconds=seconds,
                   args={**vars(args), "model": MODEL_NAME}, loss_log=loss_log, pending_losses=run_loss)

    if not args.export_only:
        print(f"transformer {n_tr / 1e6:.2f} M params, text encoder {n_text / 1e6:.2f} M", flush=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(log_path) as tmp:  # the log as of the state: drops rows of steps run after the last checkpoint
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([["step", "loss", "train_seconds"]] + [[a, f"{b:.5f}", f"{c:.1f}"] for a, b, c in loss_log])
        logf = open(log_path, "a", newline="")
        writer = csv.writer(logf)
        t_run, t_ckpt = time.time(), time.time()
        stop = []  # SIGTERM/SIGINT: finish the current step, checkpoint, export, exit
        previous = {sig: signal.signal(sig, lambda *_: stop.append(1)) for sig in (signal.SIGTERM, signal.SIGINT)}
        transformer.train()
        text.train()
        try:
            while step < args.steps and (time.time() - t_run) < args.minutes * 60 and not stop:
                t0 = time.time()
                x0, prompts = batch(rng, args.batch, args.frames, args.size, args.p_uncond)
                u = torch.rand(args.batch, generator=gen, dtype=torch.float64)
                s = (args.shift * u / (1 + (args.shift - 1) * u)).float()
                noise = torch.randn(x0.shape, generator=gen)
                sv = s.view(-1, 1, 1, 1, 1)
                x_t = (1 - sv) * x0 + sv * noise
                pred = transformer(x_t, s * 1000, encoder_hidden_states=encode(tok, text, prompts), return_dict=False)[0]
                loss = torch.nn.functional.mse_loss(pred, noise - x0)
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
                    live = {**{"u." + k: v for k, v in transformer.state_dict().items()},
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
    transformer.eval()
    text.eval()
    export(Path(args.export), tok_dir, text, transformer, ema, scheduler, info)
    print(f"exported {args.export} at step {step}", flush=True)


if __name__ == "__main__":
    main()
