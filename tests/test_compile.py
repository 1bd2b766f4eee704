"""torch.compile engine for the no-grad UNet call: same eps and keys as eager, no recompiles across steps."""

import shutil

import pytest
import torch

if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
    pytest.skip("torch.compile's CPU backend needs a C++ compiler and none is on PATH", allow_module_level=True)

from fastdm import EditConfig, FastDMError
from fastdm.taps import KeyTaps, resolve_layers


@pytest.fixture(scope="module")
def pipe(tiny_model):
    """One pipeline for this module: the no-grad engine compiled by the first test is reused by the
    edit in the second (engines are built once per shape), which keeps CI's compile time down."""
    from fastdm import DreamMotionPipeline

    return DreamMotionPipeline.from_pretrained(tiny_model)


def test_compiled_matches_eager_without_recompiling(pipe):
    bb = pipe.backbone
    layers = resolve_layers(bb, None)
    engine, build_s = pipe.engine("compile", batch=3, frames=4, size=(16, 16), layers=layers)
    assert build_s > 0 and pipe.engine("compile", batch=3, frames=4, size=(16, 16), layers=layers) == (engine, 0.0)
    gen = torch.Generator().manual_seed(0)
    text = bb.encode_prompts(["a red circle", "", "a blue square"])
    for t in (321, 77, 900):
        x = torch.randn(3, 3, 4, 16, 16, generator=gen)
        # compiled when built; a new timestep or new data must not compile again (called as the
        # pipeline calls it: in inference mode)
        with torch._dynamo.config.patch(error_on_recompile=True), torch.inference_mode():
            eps, keys = engine(x, t, text)
        with KeyTaps(bb, layers) as taps, torch.no_grad():
            want = bb.predict_noise(x, t, text)
            want_keys = taps.take(4)
        assert (eps - want).abs().max() < 1e-4 * want.abs().max()
        for k, n in zip(keys, layers):
            w = want_keys[n]
            assert (bb.keys_to_frames(k, 4) - w).abs().max() < 1e-4 * w.abs().max()


def test_edit_with_compile_backend_matches_eager(pipe, clip, monkeypatch):
    """Both branches compiled (the grad branch with its backward, truncated after the last tap):
    the same edit as eager, compile time reported apart from the steps, and no recompiles.

    The grad branch is compiled with ``aot_eager`` here: the same Dynamo capture and AOTAutograd
    forward/backward split as inductor, without inductor's C++ code generation, which the test above
    already covers on the same module (the no-grad engine it built is reused here) and which took
    about 4 of CI's 15 minutes when cold. The GPU check runs the grad branch with inductor."""
    from fastdm.driver.engines import CompiledUNet

    monkeypatch.setattr(CompiledUNet, "dynamo_backend", "aot_eager")
    cfg = EditConfig("a red circle moving right", "a blue circle moving right", steps=3, seed=1)
    eager = pipe(clip, config=cfg)
    with torch._dynamo.config.patch(error_on_recompile=False):
        comp = pipe(clip, config=cfg, backend="compile", compile_grad=True)
    assert comp.report["timings"]["engine_build_s"] > 0  # the grad branch compiled at build, not in a step
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = pipe(clip, config=cfg, backend="compile", compile_grad=True)
    assert again.report["timings"]["engine_build_s"] == 0.0
    src = pipe.backbone.to_working(torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 127.5 - 1)
    for res in (comp, again):
        assert (res.working - eager.working).norm() / (eager.working - src).norm() < 1e-4
        for k in ("s_ssm", "t_ssm", "vdds"):
            assert res.report["final_losses"][k] == pytest.approx(eager.report["final_losses"][k], rel=1e-3, abs=1e-10)


def test_compile_grad_needs_a_truncated_grad_branch(pipe, clip):
    cfg = EditConfig("a red circle moving right", "a blue circle moving right", steps=1, s_ssm_weight=0, t_ssm_weight=0)
    with pytest.raises(FastDMError, match="`compile_grad`"):
        pipe(clip, config=cfg, compile_grad=True)


def test_cudagraphs_refuses_on_cpu(pipe, clip):
    cfg = EditConfig("a red circle moving right", "a blue circle moving right", steps=1)
    with pytest.raises(FastDMError, match="needs the model on a CUDA GPU"):
        pipe(clip, config=cfg, backend="cudagraphs")
