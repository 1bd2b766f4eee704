"""Engine back ends without a GPU: TensorRT against a fake ``tensorrt`` module (parse from the
file's path, strongly typed network, cache key by GPU and TensorRT, rebuild of an engine that does
not deserialize, stream order), the streamed ONNX hash with external data, and onnxruntime's
refusals (CUDA without onnxruntime-gpu, a CPU-only session on CUDA, bf16) and I/O binding on CPU."""

from __future__ import annotations

import hashlib
import sys
import types

import pytest
import torch

from fastdm.errors import FastDMError

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install 'fastdm[onnx]')")
from onnx import TensorProto, helper  # noqa: E402

from fastdm.driver import engines  # noqa: E402

# -- a fake tensorrt ---------------------------------------------------------------------------


def make_fake_trt(version: str = "10.9.0", plan: bytes = b"engine-1", loadable: tuple[bytes, ...] | None = None,
                  strongly_typed: bool = True):
    """A stand-in for the parts of ``tensorrt`` that TrtUNet uses; ``log`` records the calls."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    log = {"parsed": [], "network_flags": [], "builds": 0, "deserialized": [], "flags_set": [], "calls": []}
    trt.log = log
    trt.float32, trt.float16, trt.bfloat16, trt.int64, trt.int32 = "f32", "f16", "bf16", "i64", "i32"
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(**({"STRONGLY_TYPED": 5} if strongly_typed else {}))
    trt.BuilderFlag = types.SimpleNamespace(**({} if strongly_typed else {"FP16": 0, "BF16": 1}))
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.state = {"plan": plan, "loadable": set(loadable if loadable is not None else (plan,))}

    class Logger:
        ERROR = 0

        def __init__(self, level):
            pass

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse(self, data):  # the bytes-only form: external data cannot resolve
            raise AssertionError("parse(bytes) used; parse_from_file(path) is needed for external data")

        def parse_from_file(self, path):
            log["parsed"].append(path)
            return True

        def get_error(self, i):
            return "?"

    class Config:
        def set_flag(self, flag):
            log["flags_set"].append(flag)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            log["network_flags"].append(flags)
            return object()

        def create_builder_config(self):
            return Config()

        def build_serialized_network(self, network, config):
            log["builds"] += 1
            return trt.state["plan"]

    io = [("sample", "in", "f32", None), ("timestep", "in", "i64", None), ("text", "in", "f32", None),
          ("eps", "out", "f32", (3, 3, 2, 4, 4)), ("keys_0", "out", "f32", (6, 16, 8))]

    class Context:
        def __init__(self):
            self.addresses = {}

        def get_tensor_shape(self, name):
            return next(s for n, _, _, s in io if n == name)

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr

        def execute_async_v3(self, stream):
            log["calls"].append(("execute", stream))
            return True

    class Engine:
        num_io_tensors = len(io)

        def get_tensor_name(self, i):
            return io[i][0]

        def get_tensor_mode(self, name):
            return next(m for n, m, _, _ in io if n == name)

        def get_tensor_dtype(self, name):
            return next(d for n, _, d, _ in io if n == name)

        def create_execution_context(self):
            return Context()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            data = bytes(data)
            log["deserialized"].append(data)
            return Engine() if data in trt.state["loadable"] else None

    trt.Logger, trt.OnnxParser, trt.Builder, trt.Runtime = Logger, Parser, Builder, Runtime
    return trt


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch sees one CUDA GPU whose name and capability the test can change."""
    gpu = {"name": "NVIDIA H100 80GB HBM3", "cc": (9, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: gpu["name"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: gpu["cc"])
    return gpu


def install(monkeypatch, trt):
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


def small_onnx(path, external: bool, dtype=TensorProto.FLOAT):
    """``y = x + w`` with a 64-element weight, optionally saved as external data beside the file."""
    import numpy as np

    w = helper.make_tensor("w", dtype, [64], np.arange(64, dtype=np.float32).tobytes(), raw=True)
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", dtype, [64])], [helper.make_tensor_value_info("y", dtype, [64])],
                              initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


# -- TensorRT ----------------------------------------------------------------------------------


def test_trt_parses_from_the_path_strongly_typed(monkeypatch, fake_gpu, tmp_path):
    trt = install(monkeypatch, make_fake_trt())
    model = small_onnx(tmp_path / "unet.onnx", external=True)
    eng = engines.TrtUNet(model, tmp_path / "cache", "bf16")
    assert trt.log["parsed"] == [str(model)]  # the path, so unet.onnx.data resolves
    assert trt.log["network_flags"] == [1 << 5]  # STRONGLY_TYPED
    assert trt.log["flags_set"] == []  # no FP16/BF16 builder flags (gone in TensorRT 11)
    assert eng.cache_path.read_bytes() == b"engine-1" and not eng.rebuilt
    engines.TrtUNet(model, tmp_path / "cache", "bf16")  # second time: from the cache, no build
    assert trt.log["builds"] == 1


def test_trt_weakly_typed_sets_precision_flag(monkeypatch, fake_gpu, tmp_path):
    trt = install(monkeypatch, make_fake_trt(strongly_typed=False))
    engines.TrtUNet(small_onnx(tmp_path / "unet.onnx", external=False), tmp_path / "cache", "fp16")
    assert trt.log["network_flags"] == [0] and trt.log["flags_set"] == [0]  # BuilderFlag.FP16


def test_trt_undeserializable_cache_is_rebuilt(monkeypatch, fake_gpu, tmp_path):
    model = small_onnx(tmp_path / "unet.onnx", external=True)
    trt = install(monkeypatch, make_fake_trt(plan=b"engine-1"))
    first = engines.TrtUNet(model, tmp_path / "cache", "fp16")
    # same key, but this TensorRT no longer loads that engine (deserialize -> None): rebuild, don't crash
    trt.state.update(plan=b"engine-2", loadable={b"engine-2"})
    second = engines.TrtUNet(model, tmp_path / "cache", "fp16")
    assert second.rebuilt and trt.log["builds"] == 2
    assert second.cache_path == first.cache_path and second.cache_path.read_bytes() == b"engine-2"
    assert trt.log["deserialized"] == [b"engine-1", b"engine-1", b"engine-2"]


def test_trt_refuses_when_even_a_fresh_engine_does_not_load(monkeypatch, fake_gpu, tmp_path):
    install(monkeypatch, make_fake_trt(plan=b"bad", loadable=()))
    with pytest.raises(FastDMError, match="could not load the engine it just built"):
        engines.TrtUNet(small_onnx(tmp_path / "unet.onnx", external=False), tmp_path / "cache", "fp16")


def test_trt_cache_key_differs_by_gpu_capability_version(monkeypatch, fake_gpu, tmp_path):
    model = small_onnx(tmp_path / "unet.onnx", external=True)
    install(monkeypatch, make_fake_trt())
    paths = {engines.TrtUNet(model, tmp_path / "c", "fp16").cache_path}
    fake_gpu["name"] = "NVIDIA H200"
    paths.add(engines.TrtUNet(model, tmp_path / "c", "fp16").cache_path)
    fake_gpu["cc"] = (10, 0)
    paths.add(engines.TrtUNet(model, tmp_path / "c", "fp16").cache_path)
    install(monkeypatch, make_fake_trt(version="11.0.0"))
    paths.add(engines.TrtUNet(model, tmp_path / "c", "fp16").cache_path)
    paths.add(engines.TrtUNet(model, tmp_path / "c", "bf16").cache_path)
    assert len(paths) == 5
    k = engines.trt_cache_key("ab", "fp16", "10.9", "GPU", (9, 0), True)
    assert k != engines.trt_cache_key("ab", "fp16", "10.9", "GPU", (8, 9), True)
    assert k != engines.trt_cache_key("ac", "fp16", "10.9", "GPU", (9, 0), True)


def test_trt_too_old_or_missing(monkeypatch, fake_gpu):
    install(monkeypatch, make_fake_trt(version="8.6.1"))
    assert "too old" in engines.trt_unavailable_reason()
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails
    assert "not installed" in engines.trt_unavailable_reason()


def test_trt_runs_on_its_own_stream_ordered_both_ways(monkeypatch, fake_gpu, tmp_path):
    trt = install(monkeypatch, make_fake_trt())
    eng = engines.TrtUNet(small_onnx(tmp_path / "unet.onnx", external=False), tmp_path / "cache", "fp32")

    class Stream:
        def __init__(self, name, ptr):
            self.name, self.cuda_stream = name, ptr

        def wait_stream(self, other):
            trt.log["calls"].append((f"{self.name} waits {other.name}",))

    torch_stream, trt_stream = Stream("torch", 0), Stream("trt", 1234)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: torch_stream)
    monkeypatch.setattr(eng, "_stream", lambda device: trt_stream)
    eps, keys = eng(torch.zeros(3, 3, 2, 4, 4), 500, torch.zeros(3, 7, 8))
    assert trt.log["calls"] == [("trt waits torch",), ("execute", 1234), ("torch waits trt",)]
    assert eps.shape == (3, 3, 2, 4, 4) and [k.shape for k in keys] == [(6, 16, 8)]
    ctx = eng.context
    assert set(ctx.addresses) == {"sample", "timestep", "text", "eps", "keys_0"}
    assert ctx.addresses["eps"] == eps.data_ptr()


# -- the ONNX hash -------------------------------------------------------------------------------


def test_onnx_digest_streams_external_data_and_remembers(tmp_path):
    model = small_onnx(tmp_path / "unet.onnx", external=True)
    data = tmp_path / "unet.onnx.data"
    assert data.exists()
    assert engines.onnx_files(model) == [model, data]
    want = hashlib.sha256(model.read_bytes() + b"\0unet.onnx.data\0" + data.read_bytes()).hexdigest()
    assert engines.onnx_digest(model, chunk=7) == want  # read in small pieces, same hash
    side = tmp_path / "unet.onnx.sha256.json"
    assert side.exists() and engines.onnx_digest(model) == want  # remembered
    raw = bytearray(data.read_bytes())
    raw[0] ^= 1
    data.write_bytes(bytes(raw))  # the weights change, the graph file does not
    import os

    os.utime(data, ns=(1, 1))
    assert engines.onnx_digest(model) != want
    data.unlink()
    side.unlink()
    with pytest.raises(FastDMError, match="lacks its external data"):
        engines.onnx_digest(model)


# -- onnxruntime ---------------------------------------------------------------------------------

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'fastdm[onnx]')")


def unet_like_onnx(path, dtype=TensorProto.FLOAT):
    """(sample, timestep, text) -> (eps = 2 sample, keys_0 = text + 1)."""
    one = helper.make_tensor("one", dtype, [1], [1.0])
    two = helper.make_tensor("two", dtype, [1], [2.0])
    graph = helper.make_graph(
        [helper.make_node("Mul", ["sample", "two"], ["eps"]), helper.make_node("Add", ["text", "one"], ["keys_0"])], "g",
        [helper.make_tensor_value_info("sample", dtype, [3, 3, 2, 4, 4]),
         helper.make_tensor_value_info("timestep", TensorProto.INT64, [3]),
         helper.make_tensor_value_info("text", dtype, [3, 7, 8])],
        [helper.make_tensor_value_info("eps", dtype, [3, 3, 2, 4, 4]), helper.make_tensor_value_info("keys_0", dtype, [3, 7, 8])],
        initializer=[one, two])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_ort_cpu_binds_in_place(tmp_path):
    sess = engines.OrtUNet(unet_like_onnx(tmp_path / "u.onnx"), "cpu")
    x, text = torch.randn(3, 3, 2, 4, 4), torch.randn(3, 7, 8)
    eps, keys = sess(x, 321, text)
    assert torch.equal(eps, 2 * x) and torch.equal(keys[0], text + 1)


def test_ort_cuda_needs_onnxruntime_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(FastDMError, match="needs onnxruntime-gpu.*pip install onnxruntime-gpu") as e:
        engines.OrtUNet(unet_like_onnx(tmp_path / "u.onnx"), "cuda")
    assert "\n" not in str(e.value)


def test_ort_cuda_refuses_a_silent_cpu_fallback(monkeypatch, tmp_path):
    """onnxruntime-gpu is there, but its CUDA provider did not start (missing cuDNN, say)."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: types.SimpleNamespace(cuda_stream=42))
    seen = {}
    real = ort.InferenceSession

    def session(path, opts, providers):
        seen["providers"] = providers
        return real(path, opts, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", session)
    with pytest.raises(FastDMError, match="could not start its CUDAExecutionProvider"):
        engines.OrtUNet(unet_like_onnx(tmp_path / "u.onnx"), "cuda")
    name, opts = seen["providers"][0]
    assert name == "CUDAExecutionProvider" and opts["user_compute_stream"] == "42"
    assert len(seen["providers"]) == 1  # no CPU provider to fall back to silently


def test_ort_refuses_bf16(tmp_path):
    with pytest.raises(FastDMError, match="does not run bf16"):
        engines.OrtUNet(unet_like_onnx(tmp_path / "u.onnx", TensorProto.BFLOAT16), "cpu")


def test_ort_reason_up_front():
    """What the caller can ask before exporting: bf16 and CUDA without onnxruntime-gpu refused."""
    assert engines.ort_unavailable_reason("cpu", torch.float32) is None
    assert "bf16" in engines.ort_unavailable_reason("cpu", torch.bfloat16)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "onnxruntime-gpu" in engines.ort_unavailable_reason("cuda", torch.float16)
