"""The one owner of the cache on disk: a directory of artifacts, each complete exactly when its manifest verifies.

An `ArtifactStore` is one directory (`<cache.dir>/<stage>/`, `<cache.models>/`, `<cache.dir>/search/`)
holding entries `<name>/`. An entry is written in a private temporary `.tmp-<name>-<pid>-<random>/`
while its writer holds the lock `.<name>.lock`, gets its `manifest.json` last, and is renamed into
place in one step: a directory that looks complete is complete, and a crash leaves only a temporary.
A temporary whose lock can be taken belongs to a dead writer, so it is removed: by the next writer
of the same name, or by `collect_garbage` (`python -m pipeline.cache gc`) for names never written again.

Lock files are never removed: a process may be waiting on one, and deleting it would let a second
writer take a fresh lock file while the first still holds the old one.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from pipeline import artifacts
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
"""What an entry may be called: one path component that is neither hidden nor `..`, so no name leaves the store."""
TEMPORARY_PATTERN = re.compile(r"\.tmp-(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)-\d+-[0-9a-f]{8}")
"""`.tmp-<name>-<pid>-<random>`: the only directories the store, and its garbage collection, ever remove."""


@dataclass
class Collected:
    """What `collect_garbage` did: removed temporaries with their sizes, and those kept because in use."""

    removed: list[tuple[Path, int]] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


class ArtifactStore:
    """Entries `<root>/<name>/` written atomically under a per-name lock; see the module docstring."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, name: str) -> Path:
        """Where the entry `name` lives once complete."""
        if not NAME_PATTERN.fullmatch(name) or ".." in name:
            raise PipelineError(f"{name!r} cannot name an entry of {self.root}: use letters, digits, '.', '_' and '-'")
        return self.root / name

    def lock_path(self, name: str) -> Path:
        """The lock a writer of `name` holds from its first write to its rename."""
        return self.root / f".{self.path(name).name}.lock"

    def lock(self, name: str, timeout: float = -1) -> FileLock:
        """The entry's lock (not yet acquired); the store directory is created first."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise PipelineError(
                f"cannot create {self.root} ({error.strerror or error}); choose a writable cache.dir or free disk space"
            ) from error
        return FileLock(str(self.lock_path(name)), timeout=timeout)

    def complete(self, name: str) -> bool:
        """True when the entry exists and every file matches its manifest."""
        return self.path(name).is_dir() and artifacts.verify(self.path(name))[0]

    def usable(self, name: str, what: str) -> bool:
        """`complete`, with a warning when an entry exists but is damaged (it will be recomputed)."""
        directory = self.path(name)
        if not directory.exists():
            return False
        ok, why = artifacts.verify(directory)
        if not ok:
            log.warning("%s: cached artifact %s is not usable (%s); recomputing", what, directory, why)
        return ok

    @contextmanager
    def writing(self, name: str, force: bool = False) -> Iterator[Path | None]:
        """Hold the entry's lock; yield None when it is complete (and not `force`d), else a fresh temporary.

        The body fills the temporary and writes its manifest; when the body returns, the temporary
        replaces the entry in one rename. Whatever happens, no temporary of this writer is left behind.
        """
        with self.lock(name):
            if not force and self.complete(name):
                yield None
                return
            self._remove_stale_temporaries(name)
            temporary = self.root / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                temporary.mkdir()
                yield temporary
                final = self.path(name)
                if final.exists() or final.is_symlink():
                    artifacts.remove_tree(final)
                os.replace(temporary, final)
            finally:
                try:
                    artifacts.remove_tree(temporary)
                except OSError:
                    log.warning("could not remove %s; the next writer of %s or cache gc will", temporary, name)

    @contextmanager
    def exclusive(self, name: str) -> Iterator[Path]:
        """A mutable entry (a study journal) held by one process at a time; busy is an error, not a wait."""
        lock = self.lock(name, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise PipelineError(f"another run holds {self.path(name)}; wait for it or stop it") from None
        try:
            directory = self.path(name)
            directory.mkdir(exist_ok=True)
            yield directory
        finally:
            lock.release()

    def temporaries(self) -> list[Path]:
        """Every temporary directory in the store, live or left by a killed writer."""
        if not self.root.is_dir():
            return []
        return sorted(
            entry
            for entry in self.root.iterdir()
            if TEMPORARY_PATTERN.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink()
        )

    def collect_garbage(self, collected: Collected) -> None:
        """Remove every temporary whose lock can be taken without waiting; keep (and list) the others."""
        for temporary in self.temporaries():
            name = TEMPORARY_PATTERN.fullmatch(temporary.name)["name"]
            try:
                with FileLock(str(self.lock_path(name)), timeout=0):
                    if temporary.exists():
                        size = tree_size(temporary)
                        artifacts.remove_tree(temporary)
                        collected.removed.append((temporary, size))
            except Timeout:
                collected.kept.append(temporary)

    def _remove_stale_temporaries(self, name: str) -> None:
        """Temporaries of `name` belong to killed writers: the caller holds the name's lock."""
        for stale in self.temporaries():
            match = TEMPORARY_PATTERN.fullmatch(stale.name)
            if match["name"] == name:
                log.warning("removing %s, left by a run that was killed while writing it", stale)
                artifacts.remove_tree(stale)


def tree_size(path: Path) -> int:
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file() and not item.is_symlink())
