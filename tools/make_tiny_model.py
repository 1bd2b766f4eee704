"""Generate the bundled default model: a tiny RANDOM-WEIGHT pixel-space UNet3D text-to-video model.

It exists so `fastdm-edit` runs end to end offline on a fresh machine; it has learned nothing, so
its edits are not meaningful. Replace it with the trained shapes model (tools/train_shapes.py)
or point --model at a real local model folder.

    python tools/make_tiny_model.py [--out fastdm/assets/models/default]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastdm.shapes import COLOURS, DIRECTIONS, SHAPES  # noqa: E402
from fastdm.testing import DEFAULT_WORDS, build_tiny_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "fastdm" / "assets" / "models" / "default"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    words = tuple(dict.fromkeys(list(DEFAULT_WORDS) + list(COLOURS) + list(SHAPES) + list(DIRECTIONS)))
    build_tiny_model(out, latent=False, size=32, channels=(32, 64), seed=args.seed, words=words)
    (out / "fastdm.json").write_text(json.dumps({"native_size": [32, 32], "weights": "random (tools/make_tiny_model.py)"}, indent=2))
    print("wrote", out)


if __name__ == "__main__":
    main()
