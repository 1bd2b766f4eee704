"""Edit configuration (the knobs of one DreamMotion edit)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from ..errors import FastDMError

OPTIMIZERS = ("sgd", "adam")
MASK_SCOPES = ("all", "vdds")


@dataclass
class EditConfig:
    source_prompt: str
    target_prompt: str
    steps: int = 200  # paper
    lr: float = 0.4  # paper (SGD)
    optimizer: str = "sgd"  # "sgd" (paper) or "adam"
    seed: int = 0
    guidance_scale: float = 7.5
    t_min: int = 50  # DDS/CDS reference range
    t_max: int = 950
    weighting: str = "constant"  # w(t): "constant" (DDS) or "sds" (1 - alpha_bar)
    negative_prompt: str = ""  # the unconditional branch of classifier-free guidance
    # S-SSM / T-SSM weights. The losses are means over matrix entries (so O(1e-4..1e-2)); the
    # defaults were chosen by measurement on the shapes suite (ARCHITECTURE.md, "Loss weights"):
    # S-SSM 3000 (16-39% of the V-DDS gradient's norm) cuts the drift of 1000 by a third or more;
    # T-SSM above ~5000 only fights the edit, so it stays at 1000 (a few % of V-DDS).
    s_ssm_weight: float = 3000.0
    t_ssm_weight: float = 1000.0
    tap_layers: tuple[str, ...] | None = None  # glob patterns; None = backbone default
    # What a mask limits: "all" (default) the whole update, so nothing outside the mask changes;
    # "vdds" only the V-DDS gradient (S-SSM/T-SSM then also move the background).
    mask_scope: str = "all"
    loss_backend: str = "auto"
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        for name in ("source_prompt", "target_prompt"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                flag = "--" + name.replace("_", "-")
                raise FastDMError(f"{flag} is empty; describe the video ({'as it is' if 'source' in name else 'as it should become'}) in words")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise FastDMError(f"--steps must be a positive integer, got {self.steps}")
        if not self.lr > 0:
            raise FastDMError(f"--lr must be positive, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise FastDMError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.mask_scope not in MASK_SCOPES:
            raise FastDMError(f"unknown mask scope {self.mask_scope!r}; choose one of {', '.join(MASK_SCOPES)}")
        if self.s_ssm_weight < 0 or self.t_ssm_weight < 0:
            raise FastDMError("S-SSM/T-SSM weights must be >= 0")
        if self.guidance_scale < 0:
            raise FastDMError(f"guidance scale must be >= 0, got {self.guidance_scale}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tap_layers"] = list(self.tap_layers) if self.tap_layers else None
        return d

    def fingerprint(self) -> str:
        """Hash of everything that shapes the result except the step count (resume may extend it)."""
        d = self.to_dict()
        d.pop("steps")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
