"""The sweep summary callback: a real multirun on the tiny model shares upstream stages through the
cache, writes summary.csv and pareto.png, and a job that fails is recorded instead of ending the sweep."""

from __future__ import annotations

import csv
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.sweep import EXPORT_STAGES, JobSummary, pareto_front, varying_overrides
from tiny_pipeline import run_in_process

SHARED = ("collect", "baseline", "measure")
PER_POINT = ("select", "evaluate")
TINY = [
    "model=tiny",
    "prompts.n_train=16",
    "prompts.n_eval=8",
    "eval.kl_prompts=8",
    "eval.max_new_tokens=4",
    "run.progress=false",
]


def test_pareto_front_keeps_exactly_the_non_dominated_points_in_x_order():
    points = [
        (0.10, 0.50),  # 0 front
        (0.20, 0.20),  # 1 front
        (0.30, 0.30),  # 2 dominated by 1
        (0.05, 0.90),  # 3 front: lowest refusal
        (0.20, 0.20),  # 4 a duplicate of 1: equal points do not dominate each other
        (0.40, 0.10),  # 5 front: lowest KL
        (0.10, 0.60),  # 6 dominated by 0 (same x, larger y)
        (0.40, 0.30),  # 7 dominated by 5 (same x, larger y) and by 1
    ]
    assert pareto_front(points) == [3, 0, 1, 4, 5]
    assert pareto_front([(0.5, 0.5)]) == [0]
    assert pareto_front([]) == []


def test_labels_keep_only_the_overrides_that_vary():
    def job(*overrides: str) -> JobSummary:
        return JobSummary(job="0", overrides=overrides, stages=6, cached_stages=0, seconds=1.0)

    jobs = [job("model=tiny", "mode.top_n=1", "select.scale=0.5"), job("model=tiny", "mode.top_n=2", "select.scale=0.5")]
    assert varying_overrides(jobs) == [("mode.top_n=1",), ("mode.top_n=2",)]


def _multirun(cwd: Path, sweep_dir: Path, cache_dir: Path, *overrides: str) -> None:
    command = [sys.executable, "-m", "pipeline", "-m", *TINY, *overrides, f"cache.dir={cache_dir}", f"hydra.sweep.dir={sweep_dir}"]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _runs(sweep_dir: Path) -> list[dict]:
    return [json.loads((sweep_dir / str(job) / "run.json").read_text()) for job in range(4)]


def _rows(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _computed(runs: list[dict], stage: str) -> int:
    return sum(not run["stages"][stage]["cached"] for run in runs)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(scratch dir, cache dir, sweep dir) after one 2x2 multirun: top_n in {1, 2} x scale in {0.5, 1.0}."""
    root = tmp_path_factory.mktemp("sweep")
    cache, sweep_dir = root / "cache", root / "first"
    _multirun(root, sweep_dir, cache, "mode.min_quality=0", "mode.top_n=1,2", "select.scale=0.5,1.0")
    return root, cache, sweep_dir


def test_a_2x2_sweep_computes_shared_stages_once_and_summarizes_every_job(sweep):
    _, _, sweep_dir = sweep
    runs = _runs(sweep_dir)
    assert {stage: _computed(runs, stage) for stage in SHARED + PER_POINT} == {
        "collect": 1, "baseline": 1, "measure": 1, "select": 4, "evaluate": 4
    }
    assert not (sweep[1] / "ablate").exists(), "a sweep writes no model directory unless run.export=true"

    rows = _rows(sweep_dir)
    assert [row["job"] for row in rows] == ["0", "1", "2", "3"]
    assert [row["cached_stages"] for row in rows] == ["0", "3", "3", "3"]
    assert all(row["stages"] == "5" and row["error"] == "" for row in rows)
    for row, run in zip(rows, runs):
        assert row["overrides"] == " ".join(run["overrides"])
        # min_quality=0 lets all 4 tiny layers qualify, so top_n alone sets how many are ablated.
        top_n = int(next(o for o in run["overrides"] if o.startswith("mode.top_n=")).split("=")[1])
        metrics = json.loads((Path(run["stages"]["evaluate"]["dir"]) / "metrics.json").read_text())
        assert row["layers"] == " ".join(str(layer) for layer in metrics["layers"])
        assert len(metrics["layers"]) == top_n
        assert float(row["refusal_after"]) == pytest.approx(metrics["refusal_after"]["rate"], rel=1e-5)
        assert float(row["refusal_before"]) == pytest.approx(metrics["refusal_before"]["rate"], rel=1e-5)
        assert float(row["kl_divergence"]) == pytest.approx(metrics["kl_divergence"], rel=1e-5)
        assert float(row["seconds"]) == pytest.approx(sum(s["seconds"] for s in run["stages"].values()), abs=1e-3)

    assert (sweep_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerunning_the_sweep_serves_every_stage_of_every_job_from_the_cache(sweep):
    root, cache, first = sweep
    again = root / "again"
    _multirun(root, again, cache, "mode.min_quality=0", "mode.top_n=1,2", "select.scale=0.5,1.0")
    runs = _runs(again)
    assert all(stage["cached"] for run in runs for stage in run["stages"].values())
    assert [run["stages"]["evaluate"]["key"] for run in runs] == [
        run["stages"]["evaluate"]["key"] for run in _runs(first)
    ]
    assert [(row["cached_stages"], row["seconds"]) for row in _rows(again)] == [("5", "0")] * 4


def test_a_failing_job_is_recorded_and_the_sweep_goes_on(sweep):
    root, cache, _ = sweep
    sweep_dir = root / "failing"
    # Job 0 selects nothing (PipelineError in select); job 1 is a point of the first sweep, all cached.
    _multirun(root, sweep_dir, cache, "mode.top_n=1", "select.scale=0.5", "mode.min_quality=1000,0")

    failed, worked = _rows(sweep_dir)
    assert failed["error"].startswith("no layer has quality >= 1000") and failed["export"] == ""
    assert (failed["stages"], failed["layers"], failed["refusal_after"], failed["kl_divergence"]) == ("3", "", "", "")
    run = json.loads((sweep_dir / "0" / "run.json").read_text())
    assert run["error"] == failed["error"] and set(run["stages"]) == set(SHARED)
    assert (worked["job"], worked["error"], worked["stages"], worked["cached_stages"]) == ("1", "", "5", "5")
    assert worked["layers"] != "" and worked["kl_divergence"] != ""
    assert (sweep_dir / "pareto.png").is_file()


def test_the_export_command_of_a_point_runs_only_ablate(sweep):
    root, cache, sweep_dir = sweep
    row, run = _rows(sweep_dir)[1], _runs(sweep_dir)[1]
    command = shlex.split(row["export"])
    assert command[:3] == ["python", "-m", "pipeline"] and command[-1] == EXPORT_STAGES
    assert command[3:-1] == run["overrides"]
    exported = run_in_process(command[3:])
    assert set(exported["stages"]) == {"collect", "measure", "select", "ablate"}
    assert [name for name, stage in exported["stages"].items() if not stage["cached"]] == ["ablate"]
    assert exported["stages"]["select"]["key"] == run["stages"]["select"]["key"]
    assert (Path(exported["stages"]["ablate"]["dir"]) / "model" / "config.json").is_file()


def test_a_forward_only_sweep_plots_the_refusal_score(tmp_path, monkeypatch):
    import pipeline.sweep as sweep

    drawn = {}
    monkeypatch.setattr(sweep, "plot_pareto", lambda path, points, front, title, **kw: drawn.update(points=points, **kw))
    jobs = [JobSummary(str(i), (f"mode.top_n={i}",), 5, 3, 1.0, refusal_score_before=0.4, refusal_score_after=score,
                       kl_divergence=kl) for i, (score, kl) in enumerate([(0.2, 0.01), (0.05, 0.03), (0.1, 0.5)])]
    jobs.append(JobSummary("3", ("mode.top_n=3",), 5, 3, 1.0, error="selected nothing"))
    sweep.plot_sweep(jobs, tmp_path / "pareto.png")
    assert drawn["points"] == [(0.01, 0.2), (0.03, 0.05), (0.5, 0.1)] and drawn["y_label"].startswith("refusal score")
    jobs[0] = JobSummary("0", ("mode.top_n=0",), 5, 3, 1.0, refusal_after=0.25, refusal_score_after=0.2, kl_divergence=0.01)
    sweep.plot_sweep(jobs[:1], tmp_path / "pareto.png")
    assert drawn["points"] == [(0.01, 0.25)] and drawn["y_label"].startswith("refusal rate")


def testpoint_labels_stay_short_enough_to_read():
    from pipeline.sweep import MAX_LABEL, point_label

    assert point_label("3", ("mode.top_n=2",)) == "#3 mode.top_n=2"
    searched = tuple(f"select.setting_{i}=0.{i}" for i in range(7))
    assert point_label("12", searched) == "#12" and len(" ".join(("#12", *searched))) > MAX_LABEL
