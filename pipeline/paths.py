"""Paths the user types are relative to the directory the command was started from."""

from __future__ import annotations

import os
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
