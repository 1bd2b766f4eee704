"""Edit configuration (the knobs of one DreamMotion edit)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from ..errors import BadInput

OPTIMIZERS = ("sgd", "adam")
MASK_SCOPES = ("all", "vdds")
# how t is drawn per step: "uniform" (paper: t ~ U{t_min..t_max}); "anneal" (step k of N draws from the
# k-th of N equal strata, from t_max down to t_min: DreamTime / DVRF-style descending t); "stratified"
# (each stratum once per N steps, in a random order)
T_SCHEDULES = ("uniform", "anneal", "stratified")
LR_SCHEDULES = ("constant", "cosine", "linear")  # the learning rate over the N steps (cosine/linear end near 0)
# "steps": run them all; "converged": stop when the edit stops moving (steps = the cap); "extend": after the steps,
# continue segment by segment while the edit is unfinished (driver/schedule.py ExtensionRule)
STOP_RULES = ("steps", "converged", "extend")
EXTEND_SIGNALS = ("speed", "vdds")  # what "extend" reads: the edit's movement per unit lr, or the masked V-DDS residual
EXTEND_SPANS = ("full", "low")  # a continuation segment's t: the whole annealed range again, or its last strata


@dataclass
class EditConfig:
    source_prompt: str
    target_prompt: str
    # The default schedule (benchmarks/cost.py; ARCHITECTURE.md, "What an edit costs"): SGD decaying on a
    # cosine, t annealed from high to low, 12 steps: 1/16 of the paper's denoiser evaluations. lr 0.8 is the
    # built-in value for models nobody has measured; the bundled models carry their measured defaults in their
    # fastdm.json (the UNet lr 4.0 with S-SSM 6000, ARCHITECTURE.md rule 11; the transformer lr 3.2 with S-SSM 6000
    # and the graded automatic mask, soft_mask 1, rule 13).
    # The paper's: PRESETS["paper"].
    steps: int = 12
    lr: float = 0.8
    optimizer: str = "sgd"  # "sgd" or "adam"
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
    # An automatic mask graded by the cross-attention map it came from: inside the mask the update is weighted by
    # min(1, heat / threshold) ** soft_mask (1 where Otsu's rule put the edit's words, falling off over the dilation
    # ring and the map's fainter parts); 0 keeps the mask binary. A high-t step paints the target into the whole
    # mask, a halo around the object that the later, small steps do not take back (ARCHITECTURE.md, "Fourth round").
    # A user's mask or boxes have no map and stay binary.
    soft_mask: float = 0.0
    loss_backend: str = "auto"
    t_schedule: str = "anneal"  # (paper: "uniform")
    lr_schedule: str = "cosine"  # (paper: "constant")
    momentum: float = 0.0  # SGD momentum (paper: none)
    stop: str = "steps"  # paper: run all the steps
    stop_window: int = 6  # "converged": steps over which progress is measured
    stop_tol: float = 0.15  # "converged": stop when the last window moved the edit less than this share of its peak window
    # "extend": continuation segments of this many steps (repeating the annealed schedule's last strata), at most
    # extend_max of them, the first at extend_lr x lr (each next one half that), while the rule says unfinished
    extend_segment: int = 4
    extend_max: int = 3
    extend_lr: float = 0.5
    extend_tol: float = 1.0  # continue while the last segment's signal is at least this many times the one before's
    # the signal the rule reads: "speed" (the edit's movement per unit learning rate) or "vdds" (the masked V-DDS
    # residual: continue while it has not fallen, i.e. the two prompts' predictions still differ as much as before)
    extend_on: str = "speed"
    extend_span: str = "full"  # a segment's t: "full" (the schedule restarted over t_max..t_min) or "low" (its last strata)
    # long clips: the model sees at most `window` working frames at once (None: the backbone's native
    # frame count; Wan: latent frames); windows overlap by this share (driver/windows.py)
    window: int | None = None
    window_overlap: float = 0.5
    # a two-expert model (Wan 2.2 A14B): the low-noise expert's guidance (None: guidance_scale), as the pipeline's
    guidance_scale_2: float | None = None

    def validate(self) -> None:
        """Every setting's type and range; a :class:`~fastdm.errors.BadInput` naming the field otherwise."""
        for name in ("source_prompt", "target_prompt"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise BadInput(f"`{name}` is empty; describe the video ({'as it is' if 'source' in name else 'as it should become'}) "
                               "in words", field=name)
        if not isinstance(self.steps, int) or self.steps < 1:
            raise BadInput(f"`steps` must be a positive integer, got {self.steps}", field="steps")
        if not self.lr > 0:
            raise BadInput(f"`lr` must be positive, got {self.lr}", field="lr")
        for name, allowed in (("optimizer", OPTIMIZERS), ("mask_scope", MASK_SCOPES), ("t_schedule", T_SCHEDULES),
                              ("lr_schedule", LR_SCHEDULES), ("stop", STOP_RULES)):
            if getattr(self, name) not in allowed:
                raise BadInput(f"`{name}={getattr(self, name)}` is unknown; choose one of {', '.join(allowed)}", field=name)
        for name in ("s_ssm_weight", "t_ssm_weight", "guidance_scale", "soft_mask"):
            if not getattr(self, name) >= 0:
                raise BadInput(f"`{name}` must be >= 0, got {getattr(self, name)}", field=name)
        if not 0 <= self.momentum < 1:
            raise BadInput(f"`momentum` must be in [0, 1), got {self.momentum}", field="momentum")
        if not isinstance(self.stop_window, int) or self.stop_window < 1:
            raise BadInput(f"`stop_window` must be a positive integer, got {self.stop_window}", field="stop_window")
        if not 0 < self.stop_tol < 1:
            raise BadInput(f"`stop_tol` must be in (0, 1), got {self.stop_tol}", field="stop_tol")
        for name in ("extend_segment", "extend_max"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (1 if name == "extend_segment" else 0):
                raise BadInput(f"`{name}` must be an integer >= {1 if name == 'extend_segment' else 0}, got {v}", field=name)
        if self.stop == "extend" and self.too_few_to_extend:
            raise BadInput(f"`extend_segment={self.extend_segment}` must be at most half of `steps={self.steps}` (the first decision "
                           "compares the schedule's last segment-length of steps with the ones before); give at least "
                           f"{2 * self.extend_segment} steps or `stop=steps`", field="extend_segment")
        if self.extend_on not in EXTEND_SIGNALS:
            raise BadInput(f"`extend_on={self.extend_on}` is unknown; choose {' or '.join(EXTEND_SIGNALS)}", field="extend_on")
        if self.extend_span not in EXTEND_SPANS:
            raise BadInput(f"`extend_span={self.extend_span}` is unknown; choose {' or '.join(EXTEND_SPANS)}", field="extend_span")
        if not self.extend_lr > 0:
            raise BadInput(f"`extend_lr` must be positive, got {self.extend_lr}", field="extend_lr")
        if not self.extend_tol >= 0:
            raise BadInput(f"`extend_tol` must be >= 0, got {self.extend_tol}", field="extend_tol")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise BadInput(f"`window` must be a positive number of frames, got {self.window}", field="window")
        if self.guidance_scale_2 is not None and not (isinstance(self.guidance_scale_2, (int, float)) and self.guidance_scale_2 >= 0):
            raise BadInput(f"`guidance_scale_2` must be >= 0, got {self.guidance_scale_2}", field="guidance_scale_2")
        if not 0 <= self.window_overlap < 1:
            raise BadInput(f"`window_overlap` must be in [0, 1), got {self.window_overlap}", field="window_overlap")

    @property
    def too_few_to_extend(self) -> bool:
        """Fewer steps than the continuation rule can judge (its first decision compares two segments' worth)."""
        return 2 * self.extend_segment > self.steps

    @property
    def cap(self) -> int:
        """The most steps this edit can run: ``steps``, plus every continuation segment with ``stop="extend"``."""
        return self.steps + (self.extend_max * self.extend_segment if self.stop == "extend" else 0)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tap_layers"] = list(self.tap_layers) if self.tap_layers else None
        return d

    def fingerprint(self) -> str:
        """Hash of everything that shapes the result except the step count (resume may extend it).

        Settings added after the first release count only when they differ from their defaults, and
        the removed ``extra`` field is hashed as it always was (``{}``): fingerprints of earlier
        checkpoints and benchmark runs stay valid."""
        d = self.to_dict()
        if d["stop"] != "extend":  # (steps: resume may extend a plain edit; an extended edit's segments follow its steps)
            d.pop("steps")
            for name in [k for k in d if k.startswith("extend_")]:
                d.pop(name)
        for name, default in _ADDED_DEFAULTS.items():
            if d.get(name) == default:
                d.pop(name)
        d["extra"] = {}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# settings added after the first release, at the values every run had before they existed (the paper's):
# a setting at this value is left out of the fingerprint, so earlier fingerprints stay valid
_ADDED_DEFAULTS = {"t_schedule": "uniform", "lr_schedule": "constant", "momentum": 0.0, "stop": "steps", "stop_window": 6,
                   "stop_tol": 0.15, "window": None, "window_overlap": 0.5, "guidance_scale_2": None,
                   "extend_segment": 4, "extend_max": 3, "extend_lr": 0.5, "extend_tol": 1.0, "extend_span": "full", "extend_on": "speed",
                   "soft_mask": 0.0}


# Named settings. "paper": DreamMotion's own schedule (SGD, lr 0.4, t ~ U[50, 950], 200 steps), bit for
# bit what fastdm ran before presets existed. Its schedule and loss weights are pinned whatever a measured model folder says (the
# bundled UNet's S-SSM 6000 included), so the paper's schedule is the same on every model; the rest (mask scope,
# windows) stays the folder's. "default": the dataclass defaults above, chosen by
# measurement (benchmarks/cost.py; ARCHITECTURE.md, "Cost").
PRESETS: dict[str, dict] = {
    "paper": {"steps": 200, "lr": 0.4, "optimizer": "sgd", "momentum": 0.0, "t_schedule": "uniform", "lr_schedule": "constant",
              "stop": "steps", "guidance_scale": 7.5, "t_min": 50, "t_max": 950, "weighting": "constant", "soft_mask": 0.0,
              "extend_on": "speed", "extend_tol": 1.0, "s_ssm_weight": 3000.0, "t_ssm_weight": 1000.0},
    "default": {},
}


def config_from_preset(preset: str | None, source_prompt: str, target_prompt: str, **settings) -> EditConfig:
    """``EditConfig`` of a preset (None: "default") with ``settings`` on top, validated."""
    return resolve_config(preset, source_prompt, target_prompt, settings)[0]


def check_defaults(defaults, where: str) -> dict:
    """A model's or family's defaults: a dict of ``EditConfig`` settings (not the prompts), or a one-line error."""
    names = {f.name for f in dataclasses.fields(EditConfig)} - {"source_prompt", "target_prompt"}
    if not isinstance(defaults, dict):
        raise BadInput(f"{where}: its defaults must be an object of settings, got {type(defaults).__name__}", field="model")
    unknown = sorted(set(defaults) - names)
    if unknown:
        raise BadInput(f"{where}: unknown setting(s) {', '.join(unknown)} in its defaults; settings are EditConfig fields",
                       field="model")
    return dict(defaults)


def resolve_config(preset: str | None, source_prompt: str, target_prompt: str, given: dict, *,
                   model_defaults: dict | None = None, family_defaults: dict | None = None,
                   family: str = "family") -> tuple[EditConfig, dict[str, str]]:
    """The edit's settings in layers, each over the one before: the built-in defaults (``EditConfig``), the model
    family's fallback (``family_defaults``, e.g. its pipeline's guidance scale), the model folder's measured defaults
    (``fastdm.json``'s ``defaults``), a preset the user named, then what the user gave. Returns the validated config
    and where each setting came from (``"default"``, ``family``, ``"fastdm.json"``, ``"preset NAME"``, ``"given"``)."""
    name = preset or "default"
    if name not in PRESETS:
        raise BadInput(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}", field="preset")
    layers = [(family, family_defaults or {}), ("fastdm.json", model_defaults or {})]
    if preset is not None:
        layers.append((f"preset {name}", PRESETS[name]))
    layers.append(("given", given))
    values: dict = {}
    source = {f.name: "default" for f in dataclasses.fields(EditConfig) if f.name not in ("source_prompt", "target_prompt")}
    for label, layer in layers:
        for k, v in layer.items():
            values[k] = v
            source[k] = label
    config = EditConfig(source_prompt, target_prompt, **values)
    layered_stop = next((layer["stop"] for _, layer in reversed(layers[:-1]) if "stop" in layer), EditConfig.stop)
    if config.stop == "converged" and source["steps"] != "given" and layered_stop == "extend":
        # steps=auto without a cap on a model whose schedule continues: its cap is that schedule's, segments included
        config.steps, source["steps"] = (dataclasses.replace(config, stop="extend").cap,
                                         f"{source['steps']}: its steps and continuation segments, the cap of stop=converged")
    if config.stop == "extend" and source["stop"] != "given" and config.too_few_to_extend:
        # a model's continuation rule belongs to its own schedule: given fewer steps than it can judge, the edit
        # runs the steps it was given (the user asked for the rule by name: the one-line error below instead)
        config.stop, source["stop"] = "steps", f"{source['stop']}: extend off, {config.steps} steps are too few to judge"
    config.validate()
    return config, source
