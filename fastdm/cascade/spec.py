"""The cascade file: an ordered list of stages, each a local model folder plus its settings.

JSON, one object with a ``stages`` list; relative ``model`` paths are read from the file's folder::

    {"stages": [
      {"kind": "edit", "model": "show-1-base", "frames": 8, "size": [64, 40]},
      {"kind": "interpolate", "model": "show-1-interpolation", "factor": 4, "steps": 75, "guidance_scale": 4.0},
      {"kind": "upscale", "model": "show-1-sr1", "scale": 4, "noise_level": 250, "window": 8, "stride": 7},
      {"kind": "refine", "model": "show-1-sr2", "size": [576, 320], "strength": 0.8, "negative_prompt": "low resolution, blur"}
    ]}

The first stage is the one ``edit`` (the DreamMotion edit at the base model's size and keyframe
count); ``interpolate``, ``upscale`` and ``refine`` follow in any order. Every key is checked here,
before any file is read or any model loaded: an unknown kind or setting, a wrong type or range is
one line naming the stage.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FastDMError

KINDS = ("edit", "interpolate", "upscale", "refine")
BUILTIN = {"shapes": "shapes.json"}  # --cascade NAME -> fastdm/assets/cascades/NAME.json

_COMMON = {"steps": 50, "guidance_scale": 7.5, "seed": 0, "negative_prompt": ""}
# kind -> {setting: default}; "model" is handled apart (required except for edit)
SETTINGS = {
    "edit": {"frames": None, "size": None},
    "interpolate": {"factor": 4, "window": 1, "start": "estimate", **_COMMON},
    "upscale": {"scale": 2, "size": None, "noise_level": 100, "window": 8, "stride": 7, "strength": 1.0, "start": "estimate",
                **_COMMON},
    "refine": {"size": None, "strength": 0.8, **_COMMON},
}


@dataclass
class Stage:
    index: int  # 0-based position in the file
    kind: str
    model: str | None  # resolved folder path (edit: None = --model or the bundled model)
    settings: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"stage {self.index + 1} ({self.kind})"

    def to_dict(self) -> dict:
        return {"index": self.index, "kind": self.kind, "model": self.model, "settings": dict(self.settings)}


@dataclass
class Cascade:
    stages: list[Stage]
    source: str  # the file (or built-in name) it came from
    builtin: str | None = None

    def to_dict(self) -> dict:
        return {"source": self.source, "builtin": self.builtin, "stages": [s.to_dict() for s in self.stages]}


def builtin_path(name: str) -> Path:
    return Path(__file__).resolve().parents[1] / "assets" / "cascades" / BUILTIN[name]


def _int(label, key, v, lo=None):
    if isinstance(v, bool) or not isinstance(v, int):
        raise FastDMError(f"{label}: '{key}' must be an integer, got {v!r}")
    if lo is not None and v < lo:
        raise FastDMError(f"{label}: '{key}' must be >= {lo}, got {v}")
    return v


def _float(label, key, v, lo=None, hi=None, lo_open=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise FastDMError(f"{label}: '{key}' must be a number, got {v!r}")
    v = float(v)
    if lo is not None and (v <= lo if lo_open else v < lo) or hi is not None and v > hi:
        rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise FastDMError(f"{label}: '{key}' must be in {rng}, got {v:g}")
    return v


def _size(label, key, v):
    if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)):
        raise FastDMError(f"{label}: '{key}' must be [width, height] in pixels, e.g. [64, 40], got {v!r}")
    return [int(v[0]), int(v[1])]


def _check_settings(label: str, kind: str, raw: dict) -> dict:
    s = {**SETTINGS[kind], **raw}
    for key in ("steps", "window", "stride", "factor", "scale", "frames"):
        if key in s and s[key] is not None:
            _int(label, key, s[key], lo=2 if key == "factor" else 1)
    if "seed" in s:
        _int(label, "seed", s["seed"])
    if "noise_level" in s:
        _int(label, "noise_level", s["noise_level"], lo=0)
    if "guidance_scale" in s:
        s["guidance_scale"] = _float(label, "guidance_scale", s["guidance_scale"], lo=0.0)
    if "strength" in s:
        s["strength"] = _float(label, "strength", s["strength"], lo=0.0, hi=1.0, lo_open=True)
    if "start" in s and s["start"] not in ("estimate", "noise"):
        raise FastDMError(f"{label}: 'start' must be \"estimate\" (the chain starts from the upsampled or interpolated "
                          f"clip, noised) or \"noise\" (pure noise), not {s['start']!r}")
    if "negative_prompt" in s and not isinstance(s["negative_prompt"], str):
        raise FastDMError(f"{label}: 'negative_prompt' must be a string")
    if s.get("size") is not None:
        s["size"] = _size(label, "size", s["size"])
    if kind == "upscale" and s["stride"] > s["window"] - 1 and s["window"] > 1:
        raise FastDMError(f"{label}: 'stride' {s['stride']} must be < 'window' {s['window']} so that windows overlap "
                          f"(each window's first frame is carried over from the previous one)")
    if kind == "upscale" and "scale" in raw and raw.get("size") is not None:
        raise FastDMError(f"{label}: give 'scale' or 'size', not both")
    return s


def parse_cascade(data, *, source: str, base_dir: Path, builtin: str | None = None) -> Cascade:
    """Check a cascade's JSON object and resolve its model paths (relative to ``base_dir``)."""
    if not isinstance(data, dict) or set(data) - {"stages", "description"} or not isinstance(data.get("stages"), list):
        raise FastDMError(f"cascade {source}: must be a JSON object {{\"stages\": [...]}} (optionally with \"description\")")
    if not data["stages"]:
        raise FastDMError(f"cascade {source}: 'stages' is empty; list an edit stage and the stages after it")
    stages = []
    for i, raw in enumerate(data["stages"]):
        label = f"cascade {source}: stage {i + 1}"
        if not isinstance(raw, dict) or "kind" not in raw:
            raise FastDMError(f"{label}: each stage must be an object with a 'kind' ({', '.join(KINDS)})")
        kind = raw["kind"]
        if kind not in KINDS:
            raise FastDMError(f"{label}: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
        label = f"cascade {source}: stage {i + 1} ({kind})"
        settings = {k: v for k, v in raw.items() if k not in ("kind", "model")}
        unknown = sorted(set(settings) - set(SETTINGS[kind]))
        if unknown:
            raise FastDMError(f"{label}: unknown setting(s) {', '.join(unknown)}; a {kind} stage takes "
                              f"model, {', '.join(SETTINGS[kind])}")
        model = raw.get("model")
        if model is None and kind != "edit":
            raise FastDMError(f"{label}: 'model' (a local diffusers-format folder) is required")
        if model is not None:
            if not isinstance(model, str) or not model:
                raise FastDMError(f"{label}: 'model' must be a folder path")
            p = Path(os.path.expanduser(model))
            model = str(p if p.is_absolute() else (base_dir / p))
        stages.append(Stage(i, kind, model, _check_settings(label, kind, settings)))
    if stages[0].kind != "edit" or any(s.kind == "edit" for s in stages[1:]):
        raise FastDMError(f"cascade {source}: the first stage, and only the first, must be the edit stage")
    return Cascade(stages, source, builtin)


def load_cascade(name_or_path: str) -> Cascade:
    """``--cascade``: a built-in name (``shapes``) or a JSON file (``./shapes`` for a file of that name)."""
    if name_or_path in BUILTIN:
        path, builtin = builtin_path(name_or_path), name_or_path
    else:
        path, builtin = Path(name_or_path).expanduser(), None
        if not path.is_file():
            names = ", ".join(BUILTIN)
            raise FastDMError(f"--cascade {name_or_path}: no such file; give a cascade JSON file or a built-in name ({names})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FastDMError(f"--cascade {name_or_path}: not valid JSON ({e}); see README, 'Cascaded editing'") from None
    return parse_cascade(data, source=name_or_path, base_dir=path.resolve().parent, builtin=builtin)
