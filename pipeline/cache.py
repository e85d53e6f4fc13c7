"""`python -m pipeline.cache gc [--cache-dir DIR] [--models-dir DIR]`: remove what killed runs left behind.

A stage writes `<cache.dir>/<stage>/.tmp-<key>-<pid>-<random>/` while it holds `<stage>/.<key>.lock`
(`pipeline.runner`), and a model is built in `<cache.models>/.tmp-<name>-<pid>/` while its builder holds
`<cache.models>/<name>.lock` (`pipeline.models`). A temporary whose lock can be taken right now has no
live writer, so it is removed; one whose lock is held belongs to a running job and is kept. A rerun of
the same key removes its own leftovers anyway; `gc` is for keys that are never computed again.

Lock files are never removed: a process may be waiting on one, and deleting it would let a second
writer take a fresh lock file while the first still holds the old one.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from filelock import FileLock, Timeout
from omegaconf import OmegaConf

from pipeline import artifacts
from pipeline.errors import PipelineError
from pipeline.paths import package_file, user_path
from pipeline.runner import TEMPORARY_PATTERN, lock_path

MODEL_TEMPORARY_PATTERN = re.compile(r"\.tmp-(?P<name>.+)-\d+")
"""`pipeline.models._materialize` builds `<name>` in `.tmp-<name>-<pid>` under the lock `<name>.lock`."""


@dataclass(frozen=True)
class Temporary:
    """A temporary directory and the lock its writer holds while it is alive."""

    path: Path
    lock: Path


@dataclass
class Collected:
    """What `collect_garbage` did: removed temporaries with their sizes, and those kept because in use."""

    removed: list[tuple[Path, int]] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


def default_dirs(cache_dir: str | None, models_dir: str | None) -> tuple[Path, Path]:
    """(cache dir, model store) as `python -m pipeline` would resolve them from conf/config.yaml."""
    config = OmegaConf.load(str(package_file("conf/config.yaml")))
    if cache_dir is not None:
        config.cache.dir = cache_dir
    if models_dir is not None:
        config.cache.models = models_dir
    return user_path(config.cache.dir), user_path(config.cache.models)


def temporaries(cache_dir: Path, models_dir: Path) -> list[Temporary]:
    """Every stage and model temporary under the two directories, with the lock that guards it."""
    found = []
    if cache_dir.is_dir():
        stage_dirs = [path for path in cache_dir.iterdir() if path.is_dir() and path.resolve() != models_dir.resolve()]
        for stage_dir in sorted(stage_dirs):
            for entry in sorted(stage_dir.iterdir()):
                match = TEMPORARY_PATTERN.fullmatch(entry.name)
                if match and entry.is_dir():
                    found.append(Temporary(entry, lock_path(stage_dir / match["key"])))
    if models_dir.is_dir():
        for entry in sorted(models_dir.iterdir()):
            match = MODEL_TEMPORARY_PATTERN.fullmatch(entry.name)
            if match and entry.is_dir():
                found.append(Temporary(entry, models_dir / f"{match['name']}.lock"))
    return found


def tree_size(path: Path) -> int:
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file() and not item.is_symlink())


def collect_garbage(cache_dir: Path, models_dir: Path) -> Collected:
    """Remove every temporary whose lock can be taken without waiting; keep the others."""
    if not cache_dir.is_dir():
        raise PipelineError(f"cache dir {cache_dir} does not exist; pass --cache-dir DIR (the run's cache.dir)")
    collected = Collected()
    for temporary in temporaries(cache_dir, models_dir):
        try:
            with FileLock(str(temporary.lock), timeout=0):
                if temporary.path.exists():
                    size = tree_size(temporary.path)
                    artifacts.remove_tree(temporary.path)
                    collected.removed.append((temporary.path, size))
        except Timeout:
            collected.kept.append(temporary.path)
    return collected


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.cache", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gc = commands.add_parser("gc", help="remove temporaries left by killed runs (never one a live job writes)")
    gc.add_argument("--cache-dir", help="the cache to clean (default: cache.dir from conf/config.yaml)")
    gc.add_argument("--models-dir", help="the model store to clean (default: cache.models, i.e. <cache-dir>/models)")
    args = parser.parse_args(argv)
    cache_dir, models_dir = default_dirs(args.cache_dir, args.models_dir)
    try:
        collected = collect_garbage(cache_dir, models_dir)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path, size in collected.removed:
        print(f"removed {path} ({size / 2**20:.1f} MiB)")
    for path in collected.kept:
        print(f"kept {path}: a running job holds its lock")
    freed = sum(size for _, size in collected.removed) / 2**20
    print(f"gc: removed {len(collected.removed)} stale temporaries ({freed:.1f} MiB), kept {len(collected.kept)} in use")
    return 0


if __name__ == "__main__":
    sys.exit(main())
