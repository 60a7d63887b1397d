"""Play latency of the world-model server (pipeline/serve.py), end to end through HTTP.

One client, one session at a time (a single stream: what a player feels): each request sends a
chunk of T actions and waits for the T generated frames, as the page does. Timed on the client
around the whole request: HTTP through Serve's proxy, the model (encode the condition frames,
Euler-sample, decode), PNG encoding, JSON, and the client's PNG decoding. frames/s = T x requests /
their total time; p50 and p95 are per request. Then the replica's resident memory with `--sessions`
sessions open at once (each stepped `--steps-per-session` times at T=1), per session, and after
they close. Sessions start from contexts of the `val` split (`--split`; test is read by a run's
final evaluation only; latency does not depend on which episodes they are).

    python -m benchmarks.play_latency --run runs/smoke --sessions 32 --out out/play_latency.csv
    python -m benchmarks.play_latency --run runs/gpu-pong --num-gpus 1 --chunks 1 4 --euler-steps 4 8 \\
        --sessions 1000 --out docs/results/current/play_latency.csv
    python -m benchmarks.play_latency --url http://127.0.0.1:8000/     # a server already running

The GPU command measures the memory over 1000 open sessions;
each costs one T=1 step (`--steps-per-session`) and holds about a megabyte (its context frames and
the PNGs kept for its GIF), so the default stays at 32 for CPU runs, where a full-size step is slow.

Without --url the benchmark starts the app itself (a local Ray cluster, or RAY_ADDRESS's) on a
free port and shuts Serve down at the end.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.common import markdown_table, write_rows
from pipeline.cli import parse_config
from workers.schema import SPLITS

COLUMNS = ["gpu", "T", "euler_steps", "frames_per_s", "p50_ms", "p95_ms", "mean_ms", "generate_ms", "requests",
           "sessions", "rss_mb_idle", "rss_mb_sessions", "kb_per_session", "kb_held_per_session", "rss_mb_closed"]
"""`kb_per_session`: the replica's resident memory grown per open session (it includes what the
allocators keep after the sessions' first steps); `kb_held_per_session`: what each session itself
holds (its condition frames and the PNGs kept for its GIF), as the server counts it."""


@dataclass(frozen=True)
class PlayLatencyConfig:
    run: str = ""
    """What to serve (pipeline/serve.py --run): a run folder, a world-model directory or an MLflow URI."""
    url: str = ""
    """Benchmark a play server already running at this URL instead of starting one."""
    data_root: str = ""
    """Episodes of the sessions' contexts; empty = the model's training data."""
    split: str = field(default="val", metadata={"choices": SPLITS})
    """Split of the sessions' contexts (val: test is read by a run's final evaluation only)."""
    chunks: tuple[int, ...] = (1, 4)
    """T: frames generated per request (one chunk)."""
    euler_steps: tuple[int, ...] = (0,)
    """Euler steps per chunk; 0 = the model's own setting."""
    warmup: int = 2
    """Untimed requests per setting (the first ones pay for allocator growth and kernel selection)."""
    iters: int = 20
    """Timed requests per setting."""
    sessions: int = 32
    """Sessions open at once for the memory figures (each stepped --steps-per-session times); 0 = none.
    The GPU table opens 1000 (the GPU command of this module's docstring); a server given by --url
    must allow as many (pipeline/serve.py --max-sessions)."""
    steps_per_session: int = 1
    seed: int = 0
    num_cpus: float = 1.0
    """CPUs of the replica the benchmark starts."""
    num_gpus: float = 0.0
    torch_threads: int = 0
    port: int = 0
    """Port of the server the benchmark starts; 0 = a free one."""
    out: str = ""
    """Write the rows here too: .csv, or JSON otherwise."""

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"PlayLatencyConfig.split={self.split!r}; splits are {list(SPLITS)}")
        if not self.run and not self.url:
            raise ValueError("PlayLatencyConfig: give --run (a model to serve) or --url (a running play server)")
        if min(self.chunks) < 1 or self.iters < 1 or self.warmup < 0 or self.sessions < 0:
            raise ValueError(f"PlayLatencyConfig: chunks >= 1, iters >= 1, warmup >= 0, sessions >= 0; got "
                             f"{self.chunks}, {self.iters}, {self.warmup}, {self.sessions}")


class Client:
    """JSON over HTTP to one play server."""

    def __init__(self, url: str, timeout_s: float = 600.0):
        self.base, self.timeout_s = url.rstrip("/"), timeout_s

    def call(self, path: str, body: dict | None = None, method: str | None = None) -> dict:
        req = urllib.request.Request(self.base + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"},
                                     method=method or ("GET" if body is None else "POST"))
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise RuntimeError(f"{req.get_method()} {path}: HTTP {e.code} {detail}") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def latency_rows(client: Client, cfg: PlayLatencyConfig, gpu: str) -> list[dict[str, Any]]:
    from pipeline.serve import decode_frame

    rows = []
    for steps in cfg.euler_steps:
        for T in cfg.chunks:
            s = client.call("/api/sessions", {"split": cfg.split, "seed": cfg.seed, "sample_steps": steps})
            sid, actions = s["session_id"], [0] * T  # NOOP: the cost does not depend on the action
            walls, gens = [], []
            for i in range(cfg.warmup + cfg.iters):
                t0 = time.perf_counter()
                r = client.call(f"/api/sessions/{sid}/step", {"actions": actions})
                frames = [decode_frame(f) for f in r["frames"]]  # what the page does with them
                wall = time.perf_counter() - t0
                assert len(frames) == T and frames[0].shape == (210, 160, 3)
                if i >= cfg.warmup:
                    walls.append(wall)
                    gens.append(r["generate_ms"])
            client.call(f"/api/sessions/{sid}", method="DELETE")
            ms = 1e3 * np.asarray(walls)
            rows.append({"gpu": gpu, "T": T, "euler_steps": r["sample_steps"],
                         "frames_per_s": T * len(walls) / sum(walls),
                         "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
                         "mean_ms": float(ms.mean()), "generate_ms": float(np.mean(gens)), "requests": len(walls)})
    return rows


def memory_row(client: Client, cfg: PlayLatencyConfig) -> dict[str, Any]:
    """The replica's resident memory idle, with cfg.sessions open (each stepped), and after closing them."""
    idle = client.call("/api/stats")
    sids = [client.call("/api/sessions", {"split": cfg.split, "seed": cfg.seed + i})["session_id"]
            for i in range(cfg.sessions)]
    for sid in sids:
        for _ in range(cfg.steps_per_session):
            client.call(f"/api/sessions/{sid}/step", {"action": 0})
    busy = client.call("/api/stats")
    for sid in sids:
        client.call(f"/api/sessions/{sid}", method="DELETE")
    closed = client.call("/api/stats")
    live = [idle["live_sessions"], busy["live_sessions"], closed["live_sessions"]]
    if live[1] - live[0] != cfg.sessions or live[2] != live[0]:
        raise RuntimeError(f"live sessions: {idle['live_sessions']} idle, {busy['live_sessions']} with "
                           f"{cfg.sessions} opened, {closed['live_sessions']} after closing them")
    mb = 1 / 2**20
    return {"sessions": cfg.sessions, "rss_mb_idle": idle["rss_bytes"] * mb, "rss_mb_sessions": busy["rss_bytes"] * mb,
            "kb_per_session": (busy["rss_bytes"] - idle["rss_bytes"]) / 1024 / max(1, cfg.sessions),
            "kb_held_per_session": (busy["session_bytes"] - idle["session_bytes"]) / 1024 / max(1, cfg.sessions),
            "rss_mb_closed": closed["rss_bytes"] * mb}


def main(cfg: PlayLatencyConfig) -> list[dict[str, Any]]:
    """Runs the benchmark, prints the device and a Markdown table, returns the rows."""
    started = False
    url = cfg.url
    if not url:
        from ray import serve

        from pipeline.cluster import init_ray
        from pipeline.serve import ServeConfig, run

        init_ray()
        url = run(ServeConfig(run=cfg.run, data_root=cfg.data_root, split=cfg.split, port=cfg.port or _free_port(),
                              name="play-latency", num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                              torch_threads=cfg.torch_threads, max_sessions=max(256, cfg.sessions + 8)))
        started = True
    try:
        client = Client(url)
        info = client.call("/api/info")
        gpu = info["device_name"]
        print(f"device: {gpu}; model: {info['model']} ({info['game']}, n_cond {info['n_cond']}, trained T "
              f"{info['trained_horizons']}, {info['sample_steps']} Euler steps); server {url}")
        rows = latency_rows(client, cfg, gpu)
        mem = memory_row(client, cfg) if cfg.sessions else {}
        rows = [{**r, **mem} for r in rows]
    finally:
        if started:
            serve.shutdown()
    print(markdown_table(rows, [c for c in COLUMNS if any(c in r for r in rows)]))
    if cfg.out:
        meta = {"device": gpu, "model": info["model"], "url": url, "config": repr(cfg)}
        print(f"wrote {write_rows(rows, cfg.out, meta)}")
    return rows


if __name__ == "__main__":
    main(parse_config(PlayLatencyConfig, description=__doc__))
