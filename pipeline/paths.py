"""Where paths point: a user's paths are relative to the launch directory; shipped files live in subpackages."""

from __future__ import annotations

import os
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from pipeline.errors import PipelineError


def user_path(value: str | os.PathLike) -> Path:
    """Resolve a user-given path against the launch directory (Hydra's original cwd when running).

    An empty path is refused: it would silently mean the launch directory itself (and `${cache.dir}/models`
    would become `/models`).
    """
    if not str(value).strip():
        raise PipelineError("an empty path was given (cache.dir, cache.models, plan or a prompt source); name a directory or file")
    path = Path(os.path.expanduser(str(value)))
    if path.is_absolute():
        return path
    try:
        from hydra.core.hydra_config import HydraConfig

        base = Path(HydraConfig.get().runtime.cwd)
    except ValueError:  # Hydra not initialised: tests and library use
        base = Path.cwd()
    return base / path


def package_file(relative: str) -> Traversable:
    """A file shipped with the package, named from its top folder: `prompts/harmful.txt`, `conf/config.yaml`.

    The repository keeps `conf/` and `prompts/` at its root; installed, they are the subpackages
    `pipeline.conf` and `pipeline.prompts` (pyproject.toml maps them), so both layouts resolve the same.
    """
    folder, _, rest = relative.partition("/")
    return files(f"pipeline.{folder}").joinpath(rest)
