"""Build the *newest set* environment the kernel, backbone and pipeline tests also run on: ``python tools/newest_env.py``.

CI runs the whole suite on the pinned set (``.ci/constraints.txt``: torch 2.13.0 CPU build, Triton 3.7.1). This
script makes a second virtual environment, ``.newest/venv``, with the newest versions the package index has that
install together: torch 2.14.1 (the index's CUDA build; it runs on the CPU) with the Triton it pins (3.8.0), the
newest diffusers, transformers and accelerate, and this checkout of fastdm (editable); and the newest Triton (3.9.0)
apart, in ``.newest/triton-newest`` (``pip install --target``), which a test puts in front on ``PYTHONPATH`` so the
kernels also run under the newest Triton's interpreter without touching the venv. The versions are pinned in
``.ci/constraints-newest.txt`` so a run is reproducible; ``--refresh`` resolves the newest versions again and
rewrites that file (then commit it if the tests pass). ``tests/test_newest_set.py`` runs the tests in it.

It is built once: a ``.newest`` whose stamp matches the pins is left as it is (a second).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / ".ci" / "constraints-newest.txt"
TORCH = "torch==2.14.1"  # the newest torch that installs here (2.15.0 does not resolve on the index)
PACKAGES = ["diffusers", "transformers", "accelerate", "safetensors", "imageio", "imageio-ffmpeg", "numpy", "tqdm", "jsonschema",
            "pytest", "opencv-python-headless"]
NEWEST_TRITON = "triton"  # installed apart at its newest version
STAMP = "fastdm-newest-env.json"


def _stamp() -> str:
    h = hashlib.sha256(CONSTRAINTS.read_bytes() if CONSTRAINTS.is_file() else b"")
    h.update(json.dumps([TORCH, PACKAGES, NEWEST_TRITON]).encode())
    return h.hexdigest()[:16]


def _run(cmd: list[str], log) -> str:
    print("+", " ".join(cmd), file=log, flush=True)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log.write(p.stdout)
    log.flush()
    if p.returncode != 0:
        raise SystemExit(f"newest_env: `{' '.join(cmd[:5])} ...` failed (exit {p.returncode}); see {log.name}")
    return p.stdout


def build(dest: Path, *, refresh: bool = False, quiet: bool = False) -> Path:
    dest = dest.resolve()
    stamp_file = dest / STAMP
    if not refresh and not CONSTRAINTS.is_file():
        raise SystemExit(f"newest_env: {CONSTRAINTS} is missing; run `python tools/newest_env.py --refresh` to resolve the newest set")
    if not refresh and stamp_file.is_file() and json.loads(stamp_file.read_text()).get("stamp") == _stamp() \
            and (dest / "venv").is_dir():
        if not quiet:
            print(f"newest_env: {dest} is up to date")
        return dest
    t0 = time.perf_counter()
    dest.mkdir(parents=True, exist_ok=True)
    log_path = dest / "build.log"
    with open(log_path, "w") as log:
        for old in ("venv", "triton-newest", STAMP):
            p = dest / old
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        _run([sys.executable, "-m", "venv", str(dest / "venv")], log)
        py = str(dest / "venv" / "bin" / "python")
        pins = [] if refresh else ["-c", str(CONSTRAINTS)]
        _run([py, "-m", "pip", "install", "-q", *pins, TORCH, *PACKAGES], log)
        _run([py, "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)], log)
        if refresh:  # the newest Triton: what the index offers now
            newest = _run([py, "-m", "pip", "index", "versions", NEWEST_TRITON], log).split("Available versions:")[1].split(",")[0].strip()
            triton_pin = f"triton=={newest}"
        else:
            triton_pin = next(line.split(":", 1)[1].strip() for line in CONSTRAINTS.read_text().splitlines()
                              if line.startswith("# newest-triton:"))
        _run([py, "-m", "pip", "install", "-q", "--no-deps", "--target", str(dest / "triton-newest"), triton_pin], log)
        if refresh:
            frozen = _run([py, "-m", "pip", "freeze", "--exclude-editable"], log)
            CONSTRAINTS.write_text("# The newest set (tools/newest_env.py --refresh): torch 2.14.1 with its Triton, the newest diffusers,\n"
                                   "# transformers and accelerate; the newest Triton is installed apart (the line below).\n"
                                   f"# newest-triton: {triton_pin}\n" + frozen)
        stamp_file.write_text(json.dumps({"stamp": _stamp(), "built_s": round(time.perf_counter() - t0, 1)}))
    if not quiet:
        print(f"newest_env: built {dest} in {time.perf_counter() - t0:.0f} s (log: {log_path})")
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dest", nargs="?", default=str(ROOT / ".newest"))
    ap.add_argument("--refresh", action="store_true", help="resolve the newest versions again and rewrite .ci/constraints-newest.txt")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    build(Path(args.dest), refresh=args.refresh, quiet=args.quiet)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
