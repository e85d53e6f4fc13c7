"""`python -m pipeline`: compose the Hydra config and run the requested stages through the cache.

Errors in user input (PipelineError) print one line on stderr and exit with status 2. In a
multirun (`-m`) a failing job is recorded instead (run.json gets an "error") and the sweep goes on:
one sweep point whose thresholds select nothing must not throw away the points that worked.
Hydra's own errors (an unknown preset, an override it cannot parse) and unwritable output
directories are reduced to one line and status 2 as well; see docs/troubleshooting.md.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from pipeline import distributed
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
    if output_dir is not None and distributed.is_main_process():  # under a launch, helper ranks share the run dir
        write_json(output_dir / "run.json", summary)
    if failure is not None:
        raise failure
    for name, info in summary["stages"].items():
        log.info("%-8s %s %s", name, "cached  " if info["cached"] else f"{info['seconds']:7.1f}s", info["dir"])
    return summary


@hydra.main(version_base=None, config_path="pkg://pipeline.conf", config_name="config")
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


WRITE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR})
"""An OSError with one of these, escaping the run, means an output path the user chose cannot be written."""


def hydra_error_line(error: Exception) -> str:
    """Hydra's multi-line composition report as one line: what is wrong, and the choices or the fix."""
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options:
        group, _, name = error.missing_cfg_file.rpartition("/")
        return f"{group}={name}: no such {group} preset; choose one of {', '.join(error.options)}"
    parts = [part.strip() for part in str(error).split("Config search path:")[0].splitlines() if part.strip()]
    line = parts[0] if parts else type(error).__name__
    for part in parts[1:]:
        line += (" " if line[-1] in ".:;" else "; ") + part
    if isinstance(error, OverrideParseException):
        return f"cannot parse override {error.override!r}: {line}"
    cause = error.__cause__
    if isinstance(cause, OmegaConfBaseException) and str(cause).strip():
        line = f"{line} ({str(cause).strip().splitlines()[0]})"
    return line


def cli() -> None:
    """`python -m pipeline`: `main` with every error a user can cause reported as one stderr line, status 2.

    HYDRA_FULL_ERROR=1 makes Hydra raise its errors instead of printing a multi-line report; they are
    caught here. A user who sets HYDRA_FULL_ERROR=1 themselves gets Hydra's full traceback, as documented.
    """
    if any(arg in ("--cfg", "-c") for arg in sys.argv) and "--resolve" not in sys.argv:
        # Show effective values (model.kind, the mode thresholds for that kind), not interpolations.
        sys.argv.append("--resolve")
    previous = os.environ.get("HYDRA_FULL_ERROR")
    wants_traceback = previous == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except (HydraException, OmegaConfBaseException) as error:
        if wants_traceback:
            raise
        print(f"error: {hydra_error_line(error)}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        if wants_traceback or error.errno not in WRITE_ERRNOS:
            raise
        print(
            f"error: cannot write {error.filename}: {error.strerror}; choose writable hydra.run.dir and cache.dir",
            file=sys.stderr,
        )
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; finished stages are cached, rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    finally:
        if previous is None:
            del os.environ["HYDRA_FULL_ERROR"]
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


if __name__ == "__main__":
    cli()
