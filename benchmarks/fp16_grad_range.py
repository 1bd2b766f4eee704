"""How small the S-SSM / T-SSM key gradients are at ZeroScope's key sizes, against fp16's range.

    python -m benchmarks.fp16_grad_range [--frames 16]

For each ZeroScope key size (N, C) and each distance from the source (unrelated keys, keys_ref + 1e-3 and
+ 1e-5 noise), the float64 reference losses' gradients in the keys (fresh random keys, rounded to fp16 first, as
an fp16 model hands them over): the largest and the median magnitude, and the share below fp16's smallest
subnormal (2^-24, about 6e-8), i.e. what a plain fp16 backward turns into zeros. Writes
``results/fp16-grad-range-<machine>.{json,md}``. (Why fp16 models take the scaled path:
``DreamMotionStep._fp16_structure_gradients``.)
"""

from __future__ import annotations

import argparse

import torch

SIZES = [(2880, 320), (720, 640), (180, 1280), (45, 1280)]
NOISE = [None, 1e-3, 1e-5]
FP16_TINY = 2.0**-24


def grads(n: int, c: int, f: int, noise: float | None, seed: int = 0) -> dict:
    from fastdm.losses.ssm import _EPS

    def sim(k):
        a = torch.nn.functional.normalize(k, dim=-1, eps=_EPS)
        return a @ a.transpose(-1, -2)

    gen = torch.Generator().manual_seed(seed)
    kr = torch.randn(f, n, c, generator=gen) + 0.3
    k = torch.randn(f, n, c, generator=gen) + 0.3 if noise is None else kr + noise * torch.randn(f, n, c, generator=gen)
    k, kr = k.half().double().requires_grad_(True), kr.half().double()
    out = {}
    for name in ("spatial", "temporal"):
        k.grad = None
        if name == "spatial":
            loss = ((sim(k) - sim(kr)) ** 2).mean()
        else:
            loss = ((sim(k.mean(-2)) - sim(kr.mean(-2))) ** 2).mean()
        loss.backward()
        g = k.grad.abs()
        out[name] = {"loss": loss.item(), "max": g.max().item(), "median": g.median().item(),
                     "below_fp16_subnormal": (g < FP16_TINY).double().mean().item()}
    return out


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import machine_description, machine_name, write_results

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = []
    for n, c in SIZES:
        for noise in NOISE:
            for loss, r in grads(n, c, args.frames, noise).items():
                rows.append({"N": n, "C": c, "F": args.frames, "keys": "unrelated" if noise is None else f"source + {noise:g} noise",
                             "loss_kind": loss, **r})
                print(rows[-1], flush=True)
    lines = [f"# S-SSM / T-SSM key gradients against fp16's range ({machine_name('cpu')})", "",
             f"Machine: {machine_description('cpu')}. float64 reference losses on fresh random keys rounded to fp16 "
             f"(seed 0), {args.frames} frames; fp16's smallest subnormal 2^-24 = {FP16_TINY:.1e}. "
             "Command: `python -m benchmarks.fp16_grad_range`.", "",
             "| N | C | keys | loss | loss value | largest gradient | median gradient | share below fp16's smallest subnormal |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['N']} | {r['C']} | {r['keys']} | {r['loss_kind']} | {r['loss']:.2e} | {r['max']:.1e} | {r['median']:.1e} | "
              f"{r['below_fp16_subnormal']:.0%} |" for r in rows]
    j, m = write_results(f"fp16-grad-range-{machine_name('cpu')}", {"rows": rows, "frames": args.frames},
                         "\n".join(lines) + "\n", args.out)
    print("wrote", j, m)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
