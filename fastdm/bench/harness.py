"""`fastdm-bench`: latency and memory of DreamMotion steps, naive vs fast, side by side in one run.

Each (preset, frames, mode) runs in a fresh process so its peak memory is its own. Per case:
median seconds per step (after one warm-up step), the projected end-to-end time of a 200-step
edit (setup + 200 x median + decode, all measured), peak memory (CUDA max allocated on GPU; peak
RSS on CPU, and the part above the loaded model: "working"), on CPU also the allocator's peak of
live tensor bytes during one extra, untimed step (the PyTorch profiler's memory events: the CPU
counterpart of CUDA max allocated, free of the RSS noise of libraries and Python), FLOPs per step
(``torch.utils.flop_counter``) and the roofline time of a step at a peak rate (``--peak-tflops``,
default: the measured matmul rate of this device in the run's dtype).

    fastdm-bench --preset shapes --frames 8 --modes naive,fast
    fastdm-bench --preset zeroscope-576w --frames 16 --device cuda --dtype bf16
    fastdm-bench --preset zeroscope-576w --frames 8,16,24 --flops-only   # meta device, no weights

Writes ``<out>/edit-<machine>.{json,md,png}`` (default out: benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..backbone.loader import DTYPES


def _rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _clip(preset: str, frames: int, size) -> np.ndarray:
    from ..toyworld.world import render_clip

    w, h = size
    if w == h:
        return render_clip("red", "circle", "right", size=w, frames=frames, radius=w / 5, speed=max(1.0, w / 16))
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8)


def _mode(mode: str) -> dict:
    """``plan[:engine][+grad]`` -> pipeline options."""
    plan, _, backend = mode.removesuffix("+grad").partition(":")
    return {"plan": plan, "backend": backend or "eager", "compile_grad": mode.endswith("+grad")}


def _size(text: str | None):
    return tuple(int(v) for v in text.lower().split("x")) if text else None


def count_step_flops(preset: str, frames: int, mode: str, dtype: torch.dtype = torch.float32, size=None) -> int:
    """FLOPs of one step (forward and backward) on the meta device: no weights, no time. The step is
    the pipeline's own (:meth:`fastdm.driver.pipeline.EditRun.step`), observed by a FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..driver.pipeline import DreamMotionPipeline
    from .presets import PRESETS, build_backbone

    bb = build_backbone(preset, "meta", dtype, size)
    pipe = DreamMotionPipeline(bb)
    pipe.encode_prompts = lambda prompts: torch.zeros(len(prompts), *bb.text_embedding_shape(), device="meta", dtype=dtype)
    w, h = size or PRESETS[preset]["size"]
    opts = {**_mode(mode), "backend": "eager", "compile_grad": False}  # engines do the same arithmetic
    run = pipe.prepare(_clip(preset, frames, (w, h)), "a red circle moving right", "a blue circle moving right", steps=1,
                       **opts)
    with FlopCounterMode(display=False) as fc:
        run.step()
    return int(fc.get_total_flops())


def triton_kernel_names() -> tuple[str, ...]:
    """The names of fastdm's own Triton kernels (every ``@triton.jit`` function in ``fastdm/kernels`` named
    ``*_kernel``; the others are helpers inlined into them), read from the source, so a new kernel is profiled under
    its kind without being listed here."""
    import ast

    names = []
    for path in sorted((Path(__file__).resolve().parent.parent / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                    "jit" in ast.unparse(d) and "triton" in ast.unparse(d) for d in node.decorator_list):
                names.append(node.name)
    return tuple(names)


KERNEL_KINDS = (  # (kind, substrings of a CUDA kernel's name), first match wins; the rest is "other"
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient_attention")),
    ("ssm loss (triton)", triton_kernel_names()),
    ("convolution", ("fprop", "dgrad", "wgrad", "conv", "implicit", "winograd", "cudnn")),  # (before matmul: cuDNN's
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_", "wgmma")),  # are xmma/cutlass too)
    ("normalization", ("norm", "welford")),
)


def kernel_profile(events, top: int = 15) -> dict:
    """Device time of one profiled step by kernel: ``events`` is ``prof.key_averages()`` (or any list of objects
    with ``key``, ``count`` and ``self_device_time_total`` in microseconds). Returns the step's total device
    milliseconds, the milliseconds per kind of kernel (:data:`KERNEL_KINDS`) and the ``top`` kernels."""
    rows = [(e.key, int(e.count), float(getattr(e, "self_device_time_total", 0.0) or 0.0) / 1e3) for e in events]
    rows = [r for r in rows if r[2] > 0]
    by_kind: dict[str, float] = {}
    for name, _, ms in rows:
        low = name.lower()
        kind = next((k for k, subs in KERNEL_KINDS if any(s in low for s in subs)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + ms
    rows.sort(key=lambda r: -r[2])
    return {"step_device_ms": round(sum(r[2] for r in rows), 3),
            "by_kind_ms": {k: round(v, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top": [{"kernel": n[:120], "calls": c, "ms": round(ms, 3)} for n, c, ms in rows[:top]]}


def run_case(preset: str, frames: int, mode: str, steps: int, device: str, dtype: str, size=None,
             cuda_profile: bool = False) -> dict:
    """Measure one case in this process (``cuda_profile``: one extra, untimed step under the CUDA profiler)."""
    from ..driver.pipeline import DreamMotionPipeline
    from .presets import PRESETS, build_backbone

    torch.manual_seed(0)
    t0 = time.perf_counter()
    bb = build_backbone(preset, device, DTYPES[dtype], size)
    load_s = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes()
    clip = _clip(preset, frames, size or PRESETS[preset]["size"])
    times: list[float] = []

    profiled = device == "cpu" or (cuda_profile and device == "cuda")  # one extra step under the profiler (CPU: memory)
    prof = None

    def on_step(_pipe, step, _t, tensors):
        nonlocal prof
        if device == "cuda":
            torch.cuda.synchronize()
        if prof is not None:
            prof.stop()
            return
        times.append(tensors["seconds"])
        if profiled and step == steps + 1:
            if device == "cuda":  # kernel time by kernel
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            else:
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            prof.start()

    # as fastdm-edit runs it: the text encoder released once the prompts are encoded (the first GPU run kept
    # ZeroScope's, 0.63 GiB in bf16, through every step: the constant 0.74-0.85 GiB above the projection)
    pipe = DreamMotionPipeline(bb, release_text_encoder=True)
    res = pipe(clip, "a red circle moving right", "a blue circle moving right", steps=steps + 1 + profiled, seed=0,
               callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=("seconds",),
               engine_cache=os.path.join(tempfile.gettempdir(), "fastdm-bench-engines"), **_mode(mode))
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _rss_bytes()
    tensor_peak = kernels = None
    if prof is not None and device == "cuda":
        kernels = kernel_profile(prof.key_averages())
    elif prof is not None:
        from ..driver.budget import trace_tensor_peak

        tensor_peak = trace_tensor_peak(prof)
    tm = res.report["timings"]
    median = statistics.median(times[1:])
    setup = load_s + tm["encode_prompts_s"] + tm["prepare_s"]
    return {
        "engine_build_s": tm["engine_build_s"],
        "median_step_s": median,
        "warmup_step_s": times[0],
        "setup_s": setup,
        "decode_s": tm["decode_s"],
        "e2e_200_projected_s": setup + tm["engine_build_s"] + 200 * median + tm["decode_s"],
        "peak_bytes": int(peak),
        "working_peak_bytes": int(max(0, peak - base)),
        "tensor_working_peak_bytes": tensor_peak,
        "params": sum(p.numel() for p in bb.denoiser.parameters()),
        **({"cuda_profile": kernels} if kernels else {}),
    }


def matmul_tflops(device: str, dtype: torch.dtype) -> float:
    n = 4096 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ a
    sync()
    reps = 20 if device == "cuda" else 5
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ a
    sync()
    return reps * 2 * n**3 / (time.perf_counter() - t0) / 1e12


def _chart(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in rows if "median_step_s" in r]
    labels = [f"{r['preset']}\nF={r['frames']}\n{r['mode']}" for r in ok]
    fig, ax = plt.subplots(1, 2, figsize=(max(6, 1.4 * len(ok)), 3.6))
    ax[0].bar(labels, [r["median_step_s"] for r in ok], color=["#c44" if r["mode"] == "naive" else "#48c" for r in ok])
    ax[0].set_ylabel("s / step (median)")
    ax[1].bar(labels, [r["peak_bytes"] / 2**20 for r in ok], color=["#c44" if r["mode"] == "naive" else "#48c" for r in ok])
    ax[1].set_ylabel("peak memory (MiB)")
    for a in ax:
        a.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> int:
    from ..version import __version__
    from .presets import PRESETS

    ap = argparse.ArgumentParser(prog="fastdm-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    ap.add_argument("--preset", default="shapes", help=f"comma-separated: {', '.join(PRESETS)}")
    ap.add_argument("--frames", default="8")
    ap.add_argument("--modes", default="naive,fast",
                    help="plans naive|fast|fast-seq|lean, optionally with an engine for the no-grad calls "
                         "(fast:compile, fast:cudagraphs, fast:ort, fast:trt) and +grad to compile the grad branch too")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per case (after one warm-up step)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="measure every case this many times, in rounds over all modes (a noisy machine drifts "
                         "between runs); s/step is the median of the rounds' medians")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak rate for the roofline (default: measured matmul rate)")
    ap.add_argument("--flops-only", action="store_true", help="count FLOPs on the meta device only (no weights, no timing)")
    ap.add_argument("--no-flops", action="store_true",
                    help="count no FLOPs (device runs): take them from the committed meta counts, edit-*-flops.json")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default=None,
                    help="name part of the result files: edit-TAG-<machine> (default: the preset when one is given)")
    ap.add_argument("--size", default=None, help="WxH instead of the preset's size (e.g. 256x256 for zeroscope-576w)")
    ap.add_argument("--cuda-profile", action="store_true",
                    help="CUDA: one extra, untimed step under the profiler; device time by kind of kernel and the top kernels")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        preset, frames, mode = args.one.split(",")
        print(json.dumps(run_case(preset, int(frames), mode, args.steps, args.device, args.dtype, _size(args.size),
                                  cuda_profile=args.cuda_profile)))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("fastdm-bench: error: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 2

    from ..machine import machine_description, machine_name

    presets, frames_list, modes = args.preset.split(","), [int(f) for f in args.frames.split(",")], args.modes.split(",")
    peak = args.peak_tflops or round(matmul_tflops(args.device, DTYPES[args.dtype]), 3)
    machine = machine_name(args.device)
    tag = args.tag if args.tag is not None else (presets[0] if len(presets) == 1 else None)
    stem = f"edit-{tag + '-' if tag else ''}{machine}" + ("-flops" if args.flops_only else "")
    out = Path(args.out)
    meta = {"machine": machine, "machine_description": machine_description(args.device), "device": args.device,
            "dtype": args.dtype, "peak_tflops": peak, "peak_source": "given" if args.peak_tflops else "measured matmul",
            "timed_steps": args.steps, "rounds": args.repeats, "flops_only": args.flops_only,
            "size": args.size, "flops": "not counted" if args.no_flops else "counted on the meta device in this run"}
    counted: dict[tuple, int | str] = {}  # FLOPs once per (preset, frames, plan): engines do the same arithmetic
    committed = {} if not args.no_flops else committed_flops(args.dtype, _size(args.size))
    rows = []
    for preset in presets:
        for frames in frames_list:
            for mode in modes:
                row = {"preset": preset, "frames": frames, "mode": mode}
                key = (preset, frames, _mode(mode)["plan"])
                if args.no_flops:
                    if key in committed:
                        row["flops_per_step"], row["flops_source"] = committed[key]
                elif key not in counted:
                    try:
                        counted[key] = count_step_flops(preset, frames, mode, DTYPES[args.dtype], _size(args.size))
                    except Exception as e:  # FLOP counting is best effort
                        counted[key] = f"{type(e).__name__}: {e}"[:200]
                if key in counted:
                    if isinstance(counted[key], int):
                        row["flops_per_step"] = counted[key]
                    else:
                        row["flops_error"] = counted[key]
                if "flops_per_step" in row:
                    row["roofline_step_s"] = row["flops_per_step"] / (peak * 1e12)
                rows.append(row)
    if args.flops_only:
        _write(out, stem, rows, meta)
    for rnd in range(0 if args.flops_only else max(1, args.repeats)):
        for row in rows:  # one round over every case, so slow drift of the machine hits all modes alike
            cmd = [sys.executable, "-m", "fastdm.bench.harness", "--one", f"{row['preset']},{row['frames']},{row['mode']}",
                   "--steps", str(args.steps), "--device", args.device, "--dtype", args.dtype,
                   *(["--size", args.size] if args.size else []), *(["--cuda-profile"] if args.cuda_profile else [])]
            p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if p.returncode == 0:
                got = json.loads(p.stdout.strip().splitlines()[-1])
                row.setdefault("rounds", []).append(got)
            else:
                row["error"] = ("killed by signal 9 (on Linux usually the out-of-memory killer)" if p.returncode in (-9, 137)
                                else (p.stderr.strip().splitlines() or ["failed"])[-1][:300])
            print(json.dumps({"round": rnd, **{k: v for k, v in row.items() if k != "rounds"},
                              **(row["rounds"][-1] if p.returncode == 0 else {})}), flush=True)
            # every finished case is on disk at once: a run cut short keeps what it measured
            _write(out, stem, rows, {**meta, "rounds_done": rnd + (row is rows[-1])})
    md, written = _write(out, stem, rows, meta)
    print(md)
    print("wrote", *written)
    return 0


def _finished(rows: list[dict]) -> list[dict]:
    """The rows as reported: each measured case with the median of its rounds so far."""
    done = []
    for row in rows:
        r = {k: v for k, v in row.items() if k != "rounds"}
        rounds = row.get("rounds")
        if rounds and "error" not in row:
            r.update(rounds[-1])
            r["median_step_s"] = statistics.median(x["median_step_s"] for x in rounds)
            r["step_s_rounds"] = [round(x["median_step_s"], 4) for x in rounds]
            r["e2e_200_projected_s"] = statistics.median(x["e2e_200_projected_s"] for x in rounds)
        done.append(r)
    return done


def _write(out: Path, stem: str, rows: list[dict], meta: dict) -> tuple[str, list[Path]]:
    """Write the JSON, markdown (and chart) of the cases measured so far, atomically."""
    from ..io.atomic import write_json_atomic, write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    report = _finished(rows)
    if not meta["flops_only"]:
        report = [r for r in report if "median_step_s" in r or "error" in r]
    md = _markdown(report, meta)
    write_json_atomic(out / f"{stem}.json", {"meta": meta, "rows": report})
    write_text_atomic(out / f"{stem}.md", md)
    written = [out / f"{stem}.json", out / f"{stem}.md"]
    if not meta["flops_only"] and _chart(report, out / f"{stem}.png"):
        written.append(out / f"{stem}.png")
    return md, written


def committed_flops(dtype: str, size=None) -> dict[tuple, tuple[int, str]]:
    """FLOPs per step from the committed meta-device counts (``benchmarks/results/edit-*-flops.json``),
    keyed by (preset, frames, plan): what ``--no-flops`` fills in instead of counting."""
    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    found: dict[tuple, tuple[int, str]] = {}
    for f in sorted(results.glob("edit-*-flops.json")) if results.is_dir() else []:
        data = json.loads(f.read_text())
        if data.get("meta", {}).get("size") != (f"{size[0]}x{size[1]}" if size else None):
            continue
        for r in data.get("rows", []):
            if "flops_per_step" in r:
                found.setdefault((r["preset"], r["frames"], _mode(r["mode"])["plan"]), (r["flops_per_step"], f"committed: {f.name}"))
    return found


def _markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# DreamMotion step: every plan beside the naive and plain baselines ({meta['machine']})", "",
             f"Machine: {meta['machine_description']}. Weights {meta['dtype']}; edited tensor fp32. "
             f"Roofline at {meta['peak_tflops']} TFLOP/s ({meta['peak_source']}). "
             f"{meta.get('timed_steps')} timed steps per run, {meta.get('rounds', 1)} round(s) over all modes; "
             "s / step is the median of the rounds' medians.", ""]
    if meta["flops_only"]:
        lines += ["| preset | frames | mode | TFLOP / step | roofline s / step | roofline 200 steps s |", "|---|---|---|---|---|---|"]
        for r in rows:
            if "flops_per_step" in r:
                lines.append(f"| {r['preset']} | {r['frames']} | {r['mode']} | {r['flops_per_step'] / 1e12:.2f} | "
                             f"{r['roofline_step_s']:.3f} | {200 * r['roofline_step_s']:.1f} |")
        return "\n".join(lines) + "\n"
    lines += ["| preset | frames | mode | s / step | speed vs naive | speed vs plain | engine build s | 200-step edit s (projected) "
              "| peak MiB | working MiB | step tensor peak MiB | memory vs naive | memory vs plain | GFLOP / step | roofline s / step |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "median_step_s" not in r:
            lines.append(f"| {r['preset']} | {r['frames']} | {r['mode']} | error: {r.get('error', '?')} | | | | | | | | | |")
            continue
        def ratios(mode):
            b = next((b for b in rows if b["preset"] == r["preset"] and b["frames"] == r["frames"] and b["mode"] == mode
                      and "median_step_s" in b), None)
            if b is None:
                return "-", "-"
            tp, btp = r.get("tensor_working_peak_bytes"), b.get("tensor_working_peak_bytes")
            return (f"{b['median_step_s'] / r['median_step_s']:.2f}x",
                    f"{btp / tp:.2f}x less" if tp and btp else f"{b['working_peak_bytes'] / max(r['working_peak_bytes'], 1):.2f}x less (working)")

        (sp, mem), (sp_p, mem_p) = ratios("naive"), ratios("plain")
        tp = r.get("tensor_working_peak_bytes")
        tp_s = f"{tp / 2**20:.0f}" if tp else "-"
        fl = f"{r['flops_per_step'] / 1e9:.1f}" if "flops_per_step" in r else "-"
        roof = f"{r['roofline_step_s']:.4f}" if "roofline_step_s" in r else "-"
        lines.append(f"| {r['preset']} | {r['frames']} | {r['mode']} | {r['median_step_s']:.3f} | {sp} | {sp_p} | "
                     f"{r.get('engine_build_s', 0):.1f} | {r['e2e_200_projected_s']:.0f} | {r['peak_bytes'] / 2**20:.0f} | "
                     f"{r['working_peak_bytes'] / 2**20:.0f} | {tp_s} | {mem} | {mem_p} | {fl} | {roof} |")
    lines += ["", "peak = CUDA max allocated (GPU) or process peak RSS (CPU); working = peak minus memory held after the",
              "model was loaded. step tensor peak (CPU) = the most bytes of tensors allocated at once during one step,",
              "above what was live when it began (PyTorch profiler memory events).",
              "memory vs naive/plain compares the step tensor peak where measured (CPU), else the working peak (RSS / CUDA).",
              "engine build = torch.compile / ONNX export / TensorRT build, done once before the first step.",
              "200-step edit = setup + engine build + 200 x median step + decode, each measured."]
    for r in rows:
        prof = r.get("cuda_profile")
        if not prof:
            continue
        lines += ["", f"## Where one step's device time goes: {r['preset']}, {r['frames']} frames, {r['mode']}", "",
                  f"One extra, untimed step under the CUDA profiler: {prof['step_device_ms']:.1f} ms of kernel time "
                  f"(the step's wall time: {1e3 * r['median_step_s']:.1f} ms).", "",
                  "| kind | ms | share |", "|---|---|---|"]
        lines += [f"| {k} | {v:.1f} | {v / max(prof['step_device_ms'], 1e-9):.0%} |" for k, v in prof["by_kind_ms"].items()]
        lines += ["", "| kernel | calls | ms |", "|---|---|---|"]
        lines += [f"| `{t['kernel'].replace('|', '/')}` | {t['calls']} | {t['ms']:.2f} |" for t in prof["top"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
