"""Naming the machine a benchmark result comes from.

``machine_name()`` is the stem every results file carries: the CPU model is part of it
(``cpu-amd-epyc-2core-x86_64``, ``cpu-intel-xeon-2-50ghz-2core-x86_64``), so runs on two CPUs
with the same core count never share a file or a run cache. ``machine_description()`` is the
sentence a table prints (model, cores, torch, threads). ``runs_machines()`` says what a table's
cached runs recorded, and never fills in a machine a run did not record.
"""

from __future__ import annotations

import os
import platform
import re
from collections import Counter
from pathlib import Path

MIXED = "mixed"  # the CPU part of a stem for tables whose runs come from more than one machine


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _slug(text: str, limit: int = 32) -> str:
    text = re.sub(r"\((r|tm)\)", " ", text.lower())
    text = re.sub(r"\b(processor|cpu|with|radeon graphics|\d+-core)\b", " ", text)
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:limit].strip("-") or "unknown"


def cpu_stem(model: str | None = None, cores: int | None = None, arch: str | None = None) -> str:
    """``cpu-<model>-<cores>core-<arch>``: e.g. ``cpu-amd-epyc-2core-x86_64``."""
    model = _slug(model if model is not None else cpu_model())
    return f"cpu-{model}-{cores or os.cpu_count()}core-{arch or platform.machine()}"


def mixed_stem(stem: str) -> str:
    """The stem of a table whose runs come from more than one machine: ``cpu-<model>-2core-x86_64`` ->
    ``cpu-mixed-2core-x86_64`` (cores and architecture kept); any other stem -> ``mixed``."""
    m = re.fullmatch(r"cpu-.+?-(\d+core-.+)", stem)
    return f"cpu-{MIXED}-{m.group(1)}" if m else MIXED


def machine_name(device: str = "cpu") -> str:
    """A short, file-name-safe name of the machine a result comes from (see the module doc)."""
    if device.startswith("cuda"):
        import torch

        return _slug(torch.cuda.get_device_name(0), limit=48)
    return cpu_stem()


def machine_description(device: str = "cpu") -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def runs_machines(runs: list[dict]) -> tuple[list[str], str]:
    """The machine stems the runs recorded and a sentence saying how many ran where.

    A run that recorded no machine is counted as such, never given one."""
    stems = sorted({r["machine"] for r in runs if r.get("machine")})
    seen = Counter(r.get("machine_description") or "a machine the run did not record" for r in runs)
    if len(seen) == 1:
        return stems, next(iter(seen))
    return stems, "; ".join(f"{n} runs on {d}" for d, n in sorted(seen.items(), key=lambda kv: -kv[1]))
