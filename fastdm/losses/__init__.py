"""Losses of DreamMotion: V-DDS (appearance), S-SSM (structure), T-SSM (motion)."""

from .ssm import spatial_ssm_loss, ssm_losses, temporal_ssm_loss
from .vdds import VDDSConfig, guided_noise, sample_timestep, vdds_gradient

__all__ = [
    "spatial_ssm_loss",
    "ssm_losses",
    "temporal_ssm_loss",
    "VDDSConfig",
    "guided_noise",
    "sample_timestep",
    "vdds_gradient",
]
