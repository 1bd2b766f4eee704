import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton reads TRITON_INTERPRET when it is imported (torch does not import it): interpret on the
# CPU only, so that on a CUDA machine the tests run the compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random-weight pixel-space UNet3D model saved as a diffusers folder."""
    from fastdm.testing import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny_pixel"), latent=False, size=16, channels=(16, 32)))


@pytest.fixture(scope="session")
def tiny_latent_model(tmp_path_factory):
    from fastdm.testing import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny_latent"), latent=True, size=16, channels=(16, 32)))


@pytest.fixture(scope="session")
def editor(tiny_model):
    from fastdm import Editor

    return Editor.from_pretrained(tiny_model)


EXTENDING_DEFAULTS = {"lr": 2.4, "steps": 8, "stop": "extend", "extend_on": "vdds", "extend_tol": 1.1}


@pytest.fixture
def extending_folder(tmp_path):
    """The bundled UNet's folder as far as the settings' layers read it (model_index.json, fastdm.json), its
    fastdm.json carrying a continuation rule (the UNet's default of rule 9c: 8 steps at lr 2.4 continued in 4-step
    segments while the masked V-DDS residual has not fallen), as a measured model's folder may."""
    import json

    from fastdm.backbone import resolve_model

    src = Path(resolve_model("shapes"))
    folder = tmp_path / "extending-model"
    folder.mkdir()
    (folder / "model_index.json").write_text((src / "model_index.json").read_text())
    info = json.loads((src / "fastdm.json").read_text())
    (folder / "fastdm.json").write_text(json.dumps({**info, "defaults": EXTENDING_DEFAULTS}))
    return str(folder)


@pytest.fixture
def clip():
    """4 frames, 16x16: a red circle moving right."""
    from fastdm.toyworld.world import render_clip

    return render_clip("red", "circle", "right", size=16, frames=4, radius=4, speed=2)


@pytest.fixture
def clip_file(tmp_path, clip):
    from fastdm.io import write_video

    p = tmp_path / "clip.gif"
    write_video(p, clip, fps=10)
    return p
