"""Shared helpers for the tests: the tiny pipeline in process, as a CLI, killed at a stage, and cache snapshots.

The session fixtures built on these are in conftest.py.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable, Sequence

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

import pipeline
from pipeline.__main__ import cli, run_pipeline
from pipeline.models import resolve_model_dir
from pipeline.runner import FAULT_ENV

ROOT = Path(pipeline.__file__).resolve().parents[1]
CONF = ROOT / "conf"
SMALL = (
    "model=tiny",
    "mode.min_quality=0",
    "prompts.n_train=16",
    "prompts.n_eval=8",
    "eval.kl_prompts=8",
    "eval.max_new_tokens=4",
    "run.progress=false",
)
"""The whole pipeline in a few seconds: tiny random Qwen2, 16 train / 8 eval prompts per class."""
STAGES = ("collect", "baseline", "measure", "select", "ablate", "evaluate")


def select_defaults() -> dict:
    """The `select` group's shipped defaults (own directions, no depth window, scale 1, orthogonal)."""
    return OmegaConf.to_container(OmegaConf.load(CONF / "select" / "default.yaml"))


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """The config `python -m pipeline <overrides>` would run, composed without starting a Hydra job."""
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def run_in_process(overrides: Sequence[str], output_dir: Path | None = None) -> dict:
    """run.json's content for SMALL + overrides (later overrides win)."""
    return run_pipeline(compose_config([*SMALL, *overrides]), output_dir)


def run_cli(args: Sequence[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """(exit status, stderr) of `python -m pipeline <args>`, run in this process through the real entry point.

    Hydra reconfigures the root logger for each job; its handlers are put back afterwards so later tests do
    not log into a closed capture stream.
    """
    monkeypatch.setattr(sys, "argv", ["pipeline", *args])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    capsys.readouterr()
    try:
        cli()
        status = 0
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:], root.level = handlers, level
    return status, capsys.readouterr().err


FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload(
    ["torch", "transformers.models.qwen2.modeling_qwen2", "pipeline.stages.collect", "pipeline.stages.baseline",
     "pipeline.stages.measure", "pipeline.stages.select", "pipeline.stages.ablate", "pipeline.stages.evaluate",
     "tiny_pipeline"]
)
"""Runs that are killed start as forks of one server that has imported torch and every stage once,
so each kill costs a fork instead of a 4-second Python start. The server never computes, so no
thread pool exists when it forks."""


def _run_with_fault(overrides: list[str], stage: str) -> None:
    os.environ[FAULT_ENV] = stage
    run_in_process(overrides)


def run_killed_at(stage: str, overrides: Sequence[str], timeout: float = 300) -> int | None:
    """Exit code of SMALL + overrides run in a fresh process with PIPELINE_FAULT=<stage> (-SIGKILL if it fired)."""
    process = FORKSERVER.Process(target=_run_with_fault, args=(list(overrides), stage))
    process.start()
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()
    return process.exitcode


def pipeline_command(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", *SMALL, *overrides]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_command(command: Sequence[str], timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=subprocess_env(**env))


def snapshot(*directories: Path) -> dict[str, str]:
    """{path: sha256 | "dir"} of everything under the directories, lock files excluded.

    Lock files are coordination, not content: the runner creates `<stage>/.<key>.lock` before it
    knows whether the stage will succeed, and must never delete one (see pipeline/cache.py).
    """
    entries = {}
    for directory in directories:
        for path in sorted(directory.rglob("*")):
            if path.name.endswith(".lock"):
                continue
            entries[str(path)] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def temporaries(cache: Path) -> list[Path]:
    return sorted(cache.rglob(".tmp-*"))


# --- bad input: a scene (a copy of the reference run), a row of the table, and its one-line error -------


@dataclass(frozen=True)
class Scene:
    """Where a row runs: a scratch dir, its cache (a copy of the reference run's), the model store, and
    the reference run.json."""

    tmp: Path
    cache: Path
    store: Path
    reference: dict


@dataclass(frozen=True)
class Row:
    """One bad input: the overrides typed, what the one-line message must say, how to set the scene."""

    args: tuple[str, ...]
    says: tuple[str, ...]
    setup: Callable[[Scene], None] | None = None
    """Writes the files the args name as {tmp}/..."""
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    skip_unless: Callable[[Path], str | None] | None = None
    """Returns a reason to skip (e.g. root can read a chmod 000 file), checked after setup."""
    env: dict[str, str] = field(default_factory=dict)


def tiny_checkpoint(scene: Scene) -> Path:
    """A copy of the tiny model's files without weights, to be completed by each row."""
    source = resolve_model_dir(compose_config(["model=tiny"]).model, scene.store)
    target = scene.tmp / "checkpoint"
    target.mkdir()
    for path in source.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors") and path.name != "manifest.json":
            shutil.copyfile(path, target / path.name)
    return target


def one_line_error(status: int, err: str) -> str:
    """The last stderr line, after checking it is the only error report and nothing crashed."""
    assert status == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err[-3000:]
    assert sum(line.startswith("error: ") for line in lines) == 1, err[-3000:]
    return lines[-1]


def args_with(base: tuple[str, ...], row_args: list[str]) -> list[str]:
    """Base overrides minus any key the row sets itself (Hydra refuses a group chosen twice)."""
    keys = {arg.split("=", 1)[0] for arg in row_args}
    return [arg for arg in base if arg.split("=", 1)[0] not in keys] + row_args




def run_row(row: Row, scene: Scene, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run one bad-input row through the real entry point; returns its one error line after checking it says
    what the row expects and that neither the cache nor the model store changed."""
    tmp = scene.tmp
    if row.setup:
        row.setup(scene)
    if row.skip_unless and (reason := row.skip_unless(tmp)):
        pytest.skip(reason)
    if row.patch:
        row.patch(monkeypatch)
    for key, value in row.env.items():
        monkeypatch.setenv(key, value)
    base = (*SMALL, f"cache.dir={scene.cache}", f"cache.models={scene.store}", f"hydra.run.dir={tmp / 'run'}")
    before = snapshot(scene.cache, scene.store)
    try:
        line = one_line_error(*run_cli(args_with(base, [arg.format(tmp=tmp) for arg in row.args]), capsys, monkeypatch))
    finally:
        for path in (scene.cache, tmp / "secret.txt"):
            if path.exists():
                path.chmod(0o755)
    for fragment in row.says:
        assert fragment.format(tmp=tmp) in line
    assert snapshot(scene.cache, scene.store) == before
    return line
