"""Writing an edited copy of a safetensors checkpoint without re-serializing it.

Every file is copied in one pass, in which each planned tensor's byte range gets its edited bytes
instead of the source's: unedited tensors, shard headers and metadata stay the source's bytes, and
memory holds one tensor (as float32) at a time. Three things run side by side. The calling thread
copies every byte that is not an edited tensor through the kernel (`sendfile`); one worker reads,
edits (`pipeline.weight_edit.PlanEditor`) and `pwrite`s the planned tensors, shard after shard, into
the same pre-sized files; the hash workers hash each source file whose sha256 is not known while it
is copied (the same pages, while they are in the page cache, so a cold checkpoint is read from disk
once) and, when asked, each written file once it is complete. The edits run ahead of the copy across
files, so a checkpoint costs about the longest of copy, edit and hashing, not their sum
(bench/ablate.py).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NoReturn

import torch
from safetensors import safe_open
from torch import Tensor
from tqdm import tqdm

from pipeline.architectures import Architecture
from pipeline.artifacts import sha256_file
from pipeline.errors import WRITE_ERRNOS, PipelineError
from pipeline.models import WEIGHT_SUFFIXES
from pipeline.weight_edit import Hit, PlanEditor, ResolvedPlan, plan_editor

QUANTIZED_SUFFIXES = ("_blocks", "_scales", "weight_scale_inv", ".qweight", ".scales")
COPY_BLOCK = 1 << 20
HASH_WORKERS = max(2, min(8, (os.cpu_count() or 1) - 2))
"""Threads hashing source and output files beside the copy (sha256 runs at ~1 GB/s per core)."""
KERNEL_COPY = sys.platform == "linux"
"""Linux `sendfile` copies file to file inside the kernel; elsewhere it needs a socket, so we read and write."""
CARD_NAME = "README.md"
Card = Callable[[ResolvedPlan, Architecture, Path], str]
"""(resolved plan, architecture, source directory) -> the model card's text; the stage that
publishes the model owns what it says."""


@dataclass(frozen=True)
class TensorEdit:
    """One planned tensor of a shard: its byte range in the file. An edit keeps dtype and shape,
    so the new bytes fill exactly the old range."""

    name: str
    begin: int
    end: int


@dataclass(frozen=True)
class FileCopy:
    """One file of the checkpoint and where its copy goes; `edits` in file order (empty when none)."""

    source: Path
    target: Path
    relative: str
    edits: tuple[TensorEdit, ...]


@dataclass(frozen=True)
class CopyJob:
    """What `edit_checkpoint` has settled before writing anything."""

    source_dir: Path
    out_dir: Path
    copies: tuple[Path, ...]
    """Shards, then the index, then every side file: everything that is copied."""
    shards: frozenset[str]
    editor: PlanEditor
    progress: bool
    card: Card | None


@dataclass
class CopyResult:
    """What the copy found out, filled in as it goes. `edited` and `hits` are written by the edit
    worker only and read once it has finished."""

    source_hashes: dict[str, str]
    output_hashes: dict[str, str] | None
    edited: list[str] = field(default_factory=list)
    hits: set[Hit] = field(default_factory=set)


@dataclass(frozen=True)
class Workers:
    """The edit worker, the hash workers and what they share with the copying thread. Every future
    is kept so that a failure anywhere can stop and join them all before the output is removed."""

    edit: ThreadPoolExecutor
    hash: ThreadPoolExecutor
    bar: tqdm
    stop: threading.Event = field(default_factory=threading.Event)
    futures: list[Future] = field(default_factory=list)

    def submit(self, pool: ThreadPoolExecutor, function: Callable[..., Any], *args: Any) -> Future:
        future = pool.submit(function, *args)
        self.futures.append(future)
        return future

    def raise_first_failure(self) -> None:
        """A failed edit or read stops the copy now, not after the last file."""
        for future in self.futures:
            if future.done() and not future.cancelled() and future.exception() is not None:
                future.result()

    def cancel(self) -> None:
        """Stop the edit worker at its next tensor, drop queued jobs and join the running ones."""
        self.stop.set()
        for future in self.futures:
            future.cancel()
        wait(self.futures)


def edit_checkpoint(
    source_dir: Path,
    out_dir: Path,
    plan: Mapping[str, Any],
    directions: Tensor,
    progress: bool,
    embed: bool = False,
    source_hashes: Mapping[str, str] | None = None,
    hash_output: bool = False,
    card: Card | None = None,
) -> dict[str, Any]:
    """Write an edited copy of the safetensors checkpoint in `source_dir` to `out_dir`, file by file.

    The index and every non-weight file (config, tokenizer, chat template) are copied too, and with
    `card` a README.md model card is written last. `source_dir` is only ever read. The source's sha256
    sums (for the manifest) are computed while each file is copied, except for files named in
    `source_hashes` ({relative POSIX path: sha256}, e.g. a model-store manifest that was just
    verified), whose hashes are taken as given. With `hash_output`, every file written is hashed too,
    each as soon as it is complete, for a caller that records them in a manifest.
    On failure, what this call wrote is removed: nothing is left that looks like a finished model.
    Returns {"source", "source_files": {relative name: sha256}, "edited_tensors": [names]}, and
    "output_files": {relative name: sha256} with `hash_output`.
    """
    source_dir, out_dir = Path(source_dir).resolve(), Path(out_dir).resolve()
    if out_dir == source_dir or source_dir in out_dir.parents:
        raise PipelineError(f"output {out_dir} is inside the source checkpoint {source_dir}; choose another directory")
    shards, copies = _checkpoint_files(source_dir)
    config = json.loads((source_dir / "config.json").read_text())
    editor = plan_editor(config, plan, directions, embed, "disk")
    _reject_quantized(config, source_dir, shards)
    job = CopyJob(source_dir, out_dir, copies, frozenset(shards), editor, progress, card)
    known = source_hashes or {}
    names = [path.relative_to(source_dir).as_posix() for path in copies]
    result = CopyResult({name: known[name] for name in names if name in known}, {} if hash_output else None)
    existed = out_dir.exists()
    try:
        with _edit_threads():
            _write_edited_copy(job, result)
    except BaseException:
        _remove_partial_output(job, existed)
        raise
    report = {
        "source": str(source_dir),
        "source_files": dict(sorted(result.source_hashes.items())),
        "edited_tensors": sorted(result.edited),
    }
    if result.output_hashes is not None:
        report["output_files"] = dict(sorted(result.output_hashes.items()))
    return report


def _write_edited_copy(job: CopyJob, result: CopyResult) -> None:
    """Copy every file of the job with its planned tensors edited, check that the plan was covered,
    then write the card."""
    files = [_create_target(job, path) for path in job.copies]
    total = sum(file.source.stat().st_size for file in files)
    with (
        ThreadPoolExecutor(1, thread_name_prefix="ablate-edit") as edit_worker,
        ThreadPoolExecutor(HASH_WORKERS, thread_name_prefix="ablate-hash") as hasher,
        tqdm(total=total, desc="ablate", unit="B", unit_scale=True, disable=not job.progress) as bar,
    ):
        workers = Workers(edit_worker, hasher, bar)
        try:
            _copy_files(files, job.editor, result, workers)
        except BaseException:
            workers.cancel()
            raise
    job.editor.check_coverage(result.hits)
    if job.card is not None:
        _write_card(job, result)


def _create_target(job: CopyJob, source: Path) -> FileCopy:
    """Create the copy of `source` at its full size (so the edit worker and the copy can write their
    byte ranges in any order) and find its planned tensors, in file order."""
    relative = source.relative_to(job.source_dir).as_posix()
    target = job.out_dir / relative
    spans = _tensor_spans(source) if relative in job.shards else {}
    planned = [TensorEdit(name, *spans[name]) for name in spans if job.editor.target(name)]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as created:
            created.truncate(source.stat().st_size)
    except OSError as error:
        _raise_write_error(error, target)
    return FileCopy(source, target, relative, tuple(sorted(planned, key=lambda edit: edit.begin)))


def _copy_files(files: list[FileCopy], editor: PlanEditor, result: CopyResult, workers: Workers) -> None:
    """Hand every file's edits to the edit worker, then copy the files' gaps here in turn, hashing
    each source beside its copy and each output once it is complete."""
    editing = {
        file.relative: workers.submit(workers.edit, _write_edits, file, editor, result, workers)
        for file in files
        if file.edits
    }
    source_hashes: dict[str, Future] = {}
    output_hashes: dict[str, Future] = {}
    for file in files:
        if file.relative not in result.source_hashes:
            source_hashes[file.relative] = workers.submit(workers.hash, sha256_file, file.source)
        _copy_gaps(file, workers.bar)
        if result.output_hashes is not None:
            editing_file = editing.get(file.relative)
            output_hashes[file.relative] = workers.submit(workers.hash, _hash_when_written, editing_file, file.target)
        workers.raise_first_failure()
    result.source_hashes.update({relative: future.result() for relative, future in source_hashes.items()})
    for future in editing.values():
        future.result()
    if result.output_hashes is not None:
        result.output_hashes.update({relative: future.result() for relative, future in output_hashes.items()})


def _write_card(job: CopyJob, result: CopyResult) -> None:
    card = job.out_dir / CARD_NAME
    try:
        card.write_text(job.card(job.editor.plan, job.editor.arch, job.source_dir))
    except OSError as error:
        _raise_write_error(error, card)
    if result.output_hashes is not None:
        result.output_hashes[card.name] = sha256_file(card)


def _write_edits(file: FileCopy, editor: PlanEditor, result: CopyResult, workers: Workers) -> None:
    """Read each planned tensor of the shard, edit it and write its bytes at its offset of the copy.
    Runs on the edit worker beside the copy of the gaps; `workers.stop` ends it early when the copy failed."""
    with safe_open(file.source, framework="pt") as reader, open(file.target, "r+b", buffering=0) as writer:
        for edit in file.edits:
            if workers.stop.is_set():
                return
            edited, hit = editor.edit(edit.name, reader.get_tensor(edit.name))
            result.hits.add(hit)
            result.edited.append(edit.name)
            new_bytes = memoryview(edited.contiguous().reshape(-1).view(torch.uint8).numpy()).cast("B")
            try:
                _write_at(writer, edit.begin, new_bytes, edit.end - edit.begin, file.source)
            except OSError as error:
                _raise_write_error(error, file.target)
            workers.bar.update(edit.end - edit.begin)


def _hash_when_written(editing: Future | None, target: Path) -> str:
    """sha256 of `target` once its edits (if any) are written: the copy of its gaps is already done."""
    if editing is not None:
        editing.result()
    return sha256_file(target)


def _copy_gaps(file: FileCopy, progress: tqdm) -> None:
    """Copy every byte of the source outside its edits' ranges into the same offsets of the copy
    (already created at its full size), through the kernel (`sendfile`) where it can."""
    with open(file.source, "rb", buffering=0) as reader:
        size = os.fstat(reader.fileno()).st_size
        try:
            with open(file.target, "r+b", buffering=0) as writer:
                position = 0
                for begin, end in [*((edit.begin, edit.end) for edit in file.edits), (size, size)]:
                    _copy_range(reader, writer, position, begin)
                    progress.update(begin - position)
                    position = end
        except OSError as error:
            _raise_write_error(error, file.target)


def _copy_range(reader: Any, writer: Any, start: int, end: int) -> None:
    """Bytes [start, end) of `reader`, written at the same offset of `writer`."""
    if KERNEL_COPY:
        os.lseek(writer.fileno(), start, os.SEEK_SET)
        while start < end:
            sent = os.sendfile(writer.fileno(), reader.fileno(), start, end - start)
            if not sent:
                raise OSError(errno.EIO, "source file shrank while it was copied", reader.name)
            start += sent
        return
    block = bytearray(COPY_BLOCK)
    view = memoryview(block)
    reader.seek(start)
    while start < end:
        size = reader.readinto(view[: min(COPY_BLOCK, end - start)])
        if not size:
            raise OSError(errno.EIO, "source file shrank while it was copied", reader.name)
        _write_at(writer, start, view[:size], size, None)
        start += size


def _write_at(writer: Any, offset: int, data: memoryview, expected: int, source: Path | None) -> None:
    """All of `data` at `offset` (`os.pwrite` may write part of it); `expected` guards the byte range."""
    if data.nbytes != expected:
        raise PipelineError(f"{source}: an edited tensor holds {data.nbytes} bytes where the header gives it {expected}")
    while data:
        written = os.pwrite(writer.fileno(), data, offset)
        data, offset = data[written:], offset + written


def _raise_write_error(error: OSError, path: Path) -> NoReturn:
    if error.errno in WRITE_ERRNOS:
        where = error.filename or path
        raise PipelineError(f"cannot write {where}: {error.strerror}; free disk space or choose a writable cache dir") from error
    raise error


def _tensor_spans(shard: Path) -> dict[str, tuple[int, int]]:
    """{tensor name: (first byte, end byte)} in the file, from the safetensors header
    (8-byte little-endian header length, JSON header, then data; offsets count from the data start)."""
    with open(shard, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    data = 8 + length
    return {
        name: (data + entry["data_offsets"][0], data + entry["data_offsets"][1])
        for name, entry in header.items()
        if name != "__metadata__"
    }


def _checkpoint_files(source_dir: Path) -> tuple[list[str], tuple[Path, ...]]:
    """(shard file names, every file to copy) of a safetensors checkpoint directory: the shards, the
    index if any, then every side file (config, tokenizer, chat template, license)."""
    index = source_dir / "model.safetensors.index.json"
    indexed = index.is_file()
    if indexed:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        escaping = [shard for shard in shards if Path(shard).name != shard]
        if escaping:
            raise PipelineError(f"{index} names shard {escaping[0]!r} outside its directory; the index is corrupt")
    elif (source_dir / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    elif any(path.suffix in (".bin", ".pt", ".pth") for path in source_dir.iterdir()):
        raise PipelineError(
            f"{source_dir} has only pickled .bin/.pt weights and we never unpickle; convert it to safetensors "
            "(e.g. load it yourself and save_pretrained(..., safe_serialization=True)) or use the model's safetensors revision"
        )
    else:
        raise PipelineError(f"{source_dir} has no model.safetensors or model.safetensors.index.json; point model at a HF checkpoint")
    copies = [source_dir / shard for shard in shards] + ([index] if indexed else [])
    return shards, (*copies, *_side_files(source_dir))


def _side_files(source_dir: Path) -> Iterator[Path]:
    """Everything in the checkpoint that is not a weight file: config, tokenizer, chat template, license."""
    for path in sorted(source_dir.rglob("*")):
        relative = path.relative_to(source_dir)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        # A model-store manifest describes the source's files, not the edited ones: never carry it over.
        if path.name.endswith(WEIGHT_SUFFIXES) or path.name in ("model.safetensors.index.json", "manifest.json"):
            continue
        yield path


def _reject_quantized(config: Mapping[str, Any], source_dir: Path, shards: list[str]) -> None:
    """Packed quantized tensors have no hidden axis to edit in float32: refuse them before writing anything."""
    names: list[str] = []
    for shard in shards:
        with safe_open(source_dir / shard, framework="pt") as reader:
            names.extend(reader.keys())
    quantized = [name for name in names if name.endswith(QUANTIZED_SUFFIXES)]
    if "quantization_config" in config or quantized:
        example = quantized[0] if quantized else "config.json quantization_config"
        raise PipelineError(f"quantized experts not supported; use a bf16 dequantized checkpoint (found {example})")


@contextmanager
def _edit_threads() -> Iterator[None]:
    """Run torch with the cores the copy and the hash workers leave free (at least one thread). The
    rank-1 edits are many short, memory-bound parallel loops whose OpenMP workers spin between loops;
    when every core is busy, a descheduled worker stalls each loop: measured on the shared 2-core
    machine (load ~7), 2 threads took 3.3 s wall / 2.0 s CPU for the bench edit against 1.8 s / 1.1 s
    for 1 thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1 - HASH_WORKERS))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _remove_partial_output(job: CopyJob, existed: bool) -> None:
    """After a failed edit: remove the output directory when this call created it, else the files it writes there."""
    if not existed:
        shutil.rmtree(job.out_dir, ignore_errors=True)
        return
    written = [path.relative_to(job.source_dir) for path in job.copies]
    for relative in [*written, *([Path(CARD_NAME)] if job.card is not None else [])]:
        with suppress(OSError):
            (job.out_dir / relative).unlink(missing_ok=True)
