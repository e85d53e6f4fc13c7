"""Remembered sha256 sums of checkpoints we do not own (a local directory, a hub snapshot).

They give such a checkpoint its content fingerprint (part of every cache key that depends on the
model), so a checkpoint rewritten in place, same names and sizes, is a different model to the cache.

The ablate manifest records the sha256 of every source file, and hashing is the slowest part of
ablating a local checkpoint: about 1 GB/s per core, twice the time of the copy itself on the
project's reference machine (bench/ablate.py). A sweep ablates the same source once per point.
As DVC's state database does, a file's hash is reused while its stat identity (device, inode,
size, modification time in ns) is unchanged: rewriting, replacing or touching a file changes it.
The identity is taken before the file is read, so a file that changes while it is hashed is
hashed again next time, and `check_unchanged` refuses an edit whose source moved under it.

State lives in `<model store>/.source-hashes/<sha256 of the directory path>.json` (JSON, written
through a temporary file and a rename; concurrent writers each leave a complete, correct file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping

from tqdm.auto import tqdm

from pipeline import artifacts
from pipeline.errors import PipelineError

STATE_DIR = ".source-hashes"
Stats = dict[str, list[int]]


def file_stats(directory: Path) -> Stats:
    """{relative POSIX path: [device, inode, size, mtime_ns]} of every file under `directory`, symlinks
    followed (a hub snapshot links into its blob store). Dot files and folders are skipped, as the
    ablate copy skips them."""
    stats: Stats = {}
    for path in sorted(Path(directory).rglob("*")):
        relative = path.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        stat = path.stat()
        stats[relative.as_posix()] = [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns]
    return stats


def _state_file(model_store: Path, directory: Path) -> Path:
    return Path(model_store) / STATE_DIR / f"{artifacts.sha256_text(str(Path(directory).resolve()))[:32]}.json"


def remembered(model_store: Path, directory: Path, stats: Stats) -> dict[str, str]:
    """{relative path: sha256} for the files of `directory` whose stats equal those recorded with
    their hash; files that changed (or were never hashed) are left out and get hashed again."""
    state_file = _state_file(model_store, directory)
    try:
        state = json.loads(state_file.read_text())
        entries = state["files"] if state.get("directory") == str(Path(directory).resolve()) else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # no state yet, or unreadable: hash everything, then write a fresh one
    return {
        name: entry["sha256"]
        for name, entry in entries.items()
        if isinstance(entry, dict) and name in stats and entry.get("stat") == stats[name] and isinstance(entry.get("sha256"), str)
    }


def remember(model_store: Path, directory: Path, stats: Stats, hashes: Mapping[str, str]) -> None:
    """Record `hashes` with the stats taken before the files were read. Best effort: a read-only model
    store only means the next run hashes again."""
    state_file = _state_file(model_store, directory)
    files = {name: {"stat": stats[name], "sha256": digest} for name, digest in sorted(hashes.items()) if name in stats}
    try:
        state_file.parent.mkdir(parents=True, exist_ok=True)
        artifacts.write_json(state_file, {"directory": str(Path(directory).resolve()), "files": files})
    except OSError:
        pass


def check_unchanged(directory: Path, before: Stats, names: Iterable[str]) -> None:
    """Refuse a copy whose source files `names` were rewritten while they were read: it may mix old and new bytes."""
    after = file_stats(directory)
    changed = sorted(name for name in names if before.get(name) != after.get(name))
    if changed:
        raise PipelineError(
            f"{directory} changed while it was read ({', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}); "
            "wait for whatever is writing it to finish, then run again"
        )


def directory_hashes(model_store: Path, directory: Path, progress: bool = True) -> dict[str, str]:
    """{relative path: sha256} of every file of `directory`; only files never hashed, or changed since,
    are read (the first use of a checkpoint reads it once, later runs read nothing)."""
    stats = file_stats(directory)
    hashes = remembered(model_store, directory, stats)
    missing = [name for name in stats if name not in hashes]
    if missing:
        total = sum(stats[name][2] for name in missing)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"hashing {Path(directory).name}",
                  disable=not progress or total < 1 << 28) as bar:
            for name in missing:
                hashes[name] = artifacts.sha256_file(Path(directory) / name)
                bar.update(stats[name][2])
        check_unchanged(directory, stats, missing)
        remember(model_store, directory, stats, hashes)
    return hashes
