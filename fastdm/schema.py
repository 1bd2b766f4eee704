"""One declared schema for requests as JSON (a ``fastdm-batch`` manifest line, a service's request
body): the JSON Schema of every field a request may set, derived from the dataclasses that hold them
(:class:`~fastdm.driver.config.EditConfig` settings by their own names, and the request options), and
checked with ``jsonschema``. Errors come back one line each, naming the field and what it must be.
"""

from __future__ import annotations

import dataclasses
import typing

from .driver.config import LR_SCHEDULES, MASK_SCOPES, OPTIMIZERS, PRESETS, STOP_RULES, T_SCHEDULES, EditConfig
from .driver.engines import ENGINES
from .driver.plan import PLANS

_ENUMS = {"optimizer": OPTIMIZERS, "mask_scope": MASK_SCOPES, "t_schedule": T_SCHEDULES, "lr_schedule": LR_SCHEDULES,
          "stop": STOP_RULES, "weighting": ("constant", "sds"), "plan": tuple(PLANS), "backend": tuple(ENGINES),
          "preset": tuple(PRESETS)}
_JSON = {"int": {"type": "integer"}, "float": {"type": "number"}, "str": {"type": "string"}, "bool": {"type": "boolean"},
         "None": {"type": "null"}, "dict": {"type": "object"}, "tuple[str, ...]": {"type": "array", "items": {"type": "string"}}}

# request options a JSON request may set besides the settings (the command line's frame selection, plan, engine)
OPTIONS = {"frames": "int | None", "stride": "int", "size": "str | None", "plan": "str | None", "backend": "str",
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
