"""Forward FLOPs of the Wan 2.1 T2V 1.3B transformer (preset architecture, meta device), to compare
with ../shared/reference/flops.md: python -m benchmarks.wan_forward_flops"""
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode
from fastdm.bench.presets import build_backbone
bb = build_backbone("wan2.1-t2v-1.3b", "meta", torch.bfloat16)
for frames in (33, 81):
    shape = bb.working_shape(frames, (832, 480))
    x = torch.zeros(shape, device="meta", dtype=torch.bfloat16)
    text = torch.zeros(1, 512, 4096, device="meta", dtype=torch.bfloat16)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        bb.denoiser_forward(x, torch.full((1,), 500, device="meta"), text)
    print(f"frames {frames}: latent {tuple(shape)}, forward {fc.get_total_flops() / 1e12:.1f} TFLOP")
