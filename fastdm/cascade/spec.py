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
before any file is read or any model loaded, against the declared schema
(:func:`fastdm.schema.cascade_schema`) and then the rules between settings: an unknown kind or
setting, a wrong type or range is one line naming the stage.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInput
from ..schema import KINDS, SETTINGS, as_declared, stage_errors  # noqa: F401  (KINDS, SETTINGS: the declarations, re-exported)

BUILTIN = {"shapes": "shapes.json"}  # --cascade NAME -> fastdm/assets/cascades/NAME.json


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


def _check_settings(label: str, kind: str, raw: dict) -> dict:
    """The stage's settings with its kind's defaults, after the schema (types and ranges, fastdm.schema) and the
    rules between settings."""
    errors = stage_errors({"kind": kind, **raw}, kind, tuple(SETTINGS[kind]))
    if errors:
        raise BadInput(f"{label}: {errors[0]}", field="cascade")
    s = as_declared({**SETTINGS[kind], **{k: v for k, v in raw.items() if k != "model"}})  # JSON 8.0 -> 8
    if kind == "upscale" and s["stride"] > s["window"] - 1 and s["window"] > 1:
        raise BadInput(f"{label}: 'stride' {s['stride']} must be < 'window' {s['window']} so that windows overlap "
                       f"(each window's first frame is carried over from the previous one)", field="cascade")
    if kind == "upscale" and "scale" in raw and raw.get("size") is not None:
        raise BadInput(f"{label}: give 'scale' or 'size', not both", field="cascade")
    return s


def parse_cascade(data, *, source: str, base_dir: Path, builtin: str | None = None) -> Cascade:
    """Check a cascade's JSON object and resolve its model paths (relative to ``base_dir``)."""
    if not isinstance(data, dict) or set(data) - {"stages", "description"} or not isinstance(data.get("stages"), list):
        raise BadInput(f"cascade {source}: must be a JSON object {{\"stages\": [...]}} (optionally with \"description\")")
    if not isinstance(data.get("description", ""), str):
        raise BadInput(f"cascade {source}: 'description' must be a string")
    if not data["stages"]:
        raise BadInput(f"cascade {source}: 'stages' is empty; list an edit stage and the stages after it")
    stages = []
    for i, raw in enumerate(data["stages"]):
        label = f"cascade {source}: stage {i + 1}"
        if not isinstance(raw, dict) or "kind" not in raw:
            raise BadInput(f"{label}: each stage must be an object with a 'kind' ({', '.join(KINDS)})")
        kind = raw["kind"]
        if kind not in KINDS:
            raise BadInput(f"{label}: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
        label = f"cascade {source}: stage {i + 1} ({kind})"
        settings = {k: v for k, v in raw.items() if k != "kind"}
        settings = _check_settings(label, kind, settings)  # model included: the schema checks it too
        model = raw.get("model")
        if model is not None:
            p = Path(os.path.expanduser(model))
            model = str(p if p.is_absolute() else (base_dir / p))
        stages.append(Stage(i, kind, model, settings))
    if stages[0].kind != "edit" or any(s.kind == "edit" for s in stages[1:]):
        raise BadInput(f"cascade {source}: the first stage, and only the first, must be the edit stage")
    return Cascade(stages, source, builtin)


def load_cascade(name_or_path: str) -> Cascade:
    """``--cascade``: a built-in name (``shapes``) or a JSON file (``./shapes`` for a file of that name)."""
    if name_or_path in BUILTIN:
        path, builtin = builtin_path(name_or_path), name_or_path
    else:
        path, builtin = Path(name_or_path).expanduser(), None
        if not path.is_file():
            names = ", ".join(BUILTIN)
            raise BadInput(f"`cascade={name_or_path}`: no such file; give a cascade JSON file or a built-in name ({names})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"`cascade={name_or_path}`: not valid JSON ({e}); see README, 'Cascaded editing'") from None
    return parse_cascade(data, source=name_or_path, base_dir=path.resolve().parent, builtin=builtin)
