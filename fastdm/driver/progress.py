"""What a front end shows while an edit runs: a progress bar fed by the step-end callback, and
quiet, offline libraries (front ends print their own lines)."""

from __future__ import annotations

import contextlib
import os


def quiet_libraries() -> None:
    """Offline, and no library warnings or progress bars (front ends print their own)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:
        pass


@contextlib.contextmanager
def progress(total: int, quiet: bool):
    """A tqdm bar fed by the pipeline's step-end callback (reading the losses syncs: CLI only)."""
    if quiet:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc="fastdm-edit", unit="step", dynamic_ncols=True)

    def on_step(_pipe, step, t, tensors):
        if step > bar.total:  # an extended edit (stop="extend") runs segments past its steps
            bar.total = step
        bar.n = step
        bar.set_postfix({k: f"{float(v):.3g}" for k, v in tensors["losses"].items()} | {"t": t}, refresh=True)

    try:
        yield on_step
    finally:
        bar.close()
