"""The play server (pipeline/serve.py) on the tiny trained Breakout model (`tiny_trained`): Ray Serve
on the shared local cluster, requests through Serve's HTTP proxy, the page driven by a real headless
Chromium (its DevTools protocol, over websocket-client), the real game replayed by ALE, the
session clock a file the test writes; and the same model logged as an MLflow pyfunc model.
Nothing is mocked: every frame comes from the world model or the emulator."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import gymnasium as gym
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from workers import schema as S
from workers.clips import parquet_files

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


# -- helpers ---------------------------------------------------------------------------------------------
def _free_port(low: int = 25000, high: int = 32000) -> int:
    """A port that binds now, below Linux's ephemeral range (see tests/test_job.py)."""
    rng = random.Random()
    while True:
        port = rng.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def _call(base: str, path: str, body=None, method: str | None = None, raw: bytes | None = None):
    """(status, JSON or bytes) of one request; 4xx/5xx answers are returned, not raised."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(base.rstrip("/") + path, data=data, headers={"Content-Type": "application/json"},
                                 method=method or ("GET" if data is None else "POST"))
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            status, out, kind = r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        status, out, kind = e.code, e.read(), e.headers.get("Content-Type", "")
    return status, (json.loads(out) if "json" in kind else out)


def _png(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _episode(data_root: str, eid: str) -> pa.Table:
    """One recorded episode's rows in step order, read straight from the Parquet files."""
    parts = [pq.read_table(f, partitioning=None, filters=[(S.EPISODE_ID, "=", eid)]) for f in parquet_files(data_root)]
    ep = pa.concat_tables([p for p in parts if p.num_rows])
    return ep.take(pc.sort_indices(ep, [(S.STEP, "ascending")]))


def _replay(ep: pa.Table, start: int, actions: list[int]) -> np.ndarray:
    """The emulator's frame after the episode's reset seed, its recorded actions 0..start-1, then `actions`."""
    import ale_py  # noqa: F401 - registers ALE ids

    env = gym.make(ep[S.ENV_ID][0].as_py(), obs_type="rgb", **json.loads(ep[S.ENV_CONFIG][0].as_py()))
    obs, _ = env.reset(seed=int(ep[S.RESET_SEED][0].as_py()))
    for a in [*ep[S.ACTION].to_numpy()[:start], *actions]:
        obs, *_ = env.step(int(a))
    env.close()
    return obs


class Chromium:
    """A headless Chromium and its first tab, driven through the DevTools protocol."""

    KEYS = {"ArrowLeft": ("ArrowLeft", 37, ""), "ArrowRight": ("ArrowRight", 39, ""), "ArrowUp": ("ArrowUp", 38, ""),
            "ArrowDown": ("ArrowDown", 40, ""), " ": ("Space", 32, " "), "Enter": ("Enter", 13, "\r"),
            "r": ("KeyR", 82, "r"), "g": ("KeyG", 71, "g")}

    def __init__(self, exe: str, workdir: Path):
        import websocket

        profile = workdir / "profile"
        profile.mkdir(parents=True)
        self.log = workdir / "chromium.log"
        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", "--window-size=1400,1000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "w"), start_new_session=True)
        port_file, deadline = profile / "DevToolsActivePort", time.time() + 60
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"chromium did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as r:
            page = next(p for p in json.loads(r.read()) if p["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=300, suppress_origin=True)
        self.n = 0

    def call(self, method: str, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def eval(self, expr: str):
        r = self.call("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expr: str, timeout_s: float = 120):
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            value = self.eval(expr)
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"page: `{expr}` still false after {timeout_s} s; page error: "
                           f"{self.eval('window.play ? play.error : document.body.innerText')}")

    def key(self, key: str) -> None:
        code, vk, text = self.KEYS[key]
        down = {"type": "keyDown" if text else "rawKeyDown", "key": key, "code": code, "windowsVirtualKeyCode": vk}
        self.call("Input.dispatchKeyEvent", **down, **({"text": text} if text else {}))
        self.call("Input.dispatchKeyEvent", type="keyUp", key=key, code=code, windowsVirtualKeyCode=vk)

    def text(self, element_id: str) -> str:
        return self.eval(f"document.getElementById({json.dumps(element_id)}).textContent")

    def canvas(self, element_id: str) -> np.ndarray:
        """The canvas's pixels at its native size, RGB uint8 (210, 160, 3)."""
        b64 = self.eval(f"""(() => {{ const c = document.getElementById({json.dumps(element_id)});
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let s = '';
            for (let i = 0; i < d.length; i += 8192) s += String.fromCharCode.apply(null, d.subarray(i, i + 8192));
            return btoa(s); }})()""")
        rgba = np.frombuffer(base64.b64decode(b64), np.uint8).reshape(210, 160, 4)
        assert (rgba[..., 3] == 255).all(), "the canvas is not fully drawn"
        return rgba[..., :3]

    def close(self) -> None:
        import signal

        try:
            self.ws.close()
        finally:  # its process group: the browser and the helpers it started (a launcher may not exec)
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


# -- fixtures --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(ray_local, tiny_trained, tiny_split_root, tmp_path_factory):
    """The play app on the shared cluster, on a free port, its clock a file: (url, clock file, idle_s)."""
    from ray import serve

    from pipeline.serve import FileClock, ServeConfig, run

    _, wm_path, _ = tiny_trained
    clock = tmp_path_factory.mktemp("serve") / "clock"
    clock.write_text("0")
    cfg = ServeConfig(run=str(wm_path), data_root=tiny_split_root, port=_free_port(), name="play-test", idle_s=60,
                      num_cpus=0, torch_threads=2, max_chunk=8)
    try:
        url = run(cfg, clock=FileClock(clock))
        yield url, clock, cfg.idle_s
    finally:
        serve.shutdown()  # the proxy, the controller and the replica: other tests share this cluster


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    pytest.importorskip("websocket", reason="websocket-client drives Chromium: pip install -e '.[test]'")
    exe = os.environ.get("AWM_CHROMIUM") or next((shutil.which(n) for n in CHROMIUM_NAMES if shutil.which(n)), None)
    if exe is None:
        pytest.skip("no Chromium: install it with `apt-get install -y chromium` (scripts/setup.sh does as root), "
                    "or set AWM_CHROMIUM to a Chromium/Chrome binary")
    browser = Chromium(exe, tmp_path_factory.mktemp("chromium"))
    yield browser
    browser.close()


# -- the page in a browser -------------------------------------------------------------------------------
def test_page_plays_the_dream_and_the_real_game_in_chromium(server, chromium, tiny_split_root):
    """The page loads and starts a session; its canvas shows the held-out start frame; RIGHT and
    LEFT from the same start (reset between) give different generated frames; the real-game switch
    shows the emulator's frame, equal to an independent replay; the GIF link downloads the session."""
    from PIL import Image, ImageSequence

    url, _, _ = server
    b = chromium
    b.call("Page.navigate", url=f"{url}?split=test&seed=5")
    b.wait("window.play && play.ready && play.sid && play.frames >= 1 && !play.busy")
    assert b.text("game") == "Breakout" and "FIRE" in b.text("keys")
    sid = b.eval("play.sid")
    status, st = _call(url, f"/api/sessions/{sid}")
    assert status == 200 and st["split"] == "test" and st["seed"] == 5
    ep, start = _episode(tiny_split_root, st["episode_id"]), st["start_step"]
    assert ep[S.SPLIT][0].as_py() == "test" and start >= 3  # n_cond = 4 recorded frames end at `start`
    start_frame = S.frames_from_arrow(ep[S.FRAME])[start]
    c0 = b.canvas("dream")
    assert np.array_equal(c0, start_frame), "the canvas does not show the recorded start frame"

    b.key("ArrowRight")
    b.wait("play.frames >= 2 && !play.busy")
    right = b.canvas("dream")
    assert b.text("action") == "RIGHT" and b.text("t") == "1"
    b.key("r")  # reset: the same start and the same noise
    b.wait("play.frames >= 3 && !play.busy")
    assert np.array_equal(b.canvas("dream"), c0)
    b.key("ArrowLeft")
    b.wait("play.frames >= 4 && !play.busy")
    left = b.canvas("dream")
    assert b.text("action") == "LEFT"
    assert (left != right).any(), "RIGHT and LEFT from the same start and noise gave the same frame"
    assert (left != c0).any() and (right != c0).any()

    b.key("g")  # the real game, restored to the start and caught up with the LEFT taken so far
    b.wait("play.real && document.getElementById('realbox').hidden === false")
    assert b.eval("play.realExact") is True  # the replay reproduced the recorded start frame
    assert np.array_equal(b.canvas("real"), _replay(ep, start, [3]))
    assert np.array_equal(b.canvas("dream"), left)
    b.key(" ")  # FIRE: both step with the same key
    b.wait("play.frames >= 5 && !play.busy")
    assert b.text("action") == "FIRE"
    assert np.array_equal(b.canvas("real"), _replay(ep, start, [3, 1]))
    dream_fire = b.canvas("dream")

    href = b.eval("document.getElementById('gif').href")
    assert href.endswith(f"/api/sessions/{sid}/gif")
    assert b.eval("document.getElementById('gif').hasAttribute('download')")
    with urllib.request.urlopen(href, timeout=60) as r:
        gif = Image.open(io.BytesIO(r.read()))
    frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(gif)]
    assert gif.format == "GIF" and gif.size == (2 * 160 + 4, 210) and len(frames) == 3  # start, LEFT, FIRE
    # game screens keep their few colours exactly; the tiny model's generated frame is noisy, with far
    # more colours than a GIF frame's 256, so it comes back quantised
    assert np.array_equal(frames[0][:, :160], start_frame) and np.array_equal(frames[0][:, 164:], start_frame)
    assert np.array_equal(frames[2][:, 164:], _replay(ep, start, [3, 1]))
    assert np.abs(frames[2][:, :160].astype(int) - dream_fire).mean() < 12

    b.key("Enter")  # run: frames keep coming with no key held (NOOP); frames/s shows it
    b.wait("play.fps > 0 && parseFloat(document.getElementById('fps').textContent) > 0")
    b.key("Enter")
    b.wait("!play.running && !play.busy")
    assert b.eval("play.frames") > 5 and b.eval("play.error") is None


# -- the HTTP API ----------------------------------------------------------------------------------------
def test_api_chunks_reset_and_frame_formats(server):
    url, _, _ = server
    status, s = _call(url, "/api/sessions", {"split": "val", "seed": 11, "format": "raw"})
    assert status == 200 and s["split"] == "val" and s["t"] == 0
    sid = s["session_id"]
    raw0 = np.frombuffer(base64.b64decode(s["frame"]), np.uint8).reshape(210, 160, 3)
    _, again = _call(url, f"/api/sessions/{sid}/reset", {})
    assert np.array_equal(_png(again["frame"]), raw0)  # PNG and raw carry the same pixels
    status, a = _call(url, f"/api/sessions/{sid}/step", {"actions": ["RIGHT", 2]})  # one chunk of T=2
    assert status == 200 and len(a["frames"]) == 2 and a["t"] == 2 and a["action_names"] == ["RIGHT", "RIGHT"]
    _call(url, f"/api/sessions/{sid}/reset", {})
    _, b = _call(url, f"/api/sessions/{sid}/step", {"actions": [2, 2], "format": "raw"})
    for png, raw in zip(a["frames"], b["frames"]):  # reset replays the same noise: the same frames
        assert np.array_equal(_png(png), np.frombuffer(base64.b64decode(raw), np.uint8).reshape(210, 160, 3))
    status, info = _call(url, "/api/info")
    assert info["actions"] == ["NOOP", "FIRE", "RIGHT", "LEFT"] and info["n_cond"] == 4
    assert info["splits"]["test"] >= 1 and info["splits"]["val"] >= 1
    assert _call(url, f"/api/sessions/{sid}", method="DELETE")[0] == 200
    assert _call(url, f"/api/sessions/{sid}/step", {"action": 0})[0] == 404


def test_bad_requests_are_4xx_with_a_message(server):
    url, _, _ = server
    status, s = _call(url, "/api/sessions", {"seed": 1})
    sid = s["session_id"]
    cases = [
        ("/api/sessions/no-such-id/step", {"action": 1}, 404, "unknown session id 'no-such-id'"),
        (f"/api/sessions/{sid}/step", {"action": 4}, 400, "action 4 is not one of Breakout's actions: 0=NOOP"),
        (f"/api/sessions/{sid}/step", {"action": -1}, 400, "action -1 is not one of Breakout's actions"),
        (f"/api/sessions/{sid}/step", {"action": "UPFIRE"}, 400, "action 'UPFIRE' is not one of"),
        (f"/api/sessions/{sid}/step", {"actions": [0, 1, 9]}, 400, "action 9 is not one of"),
        (f"/api/sessions/{sid}/step", {"actions": [0] * 9}, 400, "9 actions in one step; at most 8"),
        (f"/api/sessions/{sid}/step", {"action": 1, "actions": [1]}, 422, "exactly one of `action`"),
        (f"/api/sessions/{sid}/step", {}, 422, "exactly one of `action`"),
        (f"/api/sessions/{sid}/step", {"action": 1, "speed": 2}, 422, "Extra inputs are not permitted"),
        (f"/api/sessions/{sid}/step", {"action": [1]}, 422, "valid"),
        ("/api/sessions", {"split": "holdout"}, 422, "'train', 'val' or 'test'"),
        ("/api/sessions", {"episode_id": "nope"}, 400, "no Breakout episode 'nope'"),
        ("/api/sessions", {"seed": -3}, 422, "greater than or equal to 0"),
        (f"/api/sessions/{sid}/gif?fps=0", None, 400, "fps=0"),
    ]
    for path, body, want, message in cases:
        status, out = _call(url, path, body)
        detail = out["detail"] if isinstance(out, dict) else out
        assert status == want and message in json.dumps(detail), (path, body, status, detail)
    _, st = _call(url, f"/api/sessions/{sid}")
    status, out = _call(url, "/api/sessions", {"episode_id": st["episode_id"], "step": 100_000})
    assert status == 400 and "must be in [3, " in out["detail"]
    status, out = _call(url, f"/api/sessions/{sid}/step", raw=b'{"action": 1')  # not JSON
    assert status == 422 and out["detail"][0]["msg"] == "JSON decode error"
    assert _call(url, f"/api/sessions/{sid}")[1]["t"] == 0  # nothing was generated by the refused steps


def test_play_latency_benchmark_through_http(server, tmp_path, capsys):
    """benchmarks/play_latency.py against the running app: a row per T, the CSV's columns."""
    import csv

    from benchmarks.play_latency import PlayLatencyConfig, main

    url, _, _ = server
    out = tmp_path / "play.csv"
    rows = main(PlayLatencyConfig(url=url, chunks=(1, 4), warmup=1, iters=2, sessions=3, out=str(out)))
    printed = capsys.readouterr().out
    assert "| gpu | T | euler_steps | frames_per_s | p50_ms | p95_ms |" in printed
    with open(out) as fh:
        got = list(csv.DictReader(fh))
    assert [r["T"] for r in got] == ["1", "4"] and all(r["gpu"].startswith("cpu") for r in got)
    assert {"gpu", "T", "euler_steps", "frames_per_s", "p50_ms", "p95_ms", "sessions", "rss_mb_idle",
            "rss_mb_sessions", "kb_per_session", "kb_held_per_session"} <= set(got[0])
    for r in rows:
        assert r["frames_per_s"] > 0 and 0 < r["p50_ms"] <= r["p95_ms"] and r["euler_steps"] == 2
        assert r["sessions"] == 3 and r["rss_mb_sessions"] > 0 and r["kb_held_per_session"] > 4 * 100  # 4 frames
    assert _call(url, "/api/stats")[1]["live_sessions"] >= 0


def test_sessions_expire_on_the_injected_clock(server):
    """Sessions idle past idle_s on the server's clock (a file here) are dropped; the live count
    returns to 0 and their ids answer 404."""
    url, clock, idle_s = server
    now = float(clock.read_text())
    sids = [_call(url, "/api/sessions", {"seed": i})[1]["session_id"] for i in range(2)]
    assert _call(url, "/api/stats")[1]["live_sessions"] >= 2
    clock.write_text(str(now + idle_s / 2))
    assert _call(url, f"/api/sessions/{sids[0]}")[0] == 200  # used: its idle time restarts
    clock.write_text(str(now + idle_s + 1))
    stats = _call(url, "/api/stats")[1]
    assert stats["live_sessions"] == 1  # the other one, unused since `now`, is gone
    assert _call(url, f"/api/sessions/{sids[1]}/step", {"action": 0})[0] == 404
    clock.write_text(str(now + idle_s * 2 + 2))
    assert _call(url, "/api/stats")[1]["live_sessions"] == 0
    status, out = _call(url, f"/api/sessions/{sids[0]}")
    assert status == 404 and "expired after 60 s idle" in out["detail"]


# -- where the model comes from ---------------------------------------------------------------------------
def test_world_model_logged_to_mlflow_loads_as_pyfunc_and_by_uri(tiny_trained, tiny_split_root, tmp_path):
    """The DiT run logged its world model as a pyfunc LoggedModel and its training data as its input;
    models:/ and runs:/ URIs resolve (through the run's store) to the same weights, and the pyfunc's
    predict is the world model's."""
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    from pipeline.serve import fetch_world_model
    from pipeline.tracking import local_tracking_uri, resolve_world_model_uri
    from workers.world_model import load_world_model

    run_dir, wm_path, _ = tiny_trained
    shutil.copy(Path(run_dir) / "mlflow.db", tmp_path / "mlflow.db")  # read a copy: the run is read-only
    uri = local_tracking_uri(tmp_path)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("atari-world-model")
    dit, vae = (client.get_run(client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{n}'")[0].info.run_id)
                for n in ("dit", "vae"))
    model_uri = dit.data.tags["world_model/pyfunc_uri"]
    assert model_uri.startswith("models:/m-")
    assert [o.model_id for o in dit.outputs.model_outputs] == [model_uri.removeprefix("models:/")]

    # the training data, as the runs' input: the Parquet root, its columns, the train rows it holds
    (ds_in,) = dit.inputs.dataset_inputs
    ds = ds_in.dataset
    assert json.loads(ds.source)["uri"] == str(Path(tiny_split_root).resolve()) and ds.source_type == "local"
    assert {t.key: t.value for t in ds_in.tags}["mlflow.data.context"] == "training"
    table = pa.concat_tables([pq.read_table(f, columns=[S.GAME, S.SPLIT], partitioning=None)
                              for f in parquet_files(tiny_split_root)])
    train_rows = int(pc.sum(pc.and_(pc.equal(table[S.GAME], "Breakout"), pc.equal(table[S.SPLIT], "train"))).as_py())
    profile = json.loads(ds.profile)
    assert profile["rows"] == train_rows > 0 and profile["game"] == "Breakout" and profile["split"] == "train"
    assert {c["name"] for c in json.loads(ds.schema)["mlflow_colspec"]} == set(S.COLUMNS)
    (vae_in,) = vae.inputs.dataset_inputs  # the VAE trained on the same rows (Breakout's train split)
    assert (vae_in.dataset.name, vae_in.dataset.digest) == (ds.name, ds.digest) and ds.name.endswith("/Breakout/train")

    weights = hashlib.sha256((wm_path / "dit.pt").read_bytes()).hexdigest()
    dirs = {u: resolve_world_model_uri(u, tmp_path / f"dl{i}", uri) for i, u in enumerate(
        [model_uri, f"runs:/{dit.info.run_id}/world_model_pyfunc", f"runs:/{dit.info.run_id}/world_model"])}
    for u, d in dirs.items():
        assert hashlib.sha256((d / "dit.pt").read_bytes()).hexdigest() == weights, u
    assert fetch_world_model(model_uri, tmp_path / "serve", tracking_uri=uri).joinpath("world_model.json").is_file()

    pyfunc = mlflow.pyfunc.load_model(str(dirs[model_uri].parent.parent))  # the pyfunc model's folder
    sig = pyfunc.metadata.signature
    assert [s.name for s in sig.inputs.inputs] == ["cond_frames", "actions"]
    frames = np.random.default_rng(0).integers(0, 256, (2, 4, 210, 160, 3), dtype=np.uint8)
    actions = np.array([[2, 2], [3, 1]], dtype=np.int64)
    got = pyfunc.predict({"cond_frames": frames, "actions": actions}, params={"seed": 7})
    wm = load_world_model(wm_path)
    want = wm.predict(torch.from_numpy(frames), torch.from_numpy(actions), 2,
                      generator=torch.Generator().manual_seed(7))
    assert got.shape == (2, 2, 210, 160, 3) and got.dtype == np.uint8 and np.array_equal(got, want.numpy())


def test_run_folders_name_their_world_model(tiny_trained, tmp_path):
    """`--run` on a run folder: stages/dit.json's model_path, a seed's dit-seed<N>.json, a folder
    that moved (models/ beside stages/), and what fails, saying why."""
    from pipeline.serve import locate_world_model

    _, wm_path, _ = tiny_trained
    run = tmp_path / "run"
    (run / "stages").mkdir(parents=True)
    (run / "stages" / "dit.json").write_text(json.dumps({"model_path": str(wm_path)}))
    assert locate_world_model(str(run)) == wm_path.resolve() == locate_world_model(str(wm_path))
    (run / "stages" / "dit.json").unlink()
    with pytest.raises(FileNotFoundError, match="no dit.json.*has not finished"):
        locate_world_model(str(run))
    for s in (1, 2):
        (run / "stages" / f"dit-seed{s}.json").write_text(json.dumps({"model_path": f"/gone/models/dit-seed{s}"}))
    with pytest.raises(FileNotFoundError, match=r"pick a seed with --seed \(trained: \['dit-seed1', 'dit-seed2'\]\)"):
        locate_world_model(str(run))
    shutil.copytree(wm_path, run / "models" / "dit-seed2")  # the run folder moved here from elsewhere
    assert locate_world_model(str(run), seed=2) == (run / "models" / "dit-seed2").resolve()
    with pytest.raises(FileNotFoundError, match="holds no world model"):
        locate_world_model(str(run), seed=1)
    with pytest.raises(FileNotFoundError, match="dit-seed3.json does not exist"):
        locate_world_model(str(run), seed=3)
    with pytest.raises(FileNotFoundError, match="neither a world-model directory"):
        locate_world_model(str(tmp_path))


def test_model_and_dataset_logging_wait_out_a_store_failure(tiny_trained, tiny_split_root, tmp_path, monkeypatch):
    """With the store down, `log_world_model` and `log_dataset` keep their calls in the pending
    JSONL (training carries on); `replay_pending` logs them once it is back."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import PENDING_FILE, Tracker, local_tracking_uri
    from workers.data import training_data_input

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _, wm_path, _ = tiny_trained
    tr = Tracker(tmp_path, "dit-down")

    def down(*a, **k):
        raise ConnectionError("store down")

    for name in ("create_logged_model", "log_inputs"):
        monkeypatch.setattr(tr.client, name, down)
    assert tr.log_world_model(wm_path, step=4) is None
    tr.log_dataset(**training_data_input(tiny_split_root, "Breakout"))
    pending = [json.loads(x) for x in (tmp_path / PENDING_FILE).read_text().splitlines()]
    assert [p["op"] for p in pending] == ["world_model", "dataset"] and pending[0]["path"] == str(wm_path)
    monkeypatch.undo()
    assert tr.replay_pending() == 2 and not (tmp_path / PENDING_FILE).exists()
    tr.end()
    run = MlflowClient(local_tracking_uri(tmp_path)).get_run(tr.run_id)
    assert run.data.tags["world_model/pyfunc_uri"].startswith("models:/m-") and len(run.outputs.model_outputs) == 1
    assert run.inputs.dataset_inputs[0].dataset.name.endswith("/Breakout/train")


def test_past_future_sessions_condition_on_the_recorded_then_the_played_actions(tiny_trained, tiny_split_root):
    """A "past_future" model also reads the actions between its condition frames: a session's first
    step passes the episode's recorded ones, the next the last n_cond - 1 of recorded + played; each
    step's frame is the model's own prediction from those (the same trained weights read the actions
    in that mode; a wrong past gives another frame)."""
    from pipeline.serve import EpisodeIndex, PlayCore
    from workers.world_model import WorldModel, load_world_model

    _, wm_path, _ = tiny_trained
    wm = load_world_model(wm_path)
    pf = WorldModel(wm.vae, wm.dit, latent_scale=wm.latent_scale, n_cond=wm.n_cond, horizon=wm.horizon,
                    action_mode="past_future", sampler=wm.sampler.cfg)
    core = PlayCore(pf, {}, EpisodeIndex(tiny_split_root, "Breakout"))
    r = core.start(split="test", seed=4)
    s = core.sessions[r["session_id"]]
    recorded = [int(a) for a in s.episode.actions[s.start - 3: s.start]]
    assert core.past_actions == 3 and s.past == recorded

    def predict(cond, actions):
        return pf.predict(cond, torch.tensor([actions]), 1, generator=g)[0, 0].numpy()

    first = _png(core.step(r["session_id"], [2])["frames"][0])
    g = torch.Generator().manual_seed(4)  # the session's noise, drawn in the same order
    ctx = torch.from_numpy(s.context)[None]
    assert np.array_equal(first, predict(ctx, recorded + [2]))
    second = _png(core.step(r["session_id"], ["LEFT"])["frames"][0])
    cond = torch.cat([ctx[:, 1:], torch.from_numpy(first)[None, None]], dim=1)
    assert np.array_equal(second, predict(cond, recorded[1:] + [2, 3]))
    g = torch.Generator().manual_seed(4)
    wrong_past = [1, 1, 1] if recorded == [0, 0, 0] else [0, 0, 0]
    assert not np.array_equal(first, predict(ctx, wrong_past + [2]))
