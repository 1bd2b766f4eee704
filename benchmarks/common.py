"""Shared helpers of the benchmarks: machine naming and result files."""

from __future__ import annotations

import json
from pathlib import Path

from fastdm.bench.machine import machine_description, machine_name  # noqa: F401  (re-exported)

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parent.parent


def repo_relative(path: str | Path) -> str:
    """``path`` relative to the repository when it lies inside it (results never carry a checkout's
    absolute path), else as given."""
    p = Path(path).resolve()
    try:
        return p.relative_to(REPO).as_posix()
    except ValueError:
        return str(path)


def write_results(stem: str, data: dict, markdown: str) -> tuple[Path, Path]:
    from fastdm.io.atomic import atomic_output

    RESULTS.mkdir(parents=True, exist_ok=True)
    j, m = RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"
    with atomic_output(j) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2))
    with atomic_output(m) as tmp:
        Path(tmp).write_text(markdown)
    return j, m
