"""What can be checked of the images and cluster manifests without a Docker daemon or Kubernetes.

The files parse, their versions agree with pyproject.toml, every script or file they name exists,
and the MLflow command the compose file and the RayJob run really serves a client that reaches it
by its service name (MLflow 3 rejects unknown Host headers).
"""

import os
import re
import shlex
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
APP_DIR = "/home/ray/app"  # the image's WORKDIR, where the repository is copied


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (DOCKER / "Dockerfile").read_text()


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def k8s_docs() -> dict:
    docs = [d for d in yaml.safe_load_all((DOCKER / "rayjob.yaml").read_text()) if d]
    return {d["kind"]: d for d in docs}


def ray_pin(pyproject: dict) -> str:
    pins = [re.fullmatch(r"ray\[[^\]]*\]==(\S+)", d) for d in pyproject["project"]["dependencies"]]
    found = [m.group(1) for m in pins if m]
    assert len(found) == 1, f"pyproject.toml: expected one exact ray[...]==X pin, got {found}"
    return found[0]


def dockerfile_args(text: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))


def image_versions(image: str) -> tuple[str, str]:
    """rayproject/ray:2.60.0-py311-cpu -> ("2.60.0", "3.11")."""
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-(cpu|gpu|cu\d+)", image)
    assert m, f"not a versioned rayproject/ray image tag: {image!r}"
    return m.group(1), f"3.{m.group(2)}"


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_base_image_matches_pyproject(dockerfile, pyproject):
    args = dockerfile_args(dockerfile)
    ray_version, python = image_versions(args["BASE"])
    assert ray_version == ray_pin(pyproject), "docker/Dockerfile BASE and pyproject ray pin differ"
    requires = SpecifierSet(pyproject["project"]["requires-python"])
    assert python in requires, f"image Python {python} outside requires-python {requires}"
    assert re.search(rf"ray.__version__ == '{re.escape(ray_pin(pyproject))}'", dockerfile), (
        "the build-time version check in docker/Dockerfile must assert the pinned Ray version"
    )
    assert "FROM ${BASE}" in dockerfile


def test_dockerfile_cpu_variant_pins_a_cpu_torch(dockerfile):
    args = dockerfile_args(dockerfile)
    assert re.fullmatch(r"torch==\d+\.\d+\.\d+", args["TORCH_SPEC"]), args["TORCH_SPEC"]
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    # torch must be installed from TORCH_INDEX before the project's dependencies pull any torch.
    torch_at = dockerfile.index('--index-url "${TORCH_INDEX}" "${TORCH_SPEC}"')
    deps_at = dockerfile.index("pip install -r /tmp/requirements.txt")
    assert torch_at < deps_at


def test_dockerfile_copies_and_runs_existing_files(dockerfile):
    for rel in re.findall(r"python (\S+\.py)", dockerfile):
        assert (ROOT / rel).is_file(), f"docker/Dockerfile runs {rel}, which does not exist"
    assert "python scripts/setup_lpips.py" in dockerfile
    for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", dockerfile, flags=re.M):
        *sources, _dest = line.split()
        for src in sources:
            assert (ROOT / src).exists(), f"docker/Dockerfile copies {src}, which does not exist"
    assert re.search(rf"^WORKDIR {APP_DIR}$", dockerfile, flags=re.M)


def test_dockerignore_keeps_local_environments_out():
    ignored = set((DOCKER / "Dockerfile.dockerignore").read_text().split())
    assert {".git", ".venv", "mlruns"} <= ignored


# ---------------------------------------------------------------- compose


def test_compose_services_and_commands(compose):
    services = compose["services"]
    assert {"ray-head", "ray-worker", "ray-gpu-worker", "mlflow"} <= set(services)
    head = shlex.split(services["ray-head"]["command"])
    assert head[:3] == ["ray", "start", "--head"] and "--block" in head
    assert "--dashboard-host=0.0.0.0" in head and "--dashboard-port=8265" in head
    assert "127.0.0.1:8265:8265" in services["ray-head"]["ports"]
    for name in ("ray-worker", "ray-gpu-worker"):
        cmd = shlex.split(services[name]["command"])
        assert cmd[:2] == ["ray", "start"] and "--address=ray-head:6379" in cmd and "--block" in cmd
    gpu = services["ray-gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["count"] == 1


def test_compose_ray_nodes_share_storage_auth_and_tracking(compose):
    for name in ("ray-head", "ray-worker", "ray-gpu-worker"):
        svc = compose["services"][name]
        env = svc["environment"]
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), f"{name}: token must be required"
        assert "shared:/shared" in svc["volumes"], name
        assert svc["shm_size"], name
    assert set(compose["volumes"]) == {"shared", "mlflow"}


def test_compose_build_points_at_the_dockerfile_and_pins_match(compose, pyproject, dockerfile):
    build = compose["services"]["ray-head"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == (DOCKER / "Dockerfile")
    defaults = dockerfile_args(dockerfile)
    for key, value in build["args"].items():
        m = re.fullmatch(r"\$\{\w+:-(.+)\}", value)
        assert m, f"compose build arg {key}={value!r} should be ${{VAR:-default}}"
        assert m.group(1) == defaults[key], f"compose default for {key} differs from the Dockerfile's"
    assert compose["services"]["mlflow"]["build"] == build


def test_compose_mlflow_command(compose):
    svc = compose["services"]["mlflow"]
    cmd = shlex.split(svc["command"])
    opts = dict(zip(cmd[2::2], cmd[3::2]))
    assert cmd[:2] == ["mlflow", "server"]
    assert opts["--backend-store-uri"] == "sqlite:////mlflow/mlflow.db"
    assert opts["--artifacts-destination"] == "/mlflow/artifacts"
    assert opts["--host"] == "0.0.0.0" and opts["--port"] == "5000"
    assert "mlflow:5000" in opts["--allowed-hosts"].split(",")
    assert "mlflow:/mlflow" in svc["volumes"]


# ---------------------------------------------------------------- KubeRay


def test_rayjob_versions_entrypoint_and_storage(k8s_docs, pyproject):
    job = k8s_docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray_pin(pyproject)
    entry = shlex.split(job["spec"]["entrypoint"])
    assert entry[0] == "python"
    script = entry[1]
    assert script.startswith(APP_DIR + "/"), f"entrypoint script {script} is not in the image's {APP_DIR}"
    rel = script[len(APP_DIR) + 1:]
    assert rel == "pipeline/run_all.py" and (ROOT / rel).is_file(), f"entrypoint names {rel}, missing"
    opts = dict(zip(entry[2::2], entry[3::2]))
    assert opts["--preset"] in {"smoke", "gpu", "paper"}
    assert os.path.isabs(opts["--out"]) and opts["--out"].startswith("/shared/"), (
        "a job's working directory is a temporary copy: --out must be absolute, on the shared PVC"
    )
    assert k8s_docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_rayjob_pods_have_gpu_auth_tracking_and_the_pvc(k8s_docs):
    job = k8s_docs["RayJob"]
    cluster = job["spec"]["rayClusterSpec"]
    pvc = k8s_docs["PersistentVolumeClaim"]["metadata"]["name"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster["workerGroupSpecs"]
    ]
    for pod in pods:
        (container,) = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000"
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "auth_token"
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {pvc}
        assert {"mountPath": "/shared", "name": "shared"} in container["volumeMounts"]
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") == 1]
    assert gpu_groups, "the RayJob needs a worker group with nvidia.com/gpu: 1"
    submitter_env = {e["name"] for e in job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["env"]}
    assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= submitter_env
    service = k8s_docs["Service"]
    assert service["metadata"]["name"] == "mlflow" and service["spec"]["ports"][0]["port"] == 5000


def test_rayjob_and_compose_run_the_same_mlflow_server(k8s_docs, compose):
    k8s_cmd = k8s_docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert k8s_cmd == shlex.split(compose["services"]["mlflow"]["command"])


# ---------------------------------------------------------------- the MLflow command, run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, host: str) -> int:
    req = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.timeout(180)
def test_compose_mlflow_command_serves_clients_that_use_the_service_name(compose, tmp_path):
    """Runs the compose file's exact mlflow command (paths moved under tmp, one worker)."""
    cmd = shlex.split(compose["services"]["mlflow"]["command"])
    port = _free_port()
    cmd = [c.replace("/mlflow/", f"{tmp_path}/") for c in cmd]
    cmd[cmd.index("--host") + 1] = "127.0.0.1"
    cmd[cmd.index("--port") + 1] = str(port)
    cmd[0] = str(Path(sys.executable).parent / "mlflow")
    proc = subprocess.Popen(cmd + ["--workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
        deadline = time.monotonic() + 120  # + up to 3 requests of 20 s: inside the 180 s timeout
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            try:
                status = _get(api, "mlflow:5000")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                # TimeoutError: the server took the connection but its first answer (it creates
                # the store's tables first) was slower than the request's timeout on a busy machine.
                assert time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(1)
        assert status == 200, "the Ray nodes' Host header mlflow:5000 must be allowed"
        assert _get(api, "attacker.example:5000") == 403, "host validation should still be on"
        assert (tmp_path / "mlflow.db").is_file()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
