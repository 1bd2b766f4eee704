"""Model loading through the real loader: folders, safety switches, errors."""

import json
import shutil

import pytest
import torch

from fastdm.backbone import load_backbone
from fastdm.errors import FastDMError, Unsupported


def test_pixel_and_latent_models_load(tiny_model, tiny_latent_model):
    px = load_backbone(tiny_model)
    assert px.info.space == "pixel" and px.info.spatial_factor == 1 and px.valid_range == (-1.0, 1.0)
    lat = load_backbone(tiny_latent_model)
    assert lat.info.space == "latent" and lat.info.spatial_factor == 2 and lat.valid_range is None
    assert px.alphas_cumprod.shape == (1000,) and px.alphas_cumprod.dtype == torch.float64
    frames = torch.rand(3, 3, 16, 16) * 2 - 1
    assert lat.to_working(frames).shape == (1, 4, 3, 8, 8)
    assert lat.from_working(lat.to_working(frames)).shape == (3, 3, 16, 16)
    assert torch.equal(px.from_working(px.to_working(frames)), frames)


def test_text_encoder_release(tiny_model):
    bb = load_backbone(tiny_model)
    e = bb.encode_prompts(["a red circle", ""])
    assert e.shape[0] == 2
    bb.release_text_encoder()
    assert bb.text_encoder is None
    with pytest.raises(Unsupported, match="released"):  # a typed error, not a bare RuntimeError
        bb.encode_prompts(["x"])


@pytest.mark.parametrize(
    "path,match",
    [
        ("cerspense/zeroscope_v2_576w", "download"),
        ("/nonexistent/model", "does not exist"),
    ],
)
def test_missing_folder_or_hub_id(path, match):
    with pytest.raises(FastDMError, match=match):
        load_backbone(path)


def test_incomplete_folders(tmp_path, tiny_model):
    with pytest.raises(FastDMError, match="model_index.json"):
        load_backbone(str(tmp_path))
    bad = tmp_path / "m"
    shutil.copytree(tiny_model, bad)
    shutil.rmtree(bad / "text_encoder")
    with pytest.raises(FastDMError, match="text_encoder/"):
        load_backbone(str(bad))
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(FastDMError, match="is a file"):
        load_backbone(str(f))


def test_pickle_weights_need_allow_pickle(tmp_path, tiny_model):
    from diffusers import UNet3DConditionModel

    m = tmp_path / "m"
    shutil.copytree(tiny_model, m)
    unet = UNet3DConditionModel.from_pretrained(str(m / "unet"))
    shutil.rmtree(m / "unet")
    unet.save_pretrained(m / "unet", safe_serialization=False)
    assert not list((m / "unet").glob("*.safetensors"))
    with pytest.raises(FastDMError, match="`allow_pickle`"):
        load_backbone(str(m))
    assert load_backbone(str(m), allow_pickle=True).info.space == "pixel"


def test_custom_code_needs_trust_remote_code(tmp_path, tiny_model):
    m = tmp_path / "m"
    shutil.copytree(tiny_model, m)
    (m / "unet" / "my_unet.py").write_text(
        "from diffusers import UNet3DConditionModel\n\nclass MyUNet(UNet3DConditionModel):\n    pass\n"
    )
    index = json.loads((m / "model_index.json").read_text())
    index["unet"] = ["my_unet", "MyUNet"]
    (m / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(FastDMError, match="`trust_remote_code`"):
        load_backbone(str(m))
    bb = load_backbone(str(m), trust_remote_code=True)
    assert type(bb.unet).__name__ == "MyUNet"


def test_cuda_without_gpu_is_explained(tiny_model):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(FastDMError, match="no CUDA GPU"):
        load_backbone(tiny_model, device="cuda")


def test_kernels_package_installed_under_fastdm():
    import fastdm.kernels

    assert fastdm.kernels.__name__ == "fastdm.kernels"


def test_check_model_folder_fails_fast_and_names_the_hub_id(tiny_model):
    from fastdm.backbone.loader import check_model_folder

    assert check_model_folder(tiny_model).is_dir()
    with pytest.raises(FastDMError, match="never downloads.*huggingface-cli download cerspense/zeroscope_v2_576w --local-dir DIR"):
        check_model_folder("cerspense/zeroscope_v2_576w")


def test_no_pickle_files_in_the_repository():
    """Weights and training states are safetensors + JSON; a pickle can run code when loaded."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    try:
        files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    pickles = [f for f in files if f.lower().endswith((".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")) and (root / f).exists()]
    assert pickles == []


def test_training_state_is_safetensors_plus_json(tmp_path):
    from safetensors import safe_open

    from .train_tools import committed_state

    meta, tensors = committed_state(tmp_path / "shapes")
    assert meta["format"] == "fastdm-train-state/1" and meta["step"] == 3680
    with safe_open(str(tensors), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("rng/torch").dtype == torch.uint8
    assert {k.split("/")[0] for k in keys} == {"unet", "text", "ema", "opt", "rng"}
    assert len([k for k in keys if k.startswith("opt/")]) == 2 * len(meta["optimizer"]["state"])  # exp_avg, exp_avg_sq


def test_bundled_models_are_selectable_by_name(tmp_path, monkeypatch):
    from pathlib import Path

    import fastdm.backbone.loader as loader
    from fastdm.backbone import bundled_model_path, resolve_model

    assert resolve_model(None) == resolve_model("shapes") == bundled_model_path("shapes")
    assert resolve_model("shapes-dit") == bundled_model_path("shapes-dit")
    assert Path(bundled_model_path("shapes-dit")).parent == Path(bundled_model_path()).parent
    assert resolve_model("some/folder") == "some/folder"
    # a folder of that name where the command runs wins over the bundled model
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapes-dit").mkdir()
    assert resolve_model("shapes-dit") == "shapes-dit"
    # a bundled model missing from the install: one line that names it
    monkeypatch.setattr(loader, "bundled_model_path", lambda name="shapes": str(tmp_path / "gone" / name))
    with pytest.raises(FastDMError, match="bundled model 'shapes' is missing"):
        load_backbone("shapes")
