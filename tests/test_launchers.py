"""Sweeps on Hydra's launchers: the basic launcher's jobs share one loaded model; joblib workers and
submitit processes started together compute each upstream stage once (the per-key locks make the others
wait and reuse it), and the summary callback runs once, in the launching process, over every job."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import model_cache
from tiny_pipeline import SMALL, run_cli

SHARED = ("collect", "baseline", "measure")


def sweep_results(sweep_dir: Path, jobs: int) -> tuple[list[dict], list[dict]]:
    """(run.json of each job, summary.csv rows)."""
    runs = [json.loads((sweep_dir / str(job) / "run.json").read_text()) for job in range(jobs)]
    with open(sweep_dir / "summary.csv", newline="") as handle:
        return runs, list(csv.DictReader(handle))


def check_sweep(sweep_dir: Path, jobs: int, computed: int = 1) -> None:
    """Every job evaluated without writing a checkpoint; each upstream stage computed `computed` times in all."""
    runs, rows = sweep_results(sweep_dir, jobs)
    assert [run.get("error") for run in runs] == [None] * jobs
    assert {stage: sum(not run["stages"][stage]["cached"] for run in runs) for stage in SHARED} == dict.fromkeys(SHARED, computed)
    assert all(set(run["stages"]) == {*SHARED, "select", "evaluate"} for run in runs)  # no checkpoint per point
    assert [row["job"] for row in rows] == [str(job) for job in range(jobs)]
    assert all(row["error"] == "" and row["kl_divergence"] != "" and row["export"] for row in rows)
    assert sorted(len(row["layers"].split()) for row in rows) == list(range(1, jobs + 1))


@pytest.mark.parametrize(
    "launcher, points",
    [(("hydra/launcher=joblib", "hydra.launcher.n_jobs=2"), "1,2,3,4"), (("hydra/launcher=submitit_local",), "1,2")],
    ids=["joblib", "submitit_local"],
)
def test_parallel_jobs_share_the_cache_and_the_summary_runs_once(tmp_path, model_store, launcher, points):
    command = [sys.executable, "-m", "pipeline", "-m", *launcher, *SMALL, f"mode.top_n={points}",
               f"cache.dir={tmp_path / 'cache'}", f"cache.models={model_store}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert output.count("sweep summary:") == 1
    check_sweep(tmp_path / "sweep", len(points.split(",")))


def test_the_basic_launchers_jobs_load_the_source_model_once(tmp_path, reference, model_store, capsys, monkeypatch):
    shutil.copytree(reference[0], tmp_path / "cache")  # upstream stages cached: the jobs only select and evaluate
    model_cache.release()
    before = model_cache.loads()
    status, err = run_cli(["-m", *SMALL, "mode.top_n=1,2,3", f"cache.dir={tmp_path / 'cache'}",
                           f"cache.models={model_store}", f"hydra.sweep.dir={tmp_path / 'sweep'}"], capsys, monkeypatch)
    assert status == 0, err
    assert model_cache.loads() - before == 1
    check_sweep(tmp_path / "sweep", 3, computed=0)
