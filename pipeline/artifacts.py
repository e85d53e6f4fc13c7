"""Artifact directories: content hashes, manifests, atomic completion.

An artifact is a directory whose `manifest.json` lists the sha256 of every
file in it. The manifest is written last, inside a temporary directory that
is renamed into place in one step, so a directory that looks complete is
complete. A directory whose files do not match their manifest is not an
artifact: the runner treats it as missing and recomputes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

MANIFEST = "manifest.json"
_CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks so big shards never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def canonical_json(value: Any) -> str:
    """The one serialization that is hashed: sorted keys, no whitespace, UTF-8 safe."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


KEY_LENGTH = 16
"""Hex digits of a cache key: 64 bits, enough that two different payloads never meet in one cache."""


def content_key(payload: Any) -> str:
    """The cache key of a JSON-able payload: the start of the sha256 of its canonical JSON."""
    return sha256_text(canonical_json(payload))[:KEY_LENGTH]


def file_hashes(directory: Path, known: Mapping[str, str] | None = None) -> dict[str, str]:
    """sha256 of every file under `directory` (relative POSIX paths), manifest excluded; a file named
    in `known` takes that hash instead of being read."""
    hashes = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            relative = path.relative_to(directory).as_posix()
            hashes[relative] = known[relative] if known and relative in known else sha256_file(path)
    return hashes


def write_json(path: Path, value: Any) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_manifest(directory: Path, fields: Mapping[str, Any], known: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Hash the directory's files (those in `known` hashed already by their writer) and write
    manifest.json (last, so it marks completion)."""
    manifest = {**fields, "files": file_hashes(directory, known)}
    write_json(directory / MANIFEST, manifest)
    return manifest


def read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


_VERIFIED: dict[Path, tuple] = {}
"""Directories this process has fully verified, with the (name, size, mtime_ns) of every file then."""


def _file_stamps(directory: Path, names: Any) -> tuple:
    stamps = []
    for name in sorted(names):
        status = (directory / name).stat()
        stamps.append((name, status.st_size, status.st_mtime_ns))
    return tuple(stamps)


def verify(directory: Path) -> tuple[bool, str]:
    """(True, "") when every file listed in the manifest exists with its recorded hash.

    A directory is hashed in full the first time a process uses it; later checks in the same process
    (a 1.3 GB model is resolved by several stages of one run) only re-hash if a file's size or
    modification time changed since. A new process always hashes again.
    """
    manifest = read_manifest(directory)
    if manifest is None or not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        return False, "no valid manifest.json listing the artifact's files"
    files = manifest["files"]
    if any(Path(name).is_absolute() or ".." in Path(name).parts for name in files):
        return False, "manifest.json names a file outside the artifact"
    missing = [name for name in files if not (directory / name).is_file()]
    if missing:
        return False, f"{missing[0]} is missing"
    stamps = _file_stamps(directory, [*files, MANIFEST])
    if _VERIFIED.get(directory) == stamps:
        return True, ""
    for name, expected in files.items():
        if sha256_file(directory / name) != expected:
            return False, f"{name} does not match its manifest hash"
    _VERIFIED[directory] = stamps
    return True, ""


def remove_tree(path: Path) -> None:
    """Remove a directory we own, even when a killed writer left read-only folders in it.

    Nothing is followed through a symbolic link: a link (to `/`, say) is removed as a link, and only
    real directories inside the tree are made writable before the tree is deleted.
    """
    if path.is_symlink():
        path.unlink()
        return
    if not path.exists():
        return
    os.chmod(path, 0o700)
    for root, folders, _ in os.walk(path):
        for folder in folders:
            inner = os.path.join(root, folder)
            if not os.path.islink(inner):
                os.chmod(inner, 0o700)
    shutil.rmtree(path)


def save_tensors(tensors: Mapping[str, Any], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, then the header rewritten with sorted keys.

    safetensors stores `__metadata__` from a hash map, so the same tensors give different bytes
    (and different sha256 in manifests) from run to run. Sorting the header JSON keeps its length,
    so it is rewritten in place and the file becomes a pure function of its content.
    """
    from safetensors.torch import save_file

    save_file(dict(tensors), str(path), metadata=dict(metadata) if metadata else None)
    with open(path, "r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(canonical) > length:
            raise AssertionError(f"canonical safetensors header of {path} is longer than the original")
        handle.seek(8)
        handle.write(canonical + b" " * (length - len(canonical)))
