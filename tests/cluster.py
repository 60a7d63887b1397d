"""A Ray cluster started as users start one, an MLflow server, and jobs submitted to them with
`ray job submit`: the helpers of tests/test_job.py, and the session's `job_cluster` (conftest.py),
which brings the head and the server up in a background thread and submits the smoke job."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_ports(n: int, low: int = 25000, high: int = 32000) -> list[int]:
    """`n` distinct ports that bind now, drawn below Linux's ephemeral range (32768-60999).

    A port taken from the ephemeral range can be handed to some other process's outgoing
    connection between being picked and being bound, which is more likely on a machine where
    another Ray cluster (the suite's own) keeps opening connections. Ports below it are only
    ever taken by an explicit bind."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randrange(low, high)
        if port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    return ports


def wait_until_answering(url: str, proc: subprocess.Popen, log: Path, what: str, timeout_s: float) -> None:
    """Poll `url` until it answers (any HTTP status, e.g. 401 without a token, counts); fail with
    the tail of `log` if `proc` exits first, or after `timeout_s`."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited: {log.read_text()[-3000:]}")
            time.sleep(1)
    raise RuntimeError(f"{what} did not answer {url} within {timeout_s:.0f} s")


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else f"(no {path.name})"


def head_alive(gcs: int, env: dict) -> bool:
    """Whether the head's raylet has registered with its GCS (`ray status` lists an active node)."""
    res = subprocess.run([str(BIN / "ray"), "status", "--address", f"127.0.0.1:{gcs}"],
                         env=env, capture_output=True, text=True, timeout=60)
    return res.returncode == 0 and "node_" in res.stdout.split("Pending:")[0]


def start_head(tmp_path: Path, env: dict, attempt: int) -> tuple[subprocess.Popen, str, Path]:
    """Start one head; return it once its dashboard answers and its raylet is registered, or
    raise with the tails of its logs."""
    dash, gcs, agent_http, agent_grpc, metrics, rt_env, node_mgr, obj_mgr = free_ports(8)
    # its own block of worker ports, apart from those and from Ray's default 10002-19999
    workers = random.randrange(20000, 24000)
    # Its own short temp dir (Unix socket paths must stay under 108 bytes), so its logs are findable.
    temp_dir = Path(tempfile.mkdtemp(prefix="awm-ray-", dir="/tmp"))
    link = tmp_path / ("ray" if attempt == 0 else f"ray.{attempt}")
    link.symlink_to(temp_dir)
    log_path = tmp_path / f"ray_head.{attempt}.log"
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
         f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}",
         f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
         f"--min-worker-port={workers}", f"--max-worker-port={workers + 999}",
         "--temp-dir", str(temp_dir), "--disable-usage-stats"],
        env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        # the job API answers once the dashboard is up; the raylet registers a little later
        wait_until_answering(f"{address}/api/version", proc, log_path, "the Ray head's dashboard", 180)
        deadline = time.time() + 120
        while not head_alive(gcs, env):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("the Ray head's raylet did not register with its GCS")
            time.sleep(2)
    except Exception as e:
        stop_head(proc, None)
        logs = sorted(temp_dir.glob("session_*/logs"))
        raylet = (tail(logs[-1] / "raylet.out") + "\n" + tail(logs[-1] / "raylet.err")) if logs else ""
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise RuntimeError(f"{e}\nray start:\n{tail(log_path)}\nraylet:\n{raylet}") from e
    return proc, address, temp_dir


def stop_head(proc: subprocess.Popen, temp_dir: Path | None) -> None:
    stop_process_group(proc, timeout_s=60)
    if temp_dir is not None:
        shutil.rmtree(temp_dir, ignore_errors=True)




def start_mlflow_server(folder: Path) -> tuple[subprocess.Popen, str]:
    """A real MLflow tracking server on a free port over a SQLite store in `folder`: (process, base URL)."""
    port, = free_ports(1)
    store = folder / "mlflow"
    store.mkdir()
    log = folder / "mlflow.log"
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
         "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(f"{base}/health", proc, log, "mlflow server", 120)
    except Exception:
        stop_process_group(proc)
        raise
    return proc, base


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM to the process group of `proc` (started in a session of its own), SIGKILL after `timeout_s`."""
    try:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=timeout_s)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)


def submit_job(address: str, env: dict, working_dir: Path, entrypoint: list[str], log: Path,
               submission_id: str | None = None, owner: "JobCluster | None" = None) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir <working_dir> -- <entrypoint>`, waiting for the job's end; its
    output is also written to `log`. With `owner`, the submitting process is started through it, so
    that stopping that cluster ends it (and none starts once it is stopped)."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(working_dir),
           *(["--submission-id", submission_id] if submission_id else []), "--", *entrypoint]
    deadline = time.time() + 180  # the head's job agent can come up a while after its dashboard
    while True:
        proc = owner.popen(cmd) if owner is not None else subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=2400)
        except BaseException:
            proc.kill()
            proc.communicate()
            raise
        finally:
            if owner is not None:
                owner.forget(proc)
        res = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        if "No available agent to submit job" not in out + err or time.time() > deadline:
            break
        time.sleep(5)
    log.write_text(res.stdout + res.stderr)
    return res


def head_agent_log(folder: Path) -> str:
    """The tail of the head's dashboard agent log, which says why the job agent is missing."""
    logs = sorted((folder / "ray").glob("session_*/logs/dashboard_agent.log"))
    return logs[-1].read_text()[-3000:] if logs else "(no dashboard_agent.log)"


class JobCluster:
    """A real head node started like a user would, with token auth (Ray 2.60's default), and a real
    MLflow server, shared by the session's job tests; both start in a background thread at once.

    `--block` keeps `ray start` in the foreground as the parent of the head's processes, so
    stopping its process group ends this cluster only (`ray stop` would end every Ray cluster on
    the machine, the test session's own included).

    Every port the head listens on is chosen free, and its workers get a port block of their own:
    the test session's own cluster (`ray_local`) already holds Ray's fixed defaults, e.g. the dashboard
    agent's 52365, and a head whose agent cannot bind answers every submission with "No available
    agent to submit job". A head whose raylet dies while starting (CI saw one crash in its
    NodeManager's constructor once) is started again, at most three times, on fresh ports; the
    failures' logs are kept in its folder."""

    SMOKE_SUBMISSION = "smoke"

    def __init__(self, folder: Path):
        self.folder = folder
        # No drain on SIGTERM: `ray start --block` would otherwise ask the GCS, which the same signal to
        # the process group is stopping, to drain the node, and wait out its 30 s timeout at teardown.
        # The job's `python` is the test's own (its venv first on PATH), also when pytest runs as
        # `.venv/bin/python -m pytest` from a shell that did not activate the venv.
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self._lock = threading.Lock()
        self._stopped = False
        self._head: tuple[subprocess.Popen, Path] | None = None
        self._mlflow: subprocess.Popen | None = None
        self._running: list[subprocess.Popen] = []
        self._smoke: Future | None = None
        self._smoke_id = f"{self.SMOKE_SUBMISSION}-{uuid.uuid4().hex[:8]}"
        # one thread: the head, then the server, then whatever is submitted, in that order
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="job-cluster")
        self._address = self._pool.submit(self._start_head)
        self._tracking = self._pool.submit(self._start_mlflow)

    def head(self, timeout: float = 900) -> tuple[str, dict, Path]:
        """(dashboard address, env for the `ray` CLI, folder of the head's logs), once it is up."""
        return self._address.result(timeout), self.env, self.folder

    def mlflow(self, timeout: float = 900) -> str:
        """The MLflow server's base URL, once it answers."""
        return self._tracking.result(timeout)

    def submit_smoke_job(self) -> Future:
        """Submit `run_all.py --preset smoke` once (later calls return the same submission); the
        future's result is (`ray job submit`'s CompletedProcess, the job's --out folder)."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("the job cluster was stopped")
            if self._smoke is None:
                self._smoke = self._pool.submit(self._run_smoke)
            return self._smoke

    def popen(self, cmd: list[str]) -> subprocess.Popen:
        """Start a `ray` CLI process that `stop()` ends; refused once stopped."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("the job cluster was stopped")
            proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self._running.append(proc)
            return proc

    def forget(self, proc: subprocess.Popen) -> None:
        with self._lock:
            if proc in self._running:
                self._running.remove(proc)

    def _smoke_may_run(self) -> bool:
        """Whether the smoke job was submitted and may still be running on the head (its `ray job
        submit` interrupted, failed or still waiting)."""
        if self._smoke is None or not self._address.done() or self._address.exception() is not None:
            return False
        if not self._smoke.done():
            return True
        return self._smoke.exception() is not None or self._smoke.result()[0].returncode != 0

    def stop(self) -> None:
        """Stop a job still running (a session that ends early), the server and the head; once.
        Each step runs even if one before it fails."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            running = list(self._running)
        try:
            if self._smoke_may_run():
                with contextlib.suppress(Exception):
                    subprocess.run([str(BIN / "ray"), "job", "stop", "--no-wait", "--address", self._address.result(),
                                    self._smoke_id], env=self.env, capture_output=True, timeout=60)
            for proc in running:
                with contextlib.suppress(Exception):
                    proc.terminate()
            self._pool.shutdown(wait=True, cancel_futures=True)
        finally:
            try:
                if self._mlflow is not None:
                    stop_process_group(self._mlflow)
            finally:
                if self._head is not None:
                    stop_head(*self._head)

    def _start_head(self) -> str:
        errors = []
        for attempt in range(3):
            try:
                proc, address, temp_dir = start_head(self.folder, self.env, attempt)
                self._head = (proc, temp_dir)
                return address
            except RuntimeError as e:
                errors.append(str(e))
                (self.folder / f"ray_head.{attempt}.error").write_text(str(e))
        raise RuntimeError("the Ray head did not start in 3 attempts:\n" + "\n---\n".join(errors))

    def _start_mlflow(self) -> str:
        self._mlflow, base = start_mlflow_server(self.folder)
        return base

    def _run_smoke(self) -> tuple[subprocess.CompletedProcess, Path]:
        address, tracking = self._address.result(), self._tracking.result()
        out = self.folder / "smoke" / "run"
        out.parent.mkdir()
        res = submit_job(address, self.env, REPO, ["python", "pipeline/run_all.py", "--preset", "smoke", "--out",
                                                   str(out), "--tracking-uri", tracking],
                         self.folder / "smoke" / "job1.log", submission_id=self._smoke_id, owner=self)
        return res, out
