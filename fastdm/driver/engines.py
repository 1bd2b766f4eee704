"""Compiled engines for the no-grad UNet evaluations: torch.compile, ONNX export, onnxruntime, TensorRT.

Three of a step's four UNet evaluations need no autograd, so they can run in an inference engine.
The exported graph returns the noise prediction *and* the tapped attention keys (the source keys
S-SSM/T-SSM match against), so an engine can stand in for the eager no-grad call completely.

* :class:`CompiledUNet` is ``torch.compile`` of that call (``compile``), optionally with CUDA
  graphs (``cudagraphs``: mode ``reduce-overhead``); the timestep goes in as a tensor so a new
  timestep is new data, not a recompile.
* :func:`export_onnx` traces ``UNet(sample, t, text) -> (eps, keys...)`` at fixed shapes.
* :class:`OrtUNet` runs it with onnxruntime (CPU, or CUDA with onnxruntime-gpu only) through I/O
  binding on the torch tensors' memory — also how CI checks the export.
* :class:`TrtUNet` builds a strongly typed TensorRT engine from it (on a CUDA GPU), cached on disk
  under a key made of the ONNX model's hash (external data included), the precision, the
  TensorRT version and the GPU's name and compute capability.

Engines refuse with a one-line reason when their library or a GPU is missing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import FastDMError, MissingDependency, Unsupported


class CompiledUNet:
    """``torch.compile`` of the denoiser returning ``(model output, *keys)``
    (:class:`fastdm.taps.DenoiserWithKeys`); :meth:`warm_up` compiles it at the shapes it will
    serve, so compile time is reported apart from step time; later calls at the same shapes reuse
    it. ``grad_until``: the grad branch's form (autograd recorded up to that module and compiled
    with its backward; the rest of the denoiser in the same call runs without autograd).

    ``dynamo_backend``: torch.compile's backend (inductor; ``reduce-overhead`` with CUDA graphs).
    Tests may set another (``aot_eager``) where they check the engine's plumbing, not its code."""

    dynamo_backend = "inductor"

    def __init__(self, backbone, layers: list[str], cudagraphs: bool = False, grad_until: str | None = None):
        from ..taps import DenoiserWithKeys

        if cudagraphs and backbone.device.type != "cuda":
            raise FastDMError("`backend=cudagraphs` needs the model on a CUDA GPU (`device=cuda`); use `backend=compile`")
        self.module = DenoiserWithKeys(backbone, layers, grad_until).eval()
        if cudagraphs:
            self.fn = torch.compile(self.module, mode="reduce-overhead", dynamic=False)
        else:
            self.fn = torch.compile(self.module, backend=self.dynamo_backend, dynamic=False)
        self.cudagraphs = cudagraphs
        self.grad = grad_until is not None

    def __call__(self, sample: torch.Tensor, t: int, text: torch.Tensor):
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        ts = torch.full((sample.shape[0],), t, device=sample.device, dtype=torch.long)
        out = self.fn(sample, ts, text)
        return out[0], list(out[1:])

    def warm_up(self, sample: torch.Tensor, text: torch.Tensor) -> None:
        """Compile now (forward, and for the grad form the backward) on inputs of the served shapes."""
        if self.grad:
            with torch.enable_grad():
                x = sample.detach().clone().requires_grad_(True)
                _, keys = self(x, 500, text)
                sum(k.float().square().mean() for k in keys).backward()
        else:
            with torch.inference_mode():
                self(sample, 500, text)
        if sample.device.type == "cuda":
            torch.cuda.synchronize(sample.device)


def export_onnx(backbone, path: str | os.PathLike, *, batch: int, frames: int, size: tuple[int, int], layers: list[str]) -> Path:
    """Export ``UNet(sample, t, text) -> (eps, *keys)`` at fixed shapes to ``path`` (atomic)."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise MissingDependency("ONNX export needs the onnx extra: pip install 'fastdm[onnx]'") from None
    shape = list(backbone.working_shape(frames, size))
    shape[0] = batch
    dev, dt = backbone.device, backbone.dtype
    args = (torch.zeros(shape, device=dev, dtype=dt), torch.full((batch,), 500, device=dev, dtype=torch.long),
            torch.zeros(batch, *backbone.text_embedding_shape(), device=dev, dtype=dt))
    from ..taps import DenoiserWithKeys

    model = DenoiserWithKeys(backbone, layers).eval()
    path = Path(path)
    # Above protobuf's 2 GB limit the weights go to an external data file (ZeroScope's UNet is 2.8 GB in
    # fp16). Export into a private folder, move the data file(s) beside the target, the .onnx last: a
    # crash leaves no .onnx that names missing weights.
    external = backbone.weight_bytes() > 1_500_000_000
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.stem}-", dir=path.parent))
    try:
        with torch.no_grad():
            torch.onnx.export(model, args, str(tmpdir / path.name), input_names=["sample", "timestep", "text"],
                              output_names=["eps", *[f"keys_{i}" for i in range(len(layers))]], dynamo=True,
                              external_data=external)
        for f in sorted(tmpdir.iterdir(), key=lambda f: f.name == path.name):
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


_ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
              "tensor(int64)": torch.int64, "tensor(int32)": torch.int32}


_ORT_BF16 = ("`backend=ort` does not run bf16 models (numpy has no bf16 and onnxruntime's kernels cover it only in part); "
             "use `dtype=fp16` or fp32, or `backend=compile` or trt")


def ort_unavailable_reason(device_type: str, dtype: torch.dtype | None = None) -> str | None:
    """Why onnxruntime cannot serve a model on ``device_type`` in ``dtype`` here (None: it can).
    Cheap, so a caller can refuse before the ONNX export."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed (pip install 'fastdm[onnx]')"
    if dtype == torch.bfloat16:
        return "it " + _ORT_BF16.removeprefix("`backend=ort` ")
    if device_type == "cuda":
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            return (f"a CUDA model needs onnxruntime-gpu (this onnxruntime offers only {', '.join(available)}): "
                    "pip uninstall -y onnxruntime && pip install onnxruntime-gpu; or use `backend=compile` or trt")
    elif device_type != "cpu":
        return f"onnxruntime runs on cpu or cuda, not {device_type}; use `backend=eager`"
    return None


def _onnx_has_bf16(path) -> bool:
    try:
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:
        return False
    return any(v.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16 for v in [*graph.input, *graph.output])


class OrtUNet:
    """onnxruntime session over an exported UNet; ``(sample, t, text) -> (eps, [keys...])`` as torch tensors.

    Inputs and outputs are bound in place (I/O binding on the torch tensors' own memory), so nothing
    goes through numpy or, on CUDA, through the host. On CUDA it runs only with onnxruntime-gpu's
    CUDAExecutionProvider, never a silent CPU fallback, on a CUDA stream of its own that waits for
    torch's current stream and that torch's stream waits for in turn (no host synchronization).
    bf16 graphs are refused with the reason (no numpy bf16; partial coverage in onnxruntime's kernels).
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependency("the onnxruntime backend needs: pip install 'fastdm[onnx]'") from None
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise FastDMError(f"`backend=ort` runs on cpu or cuda, not {self.device.type}; use `backend=eager`")
        cuda = self.device.type == "cuda"
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.stream = None
        if cuda:
            reason = ort_unavailable_reason("cuda")
            if reason:
                raise FastDMError(f"`backend=ort`: {reason}")
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", index)
            self.stream = torch.cuda.Stream(self.device)
            providers = [("CUDAExecutionProvider", {"device_id": str(index), "user_compute_stream": str(self.stream.cuda_stream)})]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception:
            if _onnx_has_bf16(path):  # e.g. the CPU provider has no bf16 kernels for it
                raise FastDMError(_ORT_BF16) from None
            raise
        if cuda and "CUDAExecutionProvider" not in self.session.get_providers():
            raise FastDMError("`backend=ort`: onnxruntime-gpu could not start its CUDAExecutionProvider (it needs the CUDA and "
                              "cuDNN libraries of its build); use `backend=compile` or trt")
        self.run_options = ort.RunOptions()
        if cuda:  # torch's stream waits for ours instead of the host waiting for the GPU
            self.run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self.inputs, self.outputs = self.session.get_inputs(), self.session.get_outputs()
        args = [*self.inputs, *self.outputs]
        if any(a.type == "tensor(bfloat16)" for a in args):
            raise FastDMError(_ORT_BF16)
        odd = [f"{a.name}: {a.type}" for a in args if a.type not in _ORT_TYPES]
        if odd:
            raise FastDMError(f"`backend=ort`: unsupported tensor types in {path} ({', '.join(odd)})")
        dynamic = [o.name for o in self.outputs if not all(isinstance(d, int) for d in o.shape)]
        if dynamic:
            raise FastDMError(f"`backend=ort`: {path} has outputs without fixed shapes ({', '.join(dynamic)}); delete it to re-export")

    def __call__(self, sample: torch.Tensor, t: int, text: torch.Tensor):
        import numpy as np

        dev = sample.device
        if dev.type != self.device.type:
            raise FastDMError(f"`backend=ort`: the session runs on {self.device.type}, the inputs are on {dev.type}")
        feeds = {"sample": sample, "timestep": torch.full((sample.shape[0],), t, device=dev, dtype=torch.long), "text": text}
        binding = self.session.io_binding()
        index = dev.index or 0
        bound = []  # keeps every bound tensor alive until the run has finished

        def bind(fn, name: str, tensor: torch.Tensor):
            bound.append(tensor)
            fn(name, dev.type, index, np.dtype(str(tensor.dtype).removeprefix("torch.")), tuple(tensor.shape), tensor.data_ptr())

        for a in self.inputs:
            bind(binding.bind_input, a.name, feeds[a.name].detach().to(_ORT_TYPES[a.type]).contiguous())
        outs = [torch.empty(tuple(o.shape), device=dev, dtype=_ORT_TYPES[o.type]) for o in self.outputs]
        for o, y in zip(self.outputs, outs):
            bind(binding.bind_output, o.name, y)
        if self.stream is not None:
            current = torch.cuda.current_stream(dev)
            self.stream.wait_stream(current)  # the inputs were written on torch's stream
            self.session.run_with_iobinding(binding, self.run_options)
            current.wait_stream(self.stream)  # torch reads the outputs only after onnxruntime wrote them
        else:
            self.session.run_with_iobinding(binding, self.run_options)
        return outs[0], outs[1:]


def trt_unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU and none is available"
    try:
        import tensorrt
    except ImportError:
        return "TensorRT is not installed (pip install 'fastdm[gpu]', or pip install 'tensorrt>=10')"
    version = str(getattr(tensorrt, "__version__", "0"))
    if not version.split(".")[0].isdigit() or int(version.split(".")[0]) < 10:
        return f"TensorRT {version} is too old: fastdm needs TensorRT 10 or newer (pip install -U 'tensorrt>=10')"
    return None


def onnx_files(path: str | os.PathLike) -> list[Path]:
    """The ONNX file and the external data files its tensors reference (the exporter writes the
    weights beside the graph above about 2 GB), in a fixed order."""
    path = Path(path)
    try:
        import onnx
        from onnx import external_data_helper as edh
    except ImportError:  # without onnx: the exporter's naming, ``<model>.onnx.data``
        data = path.with_name(path.name + ".data")
        return [path, data] if data.exists() else [path]
    model = onnx.load(str(path), load_external_data=False)
    tensors = edh._get_all_tensors(model) if hasattr(edh, "_get_all_tensors") else model.graph.initializer
    locations = {next(e.value for e in t.external_data if e.key == "location") for t in tensors if edh.uses_external_data(t)}
    return [path, *(path.parent / loc for loc in sorted(locations))]


def onnx_digest(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """sha256 of an ONNX model with its external data, streamed in 16 MiB reads (a 3 GB model is
    never held in memory); remembered in ``<model>.sha256.json`` beside it while every file keeps
    its size and modification time."""
    import json

    path = Path(path)
    side = path.with_name(path.name + ".sha256.json")

    def stat(p: Path) -> list:
        s = p.stat()
        return [p.name, s.st_size, s.st_mtime_ns]

    try:
        rec = json.loads(side.read_text())
        if rec["files"] and rec["files"][0][0] == path.name and rec["files"] == [stat(path.parent / f[0]) for f in rec["files"]]:
            return rec["sha256"]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        pass
    files = onnx_files(path)
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FastDMError(f"the ONNX model {path} lacks its external data {', '.join(missing)}; delete {path} so it is exported again")
    h = hashlib.sha256()
    for i, f in enumerate(files):
        if i:  # an external file's name is part of the model (its "location")
            h.update(b"\0" + f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    digest = h.hexdigest()
    try:
        from ..io.atomic import write_json_atomic

        write_json_atomic(side, {"sha256": digest, "files": [stat(f) for f in files]})
    except OSError:
        pass  # a read-only cache still works, it only hashes again next time
    return digest


def trt_cache_key(onnx_sha256: str, precision: str, trt_version: str, gpu_name: str, capability: tuple[int, int],
                  strongly_typed: bool) -> str:
    """The engine cache key: an engine is valid only for the same model bytes, precision, TensorRT
    version and GPU (name and compute capability)."""
    ident = "|".join([onnx_sha256, precision, str(trt_version), gpu_name, f"sm{capability[0]}{capability[1]}",
                      "strongly-typed" if strongly_typed else "weakly-typed"])
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


class TrtUNet:
    """A TensorRT engine built from an exported UNet ONNX file, cached on disk.

    The network is parsed from the file's path (so weights in an external data file resolve) and
    built strongly typed where TensorRT has it (10+: the ONNX model's own fp16/bf16/fp32 types
    decide the precision; TensorRT 11 has no FP16/BF16 builder flags). The cache key holds the
    ONNX hash, precision, TensorRT version, GPU name and compute capability; an engine that still
    fails to deserialize (another TensorRT or GPU) is rebuilt. It runs on a CUDA stream of its own
    ordered after torch's current stream, and torch's stream waits for it: no host sync."""

    def __init__(self, onnx_path: str | os.PathLike, cache_dir: str | os.PathLike, precision: str = "fp16"):
        reason = trt_unavailable_reason()
        if reason:
            raise FastDMError(f"`backend=trt`: {reason}; use `backend=eager`")
        import tensorrt as trt

        self.trt = trt
        self.onnx_path = Path(onnx_path)
        self.strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
        index = torch.cuda.current_device()
        self.gpu = (torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index)))
        key = trt_cache_key(onnx_digest(self.onnx_path), precision, trt.__version__, *self.gpu, self.strongly_typed)
        cache = Path(cache_dir) / f"unet-{key}.plan"
        self.logger = trt.Logger(trt.Logger.ERROR)
        self.runtime = trt.Runtime(self.logger)
        self.rebuilt = False
        engine = self._deserialize(cache.read_bytes()) if cache.exists() else None
        if engine is None:
            if cache.exists():  # written by another TensorRT or for another GPU under the same key
                cache.unlink(missing_ok=True)
                self.rebuilt = True
            plan = self._build(precision)
            cache.parent.mkdir(parents=True, exist_ok=True)
            from ..io.atomic import atomic_output

            with atomic_output(cache) as tmp, open(tmp, "wb") as fh:
                fh.write(memoryview(plan))
            engine = self._deserialize(plan)
            if engine is None:
                raise FastDMError("TensorRT could not load the engine it just built (see its log); use `backend=eager`")
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise FastDMError("TensorRT could not create an execution context (GPU memory?); use `backend=eager`")
        self.names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.cache_path = cache
        self.streams: dict[torch.device, torch.cuda.Stream] = {}

    def _deserialize(self, plan):
        try:
            return self.runtime.deserialize_cuda_engine(plan)
        except Exception:  # some versions raise where others return None
            return None

    def _build(self, precision: str):
        trt = self.trt
        builder = trt.Builder(self.logger)
        flags = 0
        if self.strongly_typed:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(self.onnx_path)):  # the path, so external weights resolve
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no error given"
            raise FastDMError(f"TensorRT could not parse {self.onnx_path}: {errors[:400]}")
        config = builder.create_builder_config()
        if not self.strongly_typed and precision in ("fp16", "bf16"):  # weakly typed: allow the reduced precision
            flag = getattr(trt.BuilderFlag, precision.upper(), None)
            if flag is None:
                raise FastDMError(f"TensorRT {trt.__version__} cannot build {precision} engines; use `backend=eager`")
            config.set_flag(flag)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise FastDMError("TensorRT failed to build the engine (see its log); use `backend=eager`")
        return plan

    def _stream(self, device: torch.device):
        """TensorRT's own stream on ``device`` (not the legacy default stream, on which enqueueV3
        adds host synchronizations)."""
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        return self.streams[device]

    def __call__(self, sample: torch.Tensor, t: int, text: torch.Tensor):
        trt = self.trt
        dev = sample.device
        inputs = {"sample": sample, "timestep": torch.full((sample.shape[0],), t, device=dev, dtype=torch.long), "text": text}
        outputs = {}
        for name in self.names:
            dtype = _torch_dtype(self.engine.get_tensor_dtype(name))
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                tensor = inputs[name].detach().to(dtype).contiguous()
                inputs[name] = tensor  # kept alive until the call returns; torch's stream waits below
            else:
                tensor = torch.empty(tuple(self.context.get_tensor_shape(name)), device=dev, dtype=dtype)
                outputs[name] = tensor
            self.context.set_tensor_address(name, tensor.data_ptr())
        current, stream = torch.cuda.current_stream(dev), self._stream(dev)
        stream.wait_stream(current)  # the inputs were written on torch's stream
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise Unsupported("TensorRT failed to run the engine (see its log); use `backend=eager`")
        # torch reads the outputs, and reuses the inputs' memory, only after TensorRT is done with
        # them: every later kernel on torch's stream is ordered after this wait
        current.wait_stream(stream)
        keys = [outputs[n] for n in self.names if n.startswith("keys_")]
        return outputs["eps"], keys


def _torch_dtype(trt_dtype):
    import tensorrt as trt

    table = {getattr(trt, n): d for n, d in (("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16),
                                             ("int64", torch.int64), ("int32", torch.int32)) if hasattr(trt, n)}
    if trt_dtype not in table:
        raise FastDMError(f"`backend=trt`: the engine has a tensor of type {trt_dtype}, which fastdm does not map")
    return table[trt_dtype]


ENGINES = {
    "eager": "PyTorch, no engine",
    "compile": "torch.compile (inductor)",
    "cudagraphs": "torch.compile with CUDA graphs (mode reduce-overhead)",
    "ort": "ONNX export + onnxruntime",
    "trt": "ONNX export + TensorRT, engine cached on disk",
}


def engine_unsupported_reasons(kind: str, backbone) -> list[str]:
    """Why engine ``kind`` cannot run on this backbone here (library, device); [] = it can."""
    if kind not in ENGINES:
        return [f"unknown backend {kind!r}; choose one of {', '.join(ENGINES)}"]
    reasons = []
    problem = backbone.engine_problem() if kind != "eager" else None
    if problem:
        reasons.append(problem)
    if kind == "cudagraphs" and backbone.device.type != "cuda":
        reasons.append("cudagraphs needs the model on a CUDA GPU (`device=cuda`); use `backend=compile`")
    if kind == "ort":
        reason = ort_unavailable_reason(backbone.device.type, backbone.dtype)
        if reason:
            reasons.append(reason)
    if kind == "trt":
        reason = trt_unavailable_reason()
        if reason:
            reasons.append(reason)
    return reasons


def default_cache_dir() -> Path:
    return Path(os.environ.get("FASTDM_CACHE", Path.home() / ".cache" / "fastdm")) / "engines"


def build_engine(backbone, kind: str, *, batch: int, frames: int, size: tuple[int, int], layers: list[str],
                 cache_dir: str | os.PathLike | None = None, grad_until: str | None = None, warm_text: torch.Tensor | None = None):
    """Build (and for torch.compile, compile now) an engine serving ``batch`` denoiser calls of
    ``frames`` frames at ``size``, returning ``(model output, [keys...])``; ``grad_until``: the
    truncated grad branch (compile only). The ONNX export is cached on disk by the backbone's
    identity, shape, dtype and tapped layers."""
    reasons = engine_unsupported_reasons(kind, backbone)
    if kind == "eager" or reasons:
        raise FastDMError(f"`backend={kind}`: {'; '.join(reasons) or 'eager needs no engine'}")
    shape = list(backbone.working_shape(frames, size))
    shape[0] = batch
    if kind in ("compile", "cudagraphs"):
        engine = CompiledUNet(backbone, layers, cudagraphs=kind == "cudagraphs", grad_until=grad_until)
        text = warm_text if warm_text is not None else torch.zeros(batch, *backbone.text_embedding_shape(),
                                                                   device=backbone.device, dtype=backbone.dtype)
        engine.warm_up(torch.zeros(shape, device=backbone.device, dtype=backbone.dtype), text[:batch])
        return engine
    if grad_until is not None:
        raise FastDMError(f"`backend={kind}` runs without autograd; only torch.compile serves the grad branch")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    ident = "|".join([backbone.identity(), str(batch), str(frames), f"{size[0]}x{size[1]}", *layers])
    key = hashlib.sha256(ident.encode()).hexdigest()[:20]
    onnx_path = cache / f"unet-{key}.onnx"
    if not onnx_path.exists():
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(backbone, onnx_path, batch=batch, frames=frames, size=size, layers=layers)
    if kind == "ort":
        return OrtUNet(onnx_path, backbone.device.type)
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(backbone.dtype, "fp32")
    return TrtUNet(onnx_path, cache, precision)
