"""What the benchmark scripts share: device naming, timing, GPU-busy sampling, profiling, tables.

Timing rule: a measured region ends with `sync(device)` (torch.cuda.synchronize on GPU), because
CUDA kernels run asynchronously and a host clock read without it times the launch, not the work.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

PEAK_BF16_H100 = 989e12
"""Dense bf16 tensor-core peak of an H100 SXM in FLOP/s (NVIDIA datasheet; 2x with sparsity)."""


# -- device ----------------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    """"auto" -> cuda when present, else cpu; anything else is taken as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} asked for, but torch sees no CUDA device")
    return device


def device_name(device: torch.device) -> str:
    """GPU model, or the CPU model from /proc/cpuinfo (with the core count torch uses)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} ({torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(fn: Callable[[], Any], device: torch.device, calls: int) -> float:
    """Untimed calls before measuring (they absorb torch.compile's compilation, cuDNN autotuning
    and allocator growth); returns their total seconds."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return time.perf_counter() - t0


def time_calls(fn: Callable[[], Any], device: torch.device, iters: int, latency_calls: int = 3) -> dict[str, float]:
    """Seconds per call of fn, warm: `mean_s`, the wall time of `iters` back-to-back calls / iters
    (the throughput figure: the calls queue on the device as a training or generation loop's do,
    with one synchronisation at the end), and `min_s`, the fastest of `latency_calls` more calls,
    each synchronised (a latency floor; nan with none)."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    t_start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    total = time.perf_counter() - t_start
    fastest = math.inf
    for _ in range(latency_calls):
        t = time.perf_counter()
        fn()
        sync(device)
        fastest = min(fastest, time.perf_counter() - t)
    return {"mean_s": total / iters, "min_s": fastest if latency_calls > 0 else math.nan}


# -- GPU busy fraction -----------------------------------------------------------------------------
def _nvidia_smi_util(index: int) -> float | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    out = subprocess.run([exe, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", str(index)],
                         capture_output=True, text=True, timeout=5)
    try:
        return float(out.stdout.strip().splitlines()[0])
    except (IndexError, ValueError):
        return None


def gpu_utilization(device: torch.device) -> float | None:
    """NVML's "GPU utilisation" in percent: the share of the last sample period (1/6 s to 1 s) in
    which any kernel ran. torch.cuda.utilization needs pynvml; nvidia-smi reads the same counter."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        return float(torch.cuda.utilization(index))
    except Exception:  # pynvml missing or NVML unusable: the driver's command-line tool instead
        return _nvidia_smi_util(index)


class GpuBusySampler:
    """Polls gpu_utilization in a background thread while a `with` block runs; `.mean` is the
    average percent (None on CPU or when no counter is readable)."""

    def __init__(self, device: torch.device, interval_s: float = 0.2):
        self.device, self.interval_s = device, interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            u = gpu_utilization(self.device)
            if u is None:
                return
            self.samples.append(u)

    def __enter__(self) -> "GpuBusySampler":
        if self.device.type == "cuda":
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


# -- profiling -------------------------------------------------------------------------------------
def profile_table(fn: Callable[[], Any], device: torch.device, *, calls: int = 2, row_limit: int = 15) -> str:
    """torch.profiler over `calls` calls of fn (run it warm): the top ops by CUDA time on GPU, by
    CPU time on CPU, then that time summed by kind of work (`time_by_kind`): on GPU every kernel's
    time from the trace (the top ops' table leaves most kernels out and counts an op's kernels
    twice, under the op and under the kernel), on CPU every op's self time."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=row_limit)
    if device.type == "cuda":
        with tempfile.TemporaryDirectory() as tmp:
            trace = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(trace))
            timed = kernel_times(json.loads(trace.read_text()))
        what = "GPU time by kind of kernel"
    else:
        timed = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages()]
        what = "CPU self time by kind of op"
    kinds = time_by_kind(timed)
    return f"{table}\n{what}, {calls} calls:\n{markdown_table(kinds, ['kind', 'ms', 'share_pct', 'calls'])}"


KERNEL_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Triton (Inductor's fused kernels)", ("triton",)),
    ("attention", ("sdpa", "flash", "fmha", "attention", "attn")),
    ("matrix products", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "aten::mm", "aten::addmm", "aten::bmm",
                         "aten::baddbmm", "aten::_addmm", "aten::matmul")),
    ("optimizer", ("multi_tensor", "adam")),
    ("normalisation", ("norm",)),
    ("copies and fills", ("memcpy", "memset", "copy", "fill")),
    ("element-wise and reductions", ("elementwise", "vectorized", "unrolled", "reduce", "aten::")),
)
"""Kinds of work, each with the lower-case name fragments of its CUDA kernels and CPU ops; the
first kind with a matching fragment wins (a Triton kernel named after the ops it fuses stays
Triton). Names that match none count as "other"."""


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, parts in KERNEL_KINDS if any(p in low for p in parts)), "other")


def kernel_times(trace: dict) -> list[tuple[str, float]]:
    """(name, µs) of every GPU kernel, copy and fill in a torch.profiler Chrome trace."""
    events = trace.get("traceEvents", trace) if isinstance(trace, dict) else trace
    return [(e.get("name", ""), float(e.get("dur", 0.0))) for e in events
            if isinstance(e, dict) and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]


def time_by_kind(timed: list[tuple]) -> list[dict[str, Any]]:
    """Rows {kind, ms, share_pct, calls} of (name, µs) or (name, µs, calls) entries summed by
    `kernel_kind`, largest first; entries of no time are left out."""
    totals: dict[str, list[float]] = {}
    for name, us, *calls in timed:
        if us > 0:
            t = totals.setdefault(kernel_kind(name), [0.0, 0])
            t[0] += us
            t[1] += calls[0] if calls else 1
    whole = sum(t[0] for t in totals.values()) or 1.0
    rows = [{"kind": k, "ms": t[0] / 1e3, "share_pct": 100 * t[0] / whole, "calls": int(t[1])}
            for k, t in totals.items()]
    return sorted(rows, key=lambda r: -r["ms"])


# -- output ----------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 0.01:
            return f"{v:.3f}"
        return f"{v:.2e}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Rows as a Markdown table over `columns` (missing or None cells print "n/a")."""
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def command_line() -> str:
    """This process's command line as typed (`python -m benchmarks.x --flag ...`), shell-quoted."""
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    return shlex.join([os.path.basename(argv[0]), *argv[1:]])


def table_meta(meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """What every committed table carries: `commit`, `command`, `gpu` (the machine's GPUs; a
    benchmark's own `device` key names the one it ran on) and `date` (UTC), then the caller's keys,
    which may not replace those four."""
    from pipeline.results import commit_hash, gpu_names

    base = {"commit": commit_hash(), "command": command_line(), "gpu": gpu_names(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    clash = sorted(set(meta or {}) & set(base))
    if clash:
        raise ValueError(f"table_meta: keys {clash} are the table's own")
    return {**base, **(meta or {})}


def meta_path(path: str | Path) -> Path:
    """`<name>.meta.json` beside a `<name>.csv` table."""
    path = Path(path)
    return path.with_name(path.stem + ".meta.json")


def write_rows(rows: list[dict[str, Any]], path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """`.csv` -> one line per row (union of keys), and `<name>.meta.json` beside it; anything else ->
    JSON {"meta": ..., "rows": ...}. The meta is `table_meta(meta)`: commit, command, GPU and date,
    then the caller's keys (the device, the config, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = table_meta(meta)
    if path.suffix == ".csv":
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        meta_path(path).write_text(json.dumps(meta, indent=1, default=str))
    else:
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    return path
