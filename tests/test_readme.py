"""README.md's "The job on a Ray cluster" commands, run as written, read from README.md at test time.

A fenced ```bash block right after `<!-- test: KIND -->` is one of:
- `run`: its lines run in order in one bash session (`set -e`), sharing its variables;
- `serve`: a server that runs until stopped; it is started in the background, must answer HTTP on
  its `--port` (200 on `/`), and is stopped;
- `gpu`: needs a GPU, so it is not run; every `ray` command in it must parse with Ray's CLI, and its
  `run_all.py` arguments with run_all's parser.

How they run, and why:
- In a temporary HOME (no `~/.ray/auth_token`: the fresh machine the section must work on) and a
  temporary copy of the repository (git's tracked and unignored files; its `.venv/bin/activate` is
  the test's venv), so `runs/smoke` and the token are the test's own.
- In new PID, network and mount namespaces (`unshare`): `ray stop` stops every Ray process it can
  see, which in the namespace is only this cluster, never the test session's (`ray_local`) nor
  anyone else's on the machine; Ray's fixed default ports (6379, 8265, 52365, ...) and MLflow's
  5000 are free in the new network namespace, so the commands run with their defaults; and when
  the namespace's first process exits, the kernel ends whatever the blocks left running.
- RAY_TMPDIR points Ray's temp dir (sessions, `ray_current_cluster`) at a directory of the test's,
  since /tmp is shared with the machine. AWM_JOB_ARGS='--stages collect --games Pong' shortens the
  job (the README documents the variable); nothing else of the blocks is changed.
A machine where no namespace can be made (neither as root nor through a user namespace) skips,
saying so.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARKED = re.compile(r"^<!-- test: (\w+) -->\n```bash\n(.*?)^```\s*$", re.M | re.S)
TRACE = "+readme: "  # PS4 of the harness: every command the blocks run is traced with it

# Run inside the namespace by the harness: bring up loopback, wait for HTTP, count Ray processes.
HELPER = r'''
import fcntl, socket, struct, sys, time, urllib.error, urllib.request, os

def lo_up():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ifr = struct.pack("16sH22x", b"lo", 0)
    flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, ifr)[:18])[1]  # SIOCGIFFLAGS
    fcntl.ioctl(s, 0x8914, struct.pack("16sH22x", b"lo", flags | 1))   # SIOCSIFFLAGS, IFF_UP

def wait_http(url, timeout_s, pid):
    deadline = time.time() + float(timeout_s)
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                print(f"::http {r.status} {url}", flush=True)
                return 0 if r.status == 200 else 1
        except urllib.error.HTTPError as e:
            print(f"::http {e.code} {url}", flush=True)
            return 1
        except OSError:
            try:
                os.kill(int(pid), 0)
            except OSError:
                print(f"::http server exited before answering {url}", flush=True)
                return 1
            time.sleep(1)
    print(f"::http no answer from {url} in {timeout_s} s", flush=True)
    return 1

def ray_procs(timeout_s=20):
    """Ray's own processes still running (the kinds `ray stop` ends, and its workers), polled for
    `timeout_s` while they exit."""
    names = ("/raylet ", "/gcs_server ", "ray::", "dashboard/dashboard.py", "dashboard/agent.py",
             "_private/log_monitor.py", "autoscaler/_private/monitor.py", "ray.util.client.server",
             "runtime_env/agent/main.py")
    deadline = time.time() + float(timeout_s)
    while True:
        left = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(n in cmd + " " for n in names):
                left.append(cmd[:160])
        if not left or time.time() > deadline:
            break
        time.sleep(1)
    print(f"::ray-procs {len(left)} {left}", flush=True)

if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "lo-up":
        lo_up()
    elif cmd == "wait-http":
        sys.exit(wait_http(*args))
    elif cmd == "ray-procs":
        ray_procs()
'''


def readme_blocks(text: str | None = None) -> list[tuple[str, str]]:
    """(kind, body) of every block marked `<!-- test: KIND -->` in README.md, in order."""
    text = README.read_text() if text is None else text
    return [(m.group(1), m.group(2)) for m in MARKED.finditer(text)]


def _namespace_prefix() -> list[str] | None:
    """An `unshare` command line that gives its command new PID, network and mount namespaces
    (with its own /proc), killing them when it dies; None where none can be made."""
    if shutil.which("unshare") is None:
        return None
    base = ["unshare", "--pid", "--net", "--mount", "--mount-proc", "--fork", "--kill-child"]
    for prefix in (base, base[:1] + ["--user", "--map-root-user"] + base[1:]):
        try:
            ok = subprocess.run(prefix + ["true"], capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return prefix
    return None


def _copy_repo(dest: Path) -> None:
    """The files of a fresh clone with this working tree's changes: tracked and unignored ones."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    # `. .venv/bin/activate` activates the test's own venv (a real .venv/ directory, so that
    # .gitignore keeps it out of what `ray job submit` uploads)
    activate = Path(sys.prefix) / "bin" / "activate"
    assert activate.is_file(), f"the tests must run in a venv (scripts/setup.sh's .venv); {activate} is missing"
    (dest / ".venv" / "bin").mkdir(parents=True)
    (dest / ".venv" / "bin" / "activate").symlink_to(activate)


def _clean_env(home: Path, ray_tmp: Path) -> dict[str, str]:
    """The environment of a new login: no Ray or MLflow settings, the venv not active."""
    venv_bin = str(Path(sys.prefix) / "bin")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MLFLOW_")) and k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p != venv_bin)
    env.update(HOME=str(home), RAY_TMPDIR=str(ray_tmp), PYTHONUNBUFFERED="1")
    return env


def _harness(blocks: list[tuple[str, str]], work: Path, helper: Path, logs: Path) -> str:
    """One bash script running the blocks in order in the repository copy."""
    py = shlex.quote(sys.executable)
    out = ["set -o pipefail", f"PS4={shlex.quote(TRACE)}", f"{py} {helper} lo-up", f"cd {shlex.quote(str(work))}"]
    for i, (kind, body) in enumerate(blocks):
        out.append(f"echo '::block {i} {kind}'")
        if kind == "run":
            out += ["set -ex", body, "set +ex"]
        elif kind == "serve":
            m = re.search(r"--port[= ](\d+)", body)
            url = f"http://127.0.0.1:{m.group(1) if m else 5000}/"
            log = shlex.quote(str(logs / f"serve{i}.log"))
            # job control: the server gets a process group of its own, stopped as a whole
            out += ["set -m", f"( set -x\n{body}\n) > {log} 2>&1 &", "SERVE=$!", "set +m",
                    f"{py} {helper} wait-http {url} 180 $SERVE || {{ cat {log}; exit 3; }}",
                    "kill -TERM -- -$SERVE; wait $SERVE 2>/dev/null; true"]
    out += ["echo '::blocks done'", f"{py} {helper} ray-procs"]
    return "\n".join(out) + "\n"


def _segments(transcript: str) -> list[tuple[str, str]]:
    """(traced command, what followed it until the next traced command) from a harness transcript."""
    segs: list[tuple[str, str]] = []
    for line in transcript.splitlines():
        m = re.match(r"^\++" + re.escape(TRACE[1:]) + "(.*)$", line)
        if m:
            segs.append((m.group(1), ""))
        elif segs:
            segs[-1] = (segs[-1][0], segs[-1][1] + line + "\n")
    return segs


def _output_of(segs: list[tuple[str, str]], command_prefix: str) -> str:
    found = [out for cmd, out in segs if cmd.startswith(command_prefix)]
    assert found, f"no command starting {command_prefix!r} ran; commands: {[c for c, _ in segs]}"
    return found[-1]


@pytest.fixture(scope="module")
def namespace() -> list[str]:
    prefix = _namespace_prefix()
    if prefix is None:
        pytest.skip("cannot create PID/network/mount namespaces here (`unshare`, as root or through a "
                    "user namespace), which keep `ray stop` and Ray's default ports to this test")
    return prefix


def _ray_tmp() -> Path:
    # short: Ray's Unix socket paths under it must stay below 108 bytes
    return Path(tempfile.mkdtemp(prefix="awm-readme-", dir="/tmp"))


def test_readme_marks_the_cluster_section_blocks():
    blocks = readme_blocks()
    kinds = [k for k, _ in blocks]
    assert kinds.count("run") >= 2 and "serve" in kinds and "gpu" in kinds, kinds
    assert set(kinds) <= {"run", "serve", "gpu"}, kinds
    text = "\n".join(body for k, body in blocks if k != "gpu")
    for needed in ("ray get-auth-token --generate", "ray start --head", "ray job submit", "ray job logs",
                   "mlflow ui", "ray stop", "$AWM_JOB_ARGS"):
        assert needed in text, f"the tested blocks no longer contain {needed!r}"


def _commands(body: str) -> list[list[str]]:
    """Each simple command of a block as argv: continuation lines joined, comments, redirections
    and `&&` chains split off."""
    cmds: list[list[str]] = []
    for line in body.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        cur: list[str] = []
        skip = False
        for w in words + ["&&"]:
            if skip:
                skip = False
            elif w in (">", "2>", ">>"):
                skip = True
            elif w in ("&&", "||", ";"):
                if cur:
                    cmds.append(cur)
                cur = []
            else:
                cur.append(w)
    return cmds


def test_readme_gpu_recipe_parses():
    """The GPU block is not run here; its `ray` commands must parse with Ray's own CLI (every
    option exists) and its run_all.py command with run_all's parser (preset, games, stages)."""
    import click
    from ray.scripts.scripts import cli

    from pipeline import run_all
    from workers.atari import resolve_env_id

    gpu = [body for kind, body in readme_blocks() if kind == "gpu"]
    assert len(gpu) == 1
    cmds = _commands(gpu[0])
    ray_cmds = [c for c in cmds if c[0] == "ray"]
    assert {" ".join(c[:3]) for c in ray_cmds} >= {"ray start --head", "ray job submit"}
    for argv in ray_cmds:
        cmd, info, args, ctx = cli, "ray", argv[1:], None
        while isinstance(cmd, click.Group):
            ctx = click.Context(cmd, info_name=info, parent=ctx)
            info, *args = args
            cmd = cmd.get_command(ctx, info)
            assert cmd is not None, f"`{' '.join(argv)}`: no ray command {info!r}"
        try:
            cmd.make_context(info, list(args), parent=ctx)
        except click.ClickException as e:
            pytest.fail(f"`{' '.join(argv)}` does not parse: {e.format_message()}")
    submit = next(c for c in ray_cmds if c[1:3] == ["job", "submit"])
    entry = submit[submit.index("--") + 1:]
    assert entry[:2] == ["python", "pipeline/run_all.py"], entry
    a = run_all._parse(entry[2:])
    assert a.preset == "gpu" and a.games and a.out and a.out.startswith("$PWD/")
    for g in a.games:
        resolve_env_id(g)
    assert set(a.stages) <= set(run_all.STAGES)


@pytest.mark.timeout(900)
def test_readme_cluster_section_runs_as_written(tmp_path, namespace):
    """On a machine without a token: token, `ray start --head`, `ray job submit` (the smoke preset,
    collect only) to SUCCEEDED, `ray job logs`, the MLflow UI answering, `ray stop`."""
    blocks = [(k, b) for k, b in readme_blocks() if k in ("run", "serve")]
    work, home, logs = tmp_path / "repo", tmp_path / "home", tmp_path / "logs"
    for d in (work, home, logs):
        d.mkdir()
    _copy_repo(work)
    helper = tmp_path / "helper.py"
    helper.write_text(HELPER)
    script = tmp_path / "harness.sh"
    script.write_text(_harness(blocks, work, helper, logs))
    ray_tmp = _ray_tmp()
    # one game's collection with the random policy: the job's content is not what this test checks
    env = {**_clean_env(home, ray_tmp), "AWM_JOB_ARGS": "--stages collect --games Pong --set collect.policy=random"}
    try:
        res = subprocess.run(namespace + ["bash", str(script)], env=env, cwd=work, timeout=840,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    transcript = res.stdout
    (logs / "transcript.txt").write_text(transcript)
    tail = transcript[-6000:]
    assert res.returncode == 0 and "::blocks done" in transcript, f"rc={res.returncode}\n{tail}"

    segs = _segments(transcript)
    token = home / ".ray" / "auth_token"
    assert token.is_file() and len(token.read_text().strip()) >= 32, "no token in ~/.ray/auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert "Ray runtime started" in _output_of(segs, "ray start --head")
    submitted = _output_of(segs, "ray job submit")
    assert re.search(r"Job '[^']+' succeeded", submitted), submitted[-3000:]
    logs_out = _output_of(segs, "ray job logs")
    assert "[run_all] collect: done in" in logs_out, logs_out[-3000:]
    assert f"[run_all] finished; outputs under {work}/runs/smoke" in logs_out, logs_out[-3000:]
    assert (work / "runs" / "smoke" / "stages" / "collect.json").is_file()
    assert not (work / "runs" / "smoke" / "stages" / "vae.json").exists()  # AWM_JOB_ARGS reached run_all
    assert re.search(r"::http 200 http://127\.0\.0\.1:\d+/", transcript), tail
    assert "Stopped all" in _output_of(segs, "ray stop")
    assert "::ray-procs 0 " in transcript, "Ray processes were left running after `ray stop`"


@pytest.mark.timeout(300)
def test_run_all_without_the_clusters_token_fails_with_one_line(tmp_path, namespace):
    """`python pipeline/run_all.py` with RAY_ADDRESS at a token cluster, from a HOME without the
    token: exit status 1 and one line naming the fix, no traceback; both without
    RAY_AUTH_MODE=token (the cluster refuses the client) and with it (no token to send)."""
    helper = tmp_path / "helper.py"
    helper.write_text(HELPER)
    head_home, client_home = tmp_path / "head", tmp_path / "client"
    head_home.mkdir()
    client_home.mkdir()
    py, q = shlex.quote(sys.executable), shlex.quote
    ray = q(str(Path(sys.executable).parent / "ray"))
    client = (f"HOME={q(str(client_home))} RAY_ADDRESS=127.0.0.1:6379 {{mode}} {py} pipeline/run_all.py "
              f"--preset smoke --stages collect --out {q(str(tmp_path / 'out'))}")
    head_log = q(str(tmp_path / "head.log"))
    script = "\n".join([
        f"{py} {helper} lo-up",
        f"{ray} get-auth-token --generate > /dev/null 2>&1",
        f"RAY_AUTH_MODE=token {ray} start --head --num-cpus=1 --include-dashboard=false > {head_log} 2>&1"
        f" || {{ cat {head_log}; exit 3; }}",
        # both clients at once (each mostly imports torch and Ray)
        f"( {client.format(mode='')} > {tmp_path}/unset.out 2> {tmp_path}/unset.err; echo \"::rc unset $?\" ) &",
        f"( {client.format(mode='RAY_AUTH_MODE=token')} > {tmp_path}/token.out 2> {tmp_path}/token.err; "
        "echo \"::rc token $?\" ) &",
        "wait",
        f"{ray} stop > /dev/null 2>&1",
    ]) + "\n"
    ray_tmp = _ray_tmp()
    try:
        res = subprocess.run(namespace + ["bash", "-c", script], env=_clean_env(head_home, ray_tmp), cwd=REPO,
                             timeout=280, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert res.returncode == 0, res.stdout[-4000:]
    for mode, why in (("unset", "RAY_AUTH_MODE is not 'token' here"), ("token", "none was found")):
        assert f"::rc {mode} 1" in res.stdout, res.stdout[-3000:]
        err = (tmp_path / f"{mode}.err").read_text()
        assert "Traceback" not in err, err[-3000:]
        ours = [line for line in err.splitlines() if line.startswith("[ray] ")]
        assert len(ours) == 1 and ours[0] == err.rstrip().splitlines()[-1], err[-3000:]
        assert ours[0].startswith("[ray] the Ray cluster at 127.0.0.1:6379 requires its auth token"), ours
        assert why in ours[0] and "ray get-auth-token" in ours[0], ours
