"""The import rules of docs/architecture.md, read from the source (`ast`, nothing imported): a stage
imports no other stage, only `workers/`, `models/` and the shared driver parts; the world model
imports nothing of training; `models/` imports nothing of `workers`, `pipeline`, `benchmarks` or
Ray; `workers/` and `models/` import nothing of `pipeline`; `pipeline` imports `benchmarks` only in
`run_all.run_benchmark`; and no module edits `sys.path` (a script run by path runs itself again as
a module instead, e.g. scripts/setup_lpips.py, whose `--help` is checked here).

Imports are found at any depth (module level, inside functions, under `if`), relative ones
resolved, and `importlib.import_module("x")` / `__import__("x")` with a literal name counted too.
"""

from __future__ import annotations

import ast
import functools
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("collect", "train", "evaluate", "imagine", "serve")
SHARED = ("cli", "cluster", "tracking", "stats", "paper", "figures")
"""The shared driver parts a stage may import from `pipeline` (docs/architecture.md's tree)."""
NO_SYS_PATH_EDITS = ("pipeline", "workers", "models", "benchmarks", "scripts")
SYS_PATH_READS = frozenset({"index", "count", "copy", "__contains__", "__iter__", "__len__", "__getitem__"})


def _sources(*folders: str) -> list[Path]:
    files = sorted(p for f in folders for p in (ROOT / f).rglob("*.py") if "__pycache__" not in p.parts)
    assert files, folders
    return files


def scan(tree: ast.AST, package: list[str]) -> tuple[list[tuple[int, str, str | None]], list[tuple[int, str]]]:
    """The imports and the `sys.path` edits of `tree`, in one walk.

    Imports: (line, dotted name, innermost enclosing function or None); `from a import b` gives
    `a.b` (b may be a module); relative imports are resolved against `package`.
    Edits: (line, what): a mutating method called on `sys.path`, an assignment to it or an item of
    it, `from sys import path`, `site.addsitedir(...)`."""
    nodes = list(ast.walk(tree))
    funcs = [(n.lineno, n.end_lineno, n.name) for n in nodes if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    sys_names = {"sys"} | {a.asname for n in nodes if isinstance(n, ast.Import) for a in n.names
                           if a.name == "sys" and a.asname}

    def func_of(line: int) -> str | None:
        inside = [(start, name) for start, end, name in funcs if start <= line <= end]
        return max(inside)[1] if inside else None

    def is_sys_path(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                and node.value.id in sys_names)

    found: list[tuple[int, str, str | None]] = []
    edits: list[tuple[int, str]] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name, func_of(node.lineno)) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.extend((node.lineno, module if a.name == "*" else f"{module}.{a.name}", func_of(node.lineno))
                         for a in node.names)
            if module == "sys" and any(a.name == "path" for a in node.names):
                edits.append((node.lineno, "from sys import path"))
        elif isinstance(node, ast.Call):
            f = node.func
            if (node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                    and ((isinstance(f, ast.Name) and f.id in ("__import__", "import_module"))
                         or (isinstance(f, ast.Attribute) and f.attr == "import_module"))):
                found.append((node.lineno, node.args[0].value, func_of(node.lineno)))
            if isinstance(f, ast.Attribute) and is_sys_path(f.value) and f.attr not in SYS_PATH_READS:
                edits.append((node.lineno, f"sys.path.{f.attr}(...)"))
            if (isinstance(f, ast.Attribute) and f.attr == "addsitedir" and isinstance(f.value, ast.Name)
                    and f.value.id == "site"):
                edits.append((node.lineno, "site.addsitedir(...)"))
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            if any(is_sys_path(t) or (isinstance(t, ast.Subscript) and is_sys_path(t.value)) for t in targets):
                edits.append((node.lineno, f"{type(node).__name__.lower()} to sys.path"))
    return found, edits


@functools.cache
def _scan(path: Path):
    rel = path.relative_to(ROOT)
    return scan(ast.parse(path.read_text(), filename=str(path)), list(rel.parent.parts))


def _within(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def _violations(files: list[Path], bad) -> list[str]:
    """`file:line: name (in function)` of each import of `files` for which `bad(file, name, func)`."""
    out = []
    for path in files:
        rel = path.relative_to(ROOT)
        for line, name, func in _scan(path)[0]:
            if bad(rel, name, func):
                out.append(f"{rel}:{line}: imports {name}" + (f" (in {func})" if func else ""))
    return out


def test_the_checks_find_what_they_look_for():
    """The readers on planted code: an import inside a function, a relative import, a literal
    import_module, and each way of editing sys.path; reading sys.path is no edit."""
    src = """
import importlib
import sys as system
from sys import path
def f():
    from . import train
    from ..workers.train_dit import X
    importlib.import_module("pipeline.serve")
    system.path.insert(0, "x")
    system.path[:0] = ["y"]
    system.path += ["z"]
print(system.path.index("x"), system.path[0])
"""
    got, edits = scan(ast.parse(src), ["pipeline"])
    assert (6, "pipeline.train", "f") in got and (7, "workers.train_dit.X", "f") in got
    assert (8, "pipeline.serve", "f") in got
    assert sorted(line for line, _ in edits) == [4, 9, 10, 11]


def test_a_stage_imports_no_other_stage():
    stages = [ROOT / "pipeline" / f"{s}.py" for s in STAGES]
    bad = _violations(stages, lambda rel, name, _: any(_within(name, f"pipeline.{s}") for s in STAGES
                                                       if s != rel.stem))
    assert not bad, "a stage imports another stage (docs/architecture.md):\n" + "\n".join(bad)


def test_a_stage_imports_only_the_shared_driver_parts_of_pipeline():
    stages = [ROOT / "pipeline" / f"{s}.py" for s in STAGES]
    allowed = [f"pipeline.{m}" for m in SHARED]

    def bad(rel, name, _):
        own = f"pipeline.{rel.stem}"
        return (_within(name, "pipeline") and name != "pipeline" and not _within(name, own)
                and not any(_within(name, m) for m in allowed))

    found = _violations(stages, bad)
    assert not found, f"a stage imports a part of pipeline other than {SHARED}:\n" + "\n".join(found)


def test_the_world_model_imports_nothing_of_training():
    bad = _violations([ROOT / "workers" / "world_model.py"], lambda _, name, __: name.startswith("workers.train_"))
    assert not bad, "\n".join(bad)


def test_models_import_no_workers_pipeline_benchmarks_or_ray():
    banned = ("workers", "pipeline", "benchmarks", "ray")
    bad = _violations(_sources("models"), lambda _, name, __: any(_within(name, b) for b in banned))
    assert not bad, "\n".join(bad)


def test_workers_import_nothing_of_pipeline():
    bad = _violations(_sources("workers"), lambda _, name, __: _within(name, "pipeline"))
    assert not bad, "\n".join(bad)


def test_pipeline_imports_benchmarks_only_in_run_benchmark_at_run_time():
    bad = _violations(_sources("pipeline"), lambda rel, name, func: _within(name, "benchmarks") and not (
        rel == Path("pipeline/run_all.py") and func == "run_benchmark"))
    assert not bad, "\n".join(bad)


def test_no_module_edits_sys_path():
    bad = [f"{p.relative_to(ROOT)}:{line}: {what}" for p in _sources(*NO_SYS_PATH_EDITS)
           for line, what in _scan(p)[1]]
    assert not bad, "edits of sys.path (run by path, run again as a module instead):\n" + "\n".join(bad)


def test_setup_lpips_help_by_path_from_elsewhere(tmp_path):
    """`python scripts/setup_lpips.py --help`, as the README and the LPIPS error messages say, from
    another working directory: its flags come from SetupConfig (pipeline/cli.py), with their
    docstrings, and the help loads no torch."""
    env = {**os.environ, "COLUMNS": "400", "PYTHONPROFILEIMPORTTIME": "1"}  # the import log goes to stderr
    env.pop("PYTHONPATH", None)
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "setup_lpips.py"), "--help"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    text = " ".join(res.stdout.split())
    assert "Prepare the LPIPS AlexNet (v0.1) weights once" in text
    assert "--out PATH Where to write the state dict" in text
    assert "--force, --no-force Rebuild even if a valid file is already there (default: False)" in text
    imported = {line.rpartition("|")[2].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
    assert "pipeline.cli" in imported and "torch" not in imported
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "setup_lpips.py"), "--outt", "x"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--outt" in bad.stderr
