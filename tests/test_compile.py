"""torch.compile engine for the no-grad UNet call: same eps and keys as eager, no recompiles across steps."""

import shutil

import pytest
import torch

if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
    pytest.skip("torch.compile's CPU backend needs a C++ compiler and none is on PATH", allow_module_level=True)

from fastdm import EditConfig, FastDMError
from fastdm.taps import KeyTaps, resolve_layers


@pytest.fixture(scope="module")
def compiled(editor):
    from fastdm.backbone.engines import CompiledUNet

    layers = resolve_layers(editor.backbone, None)
    return CompiledUNet(editor.backbone, layers), layers


def test_compiled_matches_eager_without_recompiling(editor, compiled):
    engine, layers = compiled
    bb = editor.backbone
    gen = torch.Generator().manual_seed(0)
    text = bb.encode_prompts(["a red circle", "", "a blue square"])
    for i, t in enumerate((321, 77, 900)):
        x = torch.randn(3, 3, 4, 16, 16, generator=gen)
        # the first call compiles; a new timestep or new data must not compile again
        with torch._dynamo.config.patch(error_on_recompile=i > 0), torch.no_grad():
            eps, keys = engine(x, t, text)
        with KeyTaps(bb, layers) as taps, torch.no_grad():
            want = bb.predict_noise(x, t, text)
            want_keys = taps.take(4)
        assert (eps - want).abs().max() < 1e-4 * want.abs().max()
        for k, n in zip(keys, layers):
            w = want_keys[n]
            assert (k.reshape(w.shape) - w).abs().max() < 1e-4 * w.abs().max()


def test_edit_with_compile_backend_matches_eager(editor, clip):
    """Both branches compiled (the grad branch with its backward, truncated after the last tap):
    the same edit as eager, and no recompiles after the first step."""
    cfg = EditConfig("a red circle moving right", "a blue circle moving right", steps=3, seed=1)
    eager = editor.edit(clip, cfg)

    def no_recompiles_from_now(info):
        torch._dynamo.config.error_on_recompile = True

    try:
        comp = editor.edit(clip, cfg, backend="compile", compile_grad=True, callback=no_recompiles_from_now)
    finally:
        torch._dynamo.config.error_on_recompile = False
    src = editor.backbone.to_working(torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert (comp.working - eager.working).norm() / (eager.working - src).norm() < 1e-4
    for k in ("s_ssm", "t_ssm", "vdds"):
        assert comp.report["final_losses"][k] == pytest.approx(eager.report["final_losses"][k], rel=1e-3, abs=1e-10)


def test_compile_grad_needs_a_truncated_grad_branch(editor, clip):
    cfg = EditConfig("a red circle moving right", "a blue circle moving right", steps=1, s_ssm_weight=0, t_ssm_weight=0)
    with pytest.raises(FastDMError, match="--compile-grad"):
        editor.edit(clip, cfg, compile_grad=True)


def test_cudagraphs_refuses_on_cpu(editor, clip):
    cfg = EditConfig("a red circle moving right", "a blue circle moving right", steps=1)
    with pytest.raises(FastDMError, match="needs the model on a CUDA GPU"):
        editor.edit(clip, cfg, backend="cudagraphs")
