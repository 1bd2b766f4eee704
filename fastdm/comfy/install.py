"""`fastdm-comfy install COMFYUI_DIR`: put fastdm's node pack into a ComfyUI, the way users install packs.

It writes one small folder, ``COMFYUI_DIR/custom_nodes/fastdm_nodes/``: an ``__init__.py`` that
re-exports :mod:`fastdm.comfy`'s mappings, the pack's ``pyproject.toml`` (with its Comfy Registry
``[tool.comfy]`` table), a ``requirements.txt`` and a marker file. Nothing else of ComfyUI is touched.
``--uninstall`` removes that folder (only a folder this command wrote). fastdm must be installed in
the Python that runs ComfyUI (``--python`` checks that it imports there). ``fastdm-comfy pack DIR``
writes the same folder into DIR instead, for a ``custom_nodes: DIR`` line in ComfyUI's
``extra_model_paths.yaml``.

Exit codes: 0 done; 2 bad usage (not a ComfyUI folder, a folder of that name that is not ours,
fastdm not importable by ``--python``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import FastDMError
from ..version import __version__

PROG = "fastdm-comfy"
PACK = "fastdm_nodes"
MARKER = ".fastdm-pack.json"

INIT = '''"""fastdm's ComfyUI nodes (written by `fastdm-comfy install`; `fastdm-comfy install --uninstall` removes this folder).

The nodes live in the installed fastdm package (fastdm.comfy); this folder only makes ComfyUI load them."""

try:
    from fastdm.comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as e:  # shown in ComfyUI's log as this pack's import failure
    raise ImportError(f"fastdm is not installed in the Python that runs ComfyUI ({{e}}); "
                      "install it there: pip install fastdm=={version}") from e

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
'''

PYPROJECT = '''[project]
name = "fastdm-nodes"
version = "{version}"
description = "DreamMotion zero-shot video editing in ComfyUI: load a pipeline, edit frames from two prompts, automatic mask, video load/save (fastdm)"
license = {{ text = "Apache-2.0" }}
dependencies = ["fastdm=={version}"]

[project.urls]
Repository = "https://github.com/fastdm/fastdm"

[tool.comfy]
PublisherId = "fastdm"
DisplayName = "fastdm DreamMotion"
Icon = ""
'''


def _version() -> str:
    return __version__


def pack_files() -> dict[str, str]:
    """The pack folder's files: name -> text."""
    v = _version()
    return {"__init__.py": INIT.format(version=v), "pyproject.toml": PYPROJECT.format(version=v),
            "requirements.txt": f"fastdm=={v}\n", MARKER: json.dumps({"pack": PACK, "fastdm": v}) + "\n"}


def _custom_nodes(comfy: Path) -> Path:
    if not comfy.is_dir():
        raise FastDMError(f"'{comfy}' is not a folder; give the ComfyUI folder (the one holding main.py and custom_nodes/)")
    nodes = comfy / "custom_nodes"
    if not nodes.is_dir() or not ((comfy / "main.py").is_file() or (comfy / "nodes.py").is_file()):
        raise FastDMError(f"'{comfy}' does not look like ComfyUI (no main.py and custom_nodes/ there); give the ComfyUI folder")
    return nodes


def _ours(folder: Path) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()).get("pack") == PACK
    except (OSError, ValueError):
        return False


def install(comfy: str | os.PathLike, *, python: str | None = None) -> Path:
    """Write (or refresh) the pack folder into ComfyUI's ``custom_nodes/``; returns it."""
    return write_pack(_custom_nodes(Path(comfy)), python=python)


def write_pack(nodes: str | os.PathLike, *, python: str | None = None) -> Path:
    """Write (or refresh) the pack folder ``fastdm_nodes`` inside the folder ``nodes``; returns it."""
    nodes = Path(nodes)
    if not nodes.is_dir():
        raise FastDMError(f"'{nodes}' is not a folder; create it first")
    target = nodes / PACK
    if target.exists() and not _ours(target):
        raise FastDMError(f"'{target}' exists and was not written by {PROG}; move it away or remove it first")
    if python:
        p = subprocess.run([python, "-c", "import fastdm.comfy"], capture_output=True, text=True)
        if p.returncode != 0:
            last = (p.stderr.strip().splitlines() or ["?"])[-1]
            raise FastDMError(f"fastdm does not import in ComfyUI's Python '{python}' ({last}); "
                              f"install it there: {python} -m pip install fastdm=={_version()}")
    tmp = Path(tempfile.mkdtemp(prefix=f"{PACK}.", suffix=".disabled", dir=nodes))  # (ComfyUI skips *.disabled)
    try:
        for name, text in pack_files().items():
            (tmp / name).write_text(text)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def uninstall(comfy: str | os.PathLike) -> Path | None:
    """Remove the pack folder this command wrote; returns it, or None if there was none."""
    target = _custom_nodes(Path(comfy)) / PACK
    if not target.exists():
        return None
    if not _ours(target):
        raise FastDMError(f"'{target}' was not written by {PROG}; it is left as it is")
    shutil.rmtree(target)
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description="Install fastdm's node pack into a ComfyUI.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("install", help="write custom_nodes/fastdm_nodes/ into COMFYUI_DIR")
    i.add_argument("comfyui_dir", metavar="COMFYUI_DIR")
    i.add_argument("--uninstall", action="store_true", help="remove the pack folder instead")
    i.add_argument("--python", metavar="PATH", help="the Python that runs ComfyUI: check that fastdm imports there")
    u = sub.add_parser("uninstall", help="remove custom_nodes/fastdm_nodes/ from COMFYUI_DIR")
    u.add_argument("comfyui_dir", metavar="COMFYUI_DIR")
    k = sub.add_parser("pack", help="write the pack folder fastdm_nodes/ into DIR (for a custom_nodes: line of "
                                    "extra_model_paths.yaml)")
    k.add_argument("dir", metavar="DIR")
    args = p.parse_args(argv)
    try:
        if args.cmd == "pack":
            print(f"wrote {write_pack(args.dir)}; add `custom_nodes: {Path(args.dir).resolve()}` to an entry of "
                  "ComfyUI's extra_model_paths.yaml")
        elif args.cmd == "uninstall" or args.uninstall:
            gone = uninstall(args.comfyui_dir)
            print(f"removed {gone}" if gone else f"nothing to remove: no {PACK} in {args.comfyui_dir}/custom_nodes")
        else:
            target = install(args.comfyui_dir, python=args.python)
            where = f"fastdm imports in {args.python}" if args.python else f"this one does: {sys.executable}"
            print(f"installed {target}; restart ComfyUI. Its Python must have fastdm {_version()} installed ({where}).")
    except FastDMError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
