"""DDIM + classifier-free guidance sampler through the backbone interface."""

import numpy as np

from fastdm.sampling import ddim_sample


def test_sampler_shape_and_determinism(editor):
    bb = editor.backbone
    a = ddim_sample(bb, "a red circle moving right", frames=3, size=(16, 16), steps=4, seed=3)
    b = ddim_sample(bb, "a red circle moving right", frames=3, size=(16, 16), steps=4, seed=3)
    c = ddim_sample(bb, "a red circle moving right", frames=3, size=(16, 16), steps=4, seed=4)
    assert a.shape == (3, 16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_sampler_latent_model(tiny_latent_model):
    from fastdm.backbone import load_backbone

    out = ddim_sample(load_backbone(tiny_latent_model), "a blue square", frames=2, size=(16, 16), steps=2)
    assert out.shape == (2, 16, 16, 3)


class _Oracle:
    """A backbone whose data is one known video c: its noise prediction is exact."""

    def __init__(self, c):
        import torch

        from fastdm.backbone.base import BackboneInfo

        self.c = c
        self.device = torch.device("cpu")
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.info = BackboneInfo("oracle", "pixel", "-", (8, 8), 1, 1, 1000)
        self.valid_range = (-1.0, 1.0)

    def to_working(self, frames):
        return frames.permute(1, 0, 2, 3).unsqueeze(0)

    def from_working(self, x):
        return x[0].permute(1, 0, 2, 3).clamp(-1, 1)

    def encode_prompts(self, prompts):
        import torch

        return torch.zeros(len(prompts), 1, 1)

    def predict_noise(self, x_t, t, text):
        a = float(self.alphas_cumprod[t])
        return (x_t - a**0.5 * self.c) / (1 - a) ** 0.5


def test_ddim_with_an_exact_denoiser_lands_on_the_data():
    """The DDIM update (deterministic and ancestral) ends at the data point when eps is exact."""
    import torch

    c = torch.linspace(-1, 1, 2 * 3 * 8 * 8).reshape(1, 3, 2, 8, 8)
    want = ((c[0].permute(1, 2, 3, 0) + 1) * 127.5).round()
    for eta in (0.0, 1.0):
        out = ddim_sample(_Oracle(c), "x", frames=2, steps=10, guidance_scale=7.5, seed=1, eta=eta)
        # the last DDIM step lands on t = 0 (alpha_bar 0.99915), not on t = -1: ~3% noise is left
        assert np.abs(out.astype(np.float64) - want.numpy()).mean() < 0.03 * 127.5


def test_ancestral_sampling_is_seeded(editor):
    bb = editor.backbone
    a = ddim_sample(bb, "a red circle moving right", frames=2, size=(16, 16), steps=3, seed=3, eta=1.0)
    b = ddim_sample(bb, "a red circle moving right", frames=2, size=(16, 16), steps=3, seed=3, eta=1.0)
    c = ddim_sample(bb, "a red circle moving right", frames=2, size=(16, 16), steps=3, seed=3, eta=0.0)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
