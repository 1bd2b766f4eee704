"""Ahead-of-time compile of every Triton kernel at the configurations the dispatch launches.

    python -m fastdm.kernels.aot [--targets 80,86,89,90] [--dtypes fp32,fp16,bf16] [--out PREFIX] [--jobs 2]
                                 [--config gram3:BN=32,BC=64,w8,s2 ...]   (a candidate configuration instead)

Runs on a CPU (no GPU, no driver): the real dispatch (S-SSM forward + backward in both
algorithms, T-SSM, the fused key statistics) is run on CPU tensors of every ZeroScope key size
(576x320 video, latent 72x40: N, C = 2880, 320; 720, 640; 180, 1280; 45, 1280; 16 frames) with
its launches *recorded* (:func:`fastdm.kernels.launch.recording`), so the compiled
specializations are exactly what a GPU run launches: same constexprs (block sizes, precision),
same num_warps / num_stages, same integer and pointer specializations (Triton's own
``native_specialize_impl``). Distinct specializations are compiled once with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))``; ptxas (in the Triton wheel)
reports registers and spills, the compiled metadata the shared memory, the PTX whether
tensor-core instructions (mma.sync / wgmma) are used.

Fails (exit 1) on a compile error, shared memory above the target's per-block opt-in limit, or
spills above :data:`SPILL_BUDGET_BYTES`. Must run with ``TRITON_INTERPRET`` unset or 0.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor

SIZES = [(2880, 320), (720, 640), (180, 1280), (45, 1280)]
FRAMES = 16
# per-block shared memory limit (opt-in maximum) and an SM count of a typical card of each target
TARGETS = {
    80: {"name": "sm_80", "arch": 80, "shared_limit": 166912, "sm_count": 108},   # A100
    86: {"name": "sm_86", "arch": 86, "shared_limit": 101376, "sm_count": 84},    # RTX 3090 / A40
    89: {"name": "sm_89", "arch": 89, "shared_limit": 101376, "sm_count": 128},   # RTX 4090 / L40
    90: {"name": "sm_90a", "arch": 90, "shared_limit": 232448, "sm_count": 132},  # H100 SXM
}
SPILL_BUDGET_BYTES = 0


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def record_launches(dtype_name: str, sm_count: int, sizes=SIZES, frames: int = FRAMES) -> list[dict]:
    """Run the dispatch on CPU tensors with launches recorded; return the launch records."""
    import torch

    from .key_stats import pair_stats
    from .launch import recording
    from .ssm_spatial import SpatialSSMTriton
    from .ssm_temporal import TemporalSSMTriton

    dt = _dtype(dtype_name)
    out = []
    with recording(sm=sm_count, precision="tf32x3") as launches:
        for n, c in sizes:
            k = torch.zeros(frames, n, c, dtype=dt)
            r = torch.zeros(frames, n, c, dtype=dt)
            kk = k.clone().requires_grad_(True)
            SpatialSSMTriton.apply(kk, r, None).backward()
            TemporalSSMTriton.apply(k[None], r[None], None)
            pair_stats(k, r)
            for rec in launches:
                rec["shape"] = (frames, n, c)
            out += launches
            launches.clear()
    return out


def specialize(rec: dict) -> dict:
    """Signature, constexprs, attrs and options of a recorded launch, as Triton's JIT would make them."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    fn = rec["fn"]
    names = fn.arg_names
    sig, const, attrs = {}, {}, {}
    for i, (name, val) in enumerate(zip(names, rec["args"])):
        ty, spec = native_specialize_impl(CUDABackend, val, False, True, True)
        sig[name] = ty
        if ty == "constexpr":
            const[name] = spec
        elif isinstance(spec, str) and spec:
            attrs[(i,)] = CUDABackend.parse_attr(spec)
    for name, val in rec["meta"].items():
        sig[name] = "constexpr"
        const[name] = val
    sig = {n: sig[n] for n in names}
    return {"kernel": rec["name"], "fn": fn, "signature": sig, "constexprs": const, "attrs": attrs,
            "options": {"num_warps": rec["num_warps"], "num_stages": rec["num_stages"]}}


def _key(spec: dict, arch: int) -> str:
    return json.dumps([spec["kernel"], spec["signature"], sorted(spec["constexprs"].items()),
                       sorted((list(k), v) for k, v in spec["attrs"].items()), spec["options"], arch], default=str)


def compile_one(job: tuple) -> dict:
    """Compile one specialization for one target; return its resource usage (runs in a worker)."""
    os.environ["TRITON_INTERPRET"] = "0"
    kernel, fn_mod, fn_name, sig, const, attrs, options, arch = job
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(fn_mod), fn_name)
    knobs.nvidia.dump_ptxas_log = True
    # a cached kernel skips ptxas, and with it the register and spill report: always compile (a warm cache
    # had made the spill check pass with nothing to read)
    knobs.compilation.always_compile = True
    buf = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(buf):
            ck = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # compile error: reported, fails the check
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:400]}
    log = buf.getvalue()
    regs = re.findall(r"Used (\d+) registers", log)
    if not regs:  # no ptxas report: nothing to check, so the check fails rather than pass on nothing
        return {"error": "ptxas reported no register / spill usage (was the compile skipped?)"}
    spill_st = re.findall(r"(\d+) bytes spill stores", log)
    spill_ld = re.findall(r"(\d+) bytes spill loads", log)
    ptx = ck.asm.get("ptx", "")
    mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma" if re.search(r"\bmma\.sync", ptx) else "none")
    return {"regs": int(regs[-1]) if regs else None,
            "spill_stores": int(spill_st[-1]) if spill_st else 0, "spill_loads": int(spill_ld[-1]) if spill_ld else 0,
            "shared": int(ck.metadata.shared), "num_warps": ck.metadata.num_warps, "tensor_cores": mma,
            "compile_s": round(time.perf_counter() - t0, 2), "ptxas_log": log.strip()[-600:] if not regs else None}


def collect_jobs(targets: list[int], dtypes: list[str], sizes=SIZES, frames: int = FRAMES):
    jobs, rows = {}, []
    for arch in targets:
        for dt in dtypes:
            for rec in record_launches(dt, TARGETS[arch]["sm_count"], sizes, frames):
                spec = specialize(rec)
                key = _key(spec, arch)
                if key not in jobs:
                    fn = spec["fn"]
                    jobs[key] = (spec["kernel"], fn.fn.__module__, fn.fn.__name__, spec["signature"], spec["constexprs"],
                                 spec["attrs"], spec["options"], arch)
                rows.append({"target": TARGETS[arch]["name"], "dtype": dt, "kernel": spec["kernel"],
                             "shape": list(rec["shape"]), "meta": {k: v for k, v in rec["meta"].items()},
                             "num_warps": rec["num_warps"], "num_stages": rec["num_stages"], "key": key})
    return jobs, rows


def check(targets=(80, 86, 89, 90), dtypes=("fp32", "fp16", "bf16"), jobs_n: int = 2, sizes=SIZES, frames: int = FRAMES):
    """Compile everything; return (rows, failures, summary)."""
    jobs, rows = collect_jobs(list(targets), list(dtypes), sizes, frames)
    keys = list(jobs)
    t0 = time.perf_counter()
    if jobs_n > 1:
        with ProcessPoolExecutor(jobs_n) as ex:
            results = dict(zip(keys, ex.map(compile_one, [jobs[k] for k in keys])))
    else:
        results = {k: compile_one(jobs[k]) for k in keys}
    wall = time.perf_counter() - t0
    failures = []
    for row in rows:
        res = results[row.pop("key")]
        row.update(res)
        limit = TARGETS[next(a for a in TARGETS if TARGETS[a]["name"] == row["target"])]["shared_limit"]
        what = f"{row['kernel']} {row['target']} {row['dtype']} {tuple(row['shape'])}"
        if "error" in res:
            failures.append(f"{what}: compile error {res['error']}")
        else:
            if res["shared"] > limit:
                failures.append(f"{what}: shared memory {res['shared']} B > {limit} B")
            if res["spill_stores"] + res["spill_loads"] > SPILL_BUDGET_BYTES:
                failures.append(f"{what}: spills {res['spill_stores']} B stores / {res['spill_loads']} B loads")
    summary = {"distinct_compiles": len(keys), "compile_wall_s": round(wall, 1)}
    return rows, failures, summary


def write_report(rows: list[dict], failures: list[str], summary: dict, prefix: str) -> None:
    import triton

    meta = {"triton": triton.__version__, "sizes_NC": SIZES, "frames": FRAMES, "spill_budget_bytes": SPILL_BUDGET_BYTES,
            "shared_limits": {t["name"]: t["shared_limit"] for t in TARGETS.values()},
            "sm_counts_assumed": {t["name"]: t["sm_count"] for t in TARGETS.values()}, **summary}
    with open(prefix + ".json", "w") as f:
        json.dump({"meta": meta, "failures": failures, "rows": rows}, f, indent=1, default=str)
    # table: one line per kernel x target x dtype (sizes merged: worst case over sizes)
    agg: dict = {}
    for r in rows:
        k = (r["kernel"], r["target"], r["dtype"])
        a = agg.setdefault(k, {"regs": 0, "spills": 0, "shared": 0, "tc": set(), "cfgs": set(), "err": None})
        if "error" in r:
            a["err"] = r["error"]
            continue
        a["regs"] = max(a["regs"], r["regs"] or 0)
        a["spills"] = max(a["spills"], r["spill_stores"] + r["spill_loads"])
        a["shared"] = max(a["shared"], r["shared"])
        a["tc"].add(r["tensor_cores"])
        cfg = ",".join(f"{m}={v}" for m, v in r["meta"].items()) + f",w{r['num_warps']},s{r['num_stages']}"
        a["cfgs"].add(cfg)
    lines = [f"# Triton kernels, AOT compile (Triton {triton.__version__}, on a CPU)", "",
             "Generated by `python -m fastdm.kernels.aot` (run by `tests/test_kernels_aot.py`): every kernel at the",
             f"configurations the dispatch launches for the ZeroScope key sizes (N, C) = {SIZES}, {FRAMES} frames,",
             "fp32/fp16/bf16 keys, S-SSM forward+backward (both algorithms), T-SSM, fused key statistics.",
             f"{summary['distinct_compiles']} distinct specializations compiled in {summary['compile_wall_s']} s."
             + (f" Candidate configurations instead of the dispatch's: {summary['configs_overridden']}."
                if summary.get("configs_overridden") else ""),
             "Per kernel x target x dtype the worst case over the sizes: registers per thread, spill bytes",
             "(stores + loads, ptxas -v), shared memory per block (bytes), tensor-core instructions in the PTX.", "",
             "Shared memory limits per block: " + ", ".join(f"{t['name']} {t['shared_limit']}" for t in TARGETS.values())
             + f"; spill budget {SPILL_BUDGET_BYTES} B.", ""]
    per_target: dict = {}
    for (kern, tgt, dt), a in agg.items():
        p = per_target.setdefault(tgt, {"regs": 0, "spills": 0, "shared": 0})
        p["regs"], p["spills"], p["shared"] = max(p["regs"], a["regs"]), max(p["spills"], a["spills"]), max(p["shared"], a["shared"])
    lines += ["| target | max registers | max spill bytes | max shared B |", "|---|---|---|---|"]
    lines += [f"| {t} | {p['regs']} | {p['spills']} | {p['shared']} |" for t, p in per_target.items()]
    lines += ["", "| kernel | target | dtype | registers | spills B | shared B | tensor cores | configs |",
              "|---|---|---|---|---|---|---|---|"]
    for (kern, tgt, dt), a in sorted(agg.items()):
        if a["err"]:
            lines.append(f"| {kern} | {tgt} | {dt} | error: {a['err'][:80]} | | | | |")
            continue
        lines.append(f"| {kern} | {tgt} | {dt} | {a['regs']} | {a['spills']} | {a['shared']} | "
                     f"{'/'.join(sorted(a['tc']))} | {'; '.join(sorted(a['cfgs']))} |")
    lines += ["", "Failures: " + ("none" if not failures else ""), *[f"- {f}" for f in failures]]
    with open(prefix + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def parse_config(text: str):
    """``KERNEL:NAME=V,...,wW,sS`` (e.g. ``gram3:BN=32,BC=64,w8,s2``) -> (kernel, KernelConfig)."""
    from .launch import KernelConfig

    kernel, _, rest = text.partition(":")
    meta, warps, stages = {}, 4, 2
    for part in filter(None, rest.split(",")):
        if "=" in part:
            k, v = part.split("=", 1)
            meta[k] = int(v)
        elif part[0] == "w":
            warps = int(part[1:])
        elif part[0] == "s":
            stages = int(part[1:])
        else:
            raise ValueError(f"--config {text!r}: {part!r} is not NAME=VALUE, wN or sN")
    if not kernel or not meta:
        raise ValueError(f"--config {text!r}: give KERNEL:NAME=VALUE,...[,wN][,sN]")
    return kernel, KernelConfig(meta, warps, stages)


@contextlib.contextmanager
def configs_overridden(overrides: dict):
    """The dispatch launches ``overrides[kernel]`` instead of ``config_for``'s choice (for a report on candidate
    configurations: the launches are recorded and compiled as usual)."""
    from . import key_stats, launch, ssm_spatial, ssm_temporal

    orig = launch.config_for

    def config_for(kernel, n, c, dtype=None):
        if kernel in overrides:
            return overrides[kernel]
        return orig(kernel, n, c) if dtype is None else orig(kernel, n, c, dtype)

    mods = (launch, key_stats, ssm_spatial, ssm_temporal)
    for m in mods:
        m.config_for = config_for
    try:
        yield
    finally:
        for m in mods:
            m.config_for = orig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=[], metavar="KERNEL:NAME=V,...,wW,sS",
                    help="compile this configuration of a kernel instead of the dispatch's (a candidate's report)")
    ap.add_argument("--targets", default="80,86,89,90")
    ap.add_argument("--dtypes", default="fp32,fp16,bf16")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", default=None, help="write PREFIX.md and PREFIX.json")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("fastdm.kernels.aot: run with TRITON_INTERPRET unset or 0", file=sys.stderr)
        return 2
    overrides = dict(parse_config(c) for c in args.config)
    with configs_overridden(overrides):
        rows, failures, summary = check([int(t) for t in args.targets.split(",")], args.dtypes.split(","), args.jobs)
    if overrides:
        summary["configs_overridden"] = {k: f"{c.meta}, w{c.num_warps}, s{c.num_stages}" for k, c in overrides.items()}
    if args.out:
        write_report(rows, failures, summary, args.out)
    print(json.dumps(summary))
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
