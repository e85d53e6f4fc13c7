"""Where paths point: a user's paths are relative to the launch directory; shipped files live in subpackages."""

from __future__ import annotations

import os
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path


def user_path(value: str | os.PathLike) -> Path:
    """Resolve a user-given path against the launch directory (Hydra's original cwd when running)."""
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
