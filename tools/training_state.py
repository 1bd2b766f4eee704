"""The resumable training state and step loop shared by the shapes training tools.

``tools/train_shapes.py`` (the bundled UNet3D model), ``tools/train_shapes_dit.py`` (Wan
architecture) and ``tools/train_shapes_upscale.py`` (the cascade's upscale stage) differ in their
models, data and loss; everything else is here, once:

* **the state** (:func:`save_state`, :func:`read_state`, :func:`optimizer_state`): ``state.json``
  plus ``state-STEP.safetensors``, no pickle. The tensors (weights under ``unet/`` (any denoiser)
  and ``text/``, the EMA under ``ema/``, Adam's moments under ``opt/IDX/NAME``, the torch generator
  state as uint8 under ``rng/torch``) go to the safetensors file; step counters, hyper-parameters,
  the numpy generator state and the loss log to the JSON, written last and naming its tensors file,
  so a crash at any point leaves a consistent pair. Format ``fastdm-train-state/1`` (the committed
  ``tools/checkpoints/shapes`` state is one).
* **the run** (:class:`Training`): AdamW over denoiser + text encoder, the seeded numpy and torch
  generators, the EMA, resume, the step loop's bookkeeping (lr schedule, gradient clipping, EMA
  update, loss log CSV, checkpoints every ``--ckpt-minutes``, a clean stop on SIGTERM / Ctrl-C).
  Exact resume: torch's *global* generator is seeded at every step (``seed * 1_000_003 + step``),
  because dropout in diffusers' UNet3D temporal convolutions draws from it and the state does not
  hold it; with that a run split by a resume ends bit-identical to an uninterrupted one (on the CPU,
  same threads).
* **the export** (:func:`export_folder`): the EMA weights as a diffusers-format folder, atomically.
* **the common flags** (:func:`add_run_args`, :func:`add_schedule_args`, :func:`add_state_args`).

The tools run from the repository root (``python tools/train_shapes.py``) and put ``tools/`` on
``sys.path``, so they import this file as ``training_state``.
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fastdm.io.atomic import atomic_output, write_json_atomic  # noqa: E402

STATE_FORMAT = "fastdm-train-state/1"


# -- the state on disk ------------------------------------------------------------------------------
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
    naming that file, both atomically; older tensors files of this state are removed last. ``unet``
    is the denoiser, whatever its class (its tensors are stored under ``unet/``)."""
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
    if not tfile.is_file() and not restore_tensors(tfile):
        raise SystemExit(f"train_shapes: error: {path} names {tfile.name}, which is missing (and not in this checkout's git "
                         "history); restore it or start afresh")
    return meta, load_file(str(tfile))


def restore_tensors(tfile: Path, dest: Path | None = None) -> bool:
    """Bring back a committed state's tensors from git history. The bundled model's training state
    (``tools/checkpoints/shapes``, 37 MiB) keeps only its JSON in the working tree, so that the tree a
    GPU check carries stays small; its tensors live in the commit before the one that removed them.
    Writes ``dest`` (default: ``tfile`` itself); returns True when it is there afterwards."""
    import subprocess

    try:
        top = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=tfile.parent, capture_output=True, text=True,
                                  check=True).stdout.strip())
        rel = tfile.resolve().relative_to(top.resolve()).as_posix()
        gone = subprocess.run(["git", "rev-list", "-n", "1", "HEAD", "--", rel], cwd=top, capture_output=True, text=True,
                              check=True).stdout.strip()
        if not gone:
            return False
        blob = subprocess.run(["git", "show", f"{gone}^:{rel}"], cwd=top, capture_output=True, check=True).stdout
    except (OSError, ValueError, subprocess.CalledProcessError):
        return False
    dest = Path(dest or tfile)
    tmp = dest.with_name(f".{dest.name}.part")
    tmp.write_bytes(blob)
    tmp.replace(dest)
    return True


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


# -- weights, EMA, schedule ---------------------------------------------------------------------------
def ema_of(denoiser, text) -> dict:
    return {**{"u." + k: v.detach().clone() for k, v in denoiser.state_dict().items()},
            **{"t." + k: v.detach().clone() for k, v in text.state_dict().items()}}


def load_ema(denoiser, text, ema: dict) -> None:
    denoiser.load_state_dict({k[2:]: v for k, v in ema.items() if k.startswith("u.")})
    text.load_state_dict({k[2:]: v for k, v in ema.items() if k.startswith("t.")})


def lr_at(step: int, args) -> float:
    """Linear warm-up, constant, then (with ``--decay-start``) a cosine anneal to ``--min-lr``."""
    lr = args.lr * min(1.0, (step + 1) / args.warmup)
    if args.decay_start is not None and step >= args.decay_start:
        frac = min(1.0, (step - args.decay_start) / max(1, args.decay_steps))
        lr = args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + np.cos(np.pi * frac))
    return lr


def export_folder(folder: Path, *, tok_dir: Path, denoiser_dir: str, denoiser, text, ema: dict, scheduler, index: dict,
                  info: dict, native_size: list[int]) -> None:
    """Write the EMA weights as a diffusers-format model folder (atomically, via a temp folder):
    ``denoiser_dir/``, ``text_encoder/``, ``tokenizer/`` (a copy of ``tok_dir``), ``scheduler/``,
    ``model_index.json`` (``index``) and ``fastdm.json`` (``native_size`` and ``info``). The live
    weights are put back afterwards."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    live = ema_of(denoiser, text)
    load_ema(denoiser, text, ema)
    denoiser.save_pretrained(tmp / denoiser_dir, safe_serialization=True)
    text.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    load_ema(denoiser, text, live)
    shutil.copytree(tok_dir, tmp / "tokenizer")
    scheduler.save_pretrained(tmp / "scheduler")
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    (tmp / "fastdm.json").write_text(json.dumps({"native_size": native_size, **info}, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


# -- the run ----------------------------------------------------------------------------------------
class Training:
    """One training run of ``denoiser`` + ``text``: optimizer, generators, EMA, resume, the step loop.

    Build the models first (after ``torch.manual_seed(args.seed)``), then ``Training(args, ...)``,
    :meth:`resume`, :meth:`run` with the tool's loss, and :meth:`finish` with its export. ``model``
    (a name) is stored in the state's ``args`` so that a tool can refuse another tool's state."""

    def __init__(self, args: argparse.Namespace, denoiser, text, *, model: str | None = None):
        self.args, self.denoiser, self.text, self.model = args, denoiser, text, model
        self.state_path, self.log_path = Path(args.state), Path(args.log)
        self.params = list(denoiser.parameters()) + list(text.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=0.0)
        self.rng = np.random.default_rng(args.seed)
        self.gen = torch.Generator().manual_seed(args.seed)
        self.step, self.seconds, self.ema = 0, 0.0, ema_of(denoiser, text)
        self.loss_log: list[tuple] = []
        self.run_loss: list[float] = []

    def resume(self, *, prog: str | None = None, others: str = "", same: tuple[str, ...] = ()) -> None:
        """Continue from ``--state`` if it exists. With a ``model`` name, a state of another model is refused
        (``others``: whose states those are) and so is one whose ``same`` flags differ from this run's;
        ``prog`` starts those messages."""
        if not self.state_path.is_file():
            return
        meta, tensors = read_state(self.state_path)
        if self.model is not None:
            if meta.get("args", {}).get("model") != self.model:
                raise SystemExit(f"{prog}: error: --state {self.state_path} is not a {self.model} state ({others} "
                                 "states come from tools/train_shapes.py); give another --state")
            for key in same:
                if meta["args"].get(key) != getattr(self.args, key):
                    flag = "--" + key.replace("_", "-")
                    raise SystemExit(f"{prog}: error: {flag} {getattr(self.args, key)} differs from the state's "
                                     f"{meta['args'].get(key)}; resume with the same value")
        self.denoiser.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet/")})
        self.text.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("text/")})
        self.opt.load_state_dict(optimizer_state(meta, tensors))
        self.ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema/")}
        self.rng.bit_generator.state = meta["np_rng"]
        self.gen.set_state(tensors["rng/torch"])
        self.step, self.seconds = meta["step"], meta["seconds"]
        self.loss_log, self.run_loss = [tuple(r) for r in meta["loss_log"]], list(meta["pending_losses"])
        print(f"resumed at step {self.step} ({self.seconds / 60:.1f} min trained)", flush=True)

    def checkpoint(self) -> None:
        args = vars(self.args) if self.model is None else {**vars(self.args), "model": self.model}
        save_state(self.state_path, unet=self.denoiser, text=self.text, opt=self.opt, ema=self.ema, rng=self.rng,
                   gen=self.gen, step=self.step, seconds=self.seconds, args=args, loss_log=self.loss_log,
                   pending_losses=self.run_loss)

    def global_seed(self) -> int:
        """The seed of torch's global generator for the current step (dropout draws from it)."""
        return self.args.seed * 1_000_003 + self.step

    def run(self, loss_fn) -> None:
        """Train until ``--steps`` in total, ``--minutes`` of this run, or SIGTERM / Ctrl-C (the current
        step finishes), then checkpoint. ``loss_fn()`` draws a batch from ``self.rng`` / ``self.gen``,
        runs the models and returns the loss; this does the rest of each step."""
        args = self.args
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(self.log_path) as tmp:  # the log as of the state: drops rows of steps run after the last checkpoint
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([["step", "loss", "train_seconds"]]
                                        + [[a, f"{b:.5f}", f"{c:.1f}"] for a, b, c in self.loss_log])
        logf = open(self.log_path, "a", newline="")
        writer = csv.writer(logf)
        t_run, t_ckpt = time.time(), time.time()
        stop = []  # SIGTERM/SIGINT: finish the current step, checkpoint, export, exit
        previous = {sig: signal.signal(sig, lambda *_: stop.append(1)) for sig in (signal.SIGTERM, signal.SIGINT)}
        self.denoiser.train()
        self.text.train()
        try:
            while self.step < args.steps and (time.time() - t_run) < args.minutes * 60 and not stop:
                t0 = time.time()
                # dropout (UNet3D's temporal convolutions) draws from torch's global generator, which the state
                # does not hold: seeded per step, so a resumed run draws what an uninterrupted one does
                torch.manual_seed(self.global_seed())
                loss = loss_fn()
                lr = lr_at(self.step, args)
                for g in self.opt.param_groups:
                    g["lr"] = lr
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.params, 1.0)
                self.opt.step()
                self.step += 1
                self._update_ema()
                self.seconds += time.time() - t0
                self.run_loss.append(loss.item())
                if self.step % 25 == 0:
                    mean = np.mean(self.run_loss)
                    self.loss_log.append((self.step, float(mean), self.seconds))
                    writer.writerow([self.step, f"{mean:.5f}", f"{self.seconds:.1f}"])
                    logf.flush()
                    print(f"step {self.step} loss {mean:.4f} ({self.seconds / self.step:.2f} s/step, "
                          f"{self.seconds / 60:.1f} min)", flush=True)
                    self.run_loss = []
                if time.time() - t_ckpt > args.ckpt_minutes * 60:
                    self.checkpoint()
                    t_ckpt = time.time()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            logf.close()
        self.checkpoint()

    @torch.no_grad()
    def _update_ema(self) -> None:
        d = min(self.args.ema, (1 + self.step) / (10 + self.step))
        live = {**{"u." + k: v for k, v in self.denoiser.state_dict().items()},
                **{"t." + k: v for k, v in self.text.state_dict().items()}}
        for k, v in self.ema.items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(live[k], alpha=1 - d)
            else:
                v.copy_(live[k])

    def finish(self, export) -> None:
        """Unless ``--no-export``: the models to eval mode, ``export()`` (the tool's), one line."""
        if self.args.no_export:
            return
        self.denoiser.eval()
        self.text.eval()
        export()
        print(f"exported {self.args.export} at step {self.step}", flush=True)


# -- the common flags -------------------------------------------------------------------------------
def add_run_args(ap: argparse.ArgumentParser, *, size: int = 32, size_help: str | None = None) -> None:
    """``--steps --minutes --batch --frames --size``."""
    ap.add_argument("--steps", type=int, default=100_000, help="stop after this many optimizer steps in total")
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-time budget of this run")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=size, help=size_help)


def add_schedule_args(ap: argparse.ArgumentParser) -> None:
    """``--lr --warmup --decay-start --decay-steps --min-lr --ema --p-uncond``."""
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--decay-start", type=int, default=None,
                    help="from this step, anneal the lr along a cosine to --min-lr over --decay-steps steps")
    ap.add_argument("--decay-steps", type=int, default=500)
    ap.add_argument("--min-lr", type=float, default=1e-5)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--p-uncond", type=float, default=0.1)


def add_state_args(ap: argparse.ArgumentParser, model: str) -> None:
    """``--seed --threads --ckpt-minutes --state --log --export --export-only --no-export``; the state and
    log default to ``tools/checkpoints/MODEL/``, the export to ``fastdm/assets/models/MODEL``."""
    folder = ROOT / "tools" / "checkpoints" / model
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ckpt-minutes", type=float, default=10.0)
    ap.add_argument("--state", default=str(folder / "state.json"))
    ap.add_argument("--log", default=str(folder / "loss.csv"))
    ap.add_argument("--export", default=str(ROOT / "fastdm" / "assets" / "models" / model))
    ap.add_argument("--export-only", action="store_true")
    ap.add_argument("--no-export", action="store_true", help="do not export at the end (e.g. a short check run)")
