"""Cascaded rows of the quality suite (``python -m benchmarks.quality --cascade shapes``).

Each suite case is rendered at twice its size (64x64: the same object, path and speed, doubled).
The edit runs once per case exactly as the cascade's ``edit`` stage runs it (the keyframes
resized to the base model's 32x32 with the runner's own resize, the full method with the box
mask of the resized clip); its 32x32 result then goes two ways:

    cascade  the cascade's ``upscale`` stage (the shapes upscale model, the cascade file's settings)
    bicubic  the same edit upsampled bicubically to 64x64 (the non-cascaded edit, what a user without
             an upscale model would do)

Both are scored against the 64x64 source with the suite's metrics, so drift and flow error are
in 64-px units. Sharing the edit isolates what the upscale stage adds or loses. Runs are cached
one line per case in ``results/quality-cascade-<machine>.runs.jsonl``; the summary goes to
``results/quality-cascade-<machine>.{json,md}``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


from benchmarks.common import (
    RESULTS,
    denoiser_hash,
    machine_description,
    machine_name,
    repo_relative,
    runs_machines,
    write_results,
)

from benchmarks.suite import bicubic, box_mask, edit_config, render_case_at, score, summarize  # noqa: F401  (re-exported)

ROWS = ("cascade", "bicubic")


def run(args, pipe, suite: list[dict], cases: list[dict], machine: str, model: str, model_hash: str) -> None:
    import torch

    from fastdm.cascade.folders import check_stage_folder, load_stage_model
    from fastdm.cascade.spec import load_cascade
    from fastdm.cascade.stages import run_upscale
    from fastdm.io import plan_crop, resize_crop

    cascade = load_cascade(args.cascade)
    kinds = [st.kind for st in cascade.stages]
    if kinds != ["edit", "upscale"]:
        raise SystemExit(f"error: --cascade {args.cascade}: the quality rows need an edit -> upscale cascade, got {' -> '.join(kinds)}")
    up = cascade.stages[1]
    label = f"--cascade {args.cascade}: {up.label}"
    info = check_stage_folder(up.model, "upscale", label)
    _, up_hash = denoiser_hash(up.model)
    base = tuple(cascade.stages[0].settings.get("size") or pipe.backbone.info.native_size)
    scale = int(up.settings["scale"])
    cache = RESULTS / f"quality-cascade-{machine}.runs.jsonl"
    done = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            r = json.loads(line)
            done[(r["case"], r["steps"], r["edit_fingerprint"], r["model_hash"], r["upscale_hash"], r["upscale_settings_key"])] = r
    settings_key = json.dumps(up.settings, sort_keys=True)
    model_up = None
    t_start = time.time()
    for case in cases:
        cfg = edit_config(case, "full", args.steps, args.lr)
        key = (case["id"], args.steps, cfg.fingerprint(), model_hash, up_hash, settings_key)
        if key in done:
            continue
        if args.minutes is not None and time.time() - t_start > args.minutes * 60:
            break
        src = render_case_at(case, scale)  # (F, 64, 64, 3)
        size_hi = (src.shape[2], src.shape[1])
        small = resize_crop(src, plan_crop(size_hi, base))  # what the cascade's edit stage feeds the base model
        t0 = time.time()
        edited = pipe(small, config=cfg, mask=box_mask(small)).frames
        t_edit = time.time() - t0
        if model_up is None:
            model_up = load_stage_model(info, label, device=torch.device("cpu"), dtype=torch.float32)
        t0 = time.time()
        hi = run_upscale(model_up, edited, case["target_prompt"], up.settings)
        t_up = time.time() - t0
        rec = {"case": case["id"], "kind": case["kind"], "steps": args.steps, "lr": args.lr, "edit_fingerprint": cfg.fingerprint(),
               "model_hash": model_hash, "upscale_hash": up_hash, "upscale_settings_key": settings_key,
               "upscale_settings": up.settings, "machine": machine_name(), "machine_description": machine_description(),
               "seconds": {"edit": t_edit, "upscale": t_up},
               "metrics": {"cascade": score(case, src, hi), "bicubic": score(case, src, bicubic(edited, size_hi)),
                           "edit_32": score(case, small, edited)}}
        with open(cache, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        done[key] = rec
        m, b = rec["metrics"]["cascade"], rec["metrics"]["bicubic"]
        print(f"cascade {case['id']}  colour {m['colour_ok']!s:5s}/{b['colour_ok']!s:5s} shape {m['shape_ok']!s:5s}/"
              f"{b['shape_ok']!s:5s} drift {m['drift_px']:.2f}/{b['drift_px']:.2f}px mf {m['motion_fidelity']:.3f}/"
              f"{b['motion_fidelity']:.3f} (edit {t_edit:.0f}s, upscale {t_up:.0f}s)", flush=True)
        if args.save_videos:
            from fastdm.io import side_by_side, write_video

            Path(args.save_videos).mkdir(parents=True, exist_ok=True)
            write_video(Path(args.save_videos) / f"cascade-{case['id']}.gif", side_by_side(src, bicubic(edited, size_hi), hi), 8)

    runs = [r for (c, st, fp, mh, uh, sk), r in done.items()
            if st == args.steps and mh == model_hash and uh == up_hash and sk == settings_key
            and fp == edit_config(next(x for x in suite if x["id"] == c), "full", args.steps, args.lr).fingerprint()]
    table = {}
    for row in ROWS + ("edit_32",):
        rs = [{"config": "full", "kind": r["kind"], "case": r["case"], "metrics": r["metrics"][row],
               "seconds": r["seconds"]["edit"] + (r["seconds"]["upscale"] if row == "cascade" else 0.0)} for r in runs]
        table[row] = summarize(rs).get("full") if rs else None
    _, described = runs_machines(runs)
    meta = {"machine": machine, "machine_description": described, "model": repo_relative(model),
            "model_hash": model_hash, "upscale_model": repo_relative(up.model), "upscale_hash": up_hash,
            "upscale_settings": up.settings, "cascade": args.cascade, "steps": args.steps, "lr": args.lr,
            "cases": sorted(r["case"] for r in runs), "base_size": list(base), "scale": scale}
    md = markdown(table, meta)
    j, m = write_results(f"quality-cascade-{machine}", {"meta": meta, "table": table, "runs": runs}, md)
    print(md)
    print("wrote", j, m)


def markdown(table: dict, meta: dict) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    n = len(meta["cases"])
    hi = meta["base_size"][0] * meta["scale"]
    lines = [f"# Cascaded edits on the shapes world, {hi}x{hi} ({meta['machine']})", "",
             f"Machine: {meta['machine_description']}.",
             f"Edit stage: `{meta['model']}` (sha256 {meta['model_hash']}) at {meta['base_size'][0]}x{meta['base_size'][1]}, the full "
             f"method with the box mask, {meta['steps']} steps, lr {meta['lr']}. Upscale stage: `{meta['upscale_model']}` "
             f"(sha256 {meta['upscale_hash']}), settings {json.dumps(meta['upscale_settings'], sort_keys=True)}.",
             f"Cases ({n}): {', '.join(meta['cases'])}. Each case's source is rendered at {hi}x{hi}; one edit per case feeds "
             "both rows.", "",
             f"| output | edits | colour success | shape success | mean drift (px at {hi}) | object lost | motion fidelity | "
             f"flow EPE (px at {hi}) | frame consistency | area kept | background change (0-255) | s / edit (median) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    names = {"cascade": "cascade (edit + upscale model)", "bicubic": "non-cascaded edit, bicubic",
             "edit_32": f"the edit itself at {meta['base_size'][0]}x{meta['base_size'][1]} (px at {meta['base_size'][0]})"}
    for row, s in table.items():
        if not s:
            continue
        lines.append(f"| {names[row]} | {s['edits']} | {f(s['colour_success'], '.0%')} | {f(s['shape_success'], '.0%')} | "
                     f"{f(s['mean_drift_px'], '.2f')} | {s['object_lost']} | {s['motion_fidelity']:.3f} | {s['flow_epe_px']:.2f} | "
                     f"{s['frame_consistency']:.3f} | {f(s.get('area_kept'), '.0%')} | {f(s.get('background_change'), '.2f')} | "
                     f"{s['seconds_per_edit']:.0f} |")
    lines += ["", "Colour success counts colour and both edits, shape success shape and both edits (as in the main table).",
              "The last row scores the 32x32 edit against the 32x32 source it edited (drift and flow in 32-px units)."]
    return "\n".join(lines) + "\n"
