"""Peak GPU memory of a DreamMotion edit, projected on the CPU before any GPU run.

The model is built on the ``meta`` device (shapes and dtypes, no storage, no FLOPs), and one step
of each execution plan runs there under a simulated allocator: a ``TorchDispatchMode`` that sees
every aten op (forward, autograd's backward, checkpoint recomputation), counts each new tensor
storage's bytes when an op creates it and frees them when the storage dies (``weakref.finalize``),
and keeps the peak of the live total. Views share their storage, in-place ops create none, so the
count is the live tensor bytes an allocator would hold, with nothing rounded.

On meta, ``scaled_dot_product_attention`` would take the math path and materialize the N x N
scores; the projection instead calls the fused kernel the target device picks (CUDA: flash
attention for fp16/bf16, memory-efficient attention for fp32 or with an attention mask; CPU: the CPU
flash kernel), whose meta kernels give the true output and saved-for-backward sizes.

Projected peak = weights and buffers (UNet + VAE; the text encoder is released after the prompts)
+ the edit's tensors held across steps (edited, source video, noise, prompt embeddings)
+ max(step working peak, VAE encode working peak, VAE decode working peak).

Not projected, so a real GPU peak lies above: cuBLAS / cuDNN workspaces (convolution algorithm
scratch can be hundreds of MiB), the caching allocator's rounding and fragmentation, the Triton
loss kernels' own choices (on meta the torch loss backend runs), and anything torch.compile or an
engine adds. The method is checked against the CPU allocator's count (PyTorch profiler memory
events, ``fastdm.driver.budget.trace_tensor_peak``) on models small enough to run here; the
GPU comparison is ``tools/gpu_check.sh``'s job.

    python -m benchmarks.project_memory                     # zeroscope-576w x 16,24 frames x plans
    python -m benchmarks.project_memory --check-only        # the CPU check alone
    python -m benchmarks.project_memory --preset zeroscope-576w --frames 24 --dtype bf16 --out DIR
    python -m benchmarks.project_memory --measured gpu-results/edit-*.json   # compare with a GPU run

Writes ``<out>/memory-projection[-<preset>]-<target>-<dtype>.{json,md}`` (default out: benchmarks/results).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GiB = 2**30
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GOAL = ("lean", 24, 8 * 10**9)  # the goal: lean at 24 frames within 8 GB
GOALS = {  # per preset: (plan, frames, limit in bytes); the first is also written as meta["goal"]
    "zeroscope-576w": [GOAL],
    "wan2.1-t2v-1.3b": [("fast", 33, 16 * 10**9), ("lean", 33, 10 * 10**9), ("lean", 81, 24 * 10**9)],  # issue 12
}


class LiveBytes(TorchDispatchMode):
    """A simulated allocator: live bytes of the tensor storages created while it is active."""

    def __init__(self, devices: tuple[str, ...] | None = ("meta",)):
        super().__init__()
        self.devices = devices  # None: tensors on every device
        self.live = 0
        self.peak = 0
        self.allocs = 0
        self._seen: dict[int, weakref.finalize] = {}

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.pop(key, None)
        self.live -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        fin = self._seen.get(key)
        if fin is not None and fin.alive:
            return
        nbytes = st.nbytes()
        self._seen[key] = weakref.finalize(st, self._free, key, nbytes)
        self.live += nbytes
        self.allocs += 1
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            # a view or an in-place result shares an input's storage: nothing new. (Counting it would count
            # a storage made before the mode, e.g. a weight behind linear's transposed view, as an allocation.)
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and (self.devices is None or t.device.type in self.devices):
                self._track(t)
        return out

    def __exit__(self, *exc):
        # storages still alive are kept by the caller; stop watching them
        for fin in list(self._seen.values()):
            fin.detach()
        self._seen.clear()
        return super().__exit__(*exc)


@contextlib.contextmanager
def fused_attention(target: str):
    """``F.scaled_dot_product_attention`` on meta tensors as the fused kernel ``target`` would run."""
    F = torch.nn.functional
    original = F.scaled_dot_product_attention
    aten = torch.ops.aten

    def sdpa(q=None, k=None, v=None, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        q, k, v = kw.pop("query", q), kw.pop("key", k), kw.pop("value", v)  # diffusers' dispatcher passes keywords
        kw = {k: v for k, v in kw.items() if not (k == "enable_gqa" and not v)}  # diffusers' dispatcher passes it
        if q.device.type != "meta" or kw or q.dim() != 4:
            return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
        if attn_mask is not None:  # (HunyuanVideo's text padding mask) flash takes no mask: the kernels that do
            # a boolean mask becomes an additive bias of the mask's own shape, broadcast (not copied) over heads/queries
            bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device)
            bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            if target == "cpu":
                return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, attn_mask=bias,
                                                                        scale=scale)[0]
            need_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
            return aten._scaled_dot_product_efficient_attention(q, k, v, bias, need_lse, dropout_p, is_causal, scale=scale)[0]
        if target == "cpu":
            return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, scale=scale)[0]
        if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
            return aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)[0]
        need_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        return aten._scaled_dot_product_efficient_attention(q, k, v, None, need_lse, dropout_p, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _module_bytes(*mods) -> int:
    return sum(t.numel() * t.element_size() for m in mods if m is not None for t in [*m.parameters(), *m.buffers()])


def _backbone(preset: str, device: str, dtype: torch.dtype):
    from fastdm.bench.presets import build_backbone

    if device == "meta" and preset in ("tiny", "shapes"):
        return build_backbone(preset, "cpu", dtype).to("meta")  # small: built for real, then moved
    return build_backbone(preset, device, dtype)


def _setup(bb, frames: int, size, plan_name: str, device: str, layers=None):
    from fastdm.driver.config import EditConfig
    from fastdm.driver.plan import PLANS
    from fastdm.driver.step import DreamMotionStep
    from fastdm.losses import VDDSConfig
    from fastdm.taps import resolve_layers

    cfg = EditConfig("a red circle moving right", "a blue circle moving right")
    layers = resolve_layers(bb, layers)
    shape = bb.working_shape(frames, size)
    gen = torch.Generator().manual_seed(0)
    text = torch.randn(3, *bb.text_embedding_shape(), generator=gen).to(device, bb.dtype)
    x_src = torch.randn(shape, generator=gen).to(device)
    noise = torch.randn(shape, generator=gen).to(device)
    x = torch.nn.Parameter(x_src + 0.01 * torch.randn(shape, generator=gen).to(device))
    step = DreamMotionStep(bb, cfg, PLANS[plan_name], VDDSConfig(), layers, frames, text, None)
    held = sum(t.numel() * t.element_size() for t in (text, x_src, noise, x))
    return step, (x, x_src, noise), held


def project_step(bb, frames: int, size, plan_name: str, target: str = "cuda", layers=None) -> dict:
    """Simulated-allocator working peak of one step of ``plan_name`` on the meta backbone ``bb``
    (``layers``: tap-layer glob patterns; None = the backbone's default)."""
    step, (x, x_src, noise), held = _setup(bb, frames, size, plan_name, "meta", layers)
    t = bb.info.num_train_timesteps // 2
    with fused_attention(target), LiveBytes() as mode:
        step(x, x_src, t, noise)
    return {"step_working_bytes": mode.peak, "held_bytes": held, "allocs": mode.allocs}


def project_vae(bb, frames: int, size, tiling: bool, target: str = "cuda") -> dict:
    """Working peak of the VAE encode (prepare) and decode (end) of the clip, on meta."""
    if getattr(bb, "vae", None) is None:
        return {"encode_working_bytes": 0, "decode_working_bytes": 0}
    w, h = size
    out = {}
    with bb.vae_tiling(tiling), fused_attention(target), torch.no_grad():
        frames_t = torch.zeros(frames, 3, h, w, device="meta")
        with LiveBytes() as mode:
            x = bb.to_working(frames_t)
        out["encode_working_bytes"] = mode.peak
        if hasattr(bb, "decode_working"):  # a backbone that decodes on its device (Wan: the whole clip, causally)
            with LiveBytes() as mode:
                bb.decode_working(x)
            out["decode_working_bytes"] = mode.peak
            return out
        sf = bb.vae.config.scaling_factor
        with LiveBytes() as mode:  # from_working without its final copy to the host
            lat = x[0].permute(1, 0, 2, 3)
            torch.cat([bb.vae.decode((f[None] / sf).to(bb.dtype)).sample.float() for f in lat]).clamp(-1, 1)
        out["decode_working_bytes"] = mode.peak
    return out


def project(preset: str, frames_list, plans, dtype: torch.dtype, target: str = "cuda", layers=None, size=None) -> list[dict]:
    from fastdm.taps import resolve_layers

    from fastdm.bench.presets import PRESETS

    size = tuple(size or PRESETS[preset]["size"])
    bb = _backbone(preset, "meta", dtype)
    weights = _module_bytes(bb.denoiser, getattr(bb, "vae", None))
    # a text encoder kept on the CPU (Wan's UMT5) never occupies the accelerator
    text_encoder = 0 if getattr(bb, "text_encoder_on_cpu", False) else _module_bytes(getattr(bb, "text_encoder", None))
    rows = []
    for frames in frames_list:
        for plan in plans:
            from fastdm.driver.plan import PLANS

            t0 = time.perf_counter()
            s = project_step(bb, frames, size, plan, target, layers)
            v = project_vae(bb, frames, size, PLANS[plan].vae_tiling, target)
            phases = {"step": s["step_working_bytes"], "encode": v["encode_working_bytes"], "decode": v["decode_working_bytes"]}
            peak = weights + s["held_bytes"] + max(phases.values())
            load = weights + text_encoder  # at load, before the text encoder is released
            rows.append({"preset": preset, "frames": frames, "plan": plan, "dtype": str(dtype).removeprefix("torch."),
                         "tap_layers": resolve_layers(bb, layers),
                         "weights_bytes": weights, "text_encoder_bytes": text_encoder, "held_bytes": s["held_bytes"],
                         **{f"{k}_working_bytes": b for k, b in phases.items()}, "peak_phase": max(phases, key=phases.get),
                         "projected_peak_bytes": max(peak, load), "projected_step_peak_bytes": weights + s["held_bytes"] + phases["step"],
                         "seconds": round(time.perf_counter() - t0, 2)})
            print(json.dumps({k: rows[-1][k] for k in ("preset", "frames", "plan", "projected_peak_bytes", "peak_phase", "seconds")}),
                  flush=True)
    return rows


def measure_cpu_step(preset: str, frames: int, plan_name: str, dtype: torch.dtype = torch.float32, size=None) -> dict:
    """One real step on the CPU: the allocator's working peak (profiler memory events) and the
    simulated allocator's count on the same real tensors."""
    from fastdm.bench.presets import PRESETS
    from fastdm.driver.budget import trace_tensor_peak

    size = size or PRESETS[preset]["size"]
    torch.manual_seed(0)
    bb = _backbone(preset, "cpu", dtype)
    t = bb.info.num_train_timesteps // 2
    step, (x, x_src, noise), _ = _setup(bb, frames, size, plan_name, "cpu")
    step(x, x_src, t, noise)  # warm-up: lazy initializations stay out of the count
    x.grad = None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step(x, x_src, t, noise)
    measured = trace_tensor_peak(prof)
    x.grad = None
    with LiveBytes(devices=None) as mode:
        step(x, x_src, t, noise)
    return {"measured_step_working_bytes": measured, "simulated_on_cpu_bytes": mode.peak}


def check(cases=(("tiny", 4), ("shapes", 8)), plans=("naive", "plain", "fast", "fast-seq", "lean")) -> list[dict]:
    """Projection (meta, CPU attention) against the CPU allocator's count, per case and plan."""
    from fastdm.bench.presets import PRESETS
    from fastdm.driver.plan import PLANS

    rows = []
    for preset, frames in cases:
        bb = _backbone(preset, "meta", torch.float32)
        for plan in plans:
            if plan not in PLANS:
                continue
            proj = project_step(bb, frames, PRESETS[preset]["size"], plan, target="cpu")["step_working_bytes"]
            meas = measure_cpu_step(preset, frames, plan)
            err = (proj - meas["measured_step_working_bytes"]) / max(meas["measured_step_working_bytes"], 1)
            rows.append({"preset": preset, "frames": frames, "plan": plan, "dtype": "float32",
                         "projected_step_working_bytes": proj, **meas, "relative_error": round(err, 4)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _machine() -> str:
    try:
        from fastdm.machine import machine_name

        return machine_name("cpu")
    except Exception:
        return f"cpu-{platform.machine()}"


def _markdown(meta: dict, rows: list[dict], checks: list[dict], measured: list[dict]) -> str:
    L = [f"# Peak GPU memory, projected on the CPU ({meta.get('name', meta['machine'])})", "",
         f"Ran on: {meta.get('machine_description', 'a CPU the run did not record')}.", "",
         f"Projected before any GPU run by `python -m benchmarks.project_memory` (meta device, simulated allocator; "
         f"attention as the {meta['target']} fused kernel). Weights {meta['dtype']}; edited tensor fp32. GiB = 2^30 bytes.", "",
         "| preset | frames | plan | weights GiB | step working GiB | encode GiB | decode GiB | peak phase | **projected peak GiB** | GB (1e9) |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['preset']} | {r['frames']} | {r['plan']} | {r['weights_bytes'] / GiB:.2f} | {r['step_working_bytes'] / GiB:.2f} | "
                 f"{r['encode_working_bytes'] / GiB:.2f} | {r['decode_working_bytes'] / GiB:.2f} | {r['peak_phase']} | "
                 f"**{r['projected_peak_bytes'] / GiB:.2f}** | {r['projected_peak_bytes'] / 1e9:.2f} |")
    for goal in meta.get("goals", []):
        L += ["", f"**Goal ({goal['plan']}, {goal['frames']} frames, <= {goal['limit_bytes'] / 1e9:.0f} GB): {goal['verdict']}** — "
                  f"projected {goal['projected_bytes'] / 1e9:.2f} GB "
                  f"({goal['projected_bytes'] / GiB:.2f} GiB); the unprojected workspaces and allocator rounding come on top "
                  "(see below), so the GPU check's measurement decides."]
    if checks:
        L += ["", "## The method checked against the CPU allocator", "",
              "One step per plan, fp32 on this CPU: the projection (meta device, CPU flash attention) against the allocator's "
              "working peak during a real step (PyTorch profiler memory events, after one warm-up step), and the simulated "
              "allocator run on the real CPU tensors.", "",
              "| preset | frames | plan | projected MiB | measured MiB | simulated on real tensors MiB | error |",
              "|---|---|---|---|---|---|---|"]
        for c in checks:
            L.append(f"| {c['preset']} | {c['frames']} | {c['plan']} | {c['projected_step_working_bytes'] / 2**20:.2f} | "
                     f"{c['measured_step_working_bytes'] / 2**20:.2f} | {c['simulated_on_cpu_bytes'] / 2**20:.2f} | "
                     f"{100 * c['relative_error']:+.1f}% |")
        errs = [abs(c["relative_error"]) for c in checks]
        L += ["", f"Largest error {100 * max(errs):.1f}%, mean {100 * sum(errs) / len(errs):.1f}% (projection minus measured, "
                  "over measured)."]
    if measured:
        L += ["", "## Against a GPU measurement", "", "| preset | frames | mode | projected GiB | measured GiB (max allocated) | error |",
              "|---|---|---|---|---|---|"]
        for m in measured:
            L.append(f"| {m['preset']} | {m['frames']} | {m['mode']} | {m['projected_peak_bytes'] / GiB:.2f} | "
                     f"{m['measured_peak_bytes'] / GiB:.2f} | {100 * m['relative_error']:+.1f}% |")
    L += ["", "Not projected (a GPU peak lies above by these): cuBLAS/cuDNN workspaces, the caching allocator's rounding and "
              "fragmentation, the Triton loss kernels' own buffers (the torch loss backend runs on meta), torch.compile / engine "
              "buffers. Peak = weights (denoiser + VAE) + held tensors (edited, source, noise, prompts) + the largest working peak "
              "of the step, the VAE encode and the VAE decode; at load the text encoder is also resident (counted when larger)."]
    return "\n".join(L) + "\n"


def compare_measured(rows: list[dict], paths: list[str]) -> list[dict]:
    """Projected vs measured peaks from ``fastdm-bench`` JSON files (CUDA max allocated)."""
    found: dict[tuple, dict] = {}
    for p in paths:
        text = Path(p).read_text(errors="replace")
        if p.endswith(".json"):
            cases = json.loads(text).get("rows", [])
        else:  # a log: the harness prints one JSON line per finished case, so a run cut short still counts
            cases = []
            for line in text.splitlines():
                if line.startswith("{") and '"peak_bytes"' in line:
                    with contextlib.suppress(ValueError):
                        cases.append(json.loads(line))
        for r in cases:
            if "peak_bytes" in r and "mode" in r:
                key = (r["preset"], r["frames"], r["mode"])
                if p.endswith(".json") or key not in found:
                    found[key] = r
    out = []
    for r in found.values():
        plan = r["mode"].removesuffix("+grad").partition(":")[0]
        proj = next((x for x in rows if x["preset"] == r["preset"] and x["frames"] == r["frames"] and x["plan"] == plan), None)
        if proj is None:
            continue
        out.append({"preset": r["preset"], "frames": r["frames"], "mode": r["mode"], "projected_peak_bytes": proj["projected_peak_bytes"],
                    "measured_peak_bytes": r["peak_bytes"],
                    "relative_error": (proj["projected_peak_bytes"] - r["peak_bytes"]) / r["peak_bytes"]})
    return sorted(out, key=lambda m: (m["preset"], m["frames"], m["mode"]))


def main(argv: list[str] | None = None) -> int:
    from fastdm.driver.plan import PLANS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="zeroscope-576w")
    ap.add_argument("--frames", default="16,24")
    ap.add_argument("--plans", default=",".join(p for p in ("naive", "plain", "fast", "fast-seq", "lean") if p in PLANS))
    ap.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    ap.add_argument("--target", default="cuda", choices=("cuda", "cpu"), help="whose fused attention kernel to project")
    ap.add_argument("--no-check", action="store_true", help="skip the CPU check of the method")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--layers", default=None, help="tap layers (comma-separated glob patterns) instead of the default")
    ap.add_argument("--tag", default=None, help="extra name part of the result files")
    ap.add_argument("--size", default=None, help="WxH instead of the preset's size (name the files apart with --tag)")
    ap.add_argument("--check-cases", default="tiny:4,shapes:8", help="PRESET:FRAMES,... for the CPU check (e.g. wan-tiny:5)")
    ap.add_argument("--measured", nargs="*", default=[],
                    help="fastdm-bench JSON files or logs (GPU, CUDA max allocated) to compare with; missing ones are ignored")
    ap.add_argument("--projection", default=None, help="a projection JSON written earlier: compare it, project nothing")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--machine", default=None, help="name part of the output files (default: TARGET-DTYPE, e.g. cuda-bf16)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    plans = [p for p in args.plans.split(",") if p]
    unknown = [p for p in plans if p not in PLANS]
    if unknown:
        print(f"project_memory: unknown plan(s) {', '.join(unknown)}; choose from {', '.join(PLANS)}", file=sys.stderr)
        return 2
    frames = [int(f) for f in args.frames.split(",")]
    dtype = DTYPES[args.dtype]
    if args.projection:  # compare an earlier projection with measurements (on the GPU machine)
        prev = json.loads(Path(args.projection).read_text())
        rows, checks = prev["rows"], prev.get("check", [])
    else:
        layers = args.layers.split(",") if args.layers else None
        size = tuple(int(v) for v in args.size.split("x")) if args.size else None
        rows = [] if args.check_only else project(args.preset, frames, plans, dtype, args.target, layers, size)
        cases = tuple((c.split(":")[0], int(c.split(":")[1])) for c in args.check_cases.split(",") if c)
        checks = [] if args.no_check else check(cases)
    from fastdm.machine import machine_description

    # the figures are a projection of the target's memory (the meta device does not depend on this CPU): the files are
    # named after the target; the CPU that ran the projection and its check is recorded beside them
    meta = {"machine": _machine(), "machine_description": machine_description(), "name": args.machine or f"{args.target}-{args.dtype}",
            "dtype": args.dtype, "target": args.target, "torch": torch.__version__,
            "method": "meta device + TorchDispatchMode simulated allocator (storage bytes, freed on weakref finalize)"}
    meta["goals"] = []
    for plan, n, limit in GOALS.get(rows[0]["preset"] if rows else args.preset, []):
        goal_row = next((r for r in rows if (r["plan"], r["frames"]) == (plan, n)), None)
        if goal_row is None:
            continue
        ok = goal_row["projected_peak_bytes"] <= limit
        meta["goals"].append({"plan": plan, "frames": n, "limit_bytes": limit, "projected_bytes": goal_row["projected_peak_bytes"],
                              "meets": ok, "verdict": "met by the projection" if ok else "NOT met by the projection"})
    if meta["goals"]:
        meta["goal"] = meta["goals"][0]
    if checks:
        errs = [abs(c["relative_error"]) for c in checks]
        meta["check"] = {"max_abs_relative_error": max(errs), "mean_abs_relative_error": sum(errs) / len(errs)}
    measured = compare_measured(rows, [p for p in args.measured if Path(p).is_file()])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    named = args.preset if args.preset != "zeroscope-576w" and not args.check_only else ""  # ZeroScope keeps the old name
    named = "-".join(p for p in (named, args.tag) if p)
    stem = f"memory-projection-{named + '-' if named else ''}{meta['name']}"
    from fastdm.io.atomic import write_json_atomic

    write_json_atomic(out / f"{stem}.json", {"meta": meta, "rows": rows, "check": checks, "measured": measured})
    md = _markdown(meta, rows, checks, measured)
    (out / f"{stem}.md").write_text(md)
    print(md)
    print("wrote", out / f"{stem}.json", out / f"{stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
