"""ONNX export of the no-grad UNet call (with tapped keys), onnxruntime on CPU, TensorRT refusal."""

import pytest
import torch

from fastdm import EditConfig, FastDMError
from fastdm.taps import KeyTaps, resolve_layers

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'fastdm[onnx]')")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install 'fastdm[onnx]')")


@pytest.fixture(scope="module")
def exported(editor, tmp_path_factory):
    from fastdm.driver.engines import export_onnx

    bb = editor.backbone
    layers = resolve_layers(bb, None)
    path = export_onnx(bb, tmp_path_factory.mktemp("onnx") / "unet.onnx", batch=3, frames=4, size=(16, 16), layers=layers)
    return path, layers


def test_onnx_matches_eager_with_keys(editor, exported):
    from fastdm.driver.engines import OrtUNet

    path, layers = exported
    bb = editor.backbone
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 4, 16, 16, generator=gen)
    text = bb.encode_prompts(["a red circle", "", "a blue square"])
    eps, keys = OrtUNet(path)(x, 321, text)
    with KeyTaps(bb, layers) as taps, torch.no_grad():
        want = bb.predict_noise(x, 321, text)
        want_keys = taps.take(4)
    assert (eps - want).abs().max() < 1e-4 * want.abs().max()
    for k, n in zip(keys, layers):
        w = want_keys[n]
        assert (k.reshape(w.shape) - w).abs().max() < 1e-4 * w.abs().max()


def test_edit_with_ort_backend_matches_eager(editor, clip, tmp_path):
    cfg = EditConfig("a red circle moving right", "a blue circle moving right", steps=2, seed=1)
    eager = editor.edit(clip, cfg)
    ort = editor.edit(clip, cfg, backend="ort", engine_cache=str(tmp_path))
    d = (ort.working - eager.working).norm() / (eager.working - editor.backbone.to_working(
        torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 127.5 - 1)).norm()
    assert d < 1e-4
    assert list(tmp_path.glob("unet-*.onnx"))  # the export is cached


def test_trt_refuses_with_reason(editor, clip, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; the TensorRT path is exercised by the benchmarks")
    cfg = EditConfig("a red circle moving right", "a blue circle moving right", steps=1)
    with pytest.raises(FastDMError, match="TensorRT needs a CUDA GPU"):
        editor.edit(clip, cfg, backend="trt", engine_cache=str(tmp_path))
