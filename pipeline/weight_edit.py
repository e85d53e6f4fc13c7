"""Removing a refusal direction from the tensors that write into the residual stream.

Two edits, both applied column by column, where a "column" is one vector along
the tensor's hidden axis (the vectors the tensor can add to the residual):

* `orthogonalize`: W' = W - s * r (r^T W). With s=1 nothing the tensor writes
  has a component along r; 0<s<1 shrinks that component to (1-s) of itself.
* `norm_preserving`: the same removal, then each column is rescaled to its
  original norm, so the layer's output magnitudes are kept. The caller passes
  the *biprojected* direction for this method (see `directions_for_method`).

All arithmetic runs in float32 whatever the storage dtype, and the result is
cast back to the original dtype. Two ways to apply a plan:
`apply_plan_in_memory` (evaluate / optimize trials, restorable) and
`edit_checkpoint` (the ablate stage: copies the checkpoint to a new directory,
overwriting only the edited tensors' bytes, and never touches the source).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, suppress
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NoReturn, Sequence

import torch
from safetensors import safe_open
from torch import Tensor, nn
from tqdm import tqdm

from pipeline.architectures import (
    Architecture,
    Component,
    Match,
    Where,
    get_architecture,
    num_decoder_layers,
    residual_writers,
)
from pipeline.artifacts import sha256_file
from pipeline.errors import PipelineError

METHODS = ("orthogonal", "norm_preserving")
DIRECTION_TENSORS = {"orthogonal": "refusal_direction", "norm_preserving": "biprojected_direction"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5", ".npz")
QUANTIZED_SUFFIXES = ("_blocks", "_scales", "weight_scale_inv", ".qweight", ".scales")
WRITE_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM}
COPY_BLOCK = 1 << 20
HASH_WORKERS = max(2, min(8, (os.cpu_count() or 1) - 2))
"""Threads hashing source and output files beside the copy (sha256 runs at ~1 GB/s per core)."""
KERNEL_COPY = sys.platform == "linux"
"""Linux `sendfile` copies file to file inside the kernel; elsewhere it needs a socket, so we read and write."""


def _unit(direction: Tensor) -> Tensor:
    direction = direction.detach().to(torch.float32).flatten()
    norm = direction.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise PipelineError("refusal direction is zero or not finite; re-run the measure stage")
    return direction / norm


def _edit(tensor: Tensor, direction: Tensor, scale: float, hidden_axis: int, keep_norms: bool) -> Tensor:
    r = _unit(direction).to(tensor.device)
    hidden_axis %= tensor.dim()
    if tensor.shape[hidden_axis] != r.shape[0]:
        raise PipelineError(
            f"tensor axis {hidden_axis} has length {tensor.shape[hidden_axis]} but the direction has {r.shape[0]}; "
            "the measurements come from a different model"
        )
    # One contiguous float32 copy, edited in place: viewed as [before, hidden, after], every slice is a
    # matrix whose vectors along `hidden` get a rank-1 update (addr_), with no full-size temporaries.
    work = tensor.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    before, after = math.prod(work.shape[:hidden_axis]), math.prod(work.shape[hidden_axis + 1 :])
    if after == 1:  # hidden is the last axis (embeddings, biases, gpt-oss experts): rows are the vectors
        _remove_along(work.view(before, r.shape[0]), r, scale, 1, keep_norms)
    else:
        for block in work.view(before, r.shape[0], after):  # before > 1 only for fused experts
            _remove_along(block, r, scale, 0, keep_norms)
    return work.to(tensor.dtype)


def _remove_along(matrix: Tensor, r: Tensor, scale: float, axis: int, keep_norms: bool) -> None:
    """In place, for every vector v along `axis` (0: columns, 1: rows) of a float32 matrix:
    v <- v - s * r (r^T v), then (keep_norms) rescaled to its old norm."""
    old_norms = matrix.norm(dim=axis, keepdim=True) if keep_norms else None
    if axis == 0:
        matrix.addr_(r, r @ matrix, alpha=-scale)
    else:
        matrix.addr_(matrix @ r, r, alpha=-scale)
    if old_norms is not None:
        new_norms = matrix.norm(dim=axis, keepdim=True)
        # A vector lying exactly along r vanishes at s=1 and has no direction left to rescale: it stays zero.
        matrix.mul_(torch.where(new_norms > 0, old_norms / new_norms, torch.zeros_like(new_norms)))


def orthogonalize(tensor: Tensor, direction: Tensor, scale: float, hidden_axis: int) -> Tensor:
    """W' = W - s * r (r^T W) along `hidden_axis` (for a bias: b' = b - s * r (r^T b)); r is normalized here."""
    return _edit(tensor, direction, scale, hidden_axis, keep_norms=False)


def norm_preserving(tensor: Tensor, direction: Tensor, scale: float, hidden_axis: int) -> Tensor:
    """column' = normalize(col - s * r (r^T col)) * ||col|| for every vector along `hidden_axis`.

    `s` interpolates how much of the component along r is removed before the rescale: s=0 is the
    identity, s=1 leaves r^T W' = 0 exactly with every column norm unchanged. Uses the direction it is
    given; for this method the caller passes the biprojected direction.
    """
    return _edit(tensor, direction, scale, hidden_axis, keep_norms=True)


EDITS: dict[str, Callable[[Tensor, Tensor, float, int], Tensor]] = {
    "orthogonal": orthogonalize,
    "norm_preserving": norm_preserving,
}


def direction_for(directions: Tensor, direction_from: float) -> Tensor:
    """Unit float32 direction for a (possibly fractional) layer index into `directions` [num_layers, hidden].

    12.4 blends rows 12 and 13 as 0.6 * d12 + 0.4 * d13, then renormalizes.
    """
    last = directions.shape[0] - 1
    if not 0 <= direction_from <= last:
        raise PipelineError(
            f"direction_from {direction_from} is outside the measured layers 0-{last}; fix the plan or re-run measure"
        )
    low = math.floor(direction_from)
    weight = direction_from - low
    direction = directions[low].to(torch.float32)
    if weight > 0:
        direction = (1 - weight) * direction + weight * directions[low + 1].to(torch.float32)
    return _unit(direction)


def directions_for_method(measurements: Mapping[str, Tensor], method: str) -> Tensor:
    """The [num_layers, hidden] direction table a method uses: refusal for orthogonal, biprojected for norm_preserving."""
    if method not in METHODS:
        raise PipelineError(f"unknown ablation method {method!r}; use one of: {', '.join(METHODS)}")
    key = DIRECTION_TENSORS[method]
    if key not in measurements:
        raise PipelineError(f"measurements have no {key!r} tensor (needed by method {method}); re-run the measure stage")
    return measurements[key]


@dataclass(frozen=True)
class LayerEdit:
    """One planned layer, resolved: its unit direction and the scale per component."""

    layer: int
    direction: Tensor
    scale: float
    scales: Mapping[Component, float]


@dataclass(frozen=True)
class ResolvedPlan:
    method: str
    layers: Mapping[int, LayerEdit]
    embed_direction: Tensor | None
    embed_scale: float


def resolve_plan(plan: Mapping[str, Any], directions: Tensor, num_layers: int, embed: bool = False) -> ResolvedPlan:
    """Validate the plan against the model's layer count and turn it into per-layer edits.

    With `embed`, the token embeddings are edited along the direction of the lowest planned layer
    at that layer's `scale`.
    """
    method = plan.get("method")
    if method not in METHODS:
        raise PipelineError(f"plan method {method!r} is unknown; use one of: {', '.join(METHODS)}")
    entries = plan.get("layers") or []
    if not entries:
        raise PipelineError("the plan lists no layers; re-run select or fix ablation.yaml")
    layers: dict[int, LayerEdit] = {}
    for position, entry in enumerate(entries):
        try:
            layer, direction_from, scale = int(entry["layer"]), float(entry["direction_from"]), float(entry["scale"])
        except (KeyError, TypeError, ValueError):
            raise PipelineError(
                f"plan layers[{position}] needs numeric layer, direction_from and scale, got {entry!r}"
            ) from None
        if not 0 <= layer < num_layers:
            raise PipelineError(
                f"plan layer {layer} is out of range: the model has {num_layers} decoder layers (0-{num_layers - 1})"
            )
        if layer in layers:
            raise PipelineError(f"plan lists layer {layer} twice; keep one entry per layer")
        layers[layer] = LayerEdit(
            layer=layer,
            direction=direction_for(directions, direction_from),
            scale=scale,
            scales={
                "attn": float(entry.get("attn_scale", scale)),
                "mlp": float(entry.get("mlp_scale", scale)),
            },
        )
    first = layers[min(layers)]
    return ResolvedPlan(
        method=method,
        layers=layers,
        embed_direction=first.direction if embed else None,
        embed_scale=first.scale,
    )


def _planned(
    arch: Architecture, name: str, resolved: ResolvedPlan, num_layers: int, where: Where
) -> tuple[Tensor, float, int, Match | None] | None:
    """(unit direction, scale, hidden axis, match) when the plan edits tensor `name`, else None."""
    if resolved.embed_direction is not None and name == arch.embed_names[where]:
        return resolved.embed_direction, resolved.embed_scale, 1, None
    match = residual_writers(arch, name, num_layers, where)
    if match is None or match.layer not in resolved.layers:
        return None
    layer = resolved.layers[match.layer]
    return layer.direction, layer.scales[match.component], match.hidden_axis, match


def _edit_for(
    arch: Architecture, name: str, tensor: Tensor, resolved: ResolvedPlan, num_layers: int, where: Where
) -> tuple[Tensor, Match | None] | None:
    """The edited tensor (and its match) when the plan touches `name`, else None."""
    planned = _planned(arch, name, resolved, num_layers, where)
    if planned is None:
        return None
    direction, scale, hidden_axis, match = planned
    return EDITS[resolved.method](tensor, direction, scale, hidden_axis), match


def _check_coverage(resolved: ResolvedPlan, hits: set[tuple[int, str]], arch: Architecture, where: Where) -> None:
    """Every planned layer must have edited both an attention and an MLP writer (and the embedding
    when asked): a silent no-op would mean the table no longer matches the tensor names."""
    model_type = arch.model_type
    if resolved.embed_direction is not None and (-1, "embed") not in hits:
        raise PipelineError(
            f"no tensor named {arch.embed_names[where]} to edit for ablate.embed; "
            "the checkpoint's tensor names differ from pipeline/architectures.py"
        )
    for layer in sorted(resolved.layers):
        for component in ("attn", "mlp"):
            if (layer, component) not in hits:
                raise PipelineError(
                    f"plan layer {layer}: no {component} tensor matched the {model_type} table in "
                    "pipeline/architectures.py; the checkpoint's tensor names differ from the table"
                )


# --- in memory -------------------------------------------------------------------------------


@dataclass
class RestoreHandle:
    """The original values of the parameters `apply_plan_in_memory` edited (kept on CPU)."""

    originals: dict[str, tuple[nn.Parameter, Tensor]] = field(default_factory=dict)

    @property
    def edited(self) -> list[str]:
        return sorted(self.originals)

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the exact original tensors (bit-identical); safe to call more than once."""
        for parameter, original in self.originals.values():
            parameter.data.copy_(original)


@torch.no_grad()
def apply_plan_in_memory(
    model: nn.Module, plan: Mapping[str, Any], directions: Tensor, embed: bool = False
) -> RestoreHandle:
    """Edit the loaded model's parameters in place, as `edit_checkpoint` would edit its files.

    `directions` is the [num_layers, hidden] table for the plan's method (`directions_for_method`).
    Only the edited tensors are cloned (to CPU, so GPU memory is not doubled); `.restore()` undoes the edit.
    """
    config = model.config.to_dict()
    arch = get_architecture(config["model_type"])
    num_layers = num_decoder_layers(config)
    resolved = resolve_plan(plan, directions, num_layers, embed)
    handle = RestoreHandle()
    hits: set[tuple[int, str]] = set()
    for name, parameter in model.named_parameters():
        result = _edit_for(arch, name, parameter, resolved, num_layers, "memory")
        if result is None:
            continue
        if parameter.device.type == "meta":
            raise PipelineError(
                f"{name} is offloaded (meta device) and cannot be edited in memory; "
                "load the model without disk offload or use the ablate stage"
            )
        edited, match = result
        handle.originals[name] = (parameter, parameter.detach().to("cpu", copy=True))
        parameter.data.copy_(edited)
        hits.add((match.layer, match.component) if match is not None else (-1, "embed"))
    _check_coverage(resolved, hits, arch, "memory")
    return handle


# --- on disk ---------------------------------------------------------------------------------


def _copy_gaps(source: Path, target: Path, edits: Sequence[TensorEdit], progress: tqdm) -> None:
    """Copy every byte of `source` outside the `edits` ranges into the same offsets of `target`
    (already created at its full size), through the kernel (`sendfile`) where it can."""
    with open(source, "rb", buffering=0) as reader:
        size = os.fstat(reader.fileno()).st_size
        try:
            with open(target, "r+b", buffering=0) as writer:
                position = 0
                for begin, end in [*((edit.begin, edit.end) for edit in edits), (size, size)]:
                    _copy_range(reader, writer, position, begin)
                    progress.update(begin - position)
                    position = end
        except OSError as error:
            _raise_write_error(error, target)


def _write_edits(source: Path, target: Path, edits: Sequence[TensorEdit], stop: threading.Event, progress: tqdm) -> None:
    """Read each planned tensor of the shard `source`, edit it and write its bytes at its offset of
    `target`. Runs on the edit worker beside the copy of the gaps; `stop` ends it early when the
    copy failed."""
    with safe_open(source, framework="pt") as reader, open(target, "r+b", buffering=0) as writer:
        for edit in edits:
            if stop.is_set():
                return
            new_bytes = memoryview(edit.apply(reader.get_tensor(edit.name))).cast("B")
            try:
                _write_at(writer, edit.begin, new_bytes, edit.end - edit.begin, source)
            except OSError as error:
                _raise_write_error(error, target)
            progress.update(edit.end - edit.begin)


def _hash_when_written(editing: Future | None, target: Path) -> str:
    """sha256 of `target` once its edits (if any) are written: the copy of its gaps is already done."""
    if editing is not None:
        editing.result()
    return sha256_file(target)


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


def _weight_shards(source_dir: Path) -> tuple[list[str], str | None]:
    """(shard file names, index file name or None) of a safetensors checkpoint directory."""
    index = source_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        escaping = [shard for shard in shards if Path(shard).name != shard]
        if escaping:
            raise PipelineError(f"{index} names shard {escaping[0]!r} outside its directory; the index is corrupt")
        return shards, index.name
    if (source_dir / "model.safetensors").is_file():
        return ["model.safetensors"], None
    if any(path.suffix in (".bin", ".pt", ".pth") for path in source_dir.iterdir()):
        raise PipelineError(
            f"{source_dir} has only pickled .bin/.pt weights and we never unpickle; convert it to safetensors "
            "(e.g. load it yourself and save_pretrained(..., safe_serialization=True)) or use the model's safetensors revision"
        )
    raise PipelineError(f"{source_dir} has no model.safetensors or model.safetensors.index.json; point model at a HF checkpoint")


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


def _reject_quantized(config: Mapping[str, Any], tensor_names: list[str]) -> None:
    quantized = [name for name in tensor_names if name.endswith(QUANTIZED_SUFFIXES)]
    if "quantization_config" in config or quantized:
        example = quantized[0] if quantized else "config.json quantization_config"
        raise PipelineError(f"quantized experts not supported; use a bf16 dequantized checkpoint (found {example})")


def _tensor_names(source_dir: Path, shards: list[str]) -> list[str]:
    names: list[str] = []
    for shard in shards:
        with safe_open(source_dir / shard, framework="pt") as reader:
            names.extend(reader.keys())
    return names


def _model_card(
    plan: Mapping[str, Any], resolved: ResolvedPlan, source_dir: Path, arch: Architecture, cache_keys: Mapping[str, str]
) -> str:
    rows = "\n".join(
        f"| {entry['layer']} | {entry['direction_from']} | {layer.scales['attn']:g} | {layer.scales['mlp']:g} |"
        for entry in sorted(plan["layers"], key=lambda e: int(e["layer"]))
        for layer in [resolved.layers[int(entry["layer"])]]
    )
    model = plan.get("model", str(source_dir))
    embed = (
        f"Token embeddings: edited along layer {min(resolved.layers)}'s direction (scale {resolved.embed_scale:g}).\n"
        if resolved.embed_direction is not None
        else "Token embeddings: unchanged.\n"
    )
    caveat = f"\nNote: {arch.note}.\n" if arch.note else ""
    keys = "".join(f"- {stage}: `{key}`\n" for stage, key in sorted(cache_keys.items()))
    provenance = f"\nPipeline cache keys (`<cache.dir>/<stage>/<key>/`):\n\n{keys}" if keys else ""
    return (
        f"---\nbase_model: {model}\ntags:\n- abliterated\n---\n\n"
        f"# {model} (abliterated)\n\n"
        f"Source: `{model}` read from `{source_dir}`.\n\n"
        f"Method: `{resolved.method}`. Each listed decoder layer (0-based) had the refusal direction removed "
        "from its attention output projection and its MLP down projections (all experts, shared experts "
        "and biases included).\n\n"
        "| layer | direction_from | attn scale | mlp scale |\n|---|---|---|---|\n"
        f"{rows}\n\n{embed}{caveat}{provenance}"
    )


def _raise_write_error(error: OSError, path: Path) -> NoReturn:
    if error.errno in WRITE_ERRNOS:
        where = error.filename or path
        raise PipelineError(f"cannot write {where}: {error.strerror}; free disk space or choose a writable cache dir") from error
    raise error


@dataclass(frozen=True)
class TensorEdit:
    """One planned tensor of a shard: its byte range in the file and the edit that returns its new
    bytes. An edit keeps dtype and shape, so the new bytes fill exactly the old range."""

    name: str
    begin: int
    end: int
    apply: Callable[[Tensor], Any]


def _planned_edits(
    shard: Path,
    resolved: ResolvedPlan,
    arch: Architecture,
    num_layers: int,
    hits: set[tuple[int, str]],
    edited_names: list[str],
) -> list[TensorEdit]:
    """The shard's planned tensors in file order; applying one records it in `hits` and `edited_names`."""

    def apply(name: str, tensor: Tensor) -> Any:
        edited, match = _edit_for(arch, name, tensor, resolved, num_layers, "disk")
        hits.add((match.layer, match.component) if match is not None else (-1, "embed"))
        edited_names.append(name)
        return edited.contiguous().reshape(-1).view(torch.uint8).numpy()

    spans = _tensor_spans(shard)
    planned = [name for name in spans if _planned(arch, name, resolved, num_layers, "disk")]
    return sorted((TensorEdit(name, *spans[name], partial(apply, name)) for name in planned), key=lambda edit: edit.begin)


def _write_edited_copy(
    source_dir: Path,
    out_dir: Path,
    copies: list[Path],
    shards: list[str],
    hashes: dict[str, str],
    plan: Mapping[str, Any],
    resolved: ResolvedPlan,
    arch: Architecture,
    num_layers: int,
    progress: bool,
    cache_keys: Mapping[str, str],
    output_hashes: dict[str, str] | None,
) -> list[str]:
    """Copy every file of `copies` (shards, index, side files) into `out_dir`, hashing into `hashes` those
    not already there, with the planned tensors of each shard edited in its copy; write the model card.
    Returns the names of the edited tensors.

    Three things run side by side. This thread copies every byte that is not an edited tensor
    through the kernel; one worker reads, edits and writes the planned tensors, shard after shard,
    into the same (pre-sized) files; the hash workers hash each source file whose sha256 is not
    known while this thread copies it (the same pages, while they are in the page cache, so a cold
    checkpoint is read from disk once) and, with `output_hashes`, each written file once it is
    complete. The edits run ahead of the copy across files, so a checkpoint costs about the longest
    of copy, edit and hashing, not their sum (bench/ablate.py).
    """
    edited_names: list[str] = []
    hits: set[tuple[int, str]] = set()
    files = []
    for path in copies:
        relative = path.relative_to(source_dir).as_posix()
        target = out_dir / relative
        edits = _planned_edits(path, resolved, arch, num_layers, hits, edited_names) if relative in shards else []
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as created:
                created.truncate(path.stat().st_size)
        except OSError as error:
            _raise_write_error(error, target)
        files.append((path, target, relative, edits))
    total = sum(path.stat().st_size for path, *_ in files)
    stop = threading.Event()
    jobs: list[Future] = []
    with (
        ThreadPoolExecutor(1, thread_name_prefix="ablate-edit") as edit_worker,
        ThreadPoolExecutor(HASH_WORKERS, thread_name_prefix="ablate-hash") as hasher,
        tqdm(total=total, desc="ablate", unit="B", unit_scale=True, disable=not progress) as bar,
    ):
        try:
            editing = {
                relative: edit_worker.submit(_write_edits, path, target, edits, stop, bar)
                for path, target, relative, edits in files
                if edits
            }
            jobs += editing.values()
            source_hashes, written_hashes = {}, {}
            for path, target, relative, edits in files:
                if relative not in hashes:
                    source_hashes[relative] = hasher.submit(sha256_file, path)
                    jobs.append(source_hashes[relative])
                _copy_gaps(path, target, edits, bar)
                if output_hashes is not None:
                    written_hashes[relative] = hasher.submit(_hash_when_written, editing.get(relative), target)
                    jobs.append(written_hashes[relative])
                failed = [job for job in jobs if job.done() and not job.cancelled() and job.exception() is not None]
                if failed:
                    failed[0].result()  # a failed edit or read stops the copy now, not after the last file
            hashes.update({relative: job.result() for relative, job in source_hashes.items()})
            for job in editing.values():
                job.result()
            if output_hashes is not None:
                output_hashes.update({relative: job.result() for relative, job in written_hashes.items()})
        except BaseException:
            stop.set()
            for job in jobs:
                job.cancel()
            wait(jobs)
            raise
    _check_coverage(resolved, hits, arch, "disk")
    card = out_dir / "README.md"
    try:
        card.write_text(_model_card(plan, resolved, source_dir, arch, cache_keys))
    except OSError as error:
        _raise_write_error(error, card)
    if output_hashes is not None:
        output_hashes[card.name] = sha256_file(card)
    return edited_names


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


def edit_checkpoint(
    source_dir: Path,
    out_dir: Path,
    plan: Mapping[str, Any],
    directions: Tensor,
    progress: bool,
    embed: bool = False,
    source_hashes: Mapping[str, str] | None = None,
    cache_keys: Mapping[str, str] | None = None,
    hash_output: bool = False,
) -> dict[str, Any]:
    """Write an edited copy of the safetensors checkpoint in `source_dir` to `out_dir`, file by file.

    Every file is copied in one pass, in which each planned tensor's byte range gets its edited bytes
    instead of the source's: unedited tensors, shard headers and metadata stay the source's bytes, and
    memory holds one tensor (as float32) at a time. The index and every non-weight file (config, tokenizer, chat
    template) are copied too, and a README.md model card, written last, records the plan and the
    pipeline's `cache_keys` ({stage: key}) that produced it.
    `source_dir` is only ever read. The source's sha256 sums (for the manifest) are computed while
    each file is copied, except for files named in `source_hashes` ({relative POSIX path: sha256},
    e.g. a model-store manifest that was just verified), whose hashes are taken as given. With
    `hash_output`, every file written is hashed too, each as soon as it is complete (while it is in
    the page cache, beside the copy of the next), for a caller that records them in a manifest.
    On failure, what this call wrote is removed: nothing is left that looks like a finished model.
    Returns {"source", "source_files": {relative name: sha256}, "edited_tensors": [names]}, and
    "output_files": {relative name: sha256} with `hash_output`.
    """
    source_dir, out_dir = Path(source_dir).resolve(), Path(out_dir).resolve()
    if out_dir == source_dir or source_dir in out_dir.parents:
        raise PipelineError(f"output {out_dir} is inside the source checkpoint {source_dir}; choose another directory")
    shards, index_name = _weight_shards(source_dir)
    config = json.loads((source_dir / "config.json").read_text())
    arch = get_architecture(config.get("model_type", "<missing model_type>"))
    num_layers = num_decoder_layers(config)
    resolved = resolve_plan(plan, directions, num_layers, embed)
    _reject_quantized(config, _tensor_names(source_dir, shards))

    copies = [source_dir / shard for shard in shards] + ([source_dir / index_name] if index_name else [])
    copies += list(_side_files(source_dir))
    known = source_hashes or {}
    names = [path.relative_to(source_dir).as_posix() for path in copies]
    hashes = {name: known[name] for name in names if name in known}
    output_hashes: dict[str, str] | None = {} if hash_output else None
    existed = out_dir.exists()
    try:
        with _edit_threads():
            edited_names = _write_edited_copy(
                source_dir, out_dir, copies, shards, hashes, plan, resolved, arch, num_layers, progress,
                cache_keys or {}, output_hashes,
            )
    except BaseException:
        _remove_partial_output(out_dir, existed, copies, source_dir)
        raise
    report = {"source": str(source_dir), "source_files": dict(sorted(hashes.items())), "edited_tensors": sorted(edited_names)}
    if output_hashes is not None:
        report["output_files"] = dict(sorted(output_hashes.items()))
    return report


def _remove_partial_output(out_dir: Path, existed: bool, copies: list[Path], source_dir: Path) -> None:
    """After a failed edit: remove `out_dir` when this call created it, else the files it writes there."""
    if not existed:
        shutil.rmtree(out_dir, ignore_errors=True)
        return
    for path in [*copies, source_dir / "README.md"]:
        with suppress(OSError):
            (out_dir / path.relative_to(source_dir)).unlink(missing_ok=True)
