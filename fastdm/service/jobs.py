"""One edit request as the service front ends see it (``fastdm-batch``, ``fastdm-app``).

A request becomes the same :class:`~fastdm.request.EditRequest` the command line builds, and runs
through :func:`fastdm.request.run`, so every check, its order (before the model loads) and every
one-line message are the CLI's; only the pipeline is passed in, loaded once per worker or per app.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import BadInput
from ..request import EditRequest

def edit_request(input: str | Path, source_prompt: str, target_prompt: str, *, out: str | Path, model: str | None = None,
                 device: str = "cpu", dtype: str = "fp32", mask: str | None = None, boxes: str | None = None,
                 frames: int | None = None, stride: int = 1, size: str | None = None, plan: str | None = None,
                 backend: str = "eager", checkpoint_every: int = 0, checkpoint_dir: str | None = None,
                 resume: str | None = None, settings: dict | None = None, **options) -> EditRequest:
    """The :class:`~fastdm.request.EditRequest` of ``fastdm-edit INPUT --source-prompt ... --out OUT`` with
    these options (all others at their defaults), quiet. ``settings`` set ``EditConfig`` fields by name;
    ``options`` set further request fields (``steps``, ``lr``, ``guidance_scale``, ``seed``, ``preset``, ...)."""
    from ..driver.engines import ENGINES
    from ..driver.plan import PLANS

    if plan is not None and plan not in PLANS:
        raise BadInput(f"unknown plan {plan!r}; choose one of {', '.join(PLANS)}", field="plan")
    if backend not in ENGINES:
        raise BadInput(f"unknown backend {backend!r}; choose one of {', '.join(ENGINES)}", field="backend")
    if mask is not None and boxes is not None:
        raise BadInput("give a mask or boxes, not both (`mask` and `boxes` exclude each other)", field="mask")
    names = {f.name for f in dataclasses.fields(EditRequest)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise BadInput(f"unknown request option(s) {', '.join(unknown)}", field=unknown[0])
    return EditRequest(str(input), source_prompt, target_prompt, out=str(out), model=model, device=device, dtype=dtype,
                       mask=mask, boxes=boxes, frames=frames, stride=stride, size=size, plan=plan, backend=backend,
                       checkpoint_every=checkpoint_every, checkpoint_dir=checkpoint_dir, resume=resume,
                       settings=dict(settings or {}), quiet=True, **options)
