"""Video in and video out (imageio; its ffmpeg plugin for mp4/webm, pillow for gif/png/jpg).

Inputs: mp4, webm, mov, mkv, avi, gif, a single png/jpg, or a folder of png/jpg frames.
Frames come out as ``(F, H, W, 3)`` uint8 RGB. Outputs (mp4 or gif) are written to a temporary
file beside the target and renamed, so a failure never leaves a partial file.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FastDMError
from .atomic import atomic_output

VIDEO_EXTS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")
ISOBMFF_EXTS = (".mp4", ".mov", ".m4v")
_TOP_BOXES = {b"ftyp", b"styp", b"moov", b"mdat", b"moof", b"mfra", b"free", b"skip", b"wide", b"pdin", b"meta",
              b"uuid", b"sidx", b"ssix", b"prft", b"pnot", b"junk", b"emsg"}  # top-level ISO BMFF / QuickTime boxes
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
OUTPUT_EXTS = (".mp4", ".gif")
DEFAULT_FPS = 8.0


@dataclass(frozen=True)
class Crop:
    """How input pixels map to the model's frame: scale, then take [x, x+W) x [y, y+H)."""

    src_size: tuple[int, int]  # (W, H) of the input
    scale: float
    x: int
    y: int
    size: tuple[int, int]  # (W, H) after resize + crop

    def map_box(self, box) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = box
        s = self.scale
        return (x0 * s - self.x, y0 * s - self.y, x1 * s - self.x, y1 * s - self.y)


def _frame_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise FastDMError(f"folder '{folder}' holds no .png/.jpg frames; give a video file or a folder of frames")
    return files


def _to_rgb(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 2:
        frame = np.stack([frame] * 3, -1)
    if frame.shape[-1] == 4:
        frame = frame[..., :3]
    if frame.shape[-1] == 1:
        frame = np.repeat(frame, 3, -1)
    if frame.dtype != np.uint8:
        frame = np.clip(frame, 0, 255).astype(np.uint8)
    return frame


def _check_isobmff(path: Path, what: str) -> None:
    """An mp4/mov is a chain of boxes (size, type); a box running past the end of the file means
    the file was cut short. ffmpeg decodes what is left of such a file without a word."""
    size = path.stat().st_size
    pos = 0
    with open(path, "rb") as f:
        while pos + 8 <= size:
            f.seek(pos)
            head = f.read(16)
            n, kind = int.from_bytes(head[:4], "big"), head[4:8]
            if kind not in _TOP_BOXES:
                return  # not (or no longer) a chain of known boxes: let the decoder judge the file
            if n == 1 and len(head) == 16:
                n = int.from_bytes(head[8:16], "big")
            elif n == 0:  # the last box runs to the end of the file
                return
            if n < 8:
                return
            if pos + n > size:
                raise FastDMError(
                    f"{what} '{path}' is truncated: its '{kind.decode()}' box needs {pos + n} bytes but the file has "
                    f"{size}; copy or download it again (or re-encode what is left with ffmpeg)"
                )
            pos += n


def _iter_frames(path: Path, what: str):
    """Yield RGB uint8 frames of a video file, an image or a frame folder; also return fps."""
    import imageio.v3 as iio

    if path.is_dir():
        files = _frame_files(path)

        def gen():
            for f in files:
                try:
                    yield _to_rgb(iio.imread(f))
                except Exception:
                    raise FastDMError(f"{what} frame '{f}' is not a readable image; replace or remove it") from None

        return gen(), DEFAULT_FPS
    ext = path.suffix.lower()
    if ext not in VIDEO_EXTS + IMAGE_EXTS + (".gif",):
        raise FastDMError(f"{what} '{path}' has an unsupported type '{ext or 'none'}'; use mp4, webm, gif, png/jpg or a folder of frames")
    if path.stat().st_size == 0:
        raise FastDMError(f"{what} '{path}' is empty (0 bytes); give a real video file")
    if ext in ISOBMFF_EXTS:
        _check_isobmff(path, what)
    try:
        if ext in VIDEO_EXTS:
            meta = iio.immeta(path, plugin="FFMPEG")
            fps = float(meta.get("fps") or DEFAULT_FPS)
            it = iio.imiter(path, plugin="FFMPEG")
        elif ext == ".gif":
            meta = iio.immeta(path)
            dur = meta.get("duration") or 0
            fps = 1000.0 / dur if dur else DEFAULT_FPS
            it = iio.imiter(path)
        else:  # png/jpg: one frame, or several for an animated png
            fps = DEFAULT_FPS
            it = iio.imiter(path)
    except FastDMError:
        raise
    except Exception:
        raise FastDMError(f"{what} '{path}' could not be read: it is not a valid {ext.lstrip('.')} file (corrupt or another format)") from None

    def gen():
        try:
            for fr in it:
                yield _to_rgb(np.asarray(fr))
        except FastDMError:
            raise
        except Exception:
            fix = "save it again as png/jpg" if ext in IMAGE_EXTS else "re-encode it, e.g. with ffmpeg"
            raise FastDMError(f"{what} '{path}' could not be decoded (corrupt or cut-short file); {fix}") from None

    return gen(), fps


def check_span(start: float | None, end: float | None) -> None:
    """``start``/``end`` (seconds into the input) make sense together, or a one-line error."""
    for name, v in (("start", start), ("end", end)):
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
            raise FastDMError(f"`{name}` must be a number of seconds >= 0, got {v!r}")
    if start is not None and end is not None and end <= start:
        raise FastDMError(f"`end` ({end:g} s) must come after `start` ({start:g} s)")


def _first_frame(fps: float, start: float | None) -> int:
    """The first frame at or after ``start`` seconds (frame i is shown at i / fps)."""
    return 0 if not start else max(0, math.ceil(start * fps - 1e-6))


def _kept_frames(path: str | os.PathLike, frames: int | None, stride: int, what: str, to_end: bool, seen: dict,
                 start: float | None = None, end: float | None = None):
    """Frames s, s + stride, s + 2*stride, ... (at most ``frames``; s the first frame at or after ``start`` seconds,
    none at or after ``end``) as ``(index, frame)``, decoded one at a time; every kept frame's size checked against
    the first's. ``seen`` gets ``fps``, ``total`` (the frames decoded: all of them when ``to_end``, else up to the
    last kept one) and ``size`` (W, H)."""
    p = Path(path)
    if not p.exists():
        raise FastDMError(f"{what} '{path}' does not exist; check the path")
    if stride < 1:
        raise FastDMError(f"`stride` must be >= 1, got {stride}")
    if frames is not None and frames < 1:
        raise FastDMError(f"`frames` must be >= 1, got {frames}")
    check_span(start, end)
    it, seen["fps"] = _iter_frames(p, what)
    first_i = _first_frame(seen["fps"], start)
    stop_i = None if end is None else _first_frame(seen["fps"], end)
    kept, first, seen["total"] = 0, None, 0
    for i, fr in enumerate(it):
        seen["total"] = i + 1
        full = (frames is not None and kept == frames) or (stop_i is not None and i >= stop_i)
        if i >= first_i and (i - first_i) % stride == 0 and not full:
            if first is None:
                first = fr.shape
                seen["size"] = (fr.shape[1], fr.shape[0])
            elif fr.shape != first:
                raise FastDMError(f"{what} '{path}': frame {i} is {fr.shape[1]}x{fr.shape[0]}, the first frame read {first[1]}x{first[0]}; all frames must have one size")
            kept += 1
            yield i, fr
        elif full and not to_end:
            break
    if not kept and (start or end is not None) and seen["total"]:
        raise FastDMError(f"{what} '{path}' has no frames between `start` and `end`: it has {seen['total']} frames at "
                          f"{seen['fps']:g} fps ({seen['total'] / seen['fps']:.2f} s); give a span inside the clip")
    if not kept:
        raise FastDMError(f"{what} '{path}' has no frames that can be decoded (corrupt or cut short?); "
                          "re-encode it, e.g. with ffmpeg, or give another file")


def read_frames(path: str | os.PathLike, *, frames: int | None = None, stride: int = 1, what: str = "input video",
                with_total: bool = False, size: tuple[int, int] | None = None, start: float | None = None,
                end: float | None = None, pick=None):
    """Read frames s, s + stride, s + 2*stride, ... (at most ``frames`` of them; s the first frame at or after
    ``start`` seconds, none at or after ``end``). Returns (array, fps, indices), and with ``with_total`` also the
    number of frames in the whole input (counted in the same pass). With ``size`` = (W, H) each kept frame is
    resized and centre-cropped as it is decoded, so only frames of that size are held. ``pick``: positions into
    those frames (repeats allowed); only they are held, returned in ``pick``'s order."""
    seen: dict = {}
    held, crop = {}, None
    want = None if pick is None else set(pick)
    if pick is not None and not len(pick):
        raise FastDMError(f"{what} '{path}': no frame positions to pick")
    n_kept = 0
    for k, (i, fr) in enumerate(_kept_frames(path, frames, stride, what, with_total, seen, start, end)):
        n_kept = k + 1
        if want is not None and k not in want:
            continue
        if size is not None and crop is None:
            crop = plan_crop(seen["size"], size)
        held[k] = (i, fr if crop is None else resize_crop(fr[None], crop)[0])
    order = sorted(held) if pick is None else list(pick)
    missing = [k for k in order if k not in held]
    if missing:
        raise FastDMError(f"{what} '{path}' has {n_kept} frames to pick from; position {missing[0]} is past them")
    out, idx = np.stack([held[k][1] for k in order]), [held[k][0] for k in order]
    return (out, seen["fps"], idx, seen["total"]) if with_total else (out, seen["fps"], idx)


def probe_frames(path: str | os.PathLike, *, frames: int | None = None, stride: int = 1, what: str = "input video",
                 with_total: bool = False, start: float | None = None, end: float | None = None) -> dict:
    """What :func:`read_frames` would read, decoded one frame at a time and none kept: ``fps``, ``indices``,
    ``size`` (W, H) of the source and, with ``with_total``, ``total`` (frames in the whole input); the same
    checks and messages. Memory: one frame at a time, whatever the clip's length."""
    seen: dict = {}
    seen["indices"] = [i for i, _ in _kept_frames(path, frames, stride, what, with_total, seen, start, end)]
    if not with_total:
        seen.pop("total", None)
    return seen


# Host memory an edit holds per sample (frame x pixel x channel) of its working-size frames, whatever else it holds:
# the frames in and out as uint8, the float32 video tensor and the edit's float32 copies. Measured 27 B on the
# bundled pixel-space model (peak RSS, 64 against 1024 frames of 32x32, fastdm-edit --steps 1, AMD EPYC 2-core:
# benchmarks/results/read-memory-cpu-amd-epyc-2core-x86_64.md); a latent model's working tensor is smaller. Rounded up.
BYTES_PER_SAMPLE = 32
# A latent model holds the frames in and out as uint8 and the float32 video tensor its VAE encodes on the host; its
# working tensors are the latents (48x-192x fewer samples). Estimated, not measured: 2 + 4 B, rounded up.
LATENT_BYTES_PER_SAMPLE = 8


def source_info(path: str | os.PathLike) -> dict | None:
    """What the container says, nothing decoded: ``fps``, ``frames`` (estimated from the duration for a video) and
    ``size`` (W, H); None when it does not say (the read then finds out, with its own messages)."""
    from PIL import Image

    p = Path(path)
    try:
        if p.is_dir():
            files = _frame_files(p)
            with Image.open(files[0]) as im:
                return {"fps": DEFAULT_FPS, "frames": len(files), "size": im.size}
        ext = p.suffix.lower()
        if ext in VIDEO_EXTS:
            import imageio.v3 as iio

            meta = iio.immeta(p, plugin="FFMPEG")
            fps, dur = float(meta.get("fps") or 0), float(meta.get("duration") or 0)
            if fps <= 0 or dur <= 0 or not math.isfinite(dur):
                return None
            return {"fps": fps, "frames": max(1, round(dur * fps)), "size": tuple(meta["size"])}
        with Image.open(p) as im:
            n = int(getattr(im, "n_frames", 1))
            dur = im.info.get("duration") or 0
            return {"fps": 1000.0 / dur if ext == ".gif" and dur else DEFAULT_FPS, "frames": n, "size": im.size}
    except Exception:
        return None


def kept_count(total: int, fps: float, *, frames: int | None = None, stride: int = 1, start: float | None = None,
               end: float | None = None) -> int:
    """How many frames the read keeps of ``total`` at ``fps`` (the rule of :func:`read_frames`)."""
    first = _first_frame(fps, start)
    stop = total if end is None else min(total, _first_frame(fps, end))
    n = max(0, -(-(stop - first) // max(1, stride)))
    return n if frames is None else min(n, frames)


def available_memory() -> int | None:
    """Bytes of host memory free for new work (Linux ``MemAvailable``), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(kept: int, size: tuple[int, int], *, what: str = "input video", detail: str = "",
               available: int | None = None, share: float = 0.8, space: str = "pixel") -> None:
    """Refuse, with the arithmetic, a read whose ``kept`` frames at working ``size`` (W, H) need more host memory
    than ``share`` of what is free (``BYTES_PER_SAMPLE`` per sample; a latent model's ``LATENT_BYTES_PER_SAMPLE``)."""
    available = available_memory() if available is None else available
    if available is None:
        return
    w, h = size
    per = LATENT_BYTES_PER_SAMPLE if space == "latent" else BYTES_PER_SAMPLE
    need = kept * w * h * 3 * per
    if need > share * available:
        raise FastDMError(f"{what}: {kept} frames{detail} at {w}x{h} need about {kept} x {w} x {h} x 3 x {per} B = "
                          f"{need / 1e9:.1f} GB of memory and this machine has {available / 1e9:.1f} GB free; edit a part "
                          "(`start`/`end` in seconds, `frames`, `stride`) or a smaller `size`")


def count_frames(path: str | os.PathLike, what: str = "input video") -> int:
    """Number of frames in a video, image or frame folder (decodes, keeps nothing)."""
    it, _ = _iter_frames(Path(path), what)
    return sum(1 for _ in it)


def plan_crop(src_size: tuple[int, int], size: tuple[int, int]) -> Crop:
    w, h = src_size
    tw, th = size
    scale = max(tw / w, th / h)
    rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
    return Crop(src_size, scale, (rw - tw) // 2, (rh - th) // 2, size)


def resize_crop(frames: np.ndarray, crop: Crop, nearest: bool = False) -> np.ndarray:
    """Resize (keeping aspect) so the target is covered, then centre-crop: (F, H, W[, 3]) arrays."""
    from PIL import Image

    tw, th = crop.size
    w, h = crop.src_size
    if (w, h) == (tw, th):
        return frames
    rw, rh = max(tw, round(w * crop.scale)), max(th, round(h * crop.scale))
    method = Image.NEAREST if nearest else Image.BICUBIC
    out = []
    for f in frames:
        im = Image.fromarray(f).resize((rw, rh), method)
        out.append(np.asarray(im)[crop.y : crop.y + th, crop.x : crop.x + tw])
    return np.stack(out)


def read_video(path: str | os.PathLike, *, size: tuple[int, int] | None = None, frames: int | None = None, stride: int = 1):
    """Read a video for editing: ``(frames (F, H, W, 3) uint8, fps)``, resized+cropped to ``size``=(W, H)."""
    arr, fps, _ = read_frames(path, frames=frames, stride=stride)
    if size is not None:
        arr = resize_crop(arr, plan_crop((arr.shape[2], arr.shape[1]), size))
    return arr, fps


def _check_target(p: Path, inputs, what: str, flag: str) -> None:
    """``p`` is not an input, its folder exists and a file can really be created there (as root,
    ``os.access`` says yes to read-only folders, so this tries)."""
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise FastDMError(f"{what} folder '{parent}' does not exist; create it or choose another {flag}")
    for i in inputs:
        if i is None:
            continue
        ip = Path(i)
        if ip.resolve() == p.resolve() or (ip.exists() and p.exists() and os.path.samefile(ip, p)):
            raise FastDMError(f"{what} '{p}' would overwrite the input '{i}'; fastdm never overwrites its inputs, choose another {flag}")
    if p.is_dir():
        raise FastDMError(f"{what} '{p}' is a folder; give a file name, e.g. {p / ('edit' + (p.suffix or '.mp4'))}")
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".fastdm-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise FastDMError(f"cannot write to {what} folder '{parent}' ({e.strerror or e}); choose another {flag}") from None


def check_output_path(path: str | os.PathLike, *, inputs: list[str | os.PathLike] = (), what: str = "output",
                      flag: str = "`out`") -> Path:
    """Fail early (before any work) if ``path`` cannot be written or would overwrite an input."""
    p = Path(path)
    if p.suffix.lower() not in OUTPUT_EXTS:
        raise FastDMError(f"{what} '{path}' must end in {' or '.join(OUTPUT_EXTS)}")
    _check_target(p, inputs, what, flag)
    return p


def check_report_path(path: str | os.PathLike, *, inputs: list[str | os.PathLike] = ()) -> Path:
    """The JSON report: ends in .json, is not an input, and its folder exists and is writable."""
    p = Path(path)
    if p.suffix.lower() != ".json":
        raise FastDMError(f"`report='{path}'` must end in .json")
    _check_target(p, inputs, "report", "`report`")
    return p


def write_video(path: str | os.PathLike, frames, fps: float) -> None:
    """Write (F, H, W, 3) uint8 frames to mp4 or gif atomically. ``frames`` may be an iterable of (H, W, 3) frames,
    made as they are written (mp4: streamed to the encoder one at a time, so a long comparison or mask video is
    never held whole; a gif is small and collected)."""
    import itertools

    import imageio.v2 as iio2
    import imageio.v3 as iio

    p = Path(path)
    ext = p.suffix.lower()
    if ext not in OUTPUT_EXTS:
        raise FastDMError(f"output '{path}' must end in {' or '.join(OUTPUT_EXTS)}")
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise FastDMError(f"output '{path}': no frames to write")
    with atomic_output(p) as tmp:
        if ext == ".mp4":
            even = first.shape[0] % 2 == 0 and first.shape[1] % 2 == 0
            with iio2.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", macro_block_size=1,
                                 ffmpeg_params=["-crf", "12"], pixelformat="yuv420p" if even else "yuv444p") as w:
                for fr in itertools.chain([first], it):
                    w.append_data(np.ascontiguousarray(fr))
        else:
            iio.imwrite(tmp, np.stack([first, *it]), extension=".gif", duration=1000.0 / fps, loop=0)


def enlarge(frames: np.ndarray, height: int) -> np.ndarray:
    """(F, H, W, 3) frames enlarged by a whole factor (nearest) to at least ``height`` rows."""
    k = max(1, -(-height // frames.shape[1]))
    return frames.repeat(k, axis=1).repeat(k, axis=2) if k > 1 else frames


def preview_strip(frames: np.ndarray, height: int = 96) -> np.ndarray:
    """(F, H, W, 3) -> one image: the frames side by side (enlarged, 2 px apart)."""
    frames = enlarge(frames, height)
    gap = np.full((frames.shape[1], 2, 3), 40, np.uint8)
    parts = []
    for f in frames:
        parts += [f, gap]
    return np.concatenate(parts[:-1], axis=1)


def side_by_side(*videos: np.ndarray) -> np.ndarray:
    """Videos of one size side by side, frame by frame (input | edit, or input | mask | edit)."""
    return np.concatenate(videos, axis=2)
