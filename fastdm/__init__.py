"""fastdm: DreamMotion zero-shot video editing, fast and in little memory.

Data flow (one package per stage):
    fastdm.io        video (and mask) in, video out
    fastdm.backbone  the frozen text-to-video model behind a small interface
    fastdm.taps      attention-key feature taps
    fastdm.losses    V-DDS, S-SSM, T-SSM (PyTorch; fused Triton kernels in fastdm.kernels)
    fastdm.driver    the optimizer loop, plans, engines, schedules, checkpoints, reports
    fastdm.request   one edit request (check, read, edit or cascade, write) under every front end
    fastdm.cli       the `fastdm-edit` command; fastdm.service: `fastdm-batch`, `fastdm-app`

Python API::

    import fastdm
    pipe = fastdm.DreamMotionPipeline.from_pretrained()   # the bundled model; or a local folder
    frames, fps = fastdm.read_video("in.gif")
    result = pipe(frames, "a red circle moving right", "a blue circle moving right", steps=50)
    fastdm.write_video("out.mp4", result.frames, fps)
"""

from .driver import DreamMotionPipeline, EditConfig, EditResult, Editor, StepInfo, edit
from .errors import BadInput, Diverged, FastDMError, MissingDependency, ResumeMismatch, Unsupported
from .io import read_video, write_video
from .request import EditRequest

from .version import __version__

__all__ = ["DreamMotionPipeline", "EditConfig", "EditRequest", "EditResult", "Editor", "StepInfo", "edit", "FastDMError", "BadInput",
           "Unsupported", "MissingDependency", "Diverged", "ResumeMismatch", "read_video", "write_video"]
