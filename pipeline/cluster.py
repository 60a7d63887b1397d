"""Joining a Ray cluster, or starting a local one, without tripping over a dead one.

A bare `ray.init()` joins RAY_ADDRESS, else the cluster whose address the last `ray start` wrote
to `<ray temp dir>/ray_current_cluster`. A `ray start` that was killed (rather than stopped with
`ray stop`) leaves that file behind, and `ray.init()` then spends a minute failing to reach its
GCS before raising. `init_ray` checks that address first and starts a local cluster instead,
saying so; RAY_ADDRESS (what `ray job submit` sets for its driver) is always obeyed. `ensure_ray`
does that only when this process is not connected yet.

A cluster started with token authentication (`RAY_AUTH_MODE=token ray start`, or a plain `ray
start` once `~/.ray/auth_token` exists) refuses a client without its token: Ray then raises
AuthenticationError at once (RAY_AUTH_MODE=token but no token here) or, after retrying for about
20 s, a ConnectionError (no RAY_AUTH_MODE=token here, or another token). `init_ray` turns both
into SystemExit with one line naming the fix, instead of a traceback.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def recorded_address() -> str | None:
    """The address the last `ray start` on this machine recorded, if any."""
    from ray._common.utils import get_ray_address_file

    path = get_ray_address_file(None)
    try:
        with open(path) as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def reachable(address: str, timeout_s: float = 2.0) -> bool:
    """Whether something accepts TCP connections at host:port."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def init_ray(**kwargs) -> None:
    """`ray.init(**kwargs)` joining RAY_ADDRESS or a live `ray start` cluster, else starting a
    local cluster; a no-op when Ray is already initialised."""
    import ray

    if ray.is_initialized():
        return
    if not os.environ.get("RAY_ADDRESS") and "address" not in kwargs:
        recorded = recorded_address()
        if recorded is not None and not reachable(recorded):
            log.warning("ignoring %s from a Ray cluster that is no longer running; starting a local "
                        "cluster", recorded)
            print(f"[ray] the cluster recorded at {recorded} is not running; starting a local one",
                  flush=True)
            kwargs["address"] = "local"
    explicit = kwargs.get("address") or os.environ.get("RAY_ADDRESS")
    if explicit and _refuses_this_client(explicit):  # fail in a moment, not after 20 s of retries
        raise SystemExit(auth_fix_message(explicit))
    try:
        ray.init(**kwargs)
    except Exception as exc:  # noqa: BLE001 - re-raised unless Ray refused our token
        if not _refused_for_auth(exc):
            raise
        address = explicit or recorded_address() or "?"
        raise SystemExit(auth_fix_message(address)) from None


def ensure_ray() -> None:
    """Join or start a cluster (`init_ray`) unless this process is connected to one already: a
    stage run alone starts Ray itself, a stage run by run_all or a sweep trial uses the caller's."""
    import ray

    if not ray.is_initialized():
        init_ray()


def require_lpips_weights(use_gpu: bool = False) -> None:
    """FileNotFoundError (naming the file and its setup command) unless the LPIPS weights are where
    scoring will read them: here, or, on a cluster of several nodes whose other nodes may hold what
    this one lacks, on a node a task placed as the scoring actors are (a GPU with `use_gpu`) reaches.
    Stages that score call it once Ray is up and before they train or score anything."""
    import ray

    from models.lpips import require_weights, weights_path

    try:
        require_weights()
        return
    except FileNotFoundError:
        if not (ray.is_initialized() and sum(bool(n["Alive"]) for n in ray.nodes()) > 1):
            raise
    has = ray.remote(lambda: weights_path().is_file()).options(num_cpus=0.01, num_gpus=1 if use_gpu else 0)
    if not ray.get(has.remote()):
        require_weights()  # raises, naming this process's path


def _refuses_this_client(address: str, timeout_s: float = 5.0) -> bool:
    """Whether the GCS at `address` (host:port) refuses this process's token, or the lack of one.

    One call of Ray's GCS client, in a thread given `timeout_s`: anything but an authentication
    error (not a GCS address, a slow start) is left to `ray.init` to report. Skipped where Ray
    itself raises at once: RAY_AUTH_MODE=token with no token at all."""
    import threading

    if "://" in address or address in ("auto", "local") or not reachable(address):
        return False
    try:
        from ray._raylet import AuthenticationTokenLoader, GcsClient
        from ray.exceptions import AuthenticationError
    except ImportError:
        return False
    # Ray's own view of the mode (RAY_AUTH_MODE as its config read it); a GCS client in token mode
    # with no token at all aborts the process, so that case is left to ray.init's own error
    if _token_mode() and not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            GcsClient(address=address)
            result.append(False)
        except AuthenticationError:
            result.append(True)
        except Exception:  # noqa: BLE001 - not ours to report
            result.append(False)

    t = threading.Thread(target=probe, name="ray-auth-probe", daemon=True)
    t.start()
    t.join(timeout_s)
    return bool(result and result[0])


def _refused_for_auth(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is Ray refusing this client's token, or finding none."""
    from ray.exceptions import AuthenticationError

    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, AuthenticationError) or any(
                s in str(exc) for s in ("InvalidAuthToken", "Unauthenticated", "no authentication token")):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _token_mode() -> bool:
    """Whether this process's Ray sends a token (RAY_AUTH_MODE=token)."""
    try:
        from ray._raylet import AuthenticationMode, get_authentication_mode

        return get_authentication_mode() == AuthenticationMode.TOKEN
    except ImportError:
        return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"


def _token_source() -> str | None:
    """Where this process would read a Ray auth token from, if anywhere."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return f"RAY_AUTH_TOKEN_PATH={path}" if os.path.isfile(path) else None
    default = os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    return default if os.path.isfile(default) else None


def auth_fix_message(address: str) -> str:
    """One line: why the cluster at `address` refused this client, and what to set."""
    give = ("the cluster's token (`ray get-auth-token` on its head prints it) in ~/.ray/auth_token or "
            "RAY_AUTH_TOKEN")
    source = _token_source()
    head = f"[ray] the Ray cluster at {address} requires its auth token"
    if not _token_mode():
        fix = f"(the token is read from {source})" if source is not None else f"and put {give}"
        return f"{head} and RAY_AUTH_MODE is not 'token' here: export RAY_AUTH_MODE=token {fix}"
    if source is None:
        return f"{head} and none was found (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token): put {give}"
    return f"{head} and rejected the one from {source}: put {give}"
