"""`fastdm-batch MANIFEST --out DIR`: many edits on Ray, resumable and fault tolerant.

The manifest is JSON Lines, one job a line: ``input``, ``source_prompt``, ``target_prompt``,
optional ``mask`` / ``boxes`` (paths) and ``output`` (a file name inside DIR), any ``EditConfig``
field by its own name (``"steps": 50``), and ``frames`` / ``stride`` / ``size`` / ``plan`` /
``backend`` as on the command line. Relative paths are read from the manifest's folder; blank
lines and lines starting with ``#`` are skipped.

Flow: every line is parsed and type-checked (any error: all of them are listed with their line
numbers and nothing runs); every job still to do is checked exactly as ``fastdm-edit`` checks
its input before loading the model (a job that fails is recorded as failed with the CLI's
one-line message, the others run); then each Ray actor loads the pipeline once and runs job
after job. Each result is appended to ``DIR/results.jsonl`` as it arrives (one ``write`` on an
``O_APPEND`` file, then fsync), so a re-run skips what is finished. A job whose worker dies is
retried on a fresh actor (from its checkpoint with ``--checkpoint-every``) up to
``--max-retries`` times. A worker that cannot start (its model does not load, a library does not
import) fails each job it is given at once with the innermost error, not retried (it would fail
again); Ray's own logs are under /tmp/ray/session_latest/logs.

Exit codes: 0 every job done; 2 bad usage, a manifest error, or (``--strict``) a job that fails
its checks; 3 the batch ran and some jobs failed (``results.jsonl`` says why); 1 internal error.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FastDMError, MissingDependency, flags_of, spell
from ..schema import JOB, OPTIONS, job_errors, settings_schema
from ..version import __version__
from .jobs import edit_request

PROG = "fastdm-batch"
# a job's errors name its manifest fields: the request's `out` is the manifest's `output`
MANIFEST_NAMES = {"out": "`output`"}
INSTALL_HINT = "pip install 'fastdm[batch]'"
RESULTS = "results.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = ".checkpoints"
LOCK = ".fastdm-batch.lock"
JOB_FIELDS = tuple(JOB)  # input, prompts, mask, boxes, output; then OPTIONS and every EditConfig setting (fastdm/schema.py)
MASK_WORDS = ("auto", "none")  # fastdm-edit --mask auto|none: words, not paths


class ManifestError(FastDMError):
    """The manifest has errors; ``errors`` lists them, each ``MANIFEST:LINE: message``."""

    def __init__(self, errors: list[str]):
        super().__init__(f"{len(errors)} error(s) in the manifest")
        self.errors = errors


@dataclass
class Job:
    line: int
    spec: dict  # the manifest object as written
    key: str  # hash of the spec: a changed line is a new job
    output: str  # file name inside --out
    paths: dict = field(default_factory=dict)  # input / mask / boxes resolved against the manifest's folder
    attempts: int = 0
    deaths: int = 0

    @property
    def ckpt_name(self) -> str:
        return f"line{self.line}-{self.key}"

    def produced(self) -> list[str]:
        out = Path(self.output)
        return [out.name, f"{out.stem}_compare{out.suffix}", f"{out.stem}_mask{out.suffix}", f"{out.stem}.json"]

    def payload(self) -> dict:
        """What a worker needs (plain JSON types only)."""
        return {"line": self.line, "key": self.key, "output": self.output, "paths": self.paths,
                "spec": {k: v for k, v in self.spec.items() if k not in JOB_FIELDS}, "prompts": [self.spec["source_prompt"], self.spec["target_prompt"]]}


# -- the manifest -----------------------------------------------------------------------------------
def read_manifest(path: str | Path) -> list[Job]:
    """Parse and type-check every line; raise :class:`ManifestError` listing every error."""
    path = Path(path)
    if not path.exists():
        raise FastDMError(f"manifest '{path}' does not exist; check the path")
    if path.is_dir():
        raise FastDMError(f"manifest '{path}' is a folder; give a .jsonl file with one job a line")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise FastDMError(f"manifest '{path}' is not UTF-8 text; give a JSON Lines file, one job a line") from None
    base = path.parent
    jobs, errors = [], []
    owner: dict[str, int] = {RESULTS: 0, SUMMARY: 0}
    for n, raw in enumerate(text.splitlines(), 1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        where = f"{path}:{n}"
        try:
            spec = json.loads(s)
        except json.JSONDecodeError as e:
            errors.append(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object")
            continue
        except RecursionError:
            errors.append(f"{where}: nested too deeply; each line must be one flat JSON object")
            continue
        if not isinstance(spec, dict):
            errors.append(f"{where}: a job must be a JSON object like {{\"input\": ..., \"source_prompt\": ..., "
                          f"\"target_prompt\": ...}}, got {type(spec).__name__}")
            continue
        line_errors = job_errors(spec)  # fields and types: the one declared schema (fastdm/schema.py)
        output = spec.get("output")
        if isinstance(output, str) and (Path(output).name != output or output in (".", "..")
                                        or Path(output).suffix.lower() not in (".mp4", ".gif")):
            line_errors.append(f"'output' must be a file name (no folder) ending in .mp4 or .gif, written inside --out; got {output!r}")
        if line_errors:
            errors.extend(f"{where}: {e}" for e in line_errors)
            continue
        if not output:
            output = f"{Path(spec['input']).stem or 'video'}_line{n}.mp4"
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        paths = {k: spec[k] if Path(spec[k]).is_absolute() or (k == "mask" and spec[k] in MASK_WORDS) else str(base / spec[k])
                 for k in ("input", "mask", "boxes") if spec.get(k)}
        job = Job(n, spec, key, output, paths)
        clash = [(name, owner[name]) for name in job.produced() if name in owner]
        if clash:
            name, other = clash[0]
            errors.append(f"{where}: output file '{name}' is " + (f"line {other}'s too; give each job its own 'output'" if other
                          else f"{PROG}'s own; choose another 'output'"))
            continue
        owner.update({name: n for name in job.produced()})
        jobs.append(job)
    if errors:
        raise ManifestError(errors)
    if not jobs:
        raise FastDMError(f"manifest '{path}' holds no jobs; write one JSON object a line")
    return jobs


def job_request(job: dict | Job, out_dir: str | Path, *, model: str | None, device: str = "cpu", dtype: str = "fp32",
                checkpoint_every: int = 0, resume: bool = False):
    """The :class:`~fastdm.request.EditRequest` of one job."""
    job = job.payload() if isinstance(job, Job) else job
    spec, paths = job["spec"], job["paths"]
    options = {k: spec[k] for k in OPTIONS if k in spec}
    config_fields = settings_schema()
    settings = {k: tuple(v) if k == "tap_layers" and v is not None else v for k, v in spec.items() if k in config_fields}
    ckpt = Path(out_dir) / CHECKPOINTS / f"line{job['line']}-{job['key']}"
    return edit_request(paths["input"], *job["prompts"], out=Path(out_dir) / job["output"], model=model, device=device,
                        dtype=dtype, mask=paths.get("mask"), boxes=paths.get("boxes"), checkpoint_every=checkpoint_every,
                        checkpoint_dir=str(ckpt) if checkpoint_every else None, resume=str(ckpt) if resume else None,
                        settings=settings, **options)


def check_job(job: Job, out_dir: str | Path, *, model: str | None) -> None:
    """Everything ``fastdm-edit`` checks before it loads the model (raises its FastDMError)."""
    from ..request import run

    run(job_request(job, out_dir, model=model), check_only=True)


# -- results.jsonl ----------------------------------------------------------------------------------
def read_results(out_dir: str | Path) -> dict[tuple[int, str], dict]:
    """The latest record of every (line, job key); a torn last line (a crash mid-write) is ignored."""
    p = Path(out_dir) / RESULTS
    latest = {}
    if p.is_file():
        for raw in p.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(raw)
                latest[(int(rec["line"]), str(rec["job"]))] = rec
            except (ValueError, KeyError, TypeError):
                continue
    return latest


def append_result(out_dir: str | Path, record: dict) -> None:
    """One line, one ``write`` on an ``O_APPEND`` descriptor, then fsync: a crash leaves whole lines
    (at worst a torn last one, which :func:`read_results` skips and the next append closes)."""
    p = Path(out_dir) / RESULTS
    data = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            with open(p, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    data = b"\n" + data
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def is_finished(rec: dict | None, out_dir: Path, retry_failed: bool) -> bool:
    if rec is None:
        return False
    if rec.get("status") == "done":
        return all((out_dir / f).is_file() for f in rec.get("outputs", []))  # outputs deleted since: redo
    return rec.get("status") == "failed" and not retry_failed


# -- errors from workers ----------------------------------------------------------------------------
RAY_LOGS = "/tmp/ray/session_latest/logs (under RAY_TMPDIR if set)"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning)): (.+)$")


def innermost_error(e: BaseException) -> str:
    """``Type: message`` of the exception at the bottom of ``e``'s cause/context chain, on one line; the
    outermost one's first line follows in brackets where it is another exception."""
    outer, seen = e, set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    line = f"{type(e).__name__}: {e}"
    if e is not outer:
        first = (str(outer).strip().splitlines() or [""])[0]
        line += f" (raised under {type(outer).__name__}: {first})"
    return _one_line(line)


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(_ANSI.sub("", text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def actor_error_line(e: BaseException) -> str:
    """One plain line saying why a Ray actor died: for an error raised while it started, the innermost
    exception of the traceback Ray carries as text (a chained traceback prints its root cause first);
    otherwise Ray's own cause line (killed, out of memory, node lost), never the actor wrapper."""
    text = _ANSI.sub("", str(e))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if getattr(e, "actor_init_failed", False):
        for ln in lines:
            if _EXC_LINE.match(ln):
                return _one_line(ln)
    keep = [ln for ln in lines if not ln.startswith(("The actor died unexpectedly", "class_name:", "actor_id:", "pid:", "name:",
                                                     "namespace:", "ip:"))]
    return _one_line(" ".join(keep or lines) or type(e).__name__)


# -- the worker -------------------------------------------------------------------------------------
class Worker:
    """A Ray actor (``ray.remote(Worker)``): loads the pipeline once, then runs job after job."""

    def __init__(self, model: str | None, device: str, dtype: str, threads: int):
        import torch

        from ..driver import DreamMotionPipeline
        from ..driver.progress import quiet_libraries

        torch.set_num_threads(max(1, threads))
        quiet_libraries()
        self.model, self.device, self.dtype = model, device, dtype
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.pipe, self.start_error = None, None
        t0 = time.perf_counter()
        try:  # a worker that cannot load says why in each job's record (Ray would only say "creation task failed")
            self.pipe = DreamMotionPipeline.from_pretrained(model, device, dtype)
        except FastDMError as e:
            self.start_error, self.start_code = str(e), e.code
        except Exception as e:  # noqa: BLE001 - reported with the innermost cause (an ImportError deep in diffusers, say)
            self.start_error, self.start_code = innermost_error(e), None
        self.load_s = time.perf_counter() - t0

    def ready(self) -> str:
        return self.name

    def edit(self, job: dict, out_dir: str, checkpoint_every: int = 0) -> dict:
        """Run one job; never raises for a job's own failure (the record says why)."""
        from ..errors import ResumeMismatch
        from ..request import run

        t0 = time.perf_counter()
        if self.start_error is not None:  # the same every time: failed, not retried
            return {"worker": self.name, "status": "failed", "code": self.start_code,
                    "error": f"its worker could not start: {self.start_error} (Ray's own logs: {RAY_LOGS})",
                    "timings": {"job_s": round(time.perf_counter() - t0, 3)}}
        out_dir = Path(out_dir)
        ckpt = out_dir / CHECKPOINTS / f"line{job['line']}-{job['key']}"
        resume = bool(checkpoint_every) and (ckpt / "state.pt").is_file()
        rec = {"worker": self.name}
        try:
            try:
                request = job_request(job, out_dir, model=self.model, device=self.device, dtype=self.dtype,
                                      checkpoint_every=checkpoint_every, resume=resume)
                result = run(request, pipe=self.pipe)
            except ResumeMismatch:
                if not resume:
                    raise
                shutil.rmtree(ckpt, ignore_errors=True)  # a checkpoint of another edit: start afresh
                request = job_request(job, out_dir, model=self.model, device=self.device, dtype=self.dtype,
                                      checkpoint_every=checkpoint_every)
                result = run(request, pipe=self.pipe)
            report = result.report  # the result object itself: nothing is read back from disk
            report_path = Path(report["report_path"])
            shutil.rmtree(ckpt, ignore_errors=True)
            t = report["timings"]
            rec.update(status="done", outputs=[Path(p).name for p in report["outputs"]], report=report_path.name,
                       steps_run=report["steps_run"], resumed_from_step=report["resumed_from_step"],
                       final_losses=report["final_losses"], evaluations=report.get("evaluations"),
                       timings={"job_s": round(time.perf_counter() - t0, 3), "read_s": t.get("load_s"),
                                "step_mean_s": t.get("step_mean_s"), "edit_s": t.get("total_s")})
        except FastDMError as e:
            rec.update(status="failed", error=spell(str(e), MANIFEST_NAMES), code=e.code, timings={"job_s": round(time.perf_counter() - t0, 3)})
        except Exception as e:  # noqa: BLE001 - an internal error: recorded, never retried (it would fail again)
            rec.update(status="failed", error=f"internal error: {type(e).__name__}: {e}".replace("\n", " "),
                       timings={"job_s": round(time.perf_counter() - t0, 3)})
        return rec


# -- the driver -------------------------------------------------------------------------------------
def _require_ray():
    try:
        import ray
    except ImportError:
        raise MissingDependency(f"Ray is not installed; install it with: {INSTALL_HINT}") from None
    return ray


class BatchRunner:
    """Runs a manifest into ``out_dir``. ``running()`` tells which actor runs which job (tests use
    it to kill a worker mid-job)."""

    def __init__(self, manifest: str | Path, out_dir: str | Path, *, workers: int | None = None, address: str | None = None,
                 model: str | None = None, device: str = "cpu", dtype: str = "fp32", cpus_per_worker: int | None = None,
                 checkpoint_every: int = 0, max_retries: int = 2, retry_failed: bool = False, strict: bool = False,
                 quiet: bool = False, log=None):
        self.manifest, self.out = Path(manifest), Path(out_dir)
        self.workers_wanted, self.address, self.model, self.device, self.dtype = workers, address, model, device, dtype
        self.cpus_per_worker, self.checkpoint_every, self.max_retries = cpus_per_worker, checkpoint_every, max_retries
        self.retry_failed, self.strict, self.quiet = retry_failed, strict, quiet
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.workers: list = []
        self._in_flight: dict = {}  # ObjectRef -> (Job, worker index)
        self._lock = threading.Lock()

    def running(self) -> list[tuple[Job, object]]:
        with self._lock:
            return [(job, self.workers[i]) for job, i in self._in_flight.values()]

    def _check_args(self) -> None:
        if self.workers_wanted is not None and self.workers_wanted < 1:
            raise FastDMError(f"--workers must be >= 1, got {self.workers_wanted}")
        if self.max_retries < 0:
            raise FastDMError(f"--max-retries must be >= 0, got {self.max_retries}")
        if self.checkpoint_every < 0:
            raise FastDMError("--checkpoint-every must be >= 0")
        if self.cpus_per_worker is not None and self.cpus_per_worker < 1:
            raise FastDMError(f"--cpus-per-worker must be >= 1, got {self.cpus_per_worker}")
        if self.out.exists() and not self.out.is_dir():
            raise FastDMError(f"--out '{self.out}' is a file; give a folder (it is created if missing)")
        if not self.out.parent.is_dir():
            raise FastDMError(f"--out folder's parent '{self.out.parent}' does not exist; create it or choose another --out")

    def run(self) -> dict:
        from ..backbone import default_model_path
        from ..backbone.loader import check_model_folder

        t_start = time.perf_counter()
        self._check_args()
        jobs = read_manifest(self.manifest)  # (ManifestError lists every line's errors)
        check_model_folder(self.model or default_model_path())
        self.out.mkdir(exist_ok=True)
        with _exclusive(self.out):
            previous = read_results(self.out)
            todo = [j for j in jobs if not is_finished(previous.get((j.line, j.key)), self.out, self.retry_failed)]
            records: dict[int, dict] = {j.line: previous[(j.line, j.key)] for j in jobs if j not in todo}
            stats = {"skipped": len(jobs) - len(todo), "done": 0, "failed": 0, "retried": 0, "job_s": []}
            runnable, rejected = [], []
            for job in todo:  # every check fastdm-edit makes before loading the model, for every job, first
                try:
                    check_job(job, self.out, model=self.model)
                    runnable.append(job)
                except FastDMError as e:
                    rejected.append((job, spell(str(e), MANIFEST_NAMES)))
            if rejected and self.strict:
                raise ManifestError([f"{self.manifest}:{j.line}: {msg}" for j, msg in rejected])
            for job, msg in rejected:
                self.log(f"{PROG}: line {job.line}: {msg} (recorded as failed; the other jobs go on)")
                records[job.line] = self._record(job, {"status": "failed", "error": msg, "timings": {}, "stage": "check"})
                stats["failed"] += 1
            if not todo:
                self.log(f"{PROG}: nothing to do: every job in {self.manifest} has a result in {self.out / RESULTS}"
                         + ("" if self.retry_failed else " (--retry-failed runs failed jobs again)"))
            if runnable:
                self._run_on_ray(runnable, records, stats)
        wall = time.perf_counter() - t_start
        summary = self._summary(jobs, records, stats, wall)
        from ..io.atomic import write_json_atomic

        write_json_atomic(self.out / SUMMARY, summary)
        return summary

    def _record(self, job: Job, rec: dict) -> dict:
        rec = {"line": job.line, "job": job.key, "input": job.spec["input"], "output": job.output, "attempts": job.attempts,
               "deaths": job.deaths, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **rec}
        rec.setdefault("error", None)
        append_result(self.out, rec)
        return rec

    def _run_on_ray(self, jobs: list[Job], records: dict, stats: dict) -> None:
        ray = _require_ray()
        from ray.exceptions import RayActorError

        started = False
        if not ray.is_initialized():
            kwargs = {"log_to_driver": False, "logging_level": logging.WARNING}
            if self.address:  # (a ray:// address is Ray Client, which takes no driver logging options)
                ray.init(address=self.address, **({} if self.address.startswith("ray://") else kwargs))
            else:
                kwargs["include_dashboard"] = False
                n = self.workers_wanted or 1
                cpw = self.cpus_per_worker or max(1, (os.cpu_count() or 1) // n)
                self.cpus_per_worker = cpw
                ray.init(num_cpus=n * cpw if self.device == "cpu" else None, **kwargs)
            started = True
        try:
            resources = ray.cluster_resources()
            gpus = int(resources.get("GPU", 0))
            if self.device == "cuda":
                if gpus < 1:
                    raise FastDMError("--device cuda: the Ray cluster has no GPUs; use --device cpu or join a GPU cluster with --address")
                n = self.workers_wanted or gpus
            else:
                n = self.workers_wanted or 1
            cpw = self.cpus_per_worker or 1
            fit = gpus if self.device == "cuda" else int(resources.get("CPU", 0) // cpw)
            if fit < 1:
                raise FastDMError(f"the Ray cluster has {resources.get('CPU', 0):g} CPUs, fewer than --cpus-per-worker {cpw}")
            if n > fit:  # (more actors than fit would wait for resources forever)
                self.log(f"{PROG}: only {fit} worker(s) fit in the Ray cluster ({'GPUs' if self.device == 'cuda' else 'CPUs'}); using {fit}")
                n = fit
            n = min(n, len(jobs))
            actor_cls = ray.remote(Worker).options(num_cpus=cpw, num_gpus=1 if self.device == "cuda" else 0,
                                                   max_restarts=0, max_task_retries=0)

            def spawn():
                return actor_cls.remote(self.model, self.device, self.dtype, cpw)

            self.workers = [spawn() for _ in range(n)]
            pending, free = deque(jobs), list(range(n))
            bar = None
            if not self.quiet:
                from tqdm import tqdm

                bar = tqdm(total=len(jobs), desc=PROG, unit="job", dynamic_ncols=True)
            try:
                while pending or self._in_flight:
                    while pending and free:
                        job, i = pending.popleft(), free.pop(0)
                        job.attempts += 1
                        ref = self.workers[i].edit.remote(job.payload(), str(self.out), self.checkpoint_every)
                        with self._lock:
                            self._in_flight[ref] = (job, i)
                    ready, _ = ray.wait(list(self._in_flight), num_returns=1)
                    with self._lock:
                        job, i = self._in_flight.pop(ready[0])
                    try:
                        rec = ray.get(ready[0])
                    except RayActorError as e:  # the worker died (killed, crashed, its node lost)
                        job.deaths += 1
                        with self._lock:
                            self.workers[i] = spawn()
                        free.append(i)
                        why = actor_error_line(e)
                        if job.deaths > self.max_retries:
                            msg = (f"its worker died {job.deaths} times (last: {why}); Ray's own logs: {RAY_LOGS}; "
                                   "or raise --max-retries")
                            records[job.line] = self._record(job, {"status": "failed", "error": msg, "timings": {}})
                            stats["failed"] += 1
                            self._note(bar, f"line {job.line}: failed: {msg}")
                        else:
                            stats["retried"] += job.deaths == 1
                            self._note(bar, f"line {job.line}: worker died ({why}); retrying "
                                            f"({job.deaths}/{self.max_retries})" + (" from its checkpoint" if self.checkpoint_every else ""))
                            pending.appendleft(job)
                        continue
                    free.append(i)
                    records[job.line] = self._record(job, rec)
                    stats[rec["status"]] += 1
                    if rec["status"] == "done":
                        stats["job_s"].append(rec["timings"]["job_s"])
                    else:
                        self._note(bar, f"line {job.line}: failed: {rec['error']}")
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(done=stats["done"], failed=stats["failed"], retried=stats["retried"], refresh=True)
            finally:
                if bar is not None:
                    bar.close()
                for w in self.workers:
                    with contextlib.suppress(Exception):
                        ray.kill(w)
                self.workers_used = n
        finally:
            if started:
                ray.shutdown()

    def _note(self, bar, msg: str) -> None:
        if self.quiet:
            return
        if bar is not None:
            bar.write(msg, file=sys.stderr)
        else:
            self.log(msg)

    def _summary(self, jobs: list[Job], records: dict, stats: dict, wall: float) -> dict:
        times = stats["job_s"]
        per_job = {"mean": round(sum(times) / len(times), 2), "min": round(min(times), 2), "max": round(max(times), 2)} if times else None
        status = [records.get(j.line, {}).get("status", "pending") for j in jobs]
        from ..machine import machine_description, machine_name

        return {
            "manifest": str(self.manifest), "out": str(self.out), "machine": machine_description(self.device),
            "machine_name": machine_name(self.device), "jobs": len(jobs),
            "done": status.count("done"), "failed": status.count("failed"),
            "this_run": {"done": stats["done"], "failed": stats["failed"], "retried": stats["retried"], "skipped": stats["skipped"],
                         "wall_s": round(wall, 2), "job_s": per_job, "workers": getattr(self, "workers_used", 0),
                         "edits_per_hour": round(stats["done"] / wall * 3600, 1) if stats["done"] else 0.0},
            "results": [records.get(j.line, {"line": j.line, "status": "pending"}) for j in jobs],
        }


@contextlib.contextmanager
def _exclusive(out: Path):
    import fcntl

    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FastDMError(f"another {PROG} is running into '{out}'; wait for it or choose another --out") from None
        yield
    finally:
        os.close(fd)


def format_summary(summary: dict) -> str:
    rows = [("line", "status", "tries", "time", "output / error")]
    for r in summary["results"]:
        t = (r.get("timings") or {}).get("job_s")
        what = r.get("output", "") if r.get("status") == "done" else (r.get("error") or "")
        rows.append((str(r["line"]), r.get("status", "?"), str(r.get("attempts", "")), f"{t:.1f} s" if t else "-", what))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.rjust(w) if i in (0, 2, 3) else c.ljust(w) for i, (c, w) in enumerate(zip(row[:4], widths))) + "  " + row[4]
             for row in rows]
    s = summary["this_run"]
    per = (f"per job {s['job_s']['mean']} s mean ({s['job_s']['min']}-{s['job_s']['max']})" if s["job_s"] else "no job ran")
    lines.append(f"this run: done {s['done']}, failed {s['failed']}, retried {s['retried']}, skipped {s['skipped']} (finished before); "
                 f"wall {s['wall_s']} s with {s['workers']} worker(s); {per}; {s['edits_per_hour']} edits/hour")
    lines.append(f"all jobs: {summary['done']} done, {summary['failed']} failed of {summary['jobs']}; results in "
                 f"{Path(summary['out']) / RESULTS}")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{PROG}: error: {message} (see {PROG} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Many DreamMotion edits from a JSON Lines manifest on Ray: each actor loads the model "
                "once and runs job after job; results.jsonl records every job, so a re-run skips finished ones.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("manifest", help="JSON Lines file, one job a line (input, source_prompt, target_prompt, ...)")
    p.add_argument("--out", required=True, help="output folder (created if missing): the edits, their reports, results.jsonl, summary.json")
    p.add_argument("--workers", type=int, default=None, help="Ray actors (default: one per GPU with --device cuda, else 1)")
    p.add_argument("--address", default=None, help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting a local instance")
    p.add_argument("--model", default=None, help="local diffusers-format model folder, or a bundled model by name: shapes (the default, a UNet3D) or shapes-dit (a Wan transformer)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: one GPU per actor")
    from ..backbone.loader import DTYPES

    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--cpus-per-worker", type=int, default=None, help="CPU cores (torch threads) per actor (default: cores / workers locally, 1 on a cluster)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N", help="checkpoint each job every N steps; a retried job resumes from it")
    p.add_argument("--max-retries", type=int, default=2, help="retries of a job whose worker died (default 2)")
    p.add_argument("--retry-failed", action="store_true", help="run jobs recorded as failed again (done jobs are always skipped)")
    p.add_argument("--strict", action="store_true", help="a job that fails its checks stops the batch before any work")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _require_ray()
        runner = BatchRunner(args.manifest, args.out, workers=args.workers, address=args.address, model=args.model,
                             device=args.device, dtype=args.dtype, cpus_per_worker=args.cpus_per_worker,
                             checkpoint_every=args.checkpoint_every, max_retries=args.max_retries,
                             retry_failed=args.retry_failed, strict=args.strict, quiet=args.quiet)
        summary = runner.run()
    except ManifestError as e:
        for err in e.errors:
            print(f"{PROG}: error: {err}", file=sys.stderr)
        print(f"{PROG}: error: {len(e.errors)} error(s) above; fix them and run again (nothing was run)", file=sys.stderr)
        return 2
    except FastDMError as e:  # the API's parameter names, spelled as this command's flags
        print(f"{PROG}: error: {spell(str(e), flags_of(parser))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished jobs are in {Path(args.out) / RESULTS}, run again to go on", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        print(f"{PROG}: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0 if summary["failed"] == 0 else 3


if __name__ == "__main__":
    sys.exit(main())
