"""Shared helpers of the benchmarks: machine naming and result files."""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine_name(device: str = "cpu") -> str:
    """A short, file-name-safe name of the machine a result comes from, e.g. 'cpu-2core-x86_64'."""
    if device.startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name(0)
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"cpu-{os.cpu_count()}core-{platform.machine()}"


def machine_description(device: str = "cpu") -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def write_results(stem: str, data: dict, markdown: str) -> tuple[Path, Path]:
    from fastdm.io.atomic import atomic_output

    RESULTS.mkdir(parents=True, exist_ok=True)
    j, m = RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"
    with atomic_output(j) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2))
    with atomic_output(m) as tmp:
        Path(tmp).write_text(markdown)
    return j, m
