"""Launch configuration of the Triton kernels: block sizes, warps, stages, splits, dot precision.

One function, :func:`config_for`, returns the configuration the dispatch launches for a kernel at
given (N, C, dtype). It is deterministic (the interpreter and the AOT check need one fixed choice)
and every configuration it returns fits the consumer GPUs' 99 KB of shared memory per block with
no register spills at sm_80/86/89/90a (checked by ``tests/test_kernels_aot.py`` /
``python -m fastdm.kernels.aot``). :data:`AUTOTUNE_CONFIGS` lists the alternatives that
``FASTDM_TRITON_AUTOTUNE=1`` lets ``@triton.autotune`` (key: N, C) choose from on a CUDA GPU;
the first entry of each list is what :func:`config_for` would pick for large shapes.

Every launch goes through :func:`launch`, which

* sets the CUDA device of the inputs (``torch.cuda.device``), so keys on ``cuda:1`` work;
* can be recorded instead of run (:func:`recording`): ``fastdm.kernels.aot`` runs the real
  dispatch (forward and backward) with launches recorded and compiles exactly what it launches.

Dot precision (``PREC`` constexpr of the kernels, :func:`dot_precision`):

* ``"tf32x3"`` (default on sm_80+): 3 TF32 tensor-core products per dot (big*big + big*small +
  small*big), about fp32 accuracy. Used for every product that involves D = A - B (or X, which
  is O(|D|)), for every input dtype: D is small, and fp16 would underflow it.
* native fp16 / bf16 tensor-core dot with fp32 accumulation (``HALF`` constexpr): used for the
  O(1) x O(1) product G_B = B^T B when the keys are fp16 / bf16.
* ``"ieee"``: fp32 FMA, no tensor cores (GPUs before sm_80, or ``FASTDM_TRITON_PRECISION=ieee``).

The Triton interpreter ignores ``input_precision`` (it computes fp32 products), so on the CPU the
tests see the ieee numbers plus the fp16 rounding of the half dots; ``tests/test_kernels.py``
estimates the TF32x3 error with a plain-torch emulation of TF32 rounding, and the CUDA-only tests
measure the on-GPU tensor-core error.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import triton


@dataclass(frozen=True)
class KernelConfig:
    meta: dict = field(default_factory=dict)  # constexpr block sizes
    num_warps: int = 4
    num_stages: int = 2

    def triton_config(self):
        return triton.Config(dict(self.meta), num_warps=self.num_warps, num_stages=self.num_stages)


def _p2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, x))))


def config_for(kernel: str, n: int, c: int, dtype: torch.dtype = torch.float32) -> KernelConfig:
    """The configuration the dispatch launches ``kernel`` with at row count N and channels C."""
    # bandwidth kernels: 32 x 64 tiles of each input per step (16 elements per thread and input)
    if kernel in ("row_stats", "row_fixup"):
        return KernelConfig({"BR": 32, "BC": _p2(c, 16, 64)}, num_warps=4, num_stages=1)
    if kernel == "pair_stats":
        return KernelConfig({"BR": _p2(n, 16, 32), "BC": _p2(c, 16, 64)}, num_warps=4, num_stages=1)
    if kernel == "frame_sums":
        return KernelConfig({"BN": _p2(n, 16, 32), "BC": _p2(c, 16, 64)}, num_warps=4, num_stages=1)
    # The dot kernels: TF32x3 triples the operand registers, so the tiles are modest; each choice
    # below is the largest measured (ptxas) with no spills at sm_80..sm_90a.
    if kernel == "gram3":  # 3 BC x BC fp32 accumulators over a slice of N in BN steps
        return KernelConfig({"BN": 16, "BC": _p2(c, 16, 32)}, num_warps=8, num_stages=1)
    if kernel == "grad_gram":  # BN x BC output, contraction over C in BK chunks
        return KernelConfig({"BN": _p2(n, 16, 64), "BC": _p2(c, 16, 64), "BK": 16}, num_warps=4, num_stages=2)
    if kernel == "tiles_fwd":  # BN x BN tile of X, contraction over C in BK chunks
        return KernelConfig({"BN": _p2(n, 16, 32 if n <= 64 else 64), "BK": 16}, num_warps=4, num_stages=2)
    if kernel == "tiles_bwd":  # BN x BC of dA = X A, contraction over N in BK chunks
        return KernelConfig({"BN": _p2(n, 16, 32 if n <= 64 else 64), "BC": _p2(c, 16, 64), "BK": 16},
                            num_warps=4, num_stages=2)
    raise KeyError(kernel)


# Alternatives for @triton.autotune (FASTDM_TRITON_AUTOTUNE=1, CUDA only). Splits are sized in
# multiples of SPLIT_ALIGN so that every BN / BK below divides a split's slice.
SPLIT_ALIGN = 64
AUTOTUNE_CONFIGS = {  # measured spill-free at sm_86 fp32 (python -m fastdm.kernels.aot checks config_for's choice)
    # gram3's last three: Hopper candidates after the H100 run (gram3 at 2 % of its roofline with the first): ptxas
    # at sm_90a (fp32 / fp16 / bf16, ZeroScope's N, C): no spills, wgmma for the first two (16-54 KB shared); at
    # sm_80-89 each spills somewhere (12 B to 2.4 KB), so they stay out of config_for until a GPU run measures them
    # (bench_ssm's triton-autotune row). benchmarks/results/kernels-aot-gram3-*.md (python -m fastdm.kernels.aot --config)
    "gram3": [KernelConfig({"BN": 16, "BC": 32}, 8, 1), KernelConfig({"BN": 16, "BC": 32}, 8, 2),
              KernelConfig({"BN": 32, "BC": 64}, 8, 2), KernelConfig({"BN": 16, "BC": 64}, 8, 2),
              KernelConfig({"BN": 32, "BC": 32}, 8, 3)],
    "grad_gram": [KernelConfig({"BN": 64, "BC": 64, "BK": 16}, 4, 2), KernelConfig({"BN": 64, "BC": 64, "BK": 32}, 8, 2),
                  KernelConfig({"BN": 32, "BC": 64, "BK": 32}, 4, 2)],
    "tiles_fwd": [KernelConfig({"BN": 64, "BK": 16}, 4, 2), KernelConfig({"BN": 32, "BK": 16}, 4, 2),
                  KernelConfig({"BN": 32, "BK": 16}, 4, 3)],
    "tiles_bwd": [KernelConfig({"BN": 64, "BC": 64, "BK": 16}, 4, 2), KernelConfig({"BN": 64, "BC": 64, "BK": 32}, 8, 2)],
}


def autotune_enabled(t: torch.Tensor) -> bool:
    return t.is_cuda and os.environ.get("FASTDM_TRITON_AUTOTUNE", "0") not in ("", "0")


_AUTOTUNED: dict = {}


def autotuned(name: str, fn):
    """``@triton.autotune`` wrapper of a kernel over :data:`AUTOTUNE_CONFIGS` with key (N, C)."""
    if name not in _AUTOTUNED:
        _AUTOTUNED[name] = triton.autotune([c.triton_config() for c in AUTOTUNE_CONFIGS[name]], key=["N", "C"])(fn)
    return _AUTOTUNED[name]


def dot_precision(t: torch.Tensor) -> str:
    """``input_precision`` of the kernels' D products: tf32x3 on sm_80+, ieee otherwise / on request."""
    forced = os.environ.get("FASTDM_TRITON_PRECISION")
    if forced:
        return forced
    if _RECORDER is not None:
        return _RECORDER.precision
    if t.is_cuda and torch.cuda.get_device_capability(t.device)[0] < 8:
        return "ieee"
    return "tf32x3"


_SM_CACHE: dict = {}
CPU_SM_COUNT = 4  # interpreter: small, so that the split paths are exercised by small test shapes


def sm_count(t: torch.Tensor) -> int:
    if _RECORDER is not None:
        return _RECORDER.sm_count
    if not t.is_cuda:
        return CPU_SM_COUNT
    idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if idx not in _SM_CACHE:
        _SM_CACHE[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_CACHE[idx]


def split_count(programs: int, length: int, t: torch.Tensor, align: int = SPLIT_ALIGN) -> tuple[int, int]:
    """Split a reduction of ``length`` into S slices (a multiple of ``align`` each) so that
    ``programs * S`` reaches about two programs per SM. Returns (S, slice length)."""
    want = max(1, (2 * sm_count(t) + programs - 1) // max(1, programs))
    per = max(align, triton.cdiv(triton.cdiv(length, want), align) * align)
    return triton.cdiv(length, per), per


def device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class _Recorder:
    def __init__(self, sm: int, precision: str):
        self.sm_count, self.precision, self.launches = sm, precision, []


_RECORDER: _Recorder | None = None


@contextlib.contextmanager
def recording(sm: int = 132, precision: str = "tf32x3"):
    """Record launches instead of running them (yields the list of launches). Outputs stay garbage."""
    global _RECORDER
    prev, _RECORDER = _RECORDER, _Recorder(sm, precision)
    try:
        yield _RECORDER.launches
    finally:
        _RECORDER = prev


def launch(name: str, fn, grid, args: list, cfg: KernelConfig, extra_meta: dict | None = None, ref: torch.Tensor | None = None):
    """Run ``fn[grid](*args, **cfg.meta, **extra_meta)`` on the device of ``ref``."""
    extra_meta = extra_meta or {}
    if _RECORDER is not None:
        _RECORDER.launches.append({"name": name, "fn": fn, "args": list(args), "meta": {**cfg.meta, **extra_meta},
                                   "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "grid": grid})
        return
    ref = ref if ref is not None else next(a for a in args if isinstance(a, torch.Tensor))
    with device_guard(ref):
        if name in AUTOTUNE_CONFIGS and autotune_enabled(ref):
            meta_grid = grid if callable(grid) else (lambda _m, g=grid: g)
            autotuned(name, fn)[meta_grid](*args, **extra_meta)
        else:
            g = grid(cfg.meta) if callable(grid) else grid
            fn[g](*args, **cfg.meta, **extra_meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
