"""Run a README command and keep its report as a results file (the README's figures come from it).

    python -m benchmarks.readme_edit NAME -- fastdm/assets/clips/red_circle_right.gif --model shapes-dit \\
        --source-prompt "a red circle moving right" --target-prompt "a blue circle moving right"

runs ``fastdm-edit`` with those arguments in a temporary folder (``--out`` is added there), then
writes the run's JSON report to ``results/readme-edit-NAME-<machine>.json`` with the command, the
machine, and every path inside the repository made repo-relative (no checkout's absolute path, no
temporary path). ``--png`` also keeps every other frame of ``OUT_compare`` as a PNG strip.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

from benchmarks.common import RESULTS, machine_description, machine_name, repo_relative


def _relative(obj, tmp: str):
    if isinstance(obj, dict):
        return {k: _relative(v, tmp) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relative(v, tmp) for v in obj]
    if isinstance(obj, str) and obj.startswith("/"):
        return Path(obj).name if obj.startswith(tmp) else repo_relative(obj)
    return obj


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="results name part, e.g. shapes-dit")
    ap.add_argument("--png", action="store_true", help="also write results/readme-edit-NAME-<machine>.png")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        ap.error("give fastdm-edit's arguments after --")
    cut = argv.index("--")
    args, edit_args = ap.parse_args(argv[:cut]), argv[cut + 1:]
    if "--out" in edit_args:
        raise SystemExit("readme_edit: error: leave --out out; the run writes into a temporary folder")
    from fastdm.cli import main as edit
    from fastdm.io.atomic import write_json_atomic

    stem = f"readme-edit-{args.name}-{machine_name()}"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = str(Path(tmp).resolve())
        out = Path(tmp) / "out.mp4"
        rc = edit([*edit_args, "--out", str(out), "--quiet"])
        if rc != 0:
            return rc
        report = _relative(json.loads(out.with_suffix(".json").read_text()), tmp)
        report["readme_command"] = "fastdm-edit " + shlex.join(edit_args)
        report["machine"] = {"name": machine_name(), "description": machine_description()}
        RESULTS.mkdir(parents=True, exist_ok=True)
        write_json_atomic(RESULTS / f"{stem}.json", report)
        if args.png:
            import imageio.v3 as iio
            import numpy as np

            from fastdm.io import read_frames

            frames = read_frames(Path(tmp) / "out_compare.mp4")[0]
            iio.imwrite(RESULTS / f"{stem}.png", np.kron(np.concatenate(list(frames[::2]), 0), np.ones((2, 2, 1), np.uint8)))
    t = report.get("timings", {})
    print(f"wrote {RESULTS / stem}.json: total {t.get('total_s')} s, step median {t.get('step_median_s')} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
