"""Atomic output: write to a temporary file beside the target, then rename over it.

A crash or an error at any point leaves either the old file or the new one, never a partial one.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _read_umask() -> int:
    """The process umask, read without changing it where Linux tells it (/proc/self/status); else set
    and restored once, at import, before any thread of ours runs."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _read_umask()


def _umask() -> int:
    """The current umask; never writes it after import (``os.umask`` is process-wide, so writing it
    while another thread creates a file would give that file the wrong mode)."""
    if os.path.exists("/proc/self/status"):
        return _read_umask()
    return _UMASK_AT_IMPORT


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


def write_text_atomic(dest: str | os.PathLike, text: str) -> None:
    with atomic_output(dest) as tmp:
        Path(tmp).write_text(text)
