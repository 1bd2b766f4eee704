"""tools/train_shapes.py (the bundled model's trainer, on tools/training_state.py): exact resume
(the UNet3D's dropout included) and the committed state still loads and exports the bundled model."""

import json

import pytest
import torch
from safetensors.torch import load_file

from .train_tools import ROOT, committed_state, load_tool, resumed_equals_uninterrupted

BUNDLED = ROOT / "fastdm" / "assets" / "models" / "shapes"

SMALL = ("--size", "16")


@pytest.fixture(scope="module")
def tool():
    return load_tool("train_shapes")


def test_resumed_training_equals_uninterrupted(tool, tmp_path):
    _, meta2 = resumed_equals_uninterrupted(tool, tmp_path, *SMALL, "--no-export")
    assert "model" not in meta2["args"]  # the UNet model's states name no model, as before


def test_the_unet_draws_dropout_from_the_global_generator(tmp_path):
    """Why the step loop seeds torch's global generator: in train mode the trained UNet gives another
    output for the same input under another global seed (the temporal convolutions' dropout; their
    last layer starts at zero, so it shows from the first optimizer step on), so a resume that did
    not restore that generator would differ."""
    from diffusers import UNet3DConditionModel

    from fastdm.toyworld.world import build_model

    tok, text, _, _ = build_model(tmp_path / "tok")
    unet = UNet3DConditionModel.from_pretrained(str(BUNDLED / "unet"))  # trained: its temporal convolutions are not zero
    unet.train()
    x = torch.randn(1, 3, 2, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    ids = tok(["a red circle moving right"], padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = text(ids)[0]
        outs = []
        for seed in (1, 1, 2):
            torch.manual_seed(seed)
            outs.append(unet(x, t, encoder_hidden_states=hidden, return_dict=False)[0])
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_committed_state_loads_and_exports_the_bundled_model(tool, tmp_path):
    state = tmp_path / "shapes"  # a copy: the tool never writes next to the committed state here
    meta, _ = committed_state(state)
    tool.main(["--export-only", "--threads", "1", "--state", str(state / "state.json"), "--log", str(state / "loss.csv"),
               "--export", str(tmp_path / "model")])
    assert json.loads((tmp_path / "model" / "fastdm.json").read_text()) == json.loads((BUNDLED / "fastdm.json").read_text())
    for part, file in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        got, want = load_file(str(tmp_path / "model" / part / file)), load_file(str(BUNDLED / part / file))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), part
    assert sorted(p.name for p in state.iterdir()) == sorted(["state.json", meta["tensors"], "tokenizer"])
