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

    python -m benchmarks.bench_ssm [--device cuda] [--frames 8,16,24] [--quick]
Writes benchmarks/results/ssm-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

SIZES = [(2880, 320), (720, 640), (180, 1280), (45, 1280)]


def run_one(loss: str, backend: str, n: int, c: int, f: int, device: str, repeats: int) -> dict:
    import resource

    import torch

    from fastdm.losses import spatial_ssm_loss, temporal_ssm_loss

    fn = spatial_ssm_loss if loss == "spatial" else temporal_ssm_loss
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
    return {"median_s": statistics.median(times), "extra_peak_bytes": max(0, peak - base)}


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
    ap.add_argument("--backends", default=None, help="default: naive,torch (+triton on cuda)")
    ap.add_argument("--quick", action="store_true", help="only (2880, 320) at F = 16")
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
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    meta = {"machine": machine_name(args.device), "machine_description": machine_description(args.device),
            "device": args.device, "repeats": args.repeats, "keys_dtype": "float32", "keys_ref": "keys + 1e-3 noise"}
    if args.device == "cuda":
        import torch

        meta["fp32_matmul_tflops"] = round(matmul_tflops("cuda"), 1)
        x = torch.empty(2**28, device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            x.mul_(1.0)
        torch.cuda.synchronize()
        meta["copy_tbps"] = round(5 * 2 * x.numel() * 4 / (time.perf_counter() - t0) / 1e12, 2)
        for r in rows:
            if r["loss"] == "spatial" and r["backend"] == "triton" and "median_s" in r:
                r["roofline_s"] = roofline_s(r["N"], r["C"], r["F"], meta["fp32_matmul_tflops"], meta["copy_tbps"])

    def find(loss, b, n, c, f):
        return next((r for r in rows if (r["loss"], r["backend"], r["N"], r["C"], r["F"]) == (loss, b, n, c, f)), {})

    lines = [f"# S-SSM / T-SSM loss, forward + backward ({meta['machine']})", "",
             f"Machine: {meta['machine_description']}. fp32 keys, keys_ref = keys + 1e-3 noise; median of {args.repeats} runs;",
             "extra peak = peak memory minus what the inputs hold (CUDA max allocated / process peak RSS).", ""]
    if "fp32_matmul_tflops" in meta:
        lines += [f"Roofline inputs: fp32 (IEEE) matmul {meta['fp32_matmul_tflops']} TFLOP/s, copy {meta['copy_tbps']} TB/s.", ""]
    lines += ["| loss | N | C | F | backend | median s | extra peak MiB | speed-up vs naive | memory vs naive |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = find(r["loss"], "naive", r["N"], r["C"], r["F"])
        if "median_s" not in r:
            lines.append(f"| {r['loss']} | {r['N']} | {r['C']} | {r['F']} | {r['backend']} | error: {r['error']} | | | |")
            continue
        sp = f"{base['median_s'] / r['median_s']:.1f}x" if base.get("median_s") else "-"
        mem = f"{base['extra_peak_bytes'] / max(r['extra_peak_bytes'], 1):.1f}x less" if base.get("extra_peak_bytes") else "-"
        roof = f" (roofline {r['roofline_s'] * 1e3:.2f} ms)" if "roofline_s" in r else ""
        lines.append(f"| {r['loss']} | {r['N']} | {r['C']} | {r['F']} | {r['backend']} | {r['median_s']:.4f}{roof} | "
                     f"{r['extra_peak_bytes'] / 2**20:.0f} | {sp} | {mem} |")
    j, m = write_results(f"ssm-{meta['machine']}", {"meta": meta, "rows": rows}, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print("wrote", j, m)


if __name__ == "__main__":
    main()
