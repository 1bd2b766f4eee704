"""Atomic output: write to a temporary file beside the target, then rename over it.

A crash or an error at any point leaves either the old file or the new one, never a partial one.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output(dest: str | os.PathLike):
    """Yield a temporary path (same folder and extension as ``dest``); publish it on success."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.stem}.", suffix=dest.suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(dest: str | os.PathLike, obj) -> None:
    with atomic_output(dest) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2))
