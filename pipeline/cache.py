"""`python -m pipeline.cache gc [--cache-dir DIR] [--models-dir DIR]`: remove what killed runs left behind.

Every stage directory of the cache (`<cache.dir>/<stage>/`), the plan search's (`<cache.dir>/search/`)
and the model store (`<cache.models>/`) is a `pipeline.store.ArtifactStore`: a writer builds
`.tmp-<name>-<pid>-<random>/` while it holds `.<name>.lock`. A temporary whose lock can be taken right
now has no live writer, so it is removed; one whose lock is held belongs to a running job and is kept.
Nothing else is ever removed: not artifacts, not locks, not directories of other names.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf

from pipeline.errors import PipelineError
from pipeline.paths import package_file, user_path
from pipeline.store import ArtifactStore, Collected


def default_dirs(cache_dir: str | None, models_dir: str | None) -> tuple[Path, Path]:
    """(cache dir, model store) as `python -m pipeline` would resolve them from conf/config.yaml."""
    config = OmegaConf.load(str(package_file("conf/config.yaml")))
    if cache_dir is not None:
        config.cache.dir = cache_dir
    if models_dir is not None:
        config.cache.models = models_dir
    return user_path(config.cache.dir), user_path(config.cache.models)


def stores(cache_dir: Path, models_dir: Path) -> list[ArtifactStore]:
    """Every store under the cache dir (one per stage, plus the plan search's) and the model store."""
    stage_dirs = []
    if cache_dir.is_dir():
        stage_dirs = sorted(
            path for path in cache_dir.iterdir()
            if path.is_dir() and not path.is_symlink() and path.resolve() != models_dir.resolve()
        )
    return [*(ArtifactStore(path) for path in stage_dirs), ArtifactStore(models_dir)]


def collect_garbage(cache_dir: Path, models_dir: Path) -> Collected:
    """Remove every temporary whose lock can be taken without waiting; keep the others."""
    if not cache_dir.is_dir():
        raise PipelineError(f"cache dir {cache_dir} does not exist; pass --cache-dir DIR (the run's cache.dir)")
    collected = Collected()
    for store in stores(cache_dir, models_dir):
        store.collect_garbage(collected)
    return collected


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.cache", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gc = commands.add_parser("gc", help="remove temporaries left by killed runs (never one a live job writes)")
    gc.add_argument("--cache-dir", help="the cache to clean (default: cache.dir from conf/config.yaml)")
    gc.add_argument("--models-dir", help="the model store to clean (default: cache.models, i.e. <cache-dir>/models)")
    args = parser.parse_args(argv)
    try:
        collected = collect_garbage(*default_dirs(args.cache_dir, args.models_dir))
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
