"""Every entry point answers --help as a new user would call it, by path and as a module, with its
settings' docstrings; a script run by path imports the copy of the code it belongs to; the one
command-line generator (pipeline/cli.py) parses every kind of field."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from pipeline import cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "workers", "models", "tune_spaces")
ORIGIN = "[origin]"

# (module, arguments before --help, a flag and a fragment of its field's docstring)
STAGES = [
    ("pipeline.collect", [], "--agent-train-steps", "env steps of PPO training per game"),
    ("pipeline.train", ["vae"], "--val-every", "Steps between rank 0's reconstruction check on held-out windows"),
    ("pipeline.train", ["dit"], "--vae-path", "Directory of the trained VAE (vae.pt + vae.json), frozen here."),
    ("pipeline.evaluate", [], "--split", "Episode split scored: `test` for a run's final evaluation"),
    ("pipeline.sweep", [], "--space", "Ablation grid, a key of tune_spaces.SWEEPS."),
    ("pipeline.run_all", [], "--seed", "Training seed(s) of the DiT (and the evaluation's noise)"),
    ("pipeline.imagine", [], "--eval-episodes", "Real games per agent."),
    ("pipeline.serve", [], "--idle-s", "A session unused this long is dropped."),
    ("pipeline.results", ["tables"], "--preset", "Preset whose current version is pooled."),
    ("pipeline.results", ["ablations"], "--sweep-version", "Pool these sweep versions instead"),
]
BENCHMARKS = [
    ("benchmarks.bench_collect", "--games", "ALE games recorded one after the other."),
    ("benchmarks.bench_ddp", "--run-dir", "Holds base/ (the collection and VAE every run shares)"),
    ("benchmarks.bench_env", "--random-model", "random weights of this run_all preset's VAE and DiT"),
    ("benchmarks.bench_generate", "--world-model", "Saved world-model directory"),
    ("benchmarks.bench_multistep", "--multi-frame", "Saved world model generating several frames per chunk"),
    ("benchmarks.bench_train", "--mode", "(random latents on the device)"),
    ("benchmarks.model_flops", "--frames", "Latent frames seen by the ST-DiT"),
    ("benchmarks.play_latency", "--run", "What to serve (pipeline/serve.py --run)"),
    ("benchmarks.probe_copy_last", "--games", "ALE games (short names or ALE/<Game>-v5 ids)."),
    ("benchmarks.probe_vae_grid", "--game", "ALE game (short name or ALE/<Game>-v5 id)."),
    ("benchmarks.vae_floor", "--splits", "Splits scored: training windows beside held-out ones"),
]


def copy_reporting_origin(dest: Path) -> Path:
    """A copy of the packages under `dest` whose `__init__.py` each print "[origin] <package>
    <file>" when imported: whatever imports a package of this copy says so."""
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
        (dest / pkg / "__init__.py").write_text(f'print("{ORIGIN}", __name__, __file__, flush=True)\n')
    return dest


def origins(output: str) -> dict[str, Path]:
    """{package: the file it was imported from} of the "[origin]" lines in `output`."""
    lines = [line.split() for line in output.splitlines() if line.startswith(ORIGIN)]
    return {parts[1]: Path(parts[2]) for parts in lines}


@pytest.fixture(scope="module")
def code_copy(tmp_path_factory) -> Path:
    return copy_reporting_origin(tmp_path_factory.mktemp("copy"))


def _help(argv: list[str]) -> subprocess.CompletedProcess:
    # The repository root as working directory: another copy of the packages beside the one run.
    env = {**os.environ, "COLUMNS": "400"}  # no wrapping: a docstring reads as one line
    return subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def helps(code_copy) -> dict[tuple[str, ...], subprocess.CompletedProcess]:
    """Every `--help` this module checks, keyed ("path" | "module", module, *args), run 4 at a time:
    each is a Python start that imports torch and Ray, seconds of one core apiece."""
    argvs = {("path", m, *a): [str(code_copy / (m.replace(".", "/") + ".py")), *a] for m, a, *_ in STAGES}
    argvs |= {("module", m, *a): ["-m", m, *a] for m, a, *_ in STAGES}
    argvs |= {("module", m): ["-m", m] for m, *_ in BENCHMARKS}
    with ThreadPoolExecutor(4) as pool:
        futures = {key: pool.submit(_help, argv) for key, argv in argvs.items()}
    return {key: f.result() for key, f in futures.items()}


def _stdout(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def _assert_documents(out: str, flag: str, doc: str) -> None:
    text = " ".join(out.split())
    assert flag in text and " ".join(doc.split()) in text, out[-3000:]


@pytest.mark.parametrize("module, args, flag, doc", STAGES, ids=[" ".join([m, *a]) for m, a, *_ in STAGES])
def test_stage_help_by_path_imports_its_own_copy(helps, code_copy, module, args, flag, doc):
    """`python <copy>/pipeline/x.py --help`, run from another checkout, with the package also
    installed from elsewhere: the help has the field docstrings, and every package it imported is
    the copy's."""
    out = _stdout(helps[("path", module, *args)])
    _assert_documents(out, flag, doc)
    found = origins(out)
    assert "pipeline" in found, f"no package of the copy was imported:\n{out[:2000]}"
    strays = {pkg: path for pkg, path in found.items() if not path.is_relative_to(code_copy)}
    assert not strays, strays


@pytest.mark.parametrize("module, args, flag, doc", STAGES, ids=[" ".join([m, *a]) for m, a, *_ in STAGES])
def test_stage_help_as_module(helps, module, args, flag, doc):
    _assert_documents(_stdout(helps[("module", module, *args)]), flag, doc)


@pytest.mark.parametrize("module, flag, doc", BENCHMARKS, ids=[m for m, *_ in BENCHMARKS])
def test_benchmark_help_as_module(helps, module, flag, doc):
    _assert_documents(_stdout(helps[("module", module)]), flag, doc)


def test_collect_parser_keeps_agent_and_collection_seeds_apart():
    from pipeline.collect import _parse

    cfg = _parse(["--seed", "3", "--agent-seed", "5", "--games", "Pong", "--val-fraction", "0.25",
                  "--agent-train-steps", "100"])
    assert (cfg.seed, cfg.agent.seed, cfg.games, cfg.val_fraction, cfg.agent.train_steps) == (3, 5, ("Pong",), 0.25, 100)


@dataclasses.dataclass(frozen=True)
class Inner:
    """A nested section."""

    seed: int = 1
    """the inner seed"""
    filters: tuple[tuple[int, int, int], ...] = ((16, 8, 4),)
    """(channels, kernel, stride) per layer"""


@dataclasses.dataclass(frozen=True)
class Outer:
    """Every kind of field the generator handles."""

    name: str = ""
    """a name with 100% of its characters"""
    seed: int = 0
    rate: float = 0.5
    checkpoint: str | None = None
    explore: bool = True
    """sample actions"""
    horizons: tuple[int, ...] = (1, 2)
    patch: tuple[int, int, int] = (1, 2, 2)
    sets: tuple[str, ...] = dataclasses.field(default=(), metadata={"flag": "--set"})
    mode: str = dataclasses.field(default="a", metadata={"choices": ("a", "b")})
    inner: Inner = dataclasses.field(default_factory=lambda: Inner(seed=7))
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    """settings by name"""

    def __post_init__(self):
        if self.rate < 0:
            raise ValueError(f"rate must be >= 0, got {self.rate}")


def test_generator_parses_every_kind_of_field(capsys):
    assert cli.parse_config(Outer, []) == Outer()
    cfg = cli.parse_config(Outer, ["--name", "x", "--seed", "3", "--rate", "2.5", "--checkpoint", "c", "--no-explore",
                                   "--horizons", "4", "8", "--patch", "1", "4", "4", "--set", "a=1", "b=2", "--set",
                                   "c=3", "--mode", "b", "--inner-seed", "5", "--inner-filters", "32,4,2", "64,3,1",
                                   "--extra", '{"steps": 12, "horizon": [1, 2]}'])
    assert cfg == Outer(name="x", seed=3, rate=2.5, checkpoint="c", explore=False, horizons=(4, 8), patch=(1, 4, 4),
                        sets=("a=1", "b=2", "c=3"), mode="b", inner=Inner(seed=5, filters=((32, 4, 2), (64, 3, 1))),
                        extra={"steps": 12, "horizon": [1, 2]})
    # --field_name spellings; a tuple flag alone is an empty tuple
    assert cli.parse_config(Outer, ["--inner_seed=9", "--horizons"]) == Outer(inner=Inner(seed=9), horizons=())
    for argv, says in ((["--sed", "1"], "unrecognized arguments: --sed"), (["--see", "1"], "unrecognized"),
                       (["--mode", "c"], "invalid choice: 'c'"), (["--rate", "-1"], "rate must be >= 0, got -1.0"),
                       (["--inner-filters", "1,2"], "expected 3 comma-separated values"),
                       (["--patch", "1", "2"], "expected 3 arguments"),
                       (["--extra", "[1, 2]"], "argument --extra: '[1, 2]' is not a JSON object"),
                       (["--extra", "{steps: 1}"], "argument --extra: '{steps: 1}' is not JSON")):
        with pytest.raises(SystemExit) as exc:
            cli.parse_config(Outer, argv)
        assert exc.value.code == 2 and says in capsys.readouterr().err, argv
    help_text = cli.config_parser(Outer).format_help()
    assert "a name with 100% of its characters (default: '')" in help_text
    assert "(channels, kernel, stride) per layer (default: 16,8,4)" in help_text
    assert "--inner-seed INT" in help_text and "the inner seed (default: 7)" in help_text
    assert "--explore, --no-explore" in help_text and "sample actions (default: True)" in help_text
    assert "--extra JSON" in help_text and "settings by name (default: {})" in help_text


def test_sweep_dicts_parse_from_json_objects(capsys):
    from pipeline.sweep import SweepConfig

    cfg = cli.parse_config(SweepConfig, ["--dit", '{"steps": 12, "horizon_choices": [1, 2]}',
                                         "--overrides", '{"horizon": [1, 2], "game": "Breakout"}'])
    assert cfg.dit == {"steps": 12, "horizon_choices": [1, 2]}
    assert cfg.overrides == {"horizon": [1, 2], "game": "Breakout"}
    assert cli.parse_config(SweepConfig, []).dit == {} == cli.parse_config(SweepConfig, []).overrides
    for flag, value in (("--overrides", "[1, 2]"), ("--dit", '"steps"'), ("--dit", "12"), ("--overrides", "{horizon}")):
        with pytest.raises(SystemExit) as exc:
            cli.parse_config(SweepConfig, [flag, value])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and f"argument {flag}: {value!r}" in err and "JSON" in err, (flag, value, err)


def test_sub_commands_and_the_tracking_uri():
    command, cfg, uri = cli.parse_command({"outer": Outer, "inner": Inner}, ["inner", "--seed", "2",
                                                                             "--tracking_uri", "http://m:5000"])
    assert (command, cfg, uri) == ("inner", Inner(seed=2), "http://m:5000")
    assert cli.parse_job(Inner, []) == (Inner(), None)
