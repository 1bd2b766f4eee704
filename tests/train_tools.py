"""Shared by the tests of the shapes training tools (tools/train_shapes*.py): load a tool as a
module, read its state, and train split by a resume against uninterrupted."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name: str):
    """``tools/NAME.py`` as a module (it puts tools/ on sys.path itself, as when run from the repo root)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read_state(folder: Path) -> tuple[dict, dict]:
    meta = json.loads((folder / "state.json").read_text())
    return meta, load_file(str(folder / meta["tensors"]))


def run_tool(tool, folder: Path, steps: int, *args) -> None:
    """A short run of ``tool`` (batch 2, 2 frames, one thread) with its state, log and export in ``folder``;
    ``args``: the tool's own size flags and any others."""
    tool.main(["--steps", str(steps), "--batch", "2", "--frames", "2", "--threads", "1", "--warmup", "2",
               "--state", str(folder / "state.json"), "--log", str(folder / "loss.csv"), "--export", str(folder / "model"),
               *args])


def resumed_equals_uninterrupted(tool, tmp_path: Path, *args) -> tuple[Path, dict]:
    """:func:`run_tool` 2 steps then resumed to 4 (folder ``split``), and 4 uninterrupted (``whole``);
    asserts they end bit-identical (every tensor, the numpy generator, the pending losses) and that no
    pickle was written. Returns ``split`` and its state's meta at step 2."""
    split, whole = tmp_path / "split", tmp_path / "whole"
    run_tool(tool, split, 2, "--no-export", *args)
    meta2, _ = read_state(split)
    assert meta2["step"] == 2
    assert not any(p.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt") for p in split.rglob("*"))
    run_tool(tool, split, 4, *args)  # resumes at step 2
    run_tool(tool, whole, 4, *args)
    (ma, ta), (mb, tb) = read_state(split), read_state(whole)
    assert ma["step"] == mb["step"] == 4 and ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta), [k for k in ta if not torch.equal(ta[k], tb[k])][:5]
    assert ma["np_rng"] == mb["np_rng"] and ma["pending_losses"] == mb["pending_losses"]
    return split, meta2


def committed_state(dest: Path) -> tuple[dict, Path]:
    """A copy of the bundled model's committed training state (``tools/checkpoints/shapes``) in ``dest``:
    its JSON and tokenizer from the working tree, its tensors from the working tree or, where they were
    left out of it (the GPU check's payload), from git history. Skips when neither has them (a source
    tree without history)."""
    import shutil

    import pytest

    committed = ROOT / "tools" / "checkpoints" / "shapes"
    meta = json.loads((committed / "state.json").read_text())
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(committed / "state.json", dest / "state.json")
    shutil.copytree(committed / "tokenizer", dest / "tokenizer")
    tensors = committed / meta["tensors"]
    if tensors.is_file():
        shutil.copy(tensors, dest / meta["tensors"])
    elif not load_tool("training_state").restore_tensors(tensors, dest / meta["tensors"]):
        pytest.skip(f"{tensors.name} is neither in the working tree nor in its git history")
    return meta, dest / meta["tensors"]
