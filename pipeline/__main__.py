"""`python -m pipeline`: compose the Hydra config and run the requested stages through the cache.

Errors in user input (PipelineError) print one line on stderr and exit with status 2. In a
multirun (`-m`) a failing job is recorded instead (run.json gets an "error") and the sweep goes on:
one sweep point whose thresholds select nothing must not throw away the points that worked.
Hydra's own errors (an unknown preset, an override it cannot parse) and unwritable output
directories are reduced to one line and status 2 as well (`pipeline.cli`); see docs/troubleshooting.md.

`-m +search=default` makes the multirun a plan search (`pipeline.search`): its sweeper reads each trial's
objectives through the job's return value, run.json's content (`main` returns it).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline import distributed, outcome
from pipeline.artifacts import write_json
from pipeline.cli import run_entry_point
from pipeline.errors import PipelineError
from pipeline.paths import user_path

log = logging.getLogger("pipeline")


def run_pipeline(cfg: DictConfig, output_dir: Path | None = None) -> dict:
    """Run `cfg.run.stages` and return run.json's content (also written to `output_dir`).

    When a stage raises PipelineError, run.json still records the stages that finished, plus
    "error": the message; then the error propagates.
    """
    import torch

    from pipeline.runner import Runner
    from pipeline.stages import registry

    torch.manual_seed(int(cfg.run.seed))
    cache_dir = user_path(cfg.cache.dir)
    runner = Runner(cfg, registry(), cache_dir=cache_dir, model_store=user_path(cfg.cache.models))
    failure: PipelineError | None = None
    try:
        runner.run(list(cfg.run.stages), list(cfg.run.force))
    except PipelineError as error:
        failure = error
    summary = {
        "stages": {
            name: {"key": r.key, "dir": str(r.dir), "cached": r.cached, "seconds": round(r.seconds, 3)}
            for name, r in runner.results.items()
        },
        "overrides": list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [],
    }
    if failure is not None:
        summary["error"] = str(failure)
    if output_dir is not None and distributed.is_main_process():  # under a launch, helper ranks share the run dir
        write_json(output_dir / "run.json", summary)
    if failure is not None:
        raise failure
    for name, info in summary["stages"].items():
        log.info("%-8s %s %s", name, "cached  " if info["cached"] else f"{info['seconds']:7.1f}s", info["dir"])
    if distributed.is_main_process():
        print("\n".join(["", *outcome.finish_run(summary, output_dir, cache_dir)]), flush=True)
    return summary


@hydra.main(version_base=None, config_path="pkg://pipeline.conf", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    """Returns run.json's content (the sweeper of a search reads each trial's evaluate metrics through it);
    None for a sweep job that failed (its run.json holds the error)."""
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        return run_pipeline(cfg, output_dir)
    except PipelineError as error:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            log.error("job %s failed (recorded in run.json, the sweep goes on): %s", hydra_cfg.job.num, error)
            return None
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Exception as error:
        if hydra_cfg.mode != RunMode.MULTIRUN:
            raise
        # A bug or an environment failure in one sweep point must not cost the others, nor the summary.
        log.exception("job %s failed unexpectedly (recorded in run.json, the sweep goes on)", hydra_cfg.job.num)
        if not (output_dir / "run.json").exists():
            write_json(output_dir / "run.json", {"stages": {}, "error": f"{type(error).__name__}: {error}",
                                                  "overrides": list(hydra_cfg.overrides.task)})
        return None


def cli() -> None:
    """`python -m pipeline`: `main` with every error a user can cause reported as one stderr line, status 2."""
    from hydra_plugins.pipeline_search_sweeper.search_sweeper import register

    register()  # the plan search's sweeper (+search=default), also where Hydra's plugin scan cannot list it
    run_entry_point(main)


if __name__ == "__main__":
    cli()
