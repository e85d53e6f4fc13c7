"""`python -m pipeline`: compose the Hydra config and run the requested stages through the cache.

Errors in user input (PipelineError) print one line on stderr and exit with status 2. In a
multirun (`-m`) a failing job is recorded instead (run.json gets an "error") and the sweep goes on:
one sweep point whose thresholds select nothing must not throw away the points that worked.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline.artifacts import write_json
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
    if output_dir is not None:
        write_json(output_dir / "run.json", summary)
    if failure is not None:
        raise failure
    for name, info in summary["stages"].items():
        log.info("%-8s %s %s", name, "cached  " if info["cached"] else f"{info['seconds']:7.1f}s", info["dir"])
    return summary


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    try:
        run_pipeline(cfg, Path(hydra_cfg.runtime.output_dir))
    except PipelineError as error:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            log.error("job %s failed (recorded in run.json, the sweep goes on): %s", hydra_cfg.job.num, error)
            return
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
