"""The measurement format (`measurements.safetensors`): per-layer directions and statistics, and their ranking.

It is the hand-off from `measure` to `select`, `ablate`, `evaluate` and `regen`, and a file people
commit (tests/plans/): float32 [num_layers, hidden] directions, float64 [num_layers] statistics, and
metadata strings that say which model and prompts it was measured on. Reading refuses anything that
would need unpickling and any file whose tensors disagree with its own metadata.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors import safe_open

from pipeline.artifacts import save_tensors
from pipeline.errors import PipelineError

COPIED_METADATA = (
    "model_id",
    "model_fingerprint",
    "model_type",
    "hidden_size",
    "num_layers",
    "is_moe",
    "position",
    "harmful_sha256",
    "harmless_sha256",
)
"""Facts about the model and prompts that travel from the collect artifact into the measurement."""

DIRECTION_TENSORS = ("harmful_mean", "harmless_mean", "refusal_direction", "biprojected_direction")
"""[num_layers, hidden] tensors, stored as float32."""

STATISTIC_TENSORS = (
    "cos",
    "snr",
    "signal_quality",
    "harmful_spread",
    "harmless_spread",
    "harmful_proj_var",
    "harmless_proj_var",
)
"""[num_layers] tensors, stored as float64."""

EXTRA_DIRECTIONS = "directions_extra"
"""Optional [num_layers, MAX_DIRECTIONS - 1, hidden] float32: per layer, the top principal directions of the
harmful activations minus the harmless mean, refusal direction projected out (`select.directions` > 1). Only a
collect artifact that kept every activation has them; a row is zero where the prompts span fewer directions."""

STREAMED_TENSORS = tuple(f"{label}_{part}" for label in ("harmful", "harmless") for part in ("sum", "sumsq", "count"))
"""What a streamed collect artifact (`activations: streamed`) holds instead of `harmful`/`harmless`."""

MEASUREMENT_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class Measurements:
    """A measurement file's metadata and tensors, as `read_measurements` returns them."""

    meta: Mapping[str, str]
    tensors: Mapping[str, torch.Tensor]

    @property
    def quality(self) -> list[float]:
        return self.tensors["signal_quality"].tolist()



def read_measurements(path: Path) -> Measurements:
    """Read a `measurements.safetensors` file, refusing anything that would need unpickling."""
    path = Path(path)
    if path.suffix != MEASUREMENT_SUFFIX:
        raise PipelineError(f"{path}: we never unpickle; measurements must be {MEASUREMENT_SUFFIX}")
    if not path.is_file():
        raise PipelineError(f"measurement {path} does not exist; run the measure stage or fix the path")
    expected = set(DIRECTION_TENSORS) | set(STATISTIC_TENSORS)
    with safe_open(path, framework="pt") as measurements:
        meta = dict(measurements.metadata() or {})
        missing = sorted(expected - set(measurements.keys())) + [k for k in COPIED_METADATA if k not in meta]
        if missing:
            raise PipelineError(f"{path} is not a measurement file (missing {', '.join(missing)}); re-run measure")
        optional = {EXTRA_DIRECTIONS} & set(measurements.keys())  # absent from streamed and older measurements
        tensors = {name: measurements.get_tensor(name) for name in sorted(expected | optional)}
    num_layers, hidden_size = tensors["refusal_direction"].shape
    check_measurement_matches(meta, hidden_size=hidden_size, num_layers=num_layers, source=str(path))
    extra = tensors.get(EXTRA_DIRECTIONS)
    if extra is not None and (extra.dim() != 3 or extra.shape[0] != num_layers or extra.shape[2] != hidden_size):
        raise PipelineError(
            f"{path}: {EXTRA_DIRECTIONS} has shape {list(extra.shape)}, expected [{num_layers}, k, {hidden_size}]; "
            "re-run measure"
        )
    return Measurements(meta=meta, tensors=tensors)


def layers_by_quality(quality: Sequence[float]) -> list[int]:
    """Layer numbers best first: quality descending, ties broken by the lower layer number."""
    return sorted(range(len(quality)), key=lambda layer: (-quality[layer], layer))


def write_layers_csv(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """One row per layer with its rank (1 = best), fixed formatting so the file diffs cleanly."""
    quality = tensors["signal_quality"].tolist()
    rank = {layer: position + 1 for position, layer in enumerate(layers_by_quality(quality))}
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["layer", "cos", "snr", "quality", "rank"])
        for layer, (cos, snr) in enumerate(zip(tensors["cos"].tolist(), tensors["snr"].tolist())):
            writer.writerow([layer, f"{cos:.6f}", f"{snr:.6f}", f"{quality[layer]:.6f}", rank[layer]])



def write_measurements(path: Path, measurements: Measurements) -> None:
    """Save as safetensors: tensors plus the metadata strings `read_measurements` checks."""
    tensors = {name: tensor.contiguous() for name, tensor in measurements.tensors.items()}
    save_tensors(tensors, path, metadata=dict(measurements.meta))



def check_measurement_matches(meta: Mapping[str, str], hidden_size: int, num_layers: int, source: str) -> None:
    """Refuse a measurement taken on a model of another shape than the one it is applied to."""
    try:
        measured_hidden, measured_layers = int(meta["hidden_size"]), int(meta["num_layers"])
    except (KeyError, ValueError):
        raise PipelineError(
            f"measurement {source} has no valid hidden_size/num_layers metadata; re-run the measure stage"
        ) from None
    fix = "measure this model instead of reusing that measurement"
    if measured_hidden != hidden_size:
        raise PipelineError(
            f"measurement {source} is from a model with hidden size {measured_hidden}, "
            f"this model has {hidden_size}; {fix}"
        )
    if measured_layers != num_layers:
        raise PipelineError(
            f"measurement {source} is from a model with {measured_layers} layers, this model has {num_layers}; {fix}"
        )
