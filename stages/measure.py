"""The measure stage: per decoder layer, how well harmful and harmless activations separate.

For each layer it computes, in float64, the class means, the refusal direction
(the normalized difference of means), and the signal quality
`(1 - cos(mean_harmful, mean_harmless)) * snr` that `select` ranks layers by.
It also keeps what a later stage or a person needs to judge a direction:
the direction with the harmless mean projected out ("biprojected"), and the
within-class spread, so a large difference of means can be told apart from a
noisy one.

Activations are read one layer at a time (safetensors slices), so memory stays
near one layer of activations however deep the model is. A streamed collect
artifact (`collect.keep_activations=false`) holds per-layer sums instead; it
gives the same means, directions and quality, the spread from E|x|^2 - |mean|^2,
and NaN for the projection variances, which would need every activation.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from safetensors import safe_open

from pipeline.artifacts import save_tensors
from pipeline.errors import PipelineError
from pipeline.plan import check_measurement_matches
from pipeline.stage import Stage, StageContext

FORMULA_VERSION = 1
"""Bump together with `measure.formula_version` in conf/config.yaml when a formula below changes."""

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

STREAMED_TENSORS = tuple(f"{label}_{part}" for label in ("harmful", "harmless") for part in ("sum", "sumsq", "count"))
"""What a streamed collect artifact (`activations: streamed`) holds instead of `harmful`/`harmless`."""

MEASUREMENT_SUFFIX = ".safetensors"

_TINY = torch.finfo(torch.float64).tiny
"""Denominator floor: a zero-norm mean gives a zero direction and zero quality instead of NaN."""


@dataclass(frozen=True)
class Measurements:
    """A measurement file's metadata and tensors, as `read_measurements` returns them."""

    meta: Mapping[str, str]
    tensors: Mapping[str, torch.Tensor]

    @property
    def quality(self) -> list[float]:
        return self.tensors["signal_quality"].tolist()


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


def measure_activations(activations_path: Path, formula_version: int) -> Measurements:
    """Measure every layer of a collect artifact's `activations.safetensors`."""
    if formula_version != FORMULA_VERSION:
        raise PipelineError(
            f"measure.formula_version={formula_version} is unknown; this code implements "
            f"measure.formula_version={FORMULA_VERSION}"
        )
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
    for name in DIRECTION_TENSORS:
        tensors[name] = tensors[name].to(torch.float32)
    meta = {key: meta[key] for key in COPIED_METADATA}
    meta["formula_version"] = str(formula_version)
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
    return [layer_statistics(harmful[:, layer, :], harmless[:, layer, :]) for layer in range(num_layers)]


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
        tensors = {name: measurements.get_tensor(name) for name in sorted(expected)}
    num_layers, hidden_size = tensors["refusal_direction"].shape
    check_measurement_matches(meta, hidden_size=hidden_size, num_layers=num_layers, source=str(path))
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


def plot_quality(
    path: Path, quality: Sequence[float], title: str, selected: Sequence[int] = (), threshold: float | None = None
) -> None:
    """Quality by layer as a bar chart; `selected` layers in red, `threshold` as a dashed line."""
    figure = Figure(figsize=(8, 3.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    chosen = set(selected)
    colours = ["tab:red" if layer in chosen else "tab:blue" for layer in range(len(quality))]
    axes.bar(range(len(quality)), quality, color=colours)
    if threshold is not None:
        axes.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"mode.min_quality={threshold:g}")
        axes.legend(loc="upper left")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("decoder layer (0-based)")
    axes.set_ylabel("signal quality")
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100, metadata={"Software": None})


def write_measurements(path: Path, measurements: Measurements) -> None:
    """Save as safetensors: tensors plus the metadata strings `read_measurements` checks."""
    tensors = {name: tensor.contiguous() for name, tensor in measurements.tensors.items()}
    save_tensors(tensors, path, metadata=dict(measurements.meta))


def run(ctx: StageContext) -> None:
    measurements = measure_activations(
        ctx.inputs["collect"] / "activations.safetensors",
        formula_version=int(ctx.config["measure"]["formula_version"]),
    )
    write_measurements(ctx.out_dir / "measurements.safetensors", measurements)
    write_layers_csv(ctx.out_dir / "layers.csv", measurements.tensors)
    plot_quality(ctx.out_dir / "quality.png", measurements.quality, title=measurements.meta["model_id"])


STAGE = Stage(name="measure", version="1", needs=("collect",), config_keys=("measure",), run=run)
