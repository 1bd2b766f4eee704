"""One declared schema for what comes in as JSON: a ``fastdm-batch`` manifest line or a service's
request body (every field a request may set, derived from the dataclasses that hold them:
:class:`~fastdm.driver.config.EditConfig` settings by their own names, and the request options), and
a cascade file (:func:`cascade_schema`, one stage schema per kind). Checked with ``jsonschema``;
errors come back one line each, naming the field and what it must be.
"""

from __future__ import annotations

import dataclasses
import typing

from .driver.config import (EXTEND_SIGNALS, EXTEND_SPANS, LR_SCHEDULES, MASK_SCOPES, OPTIMIZERS, PRESETS, STOP_RULES, T_SCHEDULES,
                            EditConfig)
from .driver.engines import ENGINES
from .driver.plan import PLANS

_ENUMS = {"optimizer": OPTIMIZERS, "mask_scope": MASK_SCOPES, "t_schedule": T_SCHEDULES, "lr_schedule": LR_SCHEDULES,
          "stop": STOP_RULES, "weighting": ("constant", "sds"), "plan": tuple(PLANS), "backend": tuple(ENGINES),
          "preset": tuple(PRESETS), "extend_on": EXTEND_SIGNALS, "extend_span": EXTEND_SPANS}
_JSON = {"int": {"type": "integer"}, "float": {"type": "number"}, "str": {"type": "string"}, "bool": {"type": "boolean"},
         "None": {"type": "null"}, "dict": {"type": "object"}, "tuple[str, ...]": {"type": "array", "items": {"type": "string"}}}

# request options a JSON request may set besides the settings (the command line's frame selection, plan, engine)
OPTIONS = {"frames": "int | None", "stride": "int", "start": "float | None", "end": "float | None", "size": "str | None", "plan": "str | None", "backend": "str",
           "preset": "str | None"}
# paths and prompts of a job
JOB = {"input": "str", "source_prompt": "str", "target_prompt": "str", "mask": "str | None", "boxes": "str | None",
       "output": "str | None"}
REQUIRED = ("input", "source_prompt", "target_prompt")


def _schema_of(name: str, annotation: str) -> dict:
    parts = [p.strip() for p in annotation.split("|")]
    alts = [_JSON[p] for p in parts]
    out = alts[0] if len(alts) == 1 else {"anyOf": alts}
    if name in _ENUMS:
        out = {"anyOf": [{"enum": list(_ENUMS[name])}, *([{"type": "null"}] if "None" in parts else [])]}
    return out  # (values: EditConfig.validate and the request's checks, one place for each rule)


def settings_schema() -> dict[str, dict]:
    """Per EditConfig setting (prompts aside): its JSON Schema, from the dataclass's annotations."""
    hints = {f.name: f.type if isinstance(f.type, str) else typing.get_type_hints(EditConfig)[f.name]
             for f in dataclasses.fields(EditConfig)}
    return {n: _schema_of(n, str(t)) for n, t in hints.items() if n not in ("source_prompt", "target_prompt")}


def job_schema() -> dict:
    """The JSON Schema of one manifest line: a job's paths and prompts, options and settings."""
    props = {**{k: _schema_of(k, v) for k, v in JOB.items()}, **{k: _schema_of(k, v) for k, v in OPTIONS.items()},
             **settings_schema()}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": props,
            "required": list(REQUIRED), "additionalProperties": False}


_WHAT = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false", "null": "null",
         "array": "a list of strings", "object": "an object"}


def _expected(schema: dict) -> str:
    if "enum" in schema:
        return "one of " + ", ".join(map(str, schema["enum"]))
    if "anyOf" in schema:
        return " or ".join(_expected(s) for s in schema["anyOf"])
    return _WHAT.get(schema.get("type"), str(schema.get("type")))


def job_errors(spec) -> list[str]:
    """Every problem of one manifest line as a one-line message (empty when it fits the schema)."""
    import jsonschema

    schema = job_schema()
    out = []
    validator = jsonschema.Draft202012Validator(schema)
    order = {k: i for i, k in enumerate(schema["properties"])}  # the schema's field order: as a request lists them
    for err in sorted(validator.iter_errors(spec), key=lambda e: (order.get(e.path[0], -1) if e.path else -1, e.validator)):
        if err.validator == "required":
            missing = [k for k in REQUIRED if isinstance(spec, dict) and k not in spec]
            msg = f"missing {', '.join(repr(k) for k in missing)}; every job needs input, source_prompt and target_prompt"
        elif err.validator == "additionalProperties":
            unknown = [k for k in spec if k not in schema["properties"]]
            msg = f"unknown field(s) {', '.join(repr(k) for k in unknown)}; fields are {', '.join(schema['properties'])}"
        elif err.validator == "type" and not err.path:
            msg = "a job must be a JSON object"
        elif err.path:
            field = err.path[0]
            msg = f"'{field}' must be {_expected(schema['properties'][field])}, got {spec[field]!r}"
        else:
            msg = err.message
        if msg not in out:
            out.append(msg)
    return out


# ---- cascade files -------------------------------------------------------------------------------
KINDS = ("edit", "interpolate", "upscale", "refine")
_COMMON = {"steps": 50, "guidance_scale": 7.5, "seed": 0, "negative_prompt": ""}
# kind -> {setting: default}; "model" is apart (required except for edit)
SETTINGS = {
    "edit": {"frames": None, "size": None},
    "interpolate": {"factor": 4, "window": 1, "start": "estimate", **_COMMON},
    "upscale": {"scale": 2, "size": None, "noise_level": 100, "window": 8, "stride": 7, "strength": 1.0, "start": "estimate",
                **_COMMON},
    "refine": {"size": None, "strength": 0.8, **_COMMON},
}
# Every stage setting's schema; ``description`` is what an error says the value must be. As JSON Schema
# has it, a number with no fraction (8.0) is an integer: it is accepted and used as 8.
_INT1 = {"type": "integer", "minimum": 1, "description": "an integer >= 1"}
STAGE_SETTINGS = {
    "model": {"type": "string", "minLength": 1, "description": "a folder path (a local diffusers-format folder)"},
    "frames": {"anyOf": [_INT1, {"type": "null"}], "description": "an integer >= 1 or null"},
    "size": {"anyOf": [{"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 2},
                       {"type": "null"}], "description": "[width, height] in pixels, e.g. [64, 40]"},
    "steps": _INT1, "window": _INT1, "stride": _INT1, "scale": _INT1,
    "factor": {"type": "integer", "minimum": 2, "description": "an integer >= 2"},
    "seed": {"type": "integer", "description": "an integer"},
    "noise_level": {"type": "integer", "minimum": 0, "description": "an integer >= 0"},
    "guidance_scale": {"type": "number", "minimum": 0, "description": "a number >= 0"},
    "strength": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "description": "in (0, 1]"},
    "start": {"enum": ["estimate", "noise"], "description": "\"estimate\" (the chain starts from the upsampled or interpolated "
              "clip, noised) or \"noise\" (pure noise)"},
    "negative_prompt": {"type": "string", "description": "a string"},
}


def stage_schema(kind: str, settings: tuple[str, ...]) -> dict:
    """The JSON Schema of one cascade stage of ``kind`` taking ``settings`` (besides ``kind`` and ``model``)."""
    model = STAGE_SETTINGS["model"]
    if kind == "edit":  # the edit stage's model may be left out or null: --model or the bundled model
        model = {"anyOf": [model, {"type": "null"}], "description": model["description"] + " or null"}
    props = {"kind": {"const": kind}, "model": model, **{k: STAGE_SETTINGS[k] for k in settings}}
    return {"type": "object", "properties": props, "required": ["kind"] + (["model"] if kind != "edit" else []),
            "additionalProperties": False}


def cascade_schema() -> dict:
    """The JSON Schema of a cascade file: ``{"stages": [...], "description": "..."}``, each stage by its kind."""
    stage = {"type": "object", "required": ["kind"], "properties": {"kind": {"enum": list(KINDS)}},
             "allOf": [{"if": {"properties": {"kind": {"const": k}}}, "then": stage_schema(k, tuple(SETTINGS[k]))} for k in KINDS]}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
            "properties": {"stages": {"type": "array", "minItems": 1, "items": stage}, "description": {"type": "string"}},
            "required": ["stages"], "additionalProperties": False}


def _types(schema: dict) -> set[str]:
    return {schema["type"]} if "type" in schema else set().union(*(_types(s) for s in schema.get("anyOf", [])))


def as_declared(settings: dict) -> dict:
    """Stage settings that fit their schema, in the Python types it declares: a JSON 8.0 where an integer is
    declared is 8, a number is a float, a size's items are ints (from ``STAGE_SETTINGS``, not a second list)."""
    out = dict(settings)
    for key, v in settings.items():
        schema = STAGE_SETTINGS.get(key)
        if v is None or schema is None:
            continue
        types = _types(schema)
        if "integer" in types:
            out[key] = int(v)
        elif "number" in types:
            out[key] = float(v)
        elif "array" in types:
            out[key] = [int(x) for x in v]
    return out


def stage_errors(raw: dict, kind: str, settings: tuple[str, ...]) -> list[str]:
    """Every problem of one stage of a known kind, one line each (empty when it fits its schema)."""
    import jsonschema

    schema = stage_schema(kind, settings)
    out = []
    for err in sorted(jsonschema.Draft202012Validator(schema).iter_errors(raw), key=lambda e: (list(e.path), e.validator)):
        if err.validator == "required":
            msg = "'model' (a local diffusers-format folder) is required"
        elif err.validator == "additionalProperties":
            unknown = sorted(k for k in raw if k not in schema["properties"])
            msg = f"unknown setting(s) {', '.join(unknown)}; {'an' if kind[0] in 'aeiou' else 'a'} {kind} stage takes model, {', '.join(settings)}"
        else:
            key = err.path[0] if err.path else None
            desc = schema["properties"].get(key, {}).get("description", err.message)
            msg = f"'{key}' must be {desc}, got {raw[key]!r}" if key in raw else err.message
        if msg not in out:
            out.append(msg)
    return out
