"""`python -m pipeline`: compose the Hydra config and run the requested stages through the cache.

Errors in user input (PipelineError) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pipeline.artifacts import write_json
from pipeline.errors import PipelineError
from pipeline.paths import user_path

log = logging.getLogger("pipeline")


def run_pipeline(cfg: DictConfig, output_dir: Path | None = None) -> dict:
    """Run `cfg.run.stages` and return run.json's content (also written to `output_dir`)."""
    import torch

    from pipeline.runner import Runner
    from pipeline.stages import registry

    torch.manual_seed(int(cfg.run.seed))
    cache_dir = user_path(cfg.cache.dir)
    runner = Runner(cfg, registry(), cache_dir=cache_dir, model_store=user_path(cfg.cache.models))
    results = runner.run(list(cfg.run.stages), list(cfg.run.force))
    summary = {
        "stages": {
            name: {"key": r.key, "dir": str(r.dir), "cached": r.cached, "seconds": round(r.seconds, 3)}
            for name, r in results.items()
        },
        "overrides": list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [],
    }
    if output_dir is not None:
        write_json(output_dir / "run.json", summary)
    for name, info in summary["stages"].items():
        log.info("%-8s %s %s", name, "cached  " if info["cached"] else f"{info['seconds']:7.1f}s", info["dir"])
    return summary


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run_pipeline(cfg, Path(HydraConfig.get().runtime.output_dir))
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
