"""How strong are S-SSM and T-SSM against V-DDS? Per-term gradient norms along real edits.

The S-SSM/T-SSM weights only mean something relative to the V-DDS gradient. This walks the
edit of a few quality-suite cases with the package defaults and, every ``--every`` steps, splits
the update at that step's (t, e) into its three parts:

    g_vdds                  the masked V-DDS gradient
    g_s = d L_S-SSM / dx    (weight 1, masked like the update)
    g_t = d L_T-SSM / dx    (weight 1, masked like the update)

and reports ``|g_s| / |g_vdds|`` and ``|g_t| / |g_vdds|`` per unit weight, so a weight can be
read off for a wanted share (e.g. the weight that makes the term a fifth of V-DDS). Early in
an edit the edited keys still equal the source keys and both SSM gradients are ~0, so the
medians are taken over the second half of the edit.

It also measures what each loss can see: S-SSM and T-SSM between the keys of a source clip and
of known variants of it (shifted 3 px, recoloured, another shape, frozen in place, played
backwards) at the same t and noise. A loss that barely reacts to a variant cannot hold the edit
against that change, whatever its weight.

    python -m benchmarks.loss_balance [--cases colour-00,colour-02 | --cases none] [--every 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from benchmarks.common import RESULTS, machine_description, machine_name, write_results
from benchmarks.suite import box_mask, build_suite, render_case


def walk(pipe, case: dict, config, every: int) -> list[dict]:
    """Run one edit at ``config`` through the pipeline and record the split of its update every
    ``every`` steps: the pipeline's own step, asked for its gradient parts (``grad_parts``: V-DDS,
    and S-SSM and T-SSM at unit weight, as applied), so nothing of the loop is re-implemented here."""
    clip = render_case(case)
    rows = []

    def observe(_pipe, step, t, tensors):
        if step % every:
            return None
        parts, losses = tensors["grad_parts"], tensors["losses"]
        g_v = parts["vdds"].norm().item()
        g_s, g_t = parts["s_ssm"].norm().item(), parts["t_ssm"].norm().item()
        rows.append({"step": step, "t": int(t), "vdds_norm": g_v, "s_norm_per_weight": g_s, "t_norm_per_weight": g_t,
                     "s_ratio_per_weight": g_s / g_v, "t_ratio_per_weight": g_t / g_v,
                     "s_ssm_loss": float(losses["s_ssm"]), "t_ssm_loss": float(losses["t_ssm"])})
        return None

    pipe(clip, config=config, mask=box_mask(clip), callback_on_step_end=observe,
         callback_on_step_end_tensor_inputs=("grad_parts", "losses"))
    return rows


VARIANTS = ("shifted 3 px", "recoloured", "other shape", "frozen (no motion)", "played backwards")


def sensitivity(pipe, timesteps=(200, 500, 800), seed: int = 0, layers: list[str] | None = None) -> dict:
    """S-SSM and T-SSM losses of variants of a red circle moving right against the clip itself
    (mean over ``layers``, default: the backbone's default tap layers)."""
    from fastdm.io.tensors import frames_to_tensor
    from fastdm.losses import ssm_losses
    from fastdm.toyworld.world import render_clip
    from fastdm.taps import KeyTaps, resolve_layers

    bb = pipe.backbone
    layers = layers or resolve_layers(bb, None)
    kw = dict(size=32, frames=8, radius=6, speed=2)
    src = render_clip("red", "circle", "right", **kw)
    variants = dict(zip(VARIANTS, (np.roll(src, 3, axis=2), render_clip("blue", "circle", "right", **kw),
                                   render_clip("red", "square", "right", **kw), np.repeat(src[3:4], len(src), 0),
                                   src[::-1].copy())))
    emb = pipe.encode_prompts(["a red circle moving right"])
    gen = torch.Generator("cpu").manual_seed(seed)

    def keys(clip, t, noise):
        a, b = bb.noise_coefficients(t)
        x_t = a * bb.to_working(frames_to_tensor(clip)) + b * noise
        taps = KeyTaps(bb, layers)
        with taps, torch.no_grad():
            bb.predict_noise(x_t, t, emb)
            return taps.take(len(clip))

    out = {name: {"s_ssm": [], "t_ssm": []} for name in variants}
    shape = bb.to_working(frames_to_tensor(src)).shape
    for t in timesteps:
        noise = torch.randn(shape, generator=gen)
        ref = keys(src, t, noise)
        for name, clip in variants.items():
            k = keys(clip, t, noise)
            pairs = [ssm_losses(k[n], ref[n], "torch") for n in layers]
            out[name]["s_ssm"].append(float(np.mean([float(p[0]) for p in pairs])))
            out[name]["t_ssm"].append(float(np.mean([float(p[1]) for p in pairs])))
    return {"timesteps": list(timesteps), "layers": list(layers), "losses": out}


STRUCTURE = ("shifted 3 px", "other shape", "frozen (no motion)")


def selectivity(sens: dict) -> float:
    """How much more S-SSM reacts to a change of structure (shift, shape, motion) than to a change of
    colour: the mean S-SSM loss of the structure variants over the recoloured one's. A tap that
    guards structure and leaves appearance free to change scores high."""
    s = {k: float(np.mean(v["s_ssm"])) for k, v in sens["losses"].items()}
    return float(np.mean([s[k] for k in STRUCTURE]) / max(s["recoloured"], 1e-12))


def per_layer(pipe, cases: list[dict], steps: int, every: int, cfg) -> dict:
    """Each self-attention layer the backbone can tap, alone: what its S-SSM sees (sensitivity,
    selectivity) and its gradient against V-DDS along real edits (``walk`` with that tap only)."""
    rows = {}
    for layer in pipe.backbone.spatial_self_attention_layers():
        t0 = time.time()
        sens = sensitivity(pipe, layers=[layer])
        ratios_s, ratios_t = [], []
        for case in cases:
            c = dataclasses.replace(cfg, source_prompt=case["source_prompt"], target_prompt=case["target_prompt"],
                                    steps=steps, tap_layers=(layer,))
            late = [r for r in walk(pipe, case, c, every) if r["step"] > steps // 2]
            ratios_s.append(float(np.median([r["s_ratio_per_weight"] for r in late])))
            ratios_t.append(float(np.median([r["t_ratio_per_weight"] for r in late])))
        rows[layer] = {"selectivity": selectivity(sens), "sensitivity": sens["losses"],
                       "s_ratio": float(np.median(ratios_s)), "t_ratio": float(np.median(ratios_t)),
                       "s_share_at_default": float(np.median(ratios_s)) * cfg.s_ssm_weight,
                       "t_share_at_default": float(np.median(ratios_t)) * cfg.t_ssm_weight}
        print(layer, {k: v for k, v in rows[layer].items() if k != "sensitivity"}, f"({time.time() - t0:.0f}s)", flush=True)
    return rows


def per_layer_markdown(rows: dict, meta: dict) -> str:
    lines = [f"# Which layer to tap: each self-attention layer alone ({meta['machine']})", "",
             (f"Machine: {meta['machine_description']}. Model: `{meta['model']}`. Per layer: S-SSM and T-SSM of variants of "
              f"*a red circle moving right* against the clip (mean over t in {meta['timesteps']}), and the gradient ratio "
              f"|term| / |V-DDS| per unit weight, median over the second half of {meta['steps']}-step edits of "
              f"{', '.join(meta['cases'])} tapping that layer only (every {meta['every']} steps)."),
             "Selectivity: mean S-SSM loss of the structure variants (shifted, other shape, frozen) over the recoloured one's.", "",
             "| layer | selectivity | S-SSM shifted | S-SSM recoloured | S-SSM other shape | S-SSM frozen | T-SSM frozen | "
             "T-SSM backwards | S-SSM ratio / weight | T-SSM ratio / weight | S-SSM share at default | T-SSM share at default |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for layer, r in rows.items():
        s = {k: float(np.mean(v["s_ssm"])) for k, v in r["sensitivity"].items()}
        t = {k: float(np.mean(v["t_ssm"])) for k, v in r["sensitivity"].items()}
        lines.append(f"| {layer} | {r['selectivity']:.2f} | {s['shifted 3 px']:.2e} | {s['recoloured']:.2e} | "
                     f"{s['other shape']:.2e} | {s['frozen (no motion)']:.2e} | {t['frozen (no motion)']:.2e} | "
                     f"{t['played backwards']:.2e} | {r['s_ratio']:.3g} | {r['t_ratio']:.3g} | {r['s_share_at_default']:.3f} | "
                     f"{r['t_share_at_default']:.4f} |")
    lines += ["", f"Default weights: S-SSM {meta['s_ssm_weight']:g}, T-SSM {meta['t_ssm_weight']:g}, lr {meta['lr']}."]
    return "\n".join(lines) + "\n"


def sensitivity_markdown(sens: dict) -> str:
    lines = ["", "## What each loss sees", "",
             (f"S-SSM and T-SSM between the keys of *a red circle moving right* (32x32, 8 frames) and of a variant, "
              f"same t and noise, mean over t in {sens['timesteps']} (default tap layers)."), "",
             "| variant | S-SSM loss | T-SSM loss |", "|---|---|---|"]
    for name, v in sens["losses"].items():
        lines.append(f"| {name} | {np.mean(v['s_ssm']):.2e} | {np.mean(v['t_ssm']):.2e} |")
    return "\n".join(lines) + "\n"


def markdown(per_case: dict, meta: dict) -> str:
    lines = [
        f"# S-SSM / T-SSM gradient against V-DDS ({meta['machine']})",
        "",
        (f"Machine: {meta['machine_description']}. Edits at the package defaults (S-SSM {meta['s_ssm_weight']:g}, "
         f"T-SSM {meta['t_ssm_weight']:g}, lr {meta['lr']}, {meta['steps']} steps, box mask), decomposed every {meta['every']} steps."),
        "Ratios are |term gradient| / |V-DDS gradient| at weight 1, median over the second half of the edit;",
        "the last two columns are the weights that would make each term a fifth of the V-DDS gradient.",
        "",
        "| case | edit | S-SSM ratio / weight | T-SSM ratio / weight | S-SSM share at default | T-SSM share at default | S-SSM weight for 0.2 | T-SSM weight for 0.2 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cid, c in per_case.items():
        lines.append(
            f"| {cid} | {c['edit']} | {c['s_ratio']:.3g} | {c['t_ratio']:.3g} | {c['s_ratio'] * meta['s_ssm_weight']:.3f} | "
            f"{c['t_ratio'] * meta['t_ssm_weight']:.4f} | {0.2 / c['s_ratio']:.3g} | {0.2 / c['t_ratio']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    from fastdm import DreamMotionPipeline
    from fastdm.driver.config import config_from_preset

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="colour-00,colour-02,colour-03,shape-01")
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model", default=None, help="model folder or bundled name (shapes, shapes-dit); default shapes")
    ap.add_argument("--per-layer", action="store_true",
                    help="measure every tappable self-attention layer alone (sensitivity and gradient share) and write "
                         "results/loss-balance-per-layer-<model>-<machine>.*: how a backbone's default tap is chosen")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    suite = {c["id"]: c for c in build_suite()}
    from fastdm.backbone import resolve_model

    model = resolve_model(args.model)
    pipe = DreamMotionPipeline.from_pretrained(model)
    if args.per_layer:
        from pathlib import Path

        from benchmarks.common import repo_relative

        cfg = config_from_preset("paper", "a", "b", steps=args.steps)  # (measured under the paper's schedule)
        cases = [suite[c] for c in args.cases.split(",") if c and c != "none"]
        rows = per_layer(pipe, cases, args.steps, args.every, cfg)
        meta = {"machine": machine_name(), "machine_description": machine_description(), "model": repo_relative(model),
                "cases": [c["id"] for c in cases], "steps": args.steps, "every": args.every, "timesteps": [200, 500, 800],
                "lr": cfg.lr, "s_ssm_weight": cfg.s_ssm_weight, "t_ssm_weight": cfg.t_ssm_weight,
                "default_tap_layers": pipe.backbone.default_tap_layers()}
        md = per_layer_markdown(rows, meta)
        write_results(f"loss-balance-per-layer-{Path(model).resolve().name}-{machine_name()}", {"meta": meta, "layers": rows}, md)
        print(md)
        return
    if args.model is not None and model != resolve_model(None):
        raise SystemExit("error: the walked table is the bundled UNet model's; use --per-layer for another model")
    sens = sensitivity(pipe)
    per_case, raw = {}, {}
    cfg = config_from_preset("paper", "a", "b", steps=args.steps)  # the walked edits: the paper's schedule, as measured
    walked = {"every": args.every, "steps": args.steps, "lr": cfg.lr, "s_ssm_weight": cfg.s_ssm_weight,
              "t_ssm_weight": cfg.t_ssm_weight}
    for cid in [c for c in args.cases.split(",") if c and c != "none"]:
        case = suite[cid]
        t0 = time.time()
        rows = walk(pipe, case, dataclasses.replace(cfg, source_prompt=case["source_prompt"],
                                                      target_prompt=case["target_prompt"]), args.every)
        late = [r for r in rows if r["step"] > args.steps // 2]
        per_case[cid] = {"edit": f"{case['source_prompt']} -> {case['target_prompt']}",
                         "s_ratio": float(np.median([r["s_ratio_per_weight"] for r in late])),
                         "t_ratio": float(np.median([r["t_ratio_per_weight"] for r in late]))}
        raw[cid] = rows
        print(cid, per_case[cid], f"({time.time() - t0:.0f}s)", flush=True)
    stem = f"loss-balance-{machine_name()}"
    old = RESULTS / f"{stem}.json"
    if not per_case and old.exists():  # --cases none: refresh the sensitivity table, keep the walked cases
        prev = json.loads(old.read_text())  # ... and the settings they were walked at
        per_case, raw = prev["summary"], prev["steps"]
        walked = {k: prev["meta"][k] for k in walked}
    meta = {"machine": machine_name(), "machine_description": machine_description(), **walked}
    md = (markdown(per_case, meta) if per_case else "") + sensitivity_markdown(sens)
    write_results(stem, {"meta": meta, "summary": per_case, "steps": raw, "sensitivity": sens}, md)
    print(md)


if __name__ == "__main__":
    main()
