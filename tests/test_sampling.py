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
