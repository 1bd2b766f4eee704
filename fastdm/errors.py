"""User-facing errors, typed so that a service can act on them.

`FastDMError` is raised for anything the *user* can fix (bad input, bad flags, missing model
folder). The CLI prints its message as one line and exits 2; anything else is an internal error
(exit 1). Each subclass has a stable ``code`` a caller can branch on (never the message text), and
``field`` names the request parameter at fault where there is one (``EditRequest`` / ``EditConfig``
names: ``steps``, ``mask``, ``resume``, ...).

Messages name parameters, never a front end's flags: a parameter is marked `` `name` `` or
`` `name=value` `` (the spelling of a Python call and of a batch manifest field). A front end re-spells
the marks with :func:`spell`: ``fastdm-edit`` turns `` `steps` `` into ``--steps`` and
`` `backend=ort` `` into ``--backend ort``, from its own argument parser.

| class | code | when |
|---|---|---|
| `BadInput` | `bad_input` | a value, file or combination of values is wrong |
| `Unsupported` | `unsupported` | valid on its own, but this model, plan, engine or device cannot do it |
| `MissingDependency` | `missing_dependency` | an optional package is not installed (the message names the extra) |
| `Diverged` | `diverged` | the edit produced non-finite values (lower the learning rate or weights) |
| `ResumeMismatch` | `resume_mismatch` | a checkpoint belongs to another edit, input or settings |
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_MARK = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)(?:=([^`]*))?`")


class FastDMError(Exception):
    """A problem with the user's input; the message says what is wrong and how to fix it."""

    code = "fastdm_error"

    def __init__(self, message: str = "", *, field: str | None = None):
        super().__init__(message)
        self.field = field

    def to_dict(self) -> dict:
        return {"code": self.code, "message": str(self), "field": self.field}


class BadInput(FastDMError):
    code = "bad_input"


class Unsupported(FastDMError):
    code = "unsupported"


class MissingDependency(FastDMError):
    code = "missing_dependency"


class Diverged(FastDMError):
    code = "diverged"


class ResumeMismatch(FastDMError):
    code = "resume_mismatch"


def spell(message: str, flags: Mapping[str, str]) -> str:
    """``message`` with its parameter marks in a front end's spelling: ``flags`` maps a parameter name to
    the option that sets it (``{"steps": "--steps"}``); `` `name=value` `` becomes ``--flag value``.
    Names ``flags`` does not hold keep their mark."""

    def one(m: re.Match) -> str:
        flag = flags.get(m.group(1))
        if flag is None:
            return m.group(0)
        return flag if m.group(2) is None else f"{flag} {m.group(2)}"

    return _MARK.sub(one, message)


def flags_of(parser) -> dict[str, str]:
    """An ``argparse`` parser's parameter names -> the long option that sets each (``guidance_scale`` ->
    ``--guidance-scale``): what a command line passes to :func:`spell`."""
    return {a.dest: max(a.option_strings, key=len) for a in parser._actions if a.option_strings and a.dest != "help"}


def parameters(message: str) -> list[str]:
    """The parameter names a message marks, in order."""
    return [m.group(1) for m in _MARK.finditer(message)]


__all__ = ["BadInput", "Diverged", "FastDMError", "MissingDependency", "ResumeMismatch", "Unsupported", "flags_of", "parameters", "spell"]
