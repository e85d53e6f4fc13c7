"""The sweep summary: after `python -m pipeline -m ...`, one table and one plot for the whole sweep.

Each job writes `run.json` into its own directory (`pipeline.__main__.run_pipeline`); the evaluate
stage's `metrics.json` holds its numbers. `SweepSummary`, a Hydra callback registered in
`conf/config.yaml`, reads them back from disk when the sweep ends (so it works with any launcher)
and writes into the sweep directory:

* `summary.csv`: one row per job (overrides, layers, refusal rate and refusal score before/after, KL, cache use,
  time, error, and the command that exports the job's model from the cache: only `ablate` runs, as a sweep
  writes no model directory unless `run.export=true`);
* `pareto.png`: refusal-after against KL, with the Pareto front (both minimized, `pipeline.pareto`) marked
  and joined, each point labelled with the overrides that vary across the sweep (`pipeline.plots`).
"""

from __future__ import annotations

import csv
import json
import logging
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pipeline.pareto import pareto_front
from pipeline.plots import plot_pareto
from pipeline.report import sweep_report

log = logging.getLogger(__name__)

SUMMARY_CSV = "summary.csv"
PARETO_PNG = "pareto.png"
COLUMNS = (
    "job",
    "overrides",
    "layers",
    "refusal_before",
    "refusal_after",
    "refusal_score_before",
    "refusal_score_after",
    "kl_divergence",
    "stages",
    "cached_stages",
    "seconds",
    "error",
    "export",
)
EXPORT_STAGES = "run.stages=[ablate]"


@dataclass(frozen=True)
class JobSummary:
    """What one sweep job produced; metrics are None when the job did not finish evaluate."""

    job: str
    overrides: tuple[str, ...]
    stages: int
    cached_stages: int
    seconds: float
    layers: tuple[int, ...] | None = None
    refusal_before: float | None = None
    refusal_after: float | None = None
    refusal_score_before: float | None = None
    refusal_score_after: float | None = None
    kl_divergence: float | None = None
    error: str = ""

    @property
    def export_command(self) -> str:
        """The command that writes this job's model directory from the cache (only ablate runs), once evaluate finished
        (with or without generation)."""
        if self.kl_divergence is None:
            return ""
        # +search=default would make the command a search again (its preset sets hydra.mode=MULTIRUN)
        kept = [item for item in self.overrides
                if not item.lstrip("+~").startswith(("run.stages=", "run.export=", "search="))]
        return shlex.join(["python", "-m", "pipeline", *kept, EXPORT_STAGES])


def read_job(run_json: Path, sweep_dir: Path) -> JobSummary:
    """One job's row, from its run.json and (when evaluate finished) the evaluate artifact's metrics.json."""
    run = json.loads(run_json.read_text(encoding="utf-8"))
    stages = run.get("stages", {})
    row: dict[str, Any] = {
        "job": run_json.parent.relative_to(sweep_dir).as_posix(),
        "overrides": tuple(run.get("overrides", [])),
        "stages": len(stages),
        "cached_stages": sum(bool(stage["cached"]) for stage in stages.values()),
        "seconds": round(sum(float(stage["seconds"]) for stage in stages.values()), 3),
        "error": run.get("error", ""),
    }
    if "evaluate" in stages:
        metrics = json.loads((Path(stages["evaluate"]["dir"]) / "metrics.json").read_text(encoding="utf-8"))
        row.update(
            layers=tuple(int(layer) for layer in metrics["layers"]),
            refusal_score_before=float(metrics["refusal_score_before"]),
            refusal_score_after=float(metrics["refusal_score_after"]),
            kl_divergence=float(metrics["kl_divergence"]),
        )
        if "refusal_before" in metrics:  # generated numbers (absent with eval.generate=false)
            row.update(refusal_before=float(metrics["refusal_before"]["rate"]),
                       refusal_after=float(metrics["refusal_after"]["rate"]))
    return JobSummary(**row)


def _job_order(job: JobSummary) -> tuple:
    return (0, int(job.job), "") if job.job.isdigit() else (1, 0, job.job)


def collect_jobs(sweep_dir: Path, since: float = 0.0) -> list[JobSummary]:
    """Every job under `sweep_dir` whose run.json was written at or after `since` (epoch seconds).

    `since` keeps a rerun into an existing sweep directory from picking up jobs of an older, larger sweep.
    """
    paths = [path for path in sweep_dir.rglob("run.json") if path.stat().st_mtime >= since]
    return sorted((read_job(path, sweep_dir) for path in paths), key=_job_order)


def varying_overrides(jobs: Sequence[JobSummary]) -> list[tuple[str, ...]]:
    """Per job, the overrides not shared by every job: what tells the sweep points apart."""
    common = set.intersection(*(set(job.overrides) for job in jobs)) if jobs else set()
    return [tuple(item for item in job.overrides if item not in common) for job in jobs]


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def write_summary_csv(jobs: Sequence[JobSummary], path: Path) -> None:
    """summary.csv: a job's overrides and layers are space-separated, missing metrics are empty cells."""
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for job in jobs:
            writer.writerow(
                [
                    job.job,
                    " ".join(job.overrides),
                    "" if job.layers is None else " ".join(str(layer) for layer in job.layers),
                    _number(job.refusal_before),
                    _number(job.refusal_after),
                    _number(job.refusal_score_before),
                    _number(job.refusal_score_after),
                    _number(job.kl_divergence),
                    job.stages,
                    job.cached_stages,
                    _number(job.seconds),
                    job.error,
                    job.export_command,
                ]
            )


MAX_LABEL = 48
"""Longest point label drawn: a search varies every searched setting, and labels that long cover the plot
(summary.csv has every job's overrides)."""


def point_label(job: str, overrides: Sequence[str]) -> str:
    """'#job' plus the job's varying overrides, or '#job' alone when they would not fit."""
    text = " ".join((f"#{job}", *overrides))
    return text if len(text) <= MAX_LABEL else f"#{job}"


def plot_sweep(jobs: Sequence[JobSummary], path: Path) -> None:
    """pareto.png: evaluated jobs as points labelled by their varying overrides, the Pareto front joined."""
    shown = [(job, label) for job, label in zip(jobs, varying_overrides(jobs)) if job.kl_divergence is not None]
    generated = all(job.refusal_after is not None for job, _ in shown)  # else eval.generate=false: the refusal score
    points = [(job.kl_divergence, job.refusal_after if generated else job.refusal_score_after) for job, _ in shown]
    failed = len(jobs) - len(shown)
    plot_pareto(
        path,
        points,
        pareto_front(points),
        f"{len(shown)} evaluated jobs" + (f", {failed} without metrics (see summary.csv)" if failed else ""),
        labels=[point_label(job.job, label) for job, label in shown],
        point_label="sweep point",
        empty="no job finished evaluate",
        y_label="refusal rate on held-out harmful prompts" if generated else
        "refusal score (first-token mass on refusal tokens; eval.generate=false)",
    )


def summarize_sweep(sweep_dir: Path, since: float = 0.0) -> list[JobSummary]:
    """Write summary.csv and pareto.png into `sweep_dir`; returns the jobs they describe."""
    jobs = collect_jobs(sweep_dir, since)
    write_summary_csv(jobs, sweep_dir / SUMMARY_CSV)
    plot_sweep(jobs, sweep_dir / PARETO_PNG)
    return jobs


class SweepSummary(Callback):
    """Hydra callback: `summarize_sweep` over the jobs of this multirun when it ends."""

    def __init__(self) -> None:
        self.started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Whole seconds: some filesystems store mtimes coarser than time.time().
        self.started = float(int(time.time()))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # A relative sweep dir is relative to the launch directory, which is the cwd again once jobs end.
        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        jobs = summarize_sweep(sweep_dir, self.started)
        sweep_report(sweep_dir, sweep_dir / SUMMARY_CSV, sweep_dir / PARETO_PNG)  # report.html (pipeline/report.py)
        failed = [job.job for job in jobs if job.error]
        log.info("sweep summary: %s, %s (%d jobs)", sweep_dir / SUMMARY_CSV, sweep_dir / PARETO_PNG, len(jobs))
        if failed:
            log.warning("%d of %d jobs failed (%s); their errors are in summary.csv", len(failed), len(jobs), ", ".join(failed))
