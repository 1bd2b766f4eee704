"""Compiled engines for the no-grad UNet evaluations: torch.compile, ONNX export, onnxruntime, TensorRT.

Three of a step's four UNet evaluations need no autograd, so they can run in an inference engine.
The exported graph returns the noise prediction *and* the tapped attention keys (the source keys
S-SSM/T-SSM match against), so an engine can stand in for the eager no-grad call completely.

* :class:`CompiledUNet` is ``torch.compile`` of that call (``compile``), optionally with CUDA
  graphs (``cudagraphs``: mode ``reduce-overhead``); the timestep goes in as a tensor so a new
  timestep is new data, not a recompile.
* :func:`export_onnx` traces ``UNet(sample, t, text) -> (eps, keys...)`` at fixed shapes.
* :class:`OrtUNet` runs it with onnxruntime (CPU or CUDA) — also how CI checks the export.
* :class:`TrtUNet` builds a TensorRT engine from it (on a CUDA GPU), cached on disk under a key
  made of the ONNX file's hash, the shapes, the precision and the TensorRT version.

Engines refuse with a one-line reason when their library or a GPU is missing.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ..errors import FastDMError
from .base import stop_recording


class _UNetWithKeys(torch.nn.Module):
    """``UNet(sample, t, text) -> (eps, *keys)``; with ``grad_until``, autograd stops recording once
    that module has run (truncated backprop, as ``Backbone.predict_noise``)."""

    def __init__(self, backbone, layers: list[str], grad_until: str | None = None):
        super().__init__()
        self.unet = backbone.unet
        self.mods = [backbone.spatial_self_attention_layers()[n].to_k for n in layers]
        self.stop = backbone.unet.get_submodule(grad_until) if grad_until else None

    def forward(self, sample, timestep, text):
        keys: list[torch.Tensor] = []
        handles = [m.register_forward_hook(lambda _m, _i, o: keys.append(o)) for m in self.mods]
        if self.stop is not None:
            handles.append(self.stop.register_forward_hook(stop_recording))
        try:
            eps = self.unet(sample, timestep, encoder_hidden_states=text, return_dict=False)[0]
        finally:
            for h in handles:
                h.remove()
            if self.stop is not None:
                torch.set_grad_enabled(True)
        return (eps, *keys)


class CompiledUNet:
    """``torch.compile`` of ``UNet(sample, t, text) -> (eps, keys...)``; the first call compiles
    (the editor's first step, which benchmarks count as warm-up), later calls at the same shapes
    reuse it. ``grad_until``: the grad branch's form (autograd recorded up to that module and
    compiled with its backward; the rest of the UNet in the same call runs without autograd)."""

    def __init__(self, backbone, layers: list[str], cudagraphs: bool = False, grad_until: str | None = None):
        if cudagraphs and backbone.device.type != "cuda":
            raise FastDMError("--backend cudagraphs needs the model on a CUDA GPU (--device cuda); use --backend compile")
        self.module = _UNetWithKeys(backbone, layers, grad_until).eval()
        self.fn = torch.compile(self.module, mode="reduce-overhead" if cudagraphs else None, dynamic=False)
        self.cudagraphs = cudagraphs

    def __call__(self, sample: torch.Tensor, t: int, text: torch.Tensor):
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        ts = torch.full((sample.shape[0],), t, device=sample.device, dtype=torch.long)
        out = self.fn(sample, ts, text)
        return out[0].float(), list(out[1:])


def export_onnx(backbone, path: str | os.PathLike, *, batch: int, frames: int, size: tuple[int, int], layers: list[str]) -> Path:
    """Export ``UNet(sample, t, text) -> (eps, *keys)`` at fixed shapes to ``path`` (atomic)."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise FastDMError("ONNX export needs the onnx extra: pip install 'fastdm[onnx]'") from None
    from ..io.atomic import atomic_output

    shape = list(backbone.working_shape(frames, size))
    shape[0] = batch
    dev, dt = backbone.device, backbone.dtype
    args = (torch.zeros(shape, device=dev, dtype=dt), torch.full((batch,), 500, device=dev, dtype=torch.long),
            torch.zeros(batch, backbone.tokenizer.model_max_length, backbone.unet.config.cross_attention_dim, device=dev, dtype=dt))
    model = _UNetWithKeys(backbone, layers).eval()
    path = Path(path)
    with atomic_output(path) as tmp, torch.no_grad():
        torch.onnx.export(model, args, tmp, input_names=["sample", "timestep", "text"],
                          output_names=["eps", *[f"keys_{i}" for i in range(len(layers))]], dynamo=True, external_data=False)
    return path


class OrtUNet:
    """onnxruntime session over an exported UNet; ``(sample, t, text) -> (eps, [keys...])`` as torch tensors."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu"):
        try:
            import onnxruntime as ort
        except ImportError:
            raise FastDMError("the onnxruntime backend needs: pip install 'fastdm[onnx]'") from None
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=providers)

    def __call__(self, sample: torch.Tensor, t: int, text: torch.Tensor):
        feeds = {"sample": sample.detach().cpu().numpy(), "timestep": torch.full((sample.shape[0],), t, dtype=torch.long).numpy(),
                 "text": text.detach().cpu().numpy()}
        outs = [torch.from_numpy(o).to(sample.device) for o in self.session.run(None, feeds)]
        return outs[0].float(), outs[1:]


def trt_unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU and none is available"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (pip install tensorrt)"
    return None


class TrtUNet:
    """A TensorRT engine built from an exported UNet ONNX file, cached on disk."""

    def __init__(self, onnx_path: str | os.PathLike, cache_dir: str | os.PathLike, precision: str = "fp16"):
        reason = trt_unavailable_reason()
        if reason:
            raise FastDMError(f"--backend trt: {reason}; use --backend eager")
        import tensorrt as trt

        self.trt = trt
        data = Path(onnx_path).read_bytes()
        key = hashlib.sha256(data + f"|{precision}|{trt.__version__}".encode()).hexdigest()[:24]
        cache = Path(cache_dir) / f"unet-{key}.plan"
        logger = trt.Logger(trt.Logger.ERROR)
        if not cache.exists():
            builder = trt.Builder(logger)
            network = builder.create_network(0)
            parser = trt.OnnxParser(network, logger)
            if not parser.parse(data):
                raise FastDMError(f"TensorRT could not parse {onnx_path}: {parser.get_error(0)}")
            config = builder.create_builder_config()
            if precision == "fp16":
                config.set_flag(trt.BuilderFlag.FP16)
            elif precision == "bf16":
                config.set_flag(trt.BuilderFlag.BF16)
            plan = builder.build_serialized_network(network, config)
            if plan is None:
                raise FastDMError("TensorRT failed to build the engine (see its log)")
            cache.parent.mkdir(parents=True, exist_ok=True)
            from ..io.atomic import atomic_output

            with atomic_output(cache) as tmp:
                Path(tmp).write_bytes(bytes(plan))
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(cache.read_bytes())
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.cache_path = cache

    def __call__(self, sample: torch.Tensor, t: int, text: torch.Tensor):
        trt = self.trt
        inputs = {"sample": sample.contiguous(), "timestep": torch.full((sample.shape[0],), t, device=sample.device, dtype=torch.long),
                  "text": text.contiguous()}
        outputs = {}
        for name in self.names:
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                tensor = inputs[name].to(_torch_dtype(self.engine.get_tensor_dtype(name)))
                inputs[name] = tensor
            else:
                shape = tuple(self.context.get_tensor_shape(name))
                tensor = torch.empty(shape, device=sample.device, dtype=_torch_dtype(self.engine.get_tensor_dtype(name)))
                outputs[name] = tensor
            self.context.set_tensor_address(name, tensor.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        keys = [outputs[n] for n in self.names if n.startswith("keys_")]
        return outputs["eps"].float(), keys


def _torch_dtype(trt_dtype):
    import tensorrt as trt

    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
            trt.int64: torch.int64, trt.int32: torch.int32}[trt_dtype]


ENGINES = ("eager", "compile", "cudagraphs", "ort", "trt")


def default_cache_dir() -> Path:
    return Path(os.environ.get("FASTDM_CACHE", Path.home() / ".cache" / "fastdm")) / "engines"


def build_engine(backbone, kind: str, *, frames: int, size: tuple[int, int], layers: list[str],
                 cache_dir: str | os.PathLike | None = None):
    """An engine for the batched no-grad call (batch 3: (x_t, ""), (x^_t, source), (x^_t, "")), or None
    for ``"eager"``. The ONNX export is cached by model, shape, dtype and tapped layers."""
    if kind == "eager":
        return None
    if kind not in ENGINES:
        raise FastDMError(f"unknown backend {kind!r}; choose one of {', '.join(ENGINES)}")
    if kind in ("compile", "cudagraphs"):
        return CompiledUNet(backbone, layers, cudagraphs=kind == "cudagraphs")
    if kind == "trt":
        reason = trt_unavailable_reason()
        if reason:
            raise FastDMError(f"--backend trt: {reason}; use --backend eager or ort")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    ident = "|".join([backbone.info.path, str(backbone.dtype), str(frames), f"{size[0]}x{size[1]}", *layers,
                      *[f"{n}:{tuple(p.shape)}:{float(p.float().abs().sum()):.6e}" for n, p in list(backbone.unet.named_parameters())[:4]]])
    key = hashlib.sha256(ident.encode()).hexdigest()[:20]
    onnx_path = cache / f"unet-{key}.onnx"
    if not onnx_path.exists():
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(backbone, onnx_path, batch=3, frames=frames, size=size, layers=layers)
    if kind == "ort":
        return OrtUNet(onnx_path, backbone.device.type)
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(backbone.dtype, "fp32")
    return TrtUNet(onnx_path, cache, precision)
