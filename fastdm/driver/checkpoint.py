"""Atomic checkpoints of an edit: step, edited tensor, optimizer state and RNG state.

One file, ``state.pt``, written to a temporary name and renamed, so a kill at any moment leaves
either the previous checkpoint or the new one. It loads with ``torch.load(weights_only=True)``:
tensors and plain containers only, no code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import ResumeMismatch
from ..io.atomic import atomic_output, write_json_atomic

STATE = "state.pt"
FORMAT = 1


def save_checkpoint(folder: str | Path, *, step: int, x: torch.Tensor, optimizer_state: dict,
                    rng_state: torch.Tensor, fingerprint: str, input_fingerprint: str, extension: torch.Tensor | None = None) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT,
        "step": step,
        "x": x.detach().cpu(),
        "optimizer": optimizer_state,
        "rng": rng_state,
        "fingerprint": fingerprint,
        "input_fingerprint": input_fingerprint,
    }
    if extension is not None:  # the extension rule's per-step records (stop="extend"), so a resumed edit decides the same
        state["extension"] = extension
    with atomic_output(folder / STATE) as tmp:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    write_json_atomic(folder / "checkpoint.json", {"step": step, "fingerprint": fingerprint, "format": FORMAT})


def load_checkpoint(folder: str | Path, *, fingerprint: str, input_fingerprint: str) -> dict:
    folder = Path(folder)
    path = folder / STATE
    if not path.is_file():
        raise ResumeMismatch(f"`resume={folder}`: no checkpoint there ({STATE} missing); run with `checkpoint_every=N` first")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file
        raise ResumeMismatch(f"`resume={folder}`: {STATE} is unreadable ({type(e).__name__}); delete the folder and start again") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ResumeMismatch(f"`resume={folder}`: not a fastdm checkpoint of format {FORMAT}")
    if state["fingerprint"] != fingerprint:
        raise ResumeMismatch(
            f"`resume={folder}`: the checkpoint was made with a different configuration "
            "(prompts, seed, lr, weights or model differ; with `stop=extend` (a model folder may make it the default), also "
            "steps and the extension settings); resume with the same options or start a new edit"
        )
    if state["input_fingerprint"] != input_fingerprint:
        raise ResumeMismatch(
            f"`resume={folder}`: the checkpoint was made from a different input video, mask or size; "
            "resume with the same input or start a new edit"
        )
    return state
