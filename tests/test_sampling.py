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

    def noise_coefficients(self, t):
        a = float(self.alphas_cumprod[t])
        return a**0.5, (1 - a) ** 0.5

    def predict_noise(self, x_t, t, text):
        a, b = self.noise_coefficients(t)
        return (x_t - a * self.c) / b


class _FlowOracle(_Oracle):
    """The same data point under flow matching, as fastdm's Wan backbone presents it: x_t = (1 - s) c + s e
    with s = (t + 1) / 1000; ``alphas_cumprod`` is the DDPM alpha-bar with the same signal-to-noise ratio."""

    def __init__(self, c):
        import torch

        super().__init__(c)
        s = (torch.arange(1000, dtype=torch.float64) + 1) / 1000
        self.alphas_cumprod = (1 - s) ** 2 / ((1 - s) ** 2 + s**2)

    def noise_coefficients(self, t):
        s = (t + 1) / 1000
        return 1 - s, s


def test_ddim_with_an_exact_denoiser_lands_on_the_data():
    """The DDIM update (deterministic and ancestral) ends at the data point when eps is exact."""
    import torch

    c = torch.linspace(-1, 1, 2 * 3 * 8 * 8).reshape(1, 3, 2, 8, 8)
    want = ((c[0].permute(1, 2, 3, 0) + 1) * 127.5).round()
    for eta in (0.0, 1.0):
        out = ddim_sample(_Oracle(c), "x", frames=2, steps=10, guidance_scale=7.5, seed=1, eta=eta)
        # the last DDIM step lands on t = 0 (alpha_bar 0.99915), not on t = -1: ~3% noise is left
        assert np.abs(out.astype(np.float64) - want.numpy()).mean() < 0.03 * 127.5


def test_ddim_on_a_flow_matching_backbone_lands_on_the_data():
    """A flow backbone's x_t is not variance-preserving: the loop must feed the model its own x_t
    (fed the VP form instead, the model sees the wrong noise level and the sample misses)."""
    import torch

    c = torch.linspace(-1, 1, 2 * 3 * 8 * 8).reshape(1, 3, 2, 8, 8)
    want = ((c[0].permute(1, 2, 3, 0) + 1) * 127.5).round()
    for eta in (0.0, 1.0):
        out = ddim_sample(_FlowOracle(c), "x", frames=2, steps=10, guidance_scale=7.5, seed=1, eta=eta)
        assert np.abs(out.astype(np.float64) - want.numpy()).mean() < 0.03 * 127.5
    # one deterministic step from the middle of the schedule: an exact model gives the data at once
    # (the last steps of a full run would hide a wrong noise level; a single step cannot)
    from fastdm.sampling import ddim_loop

    oracle = _FlowOracle(c.double())
    a, b = oracle.noise_coefficients(499)
    x_t = a * oracle.c + b * torch.randn(c.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0 = ddim_loop(oracle, x_t, [499], oracle.encode_prompts(["x", ""]), guidance_scale=7.5, gen=torch.Generator())
    # what is left is the last level's own noise, s = 0.001 (without the VP form: about 0.2)
    assert (x0 - oracle.c).abs().mean() < 0.002


def test_ancestral_sampling_is_seeded(editor):
    bb = editor.backbone
    a = ddim_sample(bb, "a red circle moving right", frames=2, size=(16, 16), steps=3, seed=3, eta=1.0)
    b = ddim_sample(bb, "a red circle moving right", frames=2, size=(16, 16), steps=3, seed=3, eta=1.0)
    c = ddim_sample(bb, "a red circle moving right", frames=2, size=(16, 16), steps=3, seed=3, eta=0.0)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
