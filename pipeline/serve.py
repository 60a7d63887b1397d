"""Play a trained world model in a browser: a Ray Serve application.

    python -m pipeline.serve --run runs/smoke            # then open http://127.0.0.1:8000/
    python -m pipeline.serve --run runs/gpu-pong --seed 1 --host 0.0.0.0 --port 8080 --num-gpus 1
    python -m pipeline.serve --run models:/m-0123abcd --tracking-uri sqlite:////abs/runs/smoke/mlflow.db

`--run` takes a finished run folder (its `stages/dit.json`, or `stages/dit-seed<N>.json` with `--seed
N`, names the world model), a world-model directory (`models/<name>/`), or an MLflow URI of a logged
world model (`models:/<id>`, `runs:/<run id>/world_model_pyfunc`, `runs:/<run id>/world_model`;
pipeline/tracking.py). Sessions start from held-out contexts: n_cond recorded frames of the test
(or val) split of the model's training data (`--data-root` replaces the path the model recorded).

One replica holds every session (one per browser tab): its condition frames, its action history and
its random generator; a session idle for `--idle-s` seconds is dropped. Each session can switch on
the real game: the ALE emulator restored to the session's start by replaying the episode's
recorded reset seed and actions from step 0 (workers/schema.py), then stepped with the same actions
as the dream, so dream and reality play side by side.

HTTP API, JSON in and out. Frames are PNG, base64 (lossless, a few KB a game screen against 134 KB
of base64 raw bytes, ~1-3 ms to encode beside a model call of tens to hundreds of ms; the browser
decodes them natively), or with "format": "raw" the 210x160x3 RGB bytes, base64:

    GET    /                           the page (pipeline/static/play.html)
    GET    /api/info                   game, action meanings, n_cond, trained horizons, splits, limits
    GET    /api/stats                  live sessions, the replica's resident memory
    POST   /api/sessions               {"split": "test"|"val"|"train", "episode_id": str, "step": int,
                                        "seed": int, "sample_steps": int, "format": "png"|"raw"}
                                        (all optional) -> a new session and its start frame
    POST   /api/sessions/{id}/step     {"action": 3} or {"action": "FIRE"} (one frame), or
                                       {"actions": [3, 3, 2, 2]} (T frames: one generated chunk when
                                       T is a trained length, chained chunks otherwise)
    POST   /api/sessions/{id}/reset    back to the session's start, same noise seed
    POST   /api/sessions/{id}/real     {"on": true}: the emulator, restored and caught up
    GET    /api/sessions/{id}          the session's state (start, actions so far)
    GET    /api/sessions/{id}/gif      the session's frames as a GIF (dream | real side by side)
    DELETE /api/sessions/{id}          end it

Errors are 4xx with {"detail": message}: 404 unknown or expired session, 400 an action outside the
game's action set or a bad start, 422 a malformed body, 503 too many sessions.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at
# runtime, and through Serve's class-based view a string annotation made a JSON body a query param.
import base64
import copy
import dataclasses
import io
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

if __name__ == "__main__" and not __package__:
    # Run by path (`python pipeline/serve.py`): run again as `python -m pipeline.serve`,
    # with this file's checkout first on the import path and the working directory off it (-P),
    # so that this copy of the code is the one imported, not an installed one elsewhere.
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    os.execve(sys.executable, [sys.executable, "-P", "-m", "pipeline.serve", *sys.argv[1:]],
              {**os.environ, "PYTHONPATH": path})

import numpy as np
from fastapi import Body, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from pipeline import cli
from pipeline.cluster import init_ray

PAGE = Path(__file__).resolve().parent / "static" / "play.html"
FRAME_FORMATS = ("png", "raw")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ServeConfig:
    """Settings of the play server."""

    run: str = ""
    """A finished run folder, a world-model directory, or an MLflow URI (models:/..., runs:/...)."""
    seed: int = -1
    """Which seeded DiT of a run folder trained with --seed (`stages/dit-seed<N>.json`); -1 = the
    unseeded `stages/dit.json`, or the run's only seeded one."""
    data_root: str = ""
    """Episodes the sessions start from; empty = the data the model was trained on."""
    split: str = "test"
    """Split of a new session's context unless the request names one (test or val: held out)."""
    tracking_uri: str = ""
    """MLflow store of a models:/ or runs:/ URI; empty = MLFLOW_TRACKING_URI, else the run folder's."""
    host: str = "127.0.0.1"
    """Address the HTTP proxy listens on (0.0.0.0: every interface)."""
    port: int = 8000
    name: str = "play"
    """Serve application name."""
    idle_s: float = 600.0
    """A session unused this long is dropped."""
    max_sessions: int = 256
    """Live sessions at most; a start beyond it is refused (503)."""
    max_chunk: int = 16
    """Most frames one step request may generate."""
    max_history: int = 1800
    """Frames a session keeps for its GIF (the latest; 2 minutes at the game's 15 steps/s)."""
    sample_steps: int = 0
    """Euler steps per chunk; 0 = the model's own setting (a session may ask for its own)."""
    num_cpus: float = 1.0
    """CPUs reserved for the replica."""
    num_gpus: float = 0.0
    """GPUs of the replica (1: generate on a GPU)."""
    torch_threads: int = 0
    """torch CPU threads of the replica; 0 = max(1, num_cpus)."""

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"ServeConfig.split={self.split!r}; splits are {list(SPLITS)}")
        if self.idle_s <= 0 or self.max_sessions < 1 or self.max_chunk < 1 or self.max_history < 1:
            raise ValueError(f"ServeConfig: idle_s, max_sessions, max_chunk and max_history must be positive, got "
                             f"{self.idle_s}, {self.max_sessions}, {self.max_chunk}, {self.max_history}")


class PlayError(Exception):
    """A request the server refuses: an HTTP status and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class FileClock:
    """A clock whose time (seconds) is the number written in a file, 0 while there is none: a
    process outside the server (a test, a replay) moves the server's time by writing to it."""

    def __init__(self, path: str | Path):
        self.path = str(path)

    def __call__(self) -> float:
        try:
            return float(Path(self.path).read_text().strip() or 0.0)
        except FileNotFoundError:
            return 0.0


# -- the model and its data ---------------------------------------------------------------------------
def is_mlflow_uri(source: str) -> bool:
    return source.startswith(("models:/", "runs:/", "mlflow-artifacts:/"))


def locate_world_model(run: str, seed: int = -1) -> Path:
    """The world-model directory of a run folder (`stages/dit.json` or `stages/dit-seed<N>.json`,
    key `model_path`), or `run` itself when it is one."""
    path = Path(run).expanduser()
    if (path / "world_model.json").is_file():
        return path.resolve()
    stages = path / "stages"
    if not stages.is_dir():
        raise FileNotFoundError(f"{run} is neither a world-model directory (world_model.json) nor a run folder "
                                f"(stages/dit.json); an MLflow model is named models:/... or runs:/...")
    seeded = sorted(stages.glob("dit-seed*.json"))
    if seed >= 0:
        marker = stages / f"dit-seed{seed}.json"
    elif (stages / "dit.json").is_file():
        marker = stages / "dit.json"
    elif len(seeded) == 1:
        marker = seeded[0]
    else:
        have = [p.stem for p in seeded] or ["none"]
        raise FileNotFoundError(f"{stages}: no dit.json" + (f"; pick a seed with --seed (trained: {have})"
                                                            if seeded else " (the DiT stage has not finished)"))
    if not marker.is_file():
        raise FileNotFoundError(f"{marker} does not exist (the DiT of seed {seed} has not finished); "
                                f"trained: {[p.stem for p in seeded]}")
    model = Path(json.loads(marker.read_text())["model_path"])
    if not (model / "world_model.json").is_file():  # the run folder moved since: models/ beside stages/
        moved = path / "models" / model.name
        if not (moved / "world_model.json").is_file():
            raise FileNotFoundError(f"{marker} names {model}, which holds no world model (nor does {moved})")
        model = moved
    return model.resolve()


def fetch_world_model(source: str, dst: str | Path | None = None, seed: int = -1, tracking_uri: str = "") -> Path:
    """A local world-model directory for `source` (see ServeConfig.run); MLflow URIs are downloaded
    under `dst` (a new temporary directory when None)."""
    if not is_mlflow_uri(source):
        return locate_world_model(source, seed)
    import tempfile

    from pipeline.tracking import resolve_world_model_uri

    dst = dst or tempfile.mkdtemp(prefix="awm-play-")
    return resolve_world_model_uri(source, dst, tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None)


@dataclass(frozen=True)
class Episode:
    id: str
    split: str
    env_id: str
    env_config: str
    reset_seed: int
    actions: np.ndarray  # (N,) int64 by step; the last row's is NO_ACTION
    files: tuple[str, ...]

    @property
    def length(self) -> int:
        return len(self.actions)


class EpisodeIndex:
    """The episodes of one game in a dataset root: ids, splits, recorded actions and replay
    settings (the small columns, read once); frames are read on demand."""

    def __init__(self, data_root: str, game: str):
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from workers import schema as S
        from workers.clips import parquet_files

        self.data_root, self.game = data_root, game
        cols = [S.GAME, S.EPISODE_ID, S.STEP, S.ACTION, S.SPLIT, S.RESET_SEED, S.ENV_ID, S.ENV_CONFIG]
        parts = []
        for i, f in enumerate(parquet_files(data_root)):
            t = pq.read_table(f, columns=cols, partitioning=None)
            t = t.filter(pc.equal(t[S.GAME], game))
            if t.num_rows:
                parts.append(t.append_column("file", pa.array(np.full(t.num_rows, i, np.int32))))
        if not parts:
            raise FileNotFoundError(f"no {game} episodes under {data_root}")
        files = parquet_files(data_root)
        t = pa.concat_tables(parts)
        t = t.take(pc.sort_indices(t, [(S.EPISODE_ID, "ascending"), (S.STEP, "ascending")]))
        eids = t[S.EPISODE_ID].to_numpy(zero_copy_only=False)
        steps, actions = t[S.STEP].to_numpy(), t[S.ACTION].to_numpy().astype(np.int64)
        cuts = np.flatnonzero(eids[1:] != eids[:-1]) + 1
        self.episodes: dict[str, Episode] = {}
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(eids)]):
            eid = str(eids[lo])
            if not np.array_equal(steps[lo:hi], np.arange(hi - lo)):
                raise ValueError(f"episode {eid} in {data_root}: steps are not contiguous from 0")
            row = {c: t[c][int(lo)].as_py() for c in (S.SPLIT, S.ENV_ID, S.ENV_CONFIG, S.RESET_SEED)}
            self.episodes[eid] = Episode(
                id=eid, split=row[S.SPLIT], env_id=row[S.ENV_ID], env_config=row[S.ENV_CONFIG],
                reset_seed=int(row[S.RESET_SEED]), actions=actions[lo:hi],
                files=tuple(files[i] for i in sorted(set(t["file"].to_numpy()[lo:hi].tolist()))))
        first = next(iter(self.episodes.values()))
        self.env_id, self.env_config = first.env_id, first.env_config

    def of_split(self, split: str, min_length: int = 1) -> list[Episode]:
        return [e for e in self.episodes.values() if e.split == split and e.length >= min_length]

    def split_counts(self) -> dict[str, int]:
        return {s: len(self.of_split(s)) for s in SPLITS}

    def frames(self, ep: Episode, steps: list[int]) -> np.ndarray:
        """Recorded frames of `ep` at `steps`, uint8 (len(steps), 210, 160, 3), in that order."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from workers import schema as S

        parts = [pq.read_table(f, columns=[S.STEP, S.FRAME], partitioning=None,
                               filters=[(S.EPISODE_ID, "=", ep.id), (S.STEP, "in", list(steps))]) for f in ep.files]
        t = pa.concat_tables(parts)
        order = {int(s): i for i, s in enumerate(t[S.STEP].to_pylist())}
        missing = [s for s in steps if s not in order]
        if missing:
            raise ValueError(f"episode {ep.id}: no frames recorded at steps {missing}")
        frames = S.frames_from_arrow(t[S.FRAME], f"episode {ep.id}")
        return frames[[order[s] for s in steps]]


# -- frames on the wire ---------------------------------------------------------------------------------
def png_bytes(frame: np.ndarray) -> bytes:
    """A (210, 160, 3) uint8 frame as PNG (lossless; ~1 ms, a few KB for a game screen)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_frame(frame: np.ndarray, fmt: str, png: bytes | None = None) -> str:
    if fmt == "raw":
        return base64.b64encode(np.ascontiguousarray(frame, np.uint8).tobytes()).decode()
    return base64.b64encode(png if png is not None else png_bytes(frame)).decode()


def decode_frame(data: str, fmt: str = "png") -> np.ndarray:
    """Inverse of encode_frame (for clients: tests, the benchmark)."""
    raw = base64.b64decode(data)
    if fmt == "raw":
        return np.frombuffer(raw, np.uint8).reshape(210, 160, 3)
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def gif_bytes(dream: list[bytes], real: list[bytes | None] | None, fps: float = 15.0) -> bytes:
    """PNG frames (and the real game's beside them, where there are some) as one looping GIF."""
    from PIL import Image

    frames = []
    for i, d in enumerate(dream):
        left = np.asarray(Image.open(io.BytesIO(d)).convert("RGB"))
        right = None
        if real is not None:
            r = real[i] if i < len(real) else None
            right = np.asarray(Image.open(io.BytesIO(r)).convert("RGB")) if r is not None else np.zeros_like(left)
        frames.append(_gif_frame(left, right))
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    return buf.getvalue()


def _gif_frame(left: np.ndarray, right: np.ndarray | None):
    """One GIF frame (a 256-colour palette image): the dream, and the real game 4 px to its right.
    A game screen has few colours and keeps them exactly; the generated frame, which may have more,
    is quantised (no dithering) into the palette entries left over."""
    from PIL import Image

    gap = np.array([40, 40, 40], np.uint8)
    rgb = left if right is None else np.concatenate([left, np.broadcast_to(gap, (left.shape[0], 4, 3)), right], 1)
    exact = np.unique(rgb.reshape(-1, 3), axis=0)
    keep = np.unique(np.concatenate([right.reshape(-1, 3), gap[None]]), axis=0) if right is not None else gap[None]
    if len(exact) <= 256:  # every colour fits the palette
        palette = exact
    elif len(keep) > 128:  # not a game screen: one palette for the whole frame
        return Image.fromarray(rgb).quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    else:
        q = Image.fromarray(left).quantize(colors=256 - len(keep), method=Image.Quantize.MEDIANCUT,
                                           dither=Image.Dither.NONE)
        approx = np.asarray(q.getpalette()[:3 * (256 - len(keep))], np.uint8).reshape(-1, 3)
        palette = np.concatenate([keep, approx])
        rgb = rgb.copy()
        rgb[:, :left.shape[1]] = approx[np.asarray(q)]  # the dream, as quantised
    key = lambda a: (a[..., 0].astype(np.int64) << 16) | (a[..., 1].astype(np.int64) << 8) | a[..., 2]  # noqa: E731
    order = np.argsort(key(palette))
    sorted_keys = key(palette)[order]
    idx = order[np.searchsorted(sorted_keys, key(rgb))]  # first palette entry of each pixel's colour
    img = Image.frombytes("P", (idx.shape[1], idx.shape[0]), idx.astype(np.uint8).tobytes())
    img.putpalette(np.pad(palette, ((0, 256 - len(palette)), (0, 0))).reshape(-1).tolist())
    return img


def resident_bytes() -> int:
    """This process's resident memory (Linux /proc; else the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# -- sessions -------------------------------------------------------------------------------------------
class RealGame:
    """The emulator of one recorded episode, restored to step `start` by replaying its reset seed
    and recorded actions 0..start-1 (bit for bit without sticky actions; workers/schema.py)."""

    def __init__(self, ep: Episode, start: int):
        from workers.atari import EnvSettings, make_raw_env

        self.env = make_raw_env(ep.env_id, EnvSettings(**json.loads(ep.env_config)))
        obs, _ = self.env.reset(seed=ep.reset_seed)
        for a in ep.actions[:start]:
            obs, *_ = self.env.step(int(a))
        self.start_frame = obs
        self.start_state = self.env.unwrapped.ale.cloneState()
        self.frame, self.done = obs, False

    def restore(self) -> np.ndarray:
        self.env.unwrapped.ale.restoreState(self.start_state)
        self.frame, self.done = self.start_frame, False
        return self.frame

    def step(self, action: int) -> np.ndarray:
        if not self.done:  # a game over keeps its last frame
            self.frame, _, terminated, truncated, _ = self.env.step(int(action))
            self.done = bool(terminated or truncated)
        return self.frame

    def close(self) -> None:
        self.env.close()


@dataclass
class Session:
    id: str
    episode: Episode
    start: int  # step of the last condition frame in the episode
    seed: int
    sample_steps: int
    context: np.ndarray  # (n_cond, 210, 160, 3) the recorded condition frames
    past: list[int]  # recorded actions between the condition frames that the model reads (PlayCore.past_actions)
    last_seen: float
    model: Any  # the WorldModel view this session samples with (its own sampler settings)
    cond: Any = None  # torch uint8 (1, n_cond, H, W, 3): the latest n_cond frames
    generator: Any = None
    actions: list[int] = field(default_factory=list)  # taken since the start (or the last reset)
    dream: list[bytes] = field(default_factory=list)  # PNGs: the start frame, then each generated one
    real_frames: list[bytes | None] = field(default_factory=list)
    real: RealGame | None = None
    real_exact: bool | None = None  # the replay reproduced the recorded start frame
    dropped: int = 0  # frames no longer kept for the GIF
    lock: threading.Lock = field(default_factory=threading.Lock)


class PlayCore:
    """Sessions over one world model; what the HTTP layer calls. Thread-safe."""

    def __init__(self, world_model, meta: dict[str, Any], index: EpisodeIndex, *, source: str = "",
                 cfg: ServeConfig = ServeConfig(), clock: Callable[[], float] | None = None):
        import torch

        from workers.atari import action_meanings

        self.wm, self.meta, self.index, self.cfg, self.source = world_model, meta, index, cfg, source
        self.clock = clock or time.monotonic
        self.game = index.game
        self.meanings = list(action_meanings(index.env_id, index.env_config))
        if len(self.meanings) > self.wm.dit.cfg.num_actions:
            raise ValueError(f"{self.game} has {len(self.meanings)} actions but the model knows "
                             f"{self.wm.dit.cfg.num_actions}")
        self.n_cond = int(self.wm.n_cond)
        # actions before a_t that the model's action mode conditions on (0 for "future", n_cond - 1
        # for "past_future"; models/action_encoder.py)
        self.past_actions = int(self.wm.num_actions_for(0))
        self.sessions: dict[str, Session] = {}
        self.started = 0
        self._lock = threading.Lock()
        self._torch = torch

    @classmethod
    def from_config(cls, cfg: ServeConfig, clock: Callable[[], float] | None = None,
                    workdir: str | None = None) -> "PlayCore":
        import torch

        from workers.world_model import load_world_model

        device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        path = fetch_world_model(cfg.run, workdir, cfg.seed, cfg.tracking_uri)
        meta = json.loads((path / "world_model.json").read_text())
        wm = load_world_model(path, device, sample_steps=cfg.sample_steps or None)
        train = meta.get("train_config", {})
        data_root = cfg.data_root or train.get("data_root", "")
        game = meta.get("game") or train.get("game", "")
        if not data_root or not game:
            raise ValueError(f"{path}: the model records no training data root or game; pass --data-root "
                             f"(and train on one game)")
        return cls(wm, meta, EpisodeIndex(data_root, game), source=cfg.run or str(path), cfg=cfg, clock=clock)

    # -- bookkeeping ----------------------------------------------------------------------------------
    def expire(self) -> int:
        """Drop sessions idle for more than idle_s; returns how many are left."""
        now = self.clock()
        with self._lock:
            gone = [s for s in self.sessions.values() if now - s.last_seen > self.cfg.idle_s]
            for s in gone:
                del self.sessions[s.id]
            left = len(self.sessions)
        for s in gone:
            if s.real is not None:
                s.real.close()
        return left

    def live(self) -> int:
        return self.expire()

    def _get(self, sid: str) -> Session:
        self.expire()
        with self._lock:
            s = self.sessions.get(sid)
        if s is None:
            raise PlayError(404, f"unknown session id {sid!r}: it never started, was closed, or expired after "
                                 f"{self.cfg.idle_s:g} s idle; start a new one with POST /api/sessions")
        s.last_seen = self.clock()
        return s

    def info(self) -> dict[str, Any]:
        wm = self.wm
        return {
            "game": self.game, "env_id": self.index.env_id, "actions": self.meanings,
            "n_cond": self.n_cond, "horizon": wm.horizon, "trained_horizons": list(wm.trained_horizons),
            "action_mode": wm.action_mode, "sample_steps": wm.sampler.cfg.num_steps,
            "splits": self.index.split_counts(), "default_split": self.cfg.split,
            "idle_s": self.cfg.idle_s, "max_chunk": self.cfg.max_chunk, "max_sessions": self.cfg.max_sessions,
            "frame_formats": list(FRAME_FORMATS), "model": self.source, "device": str(wm.device),
            "device_name": device_name(wm.device), "train_step": self.meta.get("train_step"),
        }

    def stats(self) -> dict[str, Any]:
        """Live sessions, the replica's resident memory, and what the sessions hold (condition and
        start frames, the PNGs kept for their GIFs)."""
        live = self.live()
        with self._lock:
            sessions = list(self.sessions.values())
        held = sum(s.context.nbytes + s.cond.numel() + sum(map(len, s.dream))
                   + sum(len(r or b"") for r in s.real_frames) for s in sessions)
        return {"live_sessions": live, "sessions_started": self.started, "rss_bytes": resident_bytes(),
                "session_bytes": held, "kept_frames": sum(len(s.dream) for s in sessions)}

    # -- actions --------------------------------------------------------------------------------------
    def action_id(self, a: Any) -> int:
        names = ", ".join(f"{i}={m}" for i, m in enumerate(self.meanings))
        if isinstance(a, str) and a.upper() in self.meanings:
            return self.meanings.index(a.upper())
        if isinstance(a, int) and not isinstance(a, bool) and 0 <= a < len(self.meanings):
            return a
        raise PlayError(400, f"action {a!r} is not one of {self.game}'s actions: {names}")

    # -- the session's life ---------------------------------------------------------------------------
    def start(self, split: str | None = None, episode_id: str | None = None, step: int | None = None,
              seed: int | None = None, sample_steps: int = 0, fmt: str = "png") -> dict[str, Any]:
        if self.live() >= self.cfg.max_sessions:
            raise PlayError(503, f"{self.cfg.max_sessions} sessions are live (ServeConfig.max_sessions); "
                                 f"close one or wait {self.cfg.idle_s:g} s for idle ones to expire")
        seed = int(secrets.randbits(31)) if seed is None else int(seed)
        rng = np.random.default_rng(seed)
        n = self.n_cond
        if episode_id is not None:
            ep = self.index.episodes.get(episode_id)
            if ep is None:
                raise PlayError(400, f"no {self.game} episode {episode_id!r} in {self.index.data_root}")
            if ep.length < n:
                raise PlayError(400, f"episode {episode_id} has {ep.length} frames, fewer than the {n} condition "
                                     f"frames")
        else:
            split = split or self.cfg.split
            eps = self.index.of_split(split, n)
            if not eps:
                raise PlayError(400, f"no {self.game} episode of the {split} split has {n} frames "
                                     f"(episodes by split: {self.index.split_counts()})")
            ep = eps[int(rng.integers(len(eps)))]
        last = ep.length - 1
        if step is None:
            step = int(rng.integers(n - 1, max(n, last)))  # leave a recorded step after it where there is one
        if not n - 1 <= step <= last:
            raise PlayError(400, f"step {step} of episode {ep.id}: the context is the {n} frames ending at it, "
                                 f"so it must be in [{n - 1}, {last}]")
        if sample_steps < 0 or sample_steps > 1000:
            raise PlayError(400, f"sample_steps={sample_steps}: 0 (the model's own) or 1..1000")
        context = self.index.frames(ep, list(range(step - n + 1, step + 1)))
        model = self.wm
        if sample_steps:
            from models.rectified_flow import EulerSampler

            model = copy.copy(self.wm)  # the same modules, a sampler of its own
            model.sampler = EulerSampler(dataclasses.replace(self.wm.sampler.cfg, num_steps=sample_steps))
        past = [int(a) for a in ep.actions[step - self.past_actions: step]]
        s = Session(id=secrets.token_urlsafe(12), episode=ep, start=step, seed=seed, sample_steps=sample_steps,
                    context=context, past=past, last_seen=self.clock(), model=model)
        self._restart(s)
        with self._lock:
            if len(self.sessions) >= self.cfg.max_sessions:
                raise PlayError(503, f"{self.cfg.max_sessions} sessions are live (ServeConfig.max_sessions)")
            self.sessions[s.id] = s
            self.started += 1
        return {**self.state(s), "frame": encode_frame(context[-1], fmt, s.dream[0]), "format": fmt}

    def _restart(self, s: Session) -> None:
        torch = self._torch
        s.cond = torch.from_numpy(np.ascontiguousarray(s.context))[None]
        s.generator = torch.Generator(device=s.model.device).manual_seed(s.seed)
        s.actions, s.dropped = [], 0
        s.dream = [png_bytes(s.context[-1])]
        s.real_frames = []
        if s.real is not None:
            s.real_frames = [png_bytes(s.real.restore())]

    def state(self, s: Session) -> dict[str, Any]:
        return {"session_id": s.id, "game": self.game, "episode_id": s.episode.id, "split": s.episode.split,
                "start_step": s.start, "seed": s.seed, "t": len(s.actions), "actions": list(s.actions),
                "action_names": [self.meanings[a] for a in s.actions], "real": s.real is not None,
                "real_exact": s.real_exact, "real_done": bool(s.real and s.real.done),
                "sample_steps": s.model.sampler.cfg.num_steps, "n_cond": self.n_cond}

    def get_state(self, sid: str) -> dict[str, Any]:
        return self.state(self._get(sid))

    def step(self, sid: str, actions: list[Any], fmt: str = "png") -> dict[str, Any]:
        torch = self._torch
        s = self._get(sid)
        if not actions:
            raise PlayError(400, "no action given: send {\"action\": a} or {\"actions\": [a, ...]}")
        if len(actions) > self.cfg.max_chunk:
            raise PlayError(400, f"{len(actions)} actions in one step; at most {self.cfg.max_chunk} "
                                 f"(ServeConfig.max_chunk)")
        ids = [self.action_id(a) for a in actions]
        T = len(ids)
        with s.lock:
            if sid not in self.sessions:
                raise PlayError(404, f"session {sid!r} was closed")
            done, k = s.past + s.actions, self.past_actions
            past = done[len(done) - k:] if k else []  # the actions between the condition frames it wants
            acts = torch.tensor([past + ids], dtype=torch.long)
            t0 = time.perf_counter()
            new = s.model.predict(s.cond, acts, T, generator=s.generator)  # (1, T, H, W, 3) uint8, CPU
            gen_s = time.perf_counter() - t0
            s.cond = torch.cat([s.cond, new], dim=1)[:, -self.n_cond:].clone()  # not a view of n + T frames
            s.actions += ids
            frames = new[0].numpy()
            t1 = time.perf_counter()
            pngs = [png_bytes(f) for f in frames]
            s.dream += pngs
            out: dict[str, Any] = {"frames": [encode_frame(f, fmt, p) for f, p in zip(frames, pngs)]}
            if s.real is not None:
                real = [s.real.step(a) for a in ids]
                real_pngs = [png_bytes(f) for f in real]
                s.real_frames += real_pngs
                out["real_frames"] = [encode_frame(f, fmt, p) for f, p in zip(real, real_pngs)]
            self._trim(s)
            enc_s = time.perf_counter() - t1
            return {**self.state(s), **out, "format": fmt, "generate_ms": 1e3 * gen_s, "encode_ms": 1e3 * enc_s}

    def _trim(self, s: Session) -> None:
        extra = len(s.dream) - self.cfg.max_history
        if extra > 0:
            del s.dream[:extra]
            del s.real_frames[:extra]
            s.dropped += extra

    def reset(self, sid: str, fmt: str = "png") -> dict[str, Any]:
        s = self._get(sid)
        with s.lock:
            self._restart(s)
            out = {**self.state(s), "frame": encode_frame(s.context[-1], fmt, s.dream[0]), "format": fmt}
            if s.real is not None:
                out["real_frame"] = encode_frame(s.real.frame, fmt, s.real_frames[0])
            return out

    def set_real(self, sid: str, on: bool = True, fmt: str = "png") -> dict[str, Any]:
        """Switch the real game on: the emulator restored to the session's start, then stepped with
        the actions the session took so far (its frames line up with the dream's), or off."""
        s = self._get(sid)
        with s.lock:
            if not on:
                if s.real is not None:
                    s.real.close()
                s.real, s.real_frames = None, []
                return self.state(s)
            if s.real is None:
                s.real = RealGame(s.episode, s.start)
                s.real_exact = bool(np.array_equal(s.real.start_frame, s.context[-1]))
            frames = [s.real.restore()] + [s.real.step(a) for a in s.actions]
            frames = frames[len(frames) - len(s.dream):]  # the frames still kept for the GIF
            s.real_frames = [png_bytes(f) for f in frames]
            return {**self.state(s), "real_frame": encode_frame(s.real.frame, fmt, s.real_frames[-1]),
                    "frame": encode_frame(s.cond[0, -1].numpy(), fmt, s.dream[-1]), "format": fmt}

    def gif(self, sid: str, fps: float = 15.0) -> bytes:
        s = self._get(sid)
        with s.lock:
            return gif_bytes(list(s.dream), list(s.real_frames) if s.real is not None else None, fps)

    def close(self, sid: str) -> dict[str, Any]:
        s = self._get(sid)
        with self._lock:
            self.sessions.pop(sid, None)
        if s.real is not None:
            s.real.close()
        return {"session_id": sid, "closed": True, "live_sessions": self.live()}


def device_name(device) -> str:
    import platform

    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model} ({torch.get_num_threads()} threads)"


# -- HTTP (FastAPI inside a Ray Serve deployment) ----------------------------------------------------------
api = FastAPI(title="atari-world-model play", docs_url="/api/docs", openapi_url="/api/openapi.json")


@api.exception_handler(PlayError)
async def _play_error(request: Request, exc: PlayError) -> JSONResponse:
    return JSONResponse({"detail": exc.message}, status_code=exc.status)


class StartBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    split: Literal["train", "val", "test"] | None = None
    episode_id: str | None = None
    step: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    sample_steps: int = Field(0, ge=0, le=1000)
    format: Literal["png", "raw"] = "png"


class StepBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: int | str | None = None
    actions: list[int | str] | None = Field(None, min_length=1)
    format: Literal["png", "raw"] = "png"


class FormatBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["png", "raw"] = "png"


class RealBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    on: bool = True
    format: Literal["png", "raw"] = "png"


@serve.deployment(name="play", num_replicas=1, max_ongoing_requests=32, health_check_period_s=10)
@serve.ingress(api)
class PlayServer:
    """One replica holding every session (sessions live in its memory: keep num_replicas=1)."""

    def __init__(self, cfg: dict[str, Any], clock: Callable[[], float] | None = None):
        import torch

        c = ServeConfig(**cfg)
        torch.set_num_threads(c.torch_threads or max(1, int(c.num_cpus)))  # Ray's default for an actor is 1
        self.core = PlayCore.from_config(c, clock=clock)
        self.page = PAGE.read_text()

    def check_health(self) -> None:
        """Serve calls this every health_check_period_s: idle sessions go even when no request comes."""
        self.core.expire()

    @api.get("/", response_class=HTMLResponse)
    def page(self) -> str:
        return self.page

    @api.get("/api/info")
    def info(self) -> dict:
        return self.core.info()

    @api.get("/api/stats")
    def stats(self) -> dict:
        return self.core.stats()

    @api.post("/api/sessions")
    def start(self, body: StartBody | None = Body(None)) -> dict:
        b = body or StartBody()
        return self.core.start(split=b.split, episode_id=b.episode_id, step=b.step, seed=b.seed,
                               sample_steps=b.sample_steps, fmt=b.format)

    @api.get("/api/sessions/{sid}")
    def state(self, sid: str) -> dict:
        return self.core.get_state(sid)

    @api.post("/api/sessions/{sid}/step")
    def step(self, sid: str, body: StepBody = Body(...)) -> dict:
        if (body.action is None) == (body.actions is None):
            raise PlayError(422, "give exactly one of `action` (one frame) and `actions` (a chunk of T frames)")
        return self.core.step(sid, [body.action] if body.actions is None else body.actions, body.format)

    @api.post("/api/sessions/{sid}/reset")
    def reset(self, sid: str, body: FormatBody | None = Body(None)) -> dict:
        return self.core.reset(sid, (body or FormatBody()).format)

    @api.post("/api/sessions/{sid}/real")
    def real(self, sid: str, body: RealBody | None = Body(None)) -> dict:
        b = body or RealBody()
        return self.core.set_real(sid, b.on, b.format)

    @api.get("/api/sessions/{sid}/gif")
    def gif(self, sid: str, fps: float = 15.0) -> Response:
        if not 0 < fps <= 60:
            raise PlayError(400, f"fps={fps}: expected 0 < fps <= 60")
        return Response(self.core.gif(sid, fps), media_type="image/gif",
                        headers={"Content-Disposition": f'attachment; filename="{self.core.game}-{sid}.gif"'})

    @api.delete("/api/sessions/{sid}")
    def close(self, sid: str) -> dict:
        return self.core.close(sid)


def build_app(cfg: ServeConfig, clock: Callable[[], float] | None = None):
    """The Serve application of `cfg` (the replica loads the model and indexes the data)."""
    actor = {"num_cpus": cfg.num_cpus, **({"num_gpus": cfg.num_gpus} if cfg.num_gpus > 0 else {})}
    return PlayServer.options(ray_actor_options=actor).bind(dataclasses.asdict(cfg), clock)


def app_builder(args: dict[str, str]):
    """For Serve's CLI: `serve run pipeline.serve:app_builder run=runs/smoke` (ServeConfig fields)."""
    types = {f.name: f.type for f in dataclasses.fields(ServeConfig)}  # int, float or str
    unknown = sorted(set(args) - set(types))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; ServeConfig has {sorted(types)}")
    return build_app(ServeConfig(**{k: types[k](v) for k, v in args.items()}))


def run(cfg: ServeConfig, clock: Callable[[], float] | None = None) -> str:
    """Start Serve's HTTP proxy on cfg.host:cfg.port and deploy the app (Ray must be initialised);
    returns the page's URL once the replica is ready."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg, clock), name=cfg.name, route_prefix="/")
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}/"


def main(argv: list[str] | None = None) -> None:
    cfg = cli.parse_config(ServeConfig, argv, description=__doc__)
    if not cfg.run:
        raise SystemExit("usage: python -m pipeline.serve --run <run folder | world-model dir | models:/... | "
                         "runs:/...> [--port 8000] [--host 127.0.0.1] (--help lists every setting)")
    init_ray()
    try:
        url = run(cfg)
        print(f"[serve] playing {cfg.run} at {url} (arrows move, space = FIRE, Enter runs/pauses; Ctrl-C stops)",
              flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[serve] stopping", flush=True)
    finally:
        serve.shutdown()


if __name__ == "__main__":
    main()
