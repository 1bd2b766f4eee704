"""Train the default model: a tiny pixel-space text-to-video model of the shapes world.

Same classes as the real backbones: a small diffusers ``UNet3DConditionModel`` (pixel space,
cross-attention only at 8x8), a small transformers ``CLIPTextModel`` trained from scratch and a
``CLIPTokenizer`` over the shapes vocabulary; epsilon prediction on ZeroScope's DDIM schedule,
10% conditioning dropout so classifier-free guidance works.

Seeded and resumable: ``--state`` (``state.json``) holds model, EMA, optimizer and RNG states and
the loss log, written atomically every ``--ckpt-minutes``; rerunning the same command continues
where it stopped. No pickle: the tensors (weights, EMA, Adam moments, the torch generator state
as uint8) are in ``state-STEP.safetensors`` beside it, everything else (step counters,
hyper-parameters, the numpy generator state, the loss log) in the JSON, which is written last
and names its tensors file, so a crash at any point leaves a consistent pair. ``--minutes``
bounds this run's wall time; SIGTERM or Ctrl-C stops it cleanly at the next step. At the end (or with ``--export-only``) the EMA weights are saved
as a diffusers-format folder (safetensors) to ``--export``; the loss curve goes to ``--log``.

    python tools/train_shapes.py --minutes 90

The bundled model: constant lr 1e-3 (after a 200-step warm-up) to step 3116 (105 min over
several runs), then a cosine anneal to 2e-5 over 420 steps, stopped at step 3680 (119.7 min):

    python tools/train_shapes.py --minutes 14.5 --decay-start 3116 --decay-steps 420 --min-lr 2e-5
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fastdm.io.atomic import atomic_output, write_json_atomic  # noqa: E402
from fastdm.shapes import build_model as build  # noqa: E402
from fastdm.shapes import sample_clip  # noqa: E402

DEFAULT_STATE = ROOT / "tools" / "checkpoints" / "shapes" / "state.json"
STATE_FORMAT = "fastdm-train-state/1"
DEFAULT_LOG = ROOT / "tools" / "checkpoints" / "shapes" / "loss.csv"
DEFAULT_EXPORT = ROOT / "fastdm" / "assets" / "models" / "shapes"


def batch(rng: np.random.Generator, n: int, frames: int, size: int, p_uncond: float):
    clips, prompts = [], []
    for _ in range(n):
        c, p, _ = sample_clip(rng, size=size, frames=frames)
        clips.append(c)
        prompts.append("" if rng.random() < p_uncond else p)
    x = torch.from_numpy(np.stack(clips)).float().div(127.5).sub(1.0)  # (B, F, H, W, 3)
    return x.permute(0, 4, 1, 2, 3).contiguous(), prompts  # (B, 3, F, H, W)


def _jsonable(v):
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, np.generic):
        return v.item()
    if torch.is_tensor(v):
        raise TypeError("tensors go to the safetensors file")
    return v


def save_state(path: Path, *, unet, text, opt, ema: dict, rng: np.random.Generator, gen: torch.Generator, step: int,
               seconds: float, args: dict, loss_log: list, pending_losses: list) -> None:
    """Write the resumable training state: tensors to ``STEM-STEP.safetensors``, then ``path`` (JSON)
    naming that file, both atomically; older tensors files of this state are removed last."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {**{f"unet/{k}": v for k, v in unet.state_dict().items()},
               **{f"text/{k}": v for k, v in text.state_dict().items()},
               **{f"ema/{k}": v for k, v in ema.items()},
               "rng/torch": gen.get_state()}
    osd = opt.state_dict()
    opt_state = {}
    for idx, entry in osd["state"].items():
        js = {}
        for name, v in entry.items():
            if torch.is_tensor(v) and v.ndim > 0:
                tensors[f"opt/{idx}/{name}"] = v
            elif torch.is_tensor(v):  # Adam's per-parameter step counter: a 0-d tensor
                js[name] = {"scalar": v.item(), "dtype": str(v.dtype).removeprefix("torch.")}
            else:
                js[name] = _jsonable(v)
        opt_state[str(idx)] = js
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}  # no shared storage
    name = f"{path.stem}-{step:06d}.safetensors"
    with atomic_output(path.parent / name) as tmp:
        save_file(tensors, tmp, metadata={"format": STATE_FORMAT, "step": str(step)})
    meta = {"format": STATE_FORMAT, "tensors": name, "step": step, "seconds": seconds,
            "optimizer": {"class": type(opt).__name__, "param_groups": _jsonable(osd["param_groups"]), "state": opt_state},
            "np_rng": _jsonable(rng.bit_generator.state), "args": _jsonable(args),
            "loss_log": [[int(a), float(b), float(c)] for a, b, c in loss_log], "pending_losses": [float(x) for x in pending_losses]}
    write_json_atomic(path, meta)
    for old in path.parent.glob(f"{path.stem}-*.safetensors"):
        if old.name != name:
            old.unlink()


def read_state(path: Path) -> tuple[dict, dict]:
    """``(meta, tensors)`` of a state written by :func:`save_state` (never unpickles anything)."""
    from safetensors.torch import load_file

    if path.suffix.lower() in (".pt", ".pth", ".pkl", ".ckpt", ".bin"):
        raise SystemExit(f"train_shapes: error: --state {path}: pickle states are not read (loading one can run code); "
                         "give the state.json of a safetensors+JSON state")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"train_shapes: error: --state {path} is not JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        raise SystemExit(f"train_shapes: error: --state {path} is not a {STATE_FORMAT} file")
    tfile = path.parent / meta["tensors"]
    if not tfile.is_file():
        raise SystemExit(f"train_shapes: error: {path} names {tfile.name}, which is missing; restore it or start afresh")
    return meta, load_file(str(tfile))


def optimizer_state(meta: dict, tensors: dict) -> dict:
    """Rebuild ``opt.state_dict()`` from the JSON and the ``opt/IDX/NAME`` tensors."""
    state: dict[int, dict] = {}
    for idx, js in meta["optimizer"]["state"].items():
        entry = {}
        for name, v in js.items():
            entry[name] = torch.tensor(v["scalar"], dtype=getattr(torch, v["dtype"])) if isinstance(v, dict) and "scalar" in v else v
        state[int(idx)] = entry
    for key, v in tensors.items():
        if key.startswith("opt/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = v
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g) for g in meta["optimizer"]["param_groups"]]
    return {"state": state, "param_groups": groups}


def export(folder: Path, tok_dir: Path, text, unet, ema: dict, scheduler, info: dict) -> None:
    """Write the EMA weights as a diffusers-format model folder (atomically, via a temp folder)."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    live = {k: v.clone() for k, v in {**{"u." + k: v for k, v in unet.state_dict().items()},
                                      **{"t." + k: v for k, v in text.state_dict().items()}}.items()}
    load_ema(unet, text, ema)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    text.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    load_ema(unet, text, live)
    shutil.copytree(tok_dir, tmp / "tokenizer")
    scheduler.save_pretrained(tmp / "scheduler")
    index = {"_class_name": "TextToVideoSDPipeline", "_diffusers_version": "0.30.0",
             "unet": ["diffusers", "UNet3DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"], "vae": [None, None]}
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    (tmp / "fastdm.json").write_text(json.dumps({"native_size": [32, 32], **info}, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def ema_of(unet, text) -> dict:
    return {**{"u." + k: v.detach().clone() for k, v in unet.state_dict().items()},
            **{"t." + k: v.detach().clone() for k, v in text.state_dict().items()}}


def load_ema(unet, text, ema: dict) -> None:
    unet.load_state_dict({k[2:]: v for k, v in ema.items() if k.startswith("u.")})
    text.load_state_dict({k[2:]: v for k, v in ema.items() if k.startswith("t.")})


def lr_at(step: int, args) -> float:
    """Linear warm-up, constant, then (with ``--decay-start``) a cosine anneal to ``--min-lr``."""
    lr = args.lr * min(1.0, (step + 1) / args.warmup)
    if args.decay_start is not None and step >= args.decay_start:
        frac = min(1.0, (step - args.decay_start) / max(1, args.decay_steps))
        lr = args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + np.cos(np.pi * frac))
    return lr


def main() -> None:
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
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ckpt-minutes", type=float, default=10.0)
    ap.add_argument("--state", default=str(DEFAULT_STATE))
    ap.add_argument("--log", default=str(DEFAULT_LOG))
    ap.add_argument("--export", default=str(DEFAULT_EXPORT))
    ap.add_argument("--export-only", action="store_true")
    ap.add_argument("--no-export", action="store_true", help="do not export at the end (e.g. a short check run)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    state_path, log_path = Path(args.state), Path(args.log)
    tok_dir = state_path.parent / "tokenizer"
    torch.manual_seed(args.seed)
    tok, text, unet, scheduler = build(tok_dir)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    step, seconds, ema = 0, 0.0, ema_of(unet, text)
    loss_log, run_loss = [], []
    if state_path.is_file():
        meta, tensors = read_state(state_path)
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
    info = {"trained_steps": step, "train_minutes_2core_cpu": round(seconds / 60, 1), "unet_params": n_unet,
            "text_params": n_text, "batch": args.batch, "frames": args.frames, "size": args.size}

    def checkpoint():
        save_state(state_path, unet=unet, text=text, opt=opt, ema=ema, rng=rng, gen=gen, step=step, seconds=seconds,
                   args=vars(args), loss_log=loss_log, pending_losses=run_loss)

    if not args.export_only:
        print(f"unet {n_unet / 1e6:.2f} M params, text encoder {n_text / 1e6:.2f} M", flush=True)
        alphas = scheduler.alphas_cumprod.float()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(log_path) as tmp:  # the log as of the state: drops rows of steps run after the last checkpoint
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([["step", "loss", "train_seconds"]] + [[a, f"{b:.5f}", f"{c:.1f}"] for a, b, c in loss_log])
        logf = open(log_path, "a", newline="")
        writer = csv.writer(logf)
        t_run, t_ckpt = time.time(), time.time()
        stop = []  # SIGTERM/SIGINT: finish the current step, checkpoint, export, exit
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.append(1))
        unet.train()
        text.train()
        while step < args.steps and (time.time() - t_run) < args.minutes * 60 and not stop:
            t0 = time.time()
            x0, prompts = batch(rng, args.batch, args.frames, args.size, args.p_uncond)
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
            t = torch.randint(0, 1000, (args.batch,), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            a = alphas[t].view(-1, 1, 1, 1, 1)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            pred = unet(x_t, t, encoder_hidden_states=text(ids)[0], return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(pred, noise)
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
                live = {**{"u." + k: v for k, v in unet.state_dict().items()}, **{"t." + k: v for k, v in text.state_dict().items()}}
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
