"""Refusal directions and signal quality from collected activations, per decoder layer.

For each layer it computes, in float64, the class means, the refusal direction
(the normalized difference of means), and the signal quality
`(1 - cos(mean_harmful, mean_harmless)) * snr` that `select` ranks layers by.
It also keeps what a later stage or a person needs to judge a direction:
the direction with the harmless mean projected out ("biprojected"), and the
within-class spread, so a large difference of means can be told apart from a
noisy one. From kept activations it also finds the directions for
`select.directions` > 1 (`extra_directions`).

Activations are read one layer at a time (safetensors slices), so memory stays
near one layer of activations however deep the model is. A streamed collect
artifact (`collect.keep_activations=false`) holds per-layer sums instead; it
gives the same means, directions and quality, the spread from E|x|^2 - |mean|^2,
and NaN for the projection variances and no extra directions, which would need every activation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open

from pipeline.errors import PipelineError
from pipeline.measurement import COPIED_METADATA, DIRECTION_TENSORS, EXTRA_DIRECTIONS, STREAMED_TENSORS, Measurements
from pipeline.schema import MAX_DIRECTIONS

FORMULA_VERSION = 1
"""Written into every measurement's metadata; bump it, and the measure stage's version, when a formula below changes."""

_TINY = torch.finfo(torch.float64).tiny
"""Denominator floor: a zero-norm mean gives a zero direction and zero quality instead of NaN."""


def layer_statistics(harmful: torch.Tensor, harmless: torch.Tensor) -> dict[str, torch.Tensor]:
    """All per-layer quantities for one layer, from [n, hidden] activations of each class, in float64."""
    harmful = harmful.to(torch.float64)
    harmless = harmless.to(torch.float64)
    harmful_mean = harmful.mean(dim=0)
    harmless_mean = harmless.mean(dim=0)
    stats = mean_statistics(harmful_mean, harmless_mean)
    direction = stats["refusal_direction"]
    return {
        **stats,
        "harmful_spread": (harmful - harmful_mean).square().sum(dim=1).mean(),
        "harmless_spread": (harmless - harmless_mean).square().sum(dim=1).mean(),
        "harmful_proj_var": (harmful @ direction).var(correction=0),
        "harmless_proj_var": (harmless @ direction).var(correction=0),
    }


def extra_directions(harmful: torch.Tensor, harmless_mean: torch.Tensor, direction: torch.Tensor, count: int) -> torch.Tensor:
    """[count, hidden] float64: the top principal directions of the harmful activations minus the harmless mean,
    with the unit refusal `direction` projected out first, so they are orthonormal and orthogonal to it.

    The differences' mean is the difference of means, which lies along `direction`: after the projection they are
    centred, and their principal directions are where harmful prompts differ from harmless ones besides the mean
    direction (a second kind of request, a cluster of prompts). Rows past the differences' rank are zero. Each row's
    sign makes its largest component positive, so the file does not depend on the SVD routine's sign choice.
    """
    differences = harmful.to(torch.float64) - harmless_mean
    scale = differences.norm()
    differences = differences - torch.outer(differences @ direction, direction)
    _, singular, right = torch.linalg.svd(differences, full_matrices=False)
    rows = torch.zeros(count, harmful.shape[1], dtype=torch.float64)
    kept = min(count, right.shape[0])
    rows[:kept] = right[:kept] * (singular[:kept] > 1e-9 * scale).unsqueeze(1)  # rounding noise is no direction
    signs = torch.sign(rows.gather(1, rows.abs().argmax(dim=1, keepdim=True)))
    return rows * torch.where(signs == 0, 1.0, signs)


def streamed_layer_statistics(
    sums: Mapping[str, torch.Tensor], sumsqs: Mapping[str, torch.Tensor], counts: Mapping[str, int]
) -> dict[str, torch.Tensor]:
    """One layer's quantities from per-class float64 sums ([hidden]) and sums of squared norms (scalars)."""
    means = {label: sums[label] / counts[label] for label in ("harmful", "harmless")}
    spread = {
        label: (sumsqs[label] / counts[label] - means[label].dot(means[label])).clamp_min(0.0) for label in means
    }
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    return {
        **mean_statistics(means["harmful"], means["harmless"]),
        "harmful_spread": spread["harmful"],
        "harmless_spread": spread["harmless"],
        "harmful_proj_var": nan,
        "harmless_proj_var": nan.clone(),
    }


def mean_statistics(harmful_mean: torch.Tensor, harmless_mean: torch.Tensor) -> dict[str, torch.Tensor]:
    """Everything that depends on the two class means only: directions, cos, snr, quality."""
    difference = harmful_mean - harmless_mean
    difference_norm = difference.norm()
    harmful_norm = harmful_mean.norm()
    harmless_norm = harmless_mean.norm()

    direction = difference / difference_norm.clamp_min(_TINY)
    cos = harmful_mean.dot(harmless_mean) / (harmful_norm * harmless_norm).clamp_min(_TINY)
    snr = difference_norm / ((harmful_norm + harmless_norm) / 2).clamp_min(_TINY)

    harmless_unit = harmless_mean / harmless_norm.clamp_min(_TINY)
    biprojected = direction - direction.dot(harmless_unit) * harmless_unit
    biprojected = biprojected / biprojected.norm().clamp_min(_TINY)

    return {
        "harmful_mean": harmful_mean,
        "harmless_mean": harmless_mean,
        "refusal_direction": direction,
        "biprojected_direction": biprojected,
        "cos": cos,
        "snr": snr,
        "signal_quality": (1 - cos) * snr,
    }



def measure_activations(activations_path: Path) -> Measurements:
    """Measure every layer of a collect artifact's `activations.safetensors`."""
    with safe_open(activations_path, framework="pt") as activations:
        meta = dict(activations.metadata() or {})
        missing = [key for key in COPIED_METADATA if key not in meta]
        names = set(activations.keys())
        streamed = set(STREAMED_TENSORS) <= names
        if missing or not (streamed or {"harmful", "harmless"} <= names):
            raise PipelineError(
                f"{activations_path} is not a collect artifact (missing {missing or 'harmful/harmless tensors'}); "
                "re-run the collect stage"
            )
        num_layers, hidden_size = int(meta["num_layers"]), int(meta["hidden_size"])
        if streamed:
            per_layer = _streamed_per_layer(activations, activations_path, num_layers, hidden_size)
        else:
            per_layer = _kept_per_layer(activations, activations_path, num_layers, hidden_size)
    tensors = {name: torch.stack([stats[name] for stats in per_layer]) for name in per_layer[0]}
    for name in (*DIRECTION_TENSORS, EXTRA_DIRECTIONS):
        if name in tensors:
            tensors[name] = tensors[name].to(torch.float32)
    meta = {key: meta[key] for key in COPIED_METADATA}
    meta["formula_version"] = str(FORMULA_VERSION)
    return Measurements(meta=meta, tensors=tensors)


def _kept_per_layer(activations, path: Path, num_layers: int, hidden_size: int) -> list[dict[str, torch.Tensor]]:
    """Statistics of every layer from [n, num_layers, hidden] activations, one layer slice at a time."""
    harmful = activations.get_slice("harmful")
    harmless = activations.get_slice("harmless")
    shapes = {"harmful": harmful.get_shape(), "harmless": harmless.get_shape()}
    for name, shape in shapes.items():
        if len(shape) != 3 or shape[0] < 1 or shape[1:] != [num_layers, hidden_size]:
            raise PipelineError(
                f"{path}: tensor {name} has shape {shape}, expected "
                f"[n >= 1, {num_layers}, {hidden_size}] from its metadata; re-run the collect stage"
            )
    return [_kept_layer(harmful[:, layer, :], harmless[:, layer, :]) for layer in range(num_layers)]


def _kept_layer(harmful: torch.Tensor, harmless: torch.Tensor) -> dict[str, torch.Tensor]:
    """One layer's statistics and its extra directions, from that layer's activations of each class."""
    stats = layer_statistics(harmful, harmless)
    extra = extra_directions(harmful, stats["harmless_mean"], stats["refusal_direction"], MAX_DIRECTIONS - 1)
    return {**stats, EXTRA_DIRECTIONS: extra}


def _streamed_per_layer(activations, path: Path, num_layers: int, hidden_size: int) -> list[dict[str, torch.Tensor]]:
    """Statistics of every layer from a streamed artifact's per-class sums."""
    expected = {"sum": [num_layers, hidden_size], "sumsq": [num_layers], "count": []}
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    for label in ("harmful", "harmless"):
        for part, shape in expected.items():
            tensor = activations.get_tensor(f"{label}_{part}")
            if list(tensor.shape) != shape:
                raise PipelineError(
                    f"{path}: tensor {label}_{part} has shape {list(tensor.shape)}, expected {shape} "
                    "from its metadata; re-run the collect stage"
                )
            loaded.setdefault(part, {})[label] = tensor
    counts = {label: int(count) for label, count in loaded["count"].items()}
    if min(counts.values()) < 1:
        raise PipelineError(f"{path}: a class has no prompts ({counts}); re-run the collect stage")
    return [
        streamed_layer_statistics(
            {label: tensor[layer].to(torch.float64) for label, tensor in loaded["sum"].items()},
            {label: tensor[layer].to(torch.float64) for label, tensor in loaded["sumsq"].items()},
            counts,
        )
        for layer in range(num_layers)
    ]
