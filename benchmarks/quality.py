"""Edit-quality benchmark on the shapes world: the full method and the ablations of the paper's Table 3.

A fixed suite of edits (colour swaps, shape swaps, both) on generated clips, each run with

    full       V-DDS + S-SSM + T-SSM, box mask       (DreamMotion; the mask limits the whole update)
    auto_mask  V-DDS + S-SSM + T-SSM, automatic mask (fastdm's --mask auto, from cross-attention)
    vdds_only  V-DDS alone, box mask                 (w/o S-SSM and T-SSM)
    no_sssm    V-DDS + T-SSM, box mask               (w/o S-SSM)
    no_tssm    V-DDS + S-SSM, box mask               (w/o T-SSM)
    no_mask    V-DDS + S-SSM + T-SSM, no mask        (w/o mask)

and scored with weight-free metrics: target colour reached in every frame, target shape in most
frames, centroid drift (px), optical-flow motion fidelity and frame consistency; and, for the
mask axis (none / auto / box), area kept (the object's area within 0.5x-2x of the source's in every
frame) and background change (mean absolute change, 0-255, outside the source object grown by
3 px). ``--mask-iou`` measures the automatic mask against the true object instead.

Runs are cached one line each in ``results/quality-<machine>.runs.jsonl`` so the suite can be
run in pieces (``--minutes``) across sessions; the summary files
``results/quality-<machine>.{json,md}`` are rewritten from the cache after every run.

    python -m benchmarks.quality [--model DIR] [--configs full,vdds_only] [--minutes 60]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (
    RESULTS,
    denoiser_hash,
    machine_description,
    machine_name,
    mixed_stem,
    model_stem,
    repo_relative,
    runs_machines,
    write_results,
)
from fastdm.toyworld.metrics import object_mask
from benchmarks.suite import (  # noqa: F401  (re-exported)
    CONFIGS,
    MASK_AXIS,
    SCORE_KEYS,
    area_kept,
    background_change,
    box_mask,
    build_suite,
    case_mask,
    parse_setting,
    edit_config,
    render_case,
    score,
    summarize,
)

def parse_overrides(items: list[str]) -> dict:
    """``["guidance_scale=15", "t_ssm_weight=1e4"]`` -> typed EditConfig overrides."""
    return dict((key, values[0]) for key, values in map(parse_setting, items))


def overrides_label(overrides: dict) -> str:
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(overrides.items()))


def mask_iou(mask: np.ndarray, obj: np.ndarray) -> float:
    m = mask > 0.5
    return float((m & obj).sum() / max(1, (m | obj).sum()))


def mask_iou_table(pipe, suite: list[dict], settings: dict[str, dict]) -> dict:
    """IoU of the automatic mask with the true object (and of the box mask, for reference) on every
    suite clip, per setting of :func:`fastdm.automask.estimate_mask`; also its object coverage and area."""
    from fastdm.automask import estimate_mask
    from fastdm.io.tensors import frames_to_tensor

    def row(case_id: str, mask: np.ndarray, obj: np.ndarray, **extra) -> dict:
        m = mask > 0.5
        return {"case": case_id, "iou": mask_iou(mask, obj), "coverage": float((m & obj).sum() / max(1, obj.sum())),
                "area": float(m.mean()), **extra}

    bb = pipe.backbone
    rows = {name: [] for name in ["box", *settings]}
    for case in suite:
        clip = render_case(case)
        obj = np.stack([object_mask(f) for f in clip])
        rows["box"].append(row(case["id"], box_mask(clip), obj))
        x = bb.to_working(frames_to_tensor(clip))
        text = pipe.encode_prompts([case["source_prompt"], case["target_prompt"]])
        for name, kw in settings.items():
            am = estimate_mask(bb, x, text, case["source_prompt"], case["target_prompt"], (clip.shape[2], clip.shape[1]), **kw)
            if am.mask is None:
                rows[name].append({"case": case["id"], "iou": 0.0, "coverage": 0.0, "area": 0.0, "fallback": am.fallback})
                continue
            rows[name].append(row(case["id"], am.mask, obj, foreground=am.foreground, seconds=am.seconds))
    summary = {name: {"cases": len(rs), "mean_iou": float(np.mean([r["iou"] for r in rs])),
                      "min_iou": float(np.min([r["iou"] for r in rs])),
                      "mean_coverage": float(np.mean([r["coverage"] for r in rs])),
                      "min_coverage": float(np.min([r["coverage"] for r in rs])),
                      "mean_area": float(np.mean([r["area"] for r in rs])),
                      "fallbacks": sum("fallback" in r for r in rs),
                      "settings": settings.get(name, "bounding box of the object + 2 px")}
               for name, rs in rows.items()}
    return {"summary": summary, "rows": rows}


def mask_axis(runs: list[dict]) -> dict:
    """The mask axis on the cases where none, auto and box all have runs with every metric."""
    by = {(r["config"], r["case"]): r for r in runs if all(k in r["metrics"] for k in SCORE_KEYS)}
    cases = sorted({c for (_, c) in by if all((cfg, c) in by for cfg in MASK_AXIS.values())})
    table = {axis: summarize([by[(cfg, c)] for c in cases]).get(cfg) for axis, cfg in MASK_AXIS.items()}
    fallbacks = [by[("auto_mask", c)].get("auto_mask", {}).get("fallback") for c in cases]
    return {"cases": cases, "table": table if cases else {}, "auto_fallbacks": sum(f is not None for f in fallbacks),
            "auto_iou": [by[("auto_mask", c)].get("auto_mask", {}).get("iou") for c in cases]}


def mask_axis_markdown(axis: dict) -> str:
    if not axis.get("cases"):
        return ""

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = ["", "## Mask axis: none / auto / box (the full method)", "",
             f"Cases ({len(axis['cases'])}): {', '.join(axis['cases'])}. The automatic mask fell back to no mask on "
             f"{axis['auto_fallbacks']} of them.", "",
             "| mask | edits | colour success | shape success | mean drift (px) | area kept | background change (0-255) | motion fidelity | flow EPE (px) | frame consistency |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in axis["table"].items():
        lines.append(f"| {name} | {s['edits']} | {f(s['colour_success'], '.0%')} | {f(s['shape_success'], '.0%')} | "
                     f"{f(s['mean_drift_px'], '.2f')} | {s['area_kept']:.0%} | {s['background_change']:.2f} | "
                     f"{s['motion_fidelity']:.3f} | {s['flow_epe_px']:.2f} | {s['frame_consistency']:.3f} |")
    lines += ["", "Area kept: the object's area within 0.5x-2x of the source's in every frame. Background change: mean",
              "absolute change outside the source object grown by 3 px."]
    return "\n".join(lines) + "\n"


def sweep_summary(all_runs: list[dict], default_runs: list[dict], suite: list[dict], steps: int, lr: float, model_hash: str) -> list[dict]:
    """One row per (config, settings that differ from today's defaults), beside the same cases at the defaults.

    Covers the ``--set`` sweeps and the runs of earlier defaults alike: a run's label is the list of
    its EditConfig fields that differ from what the suite would run now, so a change of defaults
    keeps the old runs as a measured comparison instead of dropping them.
    """
    by_id = {c["id"]: c for c in suite}
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in all_runs:
        if r["steps"] != steps or r["model_hash"] != model_hash or r["case"] not in by_id or "edit_config" not in r:
            continue
        now = edit_config(by_id[r["case"]], r["config"], steps, lr)
        if now.fingerprint() == r.get("edit_fingerprint"):
            continue  # today's default: counted in the main table
        cur = now.to_dict()
        # fields EditConfig no longer has (the dead ``extra``) are not a setting of the run
        diff = {k: v for k, v in r["edit_config"].items() if k != "steps" and k in cur and cur[k] != v}
        groups.setdefault((r["config"], overrides_label(diff)), []).append(r)
    base = {(r["config"], r["case"]): r for r in default_runs}
    rows = []
    for (name, label), rs in sorted(groups.items()):
        paired = [r for r in rs if (name, r["case"]) in base]
        rows.append({"config": name, "set": label, "cases": sorted(r["case"] for r in paired),
                     "swept": summarize(paired).get(name), "defaults": summarize([base[(name, r["case"])] for r in paired]).get(name)})
    return [r for r in rows if r["swept"]]


def sweep_markdown(rows: list[dict]) -> str:
    if not rows:
        return ""

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = ["", "## Other settings: the same cases at that setting and at today's defaults", "",
             "Sweeps (`--set`) and runs made under earlier defaults; a setting names what differs from today's defaults.", "",
             "| config | setting | cases | colour success | shape success | mean drift (px) | motion fidelity |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        for label, s in ((r["set"], r["swept"]), ("defaults", r["defaults"])):
            lines.append(f"| {r['config']} | {label} | {s['edits']} | {f(s['colour_success'], '.0%')} | "
                         f"{f(s['shape_success'], '.0%')} | {f(s['mean_drift_px'], '.2f')} | {s['motion_fidelity']:.3f} |")
    lines.append("")
    lines.append("Cases per row: " + "; ".join(f"{r['config']} {r['set']}: {', '.join(r['cases'])}" for r in rows) + ".")
    return "\n".join(lines) + "\n"


def markdown(summary: dict, meta: dict) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [
        f"# Edit quality on the shapes world ({meta['machine']})",
        "",
        f"Machine: {meta['machine_description']}. Model: `{meta['model']}` ({meta.get('denoiser', 'unet')} sha256 {meta['model_hash']}).",
        f"Suite: {meta['suite_size']} edits (12 colour swaps, 6 shape swaps, 6 both; the edits column counts those run), "
        f"{meta['steps']} steps, lr {meta['lr']}, SGD.",
        f"Note: {meta.get('timing_note', '')}.",
        "",
        "| config | edits | colour success | shape success | mean drift (px) | object lost | motion fidelity | flow EPE (px) | frame consistency | s / edit (median) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['edits']} | {f(s['colour_success'], '.0%')} | {f(s['shape_success'], '.0%')} | "
            f"{f(s['mean_drift_px'], '.2f')} | {s['object_lost']} | {s['motion_fidelity']:.3f} | {s['flow_epe_px']:.2f} | "
            f"{s['frame_consistency']:.3f} | {s['seconds_per_edit']:.0f} |"
        )
    lines += ["", "Colour success counts colour and both edits (target colour in every frame); shape success counts",
              "shape and both edits (target shape in most frames); drift is the mean centroid distance to the source."]
    return "\n".join(lines) + "\n"


def models_table(machine: str, dit_machine: str | None = None) -> tuple[dict, str, str] | None:
    """The bundled UNet model and shapes-dit side by side: each config on the cases both models have
    runs for (at each model's current steps, lr and defaults), from the two run caches (``machine``'s and
    ``dit_machine``'s, default the same). Returns the table, its markdown and the machine stem it is named
    after: the two caches' own when they agree, else ``cpu-mixed-...``."""
    dit_machine = dit_machine or machine
    stems = {"shapes (UNet3D)": ("quality", machine), "shapes-dit (Wan transformer)": ("quality-shapes-dit", dit_machine)}
    per_model = {}
    for label, (stem, on) in stems.items():
        summary_file, cache = RESULTS / f"{stem}-{on}.json", RESULTS / f"{stem}-{on}.runs.jsonl"
        if not (summary_file.exists() and cache.exists()):
            return None
        meta = json.loads(summary_file.read_text())["meta"]
        suite = {c["id"]: c for c in build_suite()}
        latest = {}  # one run per (config, case): the cache's last, as the main table takes it
        for line in cache.read_text().splitlines():
            r = json.loads(line)
            if (r["steps"] == meta["steps"] and r["model_hash"] == meta["model_hash"] and r["case"] in suite
                    and r.get("edit_fingerprint") == edit_config(suite[r["case"]], r["config"], meta["steps"], meta["lr"]).fingerprint()):
                latest[(r["config"], r["case"])] = r
        per_model[label] = (meta, list(latest.values()))
    out, lines = {}, []
    for name in CONFIGS:
        cases = set.intersection(*({r["case"] for r in runs if r["config"] == name} for _, runs in per_model.values()))
        if not cases:
            continue
        for label, (meta, runs) in per_model.items():
            s = summarize([r for r in runs if r["config"] == name and r["case"] in cases]).get(name)
            out.setdefault(name, {})[label] = {**s, "cases": sorted(cases), "model": meta["model"]}

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    name = machine if machine == dit_machine else mixed_stem(machine)
    meta = {"machine": name, "machine_description": "; ".join(f"{label}: {m['machine_description']}" for label, (m, _) in per_model.items()),
            "sources": [f"{stem}-{on}" for stem, on in stems.values()]}
    out = {"meta": meta, "configs": out}
    lines = [f"# The shapes world on two backbone families ({name})", "",
             f"Machines: {meta['machine_description']}.", "",
             "The same suite, edits and metrics on the bundled UNet3D model and on shapes-dit (a Wan 2.1 "
             "transformer, flow matching, pixel space), each config on the cases both models have runs for. "
             "Per-model details: " + " and ".join(f"{x}.md" for x in meta["sources"]) + ".", "",
             "| config | model | edits | colour success | shape success | mean drift (px) | object lost | motion fidelity | "
             "flow EPE (px) | frame consistency | s / edit (median) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for config, by_model in out["configs"].items():
        for label, s in by_model.items():
            lines.append(f"| {config} | {label} | {s['edits']} | {f(s['colour_success'], '.0%')} | {f(s['shape_success'], '.0%')} | "
                         f"{f(s['mean_drift_px'], '.2f')} | {s['object_lost']} | {s['motion_fidelity']:.3f} | "
                         f"{s['flow_epe_px']:.2f} | {s['frame_consistency']:.3f} | {s['seconds_per_edit']:.0f} |")
    return out, "\n".join(lines) + "\n", name


# the automatic mask's settings compared by --mask-iou (the first is fastdm's default)
MASK_IOU_SETTINGS = {
    "default (t 0.5T, margin 4%)": {},
    "margin 8%": dict(margin=0.08),
    "margin 0": dict(margin=0.0),
    "t 0.3T, 0.5T, 0.7T": dict(timestep_fractions=(0.3, 0.5, 0.7)),
    "source prompt only": dict(prompts="source"),
}


def write_mask_iou(pipe, suite, machine: str, model: str, model_hash: str) -> None:
    from fastdm.automask import MAX_FOREGROUND

    t0 = time.time()
    res = mask_iou_table(pipe, suite, MASK_IOU_SETTINGS)
    meta = {"machine": machine, "machine_description": machine_description(), "model": repo_relative(model),
            "model_hash": model_hash, "suite_size": len(suite), "seconds": round(time.time() - t0, 1),
            "command": "python -m benchmarks.quality --mask-iou"}
    lines = [f"# Automatic mask against the true object ({machine})", "",
             f"Machine: {meta['machine_description']}. Model: `{meta['model']}` (unet sha256 {model_hash}). "
             f"Command: `{meta['command']}`. Every suite clip ({len(suite)}); object = the renderer's object mask.", "",
             "| mask | mean IoU | min IoU | mean object coverage | min coverage | mean area | fallbacks |", "|---|---|---|---|---|---|---|"]
    for name, s in res["summary"].items():
        lines.append(f"| {name} | {s['mean_iou']:.3f} | {s['min_iou']:.3f} | {s['mean_coverage']:.3f} | {s['min_coverage']:.3f} | "
                     f"{s['mean_area']:.3f} | {s['fallbacks']} |")
    fg = [r["foreground"] for r in res["rows"][next(iter(MASK_IOU_SETTINGS))] if r.get("foreground") is not None]
    lines += ["", f"Foreground before dilation (default setting): {min(fg):.3f}-{max(fg):.3f} of the clip "
              f"(the flat-map fallback starts above {MAX_FOREGROUND})." if fg else ""]
    write_results(f"automask-iou-{machine}", {"meta": meta, **res}, "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    import torch

    from fastdm import DreamMotionPipeline
    from fastdm.backbone import resolve_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=0.4)
    ap.add_argument("--limit", type=int, default=None, help="only the first N cases of the suite")
    ap.add_argument("--minutes", type=float, default=None, help="stop starting new edits after this long")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--shard", default=None, metavar="I/N",
                    help="only cases I, I+N, I+2N, ... (run N processes side by side; they share the cache)")
    ap.add_argument("--save-videos", default=None, help="folder for source|edit GIFs")
    ap.add_argument("--cases", default=None, help="only these case ids (comma-separated), e.g. for a sweep")
    ap.add_argument("--mask-iou", action="store_true",
                    help="measure the automatic mask against the true object on every suite clip (no edits) and write "
                         "results/automask-iou-<machine>.{json,md}")
    ap.add_argument("--cascade", default=None, metavar="NAME|FILE",
                    help="the cascaded rows instead: each case at 64x64 through an edit -> upscale cascade, beside the "
                         "same edit upsampled bicubically (benchmarks/quality_cascade.py); writes results/quality-cascade-<machine>.*")
    ap.add_argument("--machine", default=None, metavar="STEM",
                    help="re-write the tables of this machine stem's run cache (no edits run: another machine's cache "
                         "never gets this machine's runs)")
    ap.add_argument("--dit-machine", default=None, metavar="STEM",
                    help="the machine stem of the shapes-dit cache for the two-model table (default: --machine's)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="sweep: override an EditConfig setting for every config (repeatable); such runs are "
                         "reported in the sweep table beside the same cases at the defaults, never in the main table")
    args = ap.parse_args()
    from fastdm.errors import FastDMError

    try:
        overrides = parse_overrides(args.set)
    except FastDMError as e:  # one line, no traceback
        raise SystemExit(f"error: {e}") from None
    if args.threads:
        torch.set_num_threads(args.threads)

    model = resolve_model(args.model)
    denoiser, model_hash = denoiser_hash(model)
    machine = args.machine or machine_name()
    if machine != machine_name():  # another machine's cache: re-write its tables, never add this machine's runs to it
        if args.mask_iou or args.cascade:
            raise SystemExit(f"error: --machine {machine} only re-writes that machine's tables; drop --mask-iou/--cascade")
        args.minutes = 0
    stem = model_stem("quality", model)
    cache = RESULTS / f"{stem}-{machine}.runs.jsonl"
    RESULTS.mkdir(parents=True, exist_ok=True)
    done = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            r = json.loads(line)
            done[(r["config"], r["case"], r["steps"], r.get("edit_fingerprint"), r["model_hash"])] = r
    suite = build_suite()
    # kinds interleaved (colour-00, shape-00, both-00, colour-01, ...): a suite run in pieces
    # covers every kind of edit from the start
    order = sorted(range(len(suite)), key=lambda i: (int(suite[i]["id"].split("-")[1]), ["colour", "shape", "both"].index(suite[i]["kind"])))
    cases = [suite[i] for i in order]
    cases = cases[: args.limit] if args.limit else cases
    if args.cases:
        ids = args.cases.split(",")
        unknown = sorted(set(ids) - {c["id"] for c in suite})
        if unknown:
            raise SystemExit(f"error: unknown case id(s) {', '.join(unknown)}; ids look like colour-00, shape-03, both-05")
        cases = [c for c in cases if c["id"] in ids]
    if args.shard:
        i, n = (int(v) for v in args.shard.split("/"))
        cases = cases[i::n]
    pipe = DreamMotionPipeline.from_pretrained(model)
    if args.mask_iou:
        write_mask_iou(pipe, suite, machine, model, model_hash)
        return
    if args.cascade:
        from benchmarks import quality_cascade

        quality_cascade.run(args, pipe, suite, cases, machine, model, model_hash)
        return
    t_start = time.time()
    # case-major order: a suite cut short by --minutes still compares every config on the same cases
    for case, name in [(c, n) for c in cases for n in args.configs.split(",")]:
        cfg = edit_config(case, name, args.steps, args.lr, overrides)
        # cached runs count only for the same model, steps and every edit setting (defaults included)
        key = (name, case["id"], args.steps, cfg.fingerprint(), model_hash)
        if key in done and all(k in done[key]["metrics"] for k in SCORE_KEYS):
            continue
        if args.minutes is not None and time.time() - t_start > args.minutes * 60:
            break
        clip = render_case(case)
        t0 = time.time()
        res = pipe(clip, config=cfg, mask=case_mask(clip, name))
        rec = {"config": name, "case": case["id"], "kind": case["kind"], "steps": args.steps, "lr": args.lr,
               "edit_fingerprint": cfg.fingerprint(), "edit_config": cfg.to_dict(), "overrides": overrides, "model_hash": model_hash,
               "machine": machine_name(), "machine_description": machine_description(), "seconds": time.time() - t0, "metrics": score(case, clip, res.frames)}
        if "auto_mask" in res.report:
            rec["auto_mask"] = res.report["auto_mask"]
            if res.mask is not None:
                rec["auto_mask"]["iou"] = mask_iou(res.mask, np.stack([object_mask(f) for f in clip]))
        with open(cache, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        done[key] = rec
        m = rec["metrics"]
        print(f"{name:10s} {overrides_label(overrides)} {case['id']}  colour {m['colour_ok']!s:5s} shape {m['shape_ok']!s:5s} "
              f"drift {m['drift_px']:.2f}px  mf {m['motion_fidelity']:.3f}  ({rec['seconds']:.0f}s)", flush=True)
        if args.save_videos:
            from fastdm.io import side_by_side, write_video

            Path(args.save_videos).mkdir(parents=True, exist_ok=True)
            write_video(Path(args.save_videos) / f"{name}-{case['id']}.gif", side_by_side(clip, res.frames), 8)
    wanted = {(n, c["id"]): edit_config(c, n, args.steps, args.lr).fingerprint() for c in suite for n in CONFIGS}
    runs = [r for r in done.values() if r["steps"] == args.steps and r["model_hash"] == model_hash
            and r.get("edit_fingerprint") == wanted.get((r["config"], r["case"]))]
    meta = {"machine": machine, "machine_description": runs_machines(runs)[1],
            "model": repo_relative(model), "model_hash": model_hash, "denoiser": denoiser,
            "suite_size": len(suite), "steps": args.steps, "lr": args.lr,
            "timing_note": "s / edit from the runs' own clocks; shards may have run side by side (see --shard, --threads)"}
    summary = summarize(runs)
    sweep = sweep_summary(list(done.values()), runs, suite, args.steps, args.lr, model_hash)
    axis = mask_axis(runs)
    md = markdown(summary, meta) + mask_axis_markdown(axis) + sweep_markdown(sweep)
    j, m = write_results(f"{stem}-{machine}", {"meta": meta, "summary": summary, "mask_axis": axis, "sweep": sweep, "suite": suite}, md)
    print(md)
    print("wrote", j, m)
    both = models_table(machine, args.dit_machine)
    if both:
        print("wrote", *write_results(f"quality-models-{both[2]}", both[0], both[1]))


if __name__ == "__main__":
    main()
