"""One edit request as the front ends over the pipeline see it (``fastdm-batch``, ``fastdm-app``).

A request becomes the same ``argparse.Namespace`` the command line builds, and runs through
:func:`fastdm.cli.run`, so every check, its order (before the model loads) and every one-line
message are the CLI's; only the pipeline is passed in, loaded once per worker or per app.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..driver.config import EditConfig
from ..errors import FastDMError

# EditConfig fields a request may set by their own names, and the JSON types each accepts
CONFIG_TYPES: dict[str, tuple[type, ...]] = {}
for _f in dataclasses.fields(EditConfig):
    if _f.name in ("source_prompt", "target_prompt", "extra"):
        continue
    _default = _f.default
    if _f.name == "tap_layers":
        CONFIG_TYPES[_f.name] = (list, type(None))
    elif isinstance(_default, bool):
        CONFIG_TYPES[_f.name] = (bool,)
    elif isinstance(_default, int):
        CONFIG_TYPES[_f.name] = (int,)
    elif isinstance(_default, float):
        CONFIG_TYPES[_f.name] = (int, float)
    else:
        CONFIG_TYPES[_f.name] = (str,)

# command-line options a request may also set (frame selection and size, plan, engine)
OPTION_TYPES: dict[str, tuple[type, ...]] = {"frames": (int, type(None)), "stride": (int,), "size": (str, type(None)),
                                             "plan": (str, type(None)), "backend": (str,)}

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", list: "a list of strings", bool: "true or false",
               type(None): "null"}


def type_error(name: str, value, types: tuple[type, ...]) -> str | None:
    """Why ``value`` does not fit ``types`` (JSON values; a bool is no number), or None."""
    if isinstance(value, bool) and bool not in types:
        ok = False
    elif isinstance(value, int) and not isinstance(value, bool) and (int in types or float in types):
        ok = True
    else:
        ok = isinstance(value, types)
    if ok and isinstance(value, list):
        ok = all(isinstance(v, str) for v in value)
    if ok:
        return None
    want = " or ".join(_TYPE_NAMES[t] for t in types if not (t is int and float in types))
    return f"'{name}' must be {want}, got {value!r}"


def edit_args(input: str | Path, source_prompt: str, target_prompt: str, *, out: str | Path, model: str | None = None,
              device: str = "cpu", dtype: str = "fp32", mask: str | None = None, boxes: str | None = None,
              frames: int | None = None, stride: int = 1, size: str | None = None, plan: str | None = None,
              backend: str = "eager", checkpoint_every: int = 0, checkpoint_dir: str | None = None,
              resume: str | None = None, **cli_options) -> argparse.Namespace:
    """The Namespace ``fastdm-edit INPUT --source-prompt ... --out OUT`` would give (all other
    options at their command-line defaults), quiet. ``cli_options`` set further CLI
    options by their argparse names (``steps``, ``lr``, ``guidance_scale``, ``seed``, ...)."""
    from ..cli import _size, build_parser

    args = build_parser().parse_args([f"--source-prompt={source_prompt}", f"--target-prompt={target_prompt}", "--", str(input)])
    if size is not None:
        try:
            args.size = _size(size)
        except argparse.ArgumentTypeError as e:
            raise FastDMError(str(e)) from None
    args.out, args.model, args.device, args.dtype = str(out), model, device, dtype
    args.mask, args.boxes, args.frames, args.stride, args.plan, args.backend = mask, boxes, frames, stride, plan, backend
    args.checkpoint_every, args.checkpoint_dir, args.resume = checkpoint_every, checkpoint_dir, resume
    args.quiet = True
    from ..backbone.engines import ENGINES
    from ..driver.plan import PLANS

    if plan is not None and plan not in PLANS:  # (argparse's choices, which a request bypasses)
        raise FastDMError(f"unknown plan {plan!r}; choose one of {', '.join(PLANS)}")
    if backend not in ENGINES:
        raise FastDMError(f"unknown backend {backend!r}; choose one of {', '.join(ENGINES)}")
    if mask is not None and boxes is not None:
        raise FastDMError("give a mask or boxes, not both (--mask and --boxes exclude each other)")
    for k, v in cli_options.items():
        if not hasattr(args, k):
            raise TypeError(f"no fastdm-edit option {k!r}")
        setattr(args, k, v)
    return args
