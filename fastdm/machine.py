"""Naming the machine a benchmark result comes from."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path


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
