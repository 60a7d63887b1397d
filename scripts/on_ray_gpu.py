"""Run a command as a Ray task that holds GPUs of the running cluster, so that it never shares a
GPU with the jobs Ray schedules meanwhile (gpu_run.sh times benchmarks beside its pipelines this
way). The task's CUDA_VISIBLE_DEVICES names the GPUs Ray gave it; the command inherits it.

    python scripts/on_ray_gpu.py --log /tmp/bench.log [--num-gpus 1] [--num-cpus 4] -- python -m ...

Exits with the command's exit status; its stdout and stderr go to --log.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def run_on_gpu(cmd: list[str], log: str, num_gpus: float = 1, num_cpus: float = 4, address: str | None = None) -> int:
    import ray

    if not cmd:
        raise ValueError("on_ray_gpu: no command given after --")
    owns = not ray.is_initialized()  # a caller's own Ray session is used and left running
    if owns:
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), logging_level="ERROR", log_to_driver=False)
    cwd = os.getcwd()

    @ray.remote(num_gpus=num_gpus, num_cpus=num_cpus)
    def run(cmd: list[str], cwd: str, log: str) -> tuple[int, str]:
        with open(log, "w") as f:
            proc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
        return proc.returncode, os.environ.get("CUDA_VISIBLE_DEVICES", "")

    try:
        code, devices = ray.get(run.remote(cmd, cwd, os.path.abspath(log)))
    finally:
        if owns:
            ray.shutdown()
    print(f"on_ray_gpu: exit {code} on CUDA_VISIBLE_DEVICES={devices!r}: {' '.join(cmd)}")
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: on_ray_gpu.py --log FILE [--num-gpus N] [--num-cpus N] -- command ...", file=sys.stderr)
        return 2
    split = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--log", required=True)
    p.add_argument("--num-gpus", type=float, default=1)
    p.add_argument("--num-cpus", type=float, default=4)
    p.add_argument("--address", default=None)
    a = p.parse_args(argv[:split])
    return run_on_gpu(argv[split + 1:], a.log, a.num_gpus, a.num_cpus, a.address)


if __name__ == "__main__":
    sys.exit(main())
