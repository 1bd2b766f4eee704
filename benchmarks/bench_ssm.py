"""S-SSM / T-SSM loss benchmark: materialized vs PyTorch form vs Triton, forward + backward.

At ZeroScope's key sizes (N, C) = (2880, 320), (720, 640), (180, 1280), (45, 1280) (576x320 video,
the four UNet levels) and F = 8, 16, 24 frames. Each case runs in a fresh process so its peak
memory is its own: CUDA max allocated on GPU, peak RSS on CPU, minus what the inputs already
hold ("extra peak"). Median of ``--repeats`` timed forward+backward runs after one warm-up.

Backends: ``naive`` (materializes the N x N similarity matrices), ``torch`` (the cancellation-free
C x C form) and ``triton`` (fused kernels; GPU only — the CPU interpreter is not timed).
On a GPU the results also state the roofline of the Triton S-SSM: one read of keys and keys_ref
(forward, and again in the backward, plus the gradient write) against the C x C FLOPs at the
card's measured fp32 (IEEE, no TF32) matmul rate.

On CUDA the Triton rows also give each kernel's achieved fraction of its roofline: the kernel's
device time (torch.profiler, one forward+backward) against max(FLOPs / peak, bytes / bandwidth)
with the card's datasheet peaks (:data:`PEAKS`; TF32x3 products count 3 TF32 passes, the fp32
kernels without tensor cores count against the fp32 non-tensor peak; bytes = compulsory traffic).

    python -m benchmarks.bench_ssm [--device cuda] [--frames 8,16,24] [--quick]
Writes benchmarks/results/ssm-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = [(2880, 320), (720, 640), (180, 1280), (45, 1280)]

# Datasheet peaks (dense): TFLOP/s fp32 without tensor cores, tf32 / bf16 (= fp16) tensor cores,
# TB/s memory bandwidth. Matched against torch.cuda.get_device_name() by substring, first match.
PEAKS = [
    ("H200", {"fp32": 67.0, "tf32": 495.0, "bf16": 989.0, "tbps": 4.8}),
    ("H100 PCIe", {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0, "tbps": 2.0}),
    ("H100", {"fp32": 67.0, "tf32": 495.0, "bf16": 989.0, "tbps": 3.35}),  # SXM
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "tbps": 2.0}),
    ("L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.0, "tbps": 0.864}),
    ("4090", {"fp32": 82.6, "tf32": 82.6, "bf16": 165.0, "tbps": 1.008}),
    ("3090", {"fp32": 35.6, "tf32": 35.6, "bf16": 71.0, "tbps": 0.936}),
    ("A10", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "tbps": 0.6}),
]


def peaks_for(name: str) -> dict | None:
    return next((p for key, p in PEAKS if key in name), None)


def kernel_work(kernel: str, n: int, c: int, f: int, itemsize: int = 4) -> tuple[float, float, str]:
    """(FLOPs counted at the peak named by the 3rd item, compulsory bytes, peak) of one launch set.

    TF32x3 dots execute 3 TF32 passes: their useful FLOPs are multiplied by 3 against the tf32 peak."""
    keys = f * n * c * itemsize
    if "gram3" in kernel:  # 3 C x C grams over N, tf32x3
        return 3 * 3 * 2.0 * f * n * c * c, 2 * keys + 3 * f * c * c * 4, "tf32"
    if "grad_gram" in kernel:  # D G_A + B P
        return 3 * 2 * 2.0 * f * n * c * c, 2 * keys + 2 * f * c * c * 4 + f * n * c * 4, "tf32"
    if "tiles_fwd" in kernel:  # upper-triangle X tiles, 2 products over C
        return 3 * 2 * 2.0 * f * n * n * c / 2, 2 * keys + f * n * n * 4, "tf32"
    if "tiles_bwd" in kernel:  # X A
        return 3 * 2.0 * f * n * n * c, keys + f * n * n * 4 + f * n * c * 4, "tf32"
    if "row_fixup" in kernel:
        return 0.0, keys + f * n * c * 4 + keys, "fp32"
    return 0.0, 2 * keys, "fp32"  # row_stats, pair_stats, frame_sums: one read of keys and keys_ref


def kernel_rooflines(step, n: int, c: int, f: int, device_name: str) -> list[dict]:
    """Per Triton kernel of one forward+backward: device time and achieved fraction of its roofline."""
    from torch.profiler import ProfilerActivity, profile

    peaks = peaks_for(device_name)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
    out = []
    for ev in prof.key_averages():
        if not ev.key.startswith("_") or "kernel" not in ev.key:
            continue
        t = (getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)) * 1e-6
        row = {"kernel": ev.key, "time_s": t, "calls": ev.count}
        if peaks and t > 0:
            flops, byts, kind = kernel_work(ev.key, n, c, f)
            roof = max(flops / (peaks[kind] * 1e12), byts / (peaks["tbps"] * 1e12))
            row.update(roofline_s=roof, fraction=roof / t, bound="flops" if flops / (peaks[kind] * 1e12) > byts / (peaks["tbps"] * 1e12) else "bandwidth")
        out.append(row)
    return out


def run_one(loss: str, backend: str, n: int, c: int, f: int, device: str, repeats: int) -> dict:
    import resource

    import torch

    from fastdm.losses import spatial_ssm_loss, temporal_ssm_loss

    fn = spatial_ssm_loss if loss == "spatial" else temporal_ssm_loss
    tuned = backend == "triton-autotune"  # the Triton kernels under @triton.autotune over launch.AUTOTUNE_CONFIGS
    if tuned:
        os.environ["FASTDM_TRITON_AUTOTUNE"] = "1"
        backend = "triton"
    gen = torch.Generator().manual_seed(0)
    kr = torch.randn(f, n, c, generator=gen).to(device)
    k = (kr + 1e-3 * torch.randn(f, n, c, generator=gen).to(device)).requires_grad_(True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        k.grad = None
        fn(k, kr, backend=backend).backward()
        sync()

    if device == "cuda":  # what the inputs hold; peaks are measured from here on
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()  # warm-up (compiles Triton kernels)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res = {"median_s": statistics.median(times), "extra_peak_bytes": max(0, peak - base)}
    if device == "cuda" and backend == "triton":
        res["device_name"] = torch.cuda.get_device_name()
        res["kernels"] = kernel_rooflines(step, n, c, f, res["device_name"])
    if tuned:  # what the autotuner chose, per kernel
        from fastdm.kernels import launch as L

        res["autotuned"] = {name: str(getattr(fn_, "best_config", None)) for name, fn_ in L._AUTOTUNED.items()}
    return res


def matmul_tflops(device: str) -> float:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(8192, 8192, device=device)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12


def roofline_s(n: int, c: int, f: int, tflops: float, tbps: float) -> float:
    flops = f * (3 * 2 * n * c * c + 2 * 2 * n * c * c)  # forward 3 grams, backward 2 products
    byts = f * n * c * 4 * (2 + 2 + 1)  # keys + keys_ref read forward and backward, gradient written
    return max(flops / (tflops * 1e12), byts / (tbps * 1e12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--frames", default="8,16,24")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default=None, help="default: naive,torch (+triton on cuda); also triton-autotune "
                    "(FASTDM_TRITON_AUTOTUNE=1: the best of launch.AUTOTUNE_CONFIGS, the choice recorded)")
    ap.add_argument("--quick", action="store_true", help="only (2880, 320) at F = 16")
    ap.add_argument("--out", default=None, help="folder for ssm-<machine>.{json,md} (default: benchmarks/results)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        loss, backend, n, c, f = args.one.split(",")
        print(json.dumps(run_one(loss, backend, int(n), int(c), int(f), args.device, args.repeats)))
        return

    from benchmarks.common import machine_description, machine_name, write_results

    backends = args.backends.split(",") if args.backends else ["naive", "torch"] + (["triton"] if args.device == "cuda" else [])
    frames = [16] if args.quick else [int(x) for x in args.frames.split(",")]
    sizes = SIZES[:1] if args.quick else SIZES
    meta = {"machine": machine_name(args.device), "machine_description": machine_description(args.device),
            "device": args.device, "repeats": args.repeats, "keys_dtype": "float32", "keys_ref": "keys + 1e-3 noise"}
    if args.device == "cuda":  # the roofline inputs first, so every row written below can carry its roofline
        import torch

        meta["fp32_matmul_tflops"] = round(matmul_tflops("cuda"), 1)
        x = torch.empty(2**28, device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            x.mul_(1.0)
        torch.cuda.synchronize()
        meta["copy_tbps"] = round(5 * 2 * x.numel() * 4 / (time.perf_counter() - t0) / 1e12, 2)
        del x
        torch.cuda.empty_cache()
    out = Path(args.out) if args.out else None
    rows = []
    for loss in ("spatial", "temporal"):
        for n, c in sizes:
            for f in frames:
                for b in backends:
                    cmd = [sys.executable, "-m", "benchmarks.bench_ssm", "--device", args.device, "--repeats", str(args.repeats),
                           "--one", f"{loss},{b},{n},{c},{f}"]
                    p = subprocess.run(cmd, capture_output=True, text=True)
                    if p.returncode != 0:
                        res = {"error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
                    else:
                        res = json.loads(p.stdout.strip().splitlines()[-1])
                    row = {"loss": loss, "backend": b, "N": n, "C": c, "F": f, **res}
                    if "copy_tbps" in meta and loss == "spatial" and b.startswith("triton") and "median_s" in row:
                        row["roofline_s"] = roofline_s(n, c, f, meta["fp32_matmul_tflops"], meta["copy_tbps"])
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    write(rows, meta, out, write_results)  # every finished case on disk at once
    md, (j, m) = write(rows, meta, out, write_results)
    print(md)
    print("wrote", j, m)


def write(rows: list[dict], meta: dict, out: Path | None, write_results) -> tuple[str, tuple[Path, Path]]:
    """The markdown of the rows so far, written with the JSON (to ``out`` or benchmarks/results)."""
    md = markdown(rows, meta)
    return md, write_results(f"ssm-{meta['machine']}", {"meta": meta, "rows": rows}, md, out)


def markdown(rows: list[dict], meta: dict) -> str:
    def find(loss, b, n, c, f):
        return next((r for r in rows if (r["loss"], r["backend"], r["N"], r["C"], r["F"]) == (loss, b, n, c, f)), {})

    lines = [f"# S-SSM / T-SSM loss, forward + backward ({meta['machine']})", "",
             f"Machine: {meta['machine_description']}. fp32 keys, keys_ref = keys + 1e-3 noise; median of {meta['repeats']} runs;",
             "extra peak = peak memory minus what the inputs hold (CUDA max allocated / process peak RSS).", ""]
    if "fp32_matmul_tflops" in meta:
        lines += [f"Roofline inputs: fp32 (IEEE) matmul {meta['fp32_matmul_tflops']} TFLOP/s, copy {meta['copy_tbps']} TB/s.", ""]
    lines += ["| loss | N | C | F | backend | median s | extra peak MiB | speed-up vs naive | memory vs naive | fraction of roofline |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = find(r["loss"], "naive", r["N"], r["C"], r["F"])
        if "median_s" not in r:
            lines.append(f"| {r['loss']} | {r['N']} | {r['C']} | {r['F']} | {r['backend']} | error: {r['error']} | | | | |")
            continue
        sp = f"{base['median_s'] / r['median_s']:.1f}x" if base.get("median_s") else "-"
        mem = f"{base['extra_peak_bytes'] / max(r['extra_peak_bytes'], 1):.1f}x less" if base.get("extra_peak_bytes") else "-"
        roof = f" (roofline {r['roofline_s'] * 1e3:.2f} ms)" if "roofline_s" in r else ""
        frac = f"{100 * r['roofline_s'] / r['median_s']:.0f}%" if "roofline_s" in r else "-"
        lines.append(f"| {r['loss']} | {r['N']} | {r['C']} | {r['F']} | {r['backend']} | {r['median_s']:.4f}{roof} | "
                     f"{r['extra_peak_bytes'] / 2**20:.0f} | {sp} | {mem} | {frac} |")
    kern_rows = [(r, k) for r in rows for k in r.get("kernels", []) if "fraction" in k]
    if kern_rows:
        lines += ["", "Per Triton kernel, one forward+backward: device time vs roofline max(FLOPs / peak, bytes / bandwidth)",
                  f"(datasheet peaks for {kern_rows[0][0].get('device_name')}, see PEAKS in benchmarks/bench_ssm.py).", "",
                  "| loss | N | C | F | kernel | calls | device ms | roofline ms | bound | fraction of roofline |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r, k in kern_rows:
            lines.append(f"| {r['loss']} | {r['N']} | {r['C']} | {r['F']} | {r['backend']}: {k['kernel']} | {k['calls']} | "
                         f"{k['time_s'] * 1e3:.3f} | {k['roofline_s'] * 1e3:.3f} | {k['bound']} | {100 * k['fraction']:.0f}% |")
    tuned = [r for r in rows if r.get("autotuned")]
    if tuned:
        lines += ["", "triton-autotune chose (per kernel, over fastdm.kernels.launch.AUTOTUNE_CONFIGS):", ""]
        lines += [f"- {r['loss']} N={r['N']} C={r['C']} F={r['F']}: " + "; ".join(f"{k}: {v}" for k, v in r["autotuned"].items())
                  for r in tuned]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
