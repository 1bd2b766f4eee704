"""Shared helpers of the benchmarks: machine naming and result files."""

from __future__ import annotations

from pathlib import Path

from fastdm.machine import machine_description, machine_name, mixed_stem, runs_machines  # noqa: F401  (re-exported)

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parent.parent


def repo_relative(path: str | Path) -> str:
    """``path`` relative to the repository when it lies inside it (results never carry a checkout's
    absolute path), else as given."""
    p = Path(path).resolve()
    try:
        return p.relative_to(REPO).as_posix()
    except ValueError:
        return str(path)


def denoiser_hash(folder: str | Path) -> tuple[str, str]:
    """(subfolder, short sha256) of a diffusers folder's denoiser weights: ``transformer/`` for a
    Wan-format folder, else ``unet/``. Result caches key on it, so retrained weights never reuse
    old runs."""
    import hashlib

    sub = "transformer" if Path(folder, "transformer").is_dir() and not Path(folder, "unet").is_dir() else "unet"
    weights = next(Path(folder, sub).glob("*.safetensors"))
    return sub, hashlib.sha256(weights.read_bytes()).hexdigest()[:16]


def model_stem(prefix: str, model: str | Path) -> str:
    """Result-file stem for a model: ``prefix`` for the bundled UNet model (the historical names),
    ``prefix-<folder name>`` for any other (``quality-shapes-dit``)."""
    from fastdm.backbone import resolve_model

    folder = Path(model).resolve()
    return prefix if folder == Path(resolve_model("shapes")).resolve() else f"{prefix}-{folder.name}"


def write_results(stem: str, data: dict, markdown: str, folder: Path | None = None) -> tuple[Path, Path]:
    """``STEM.json`` and ``STEM.md``, each written atomically, in ``folder`` (default: benchmarks/results)."""
    from fastdm.io.atomic import write_json_atomic, write_text_atomic

    folder = Path(folder) if folder is not None else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    j, m = folder / f"{stem}.json", folder / f"{stem}.md"
    write_json_atomic(j, data)
    write_text_atomic(m, markdown)
    return j, m
