"""Layer selection: turn a measurement's per-layer qualities into an ablation plan.

Layers are ranked by signal quality (best first, ties to the lower layer),
restricted to a depth window, and kept while their quality clears both the
absolute floor `mode.min_quality` and `select.relative_min` times the best
quality in the window; at most `mode.top_n` are kept. The same function
serves the select stage, `python -m pipeline.regen` and the plan search,
so a committed plan is exactly what the stage would write.

Selection never writes an empty plan: when nothing qualifies it fails with
the best qualities it saw and the override that would select them.

With `plan=<ablation.yaml>` nothing is selected: `replayed_plan` checks that
plan (a search's winner, a reviewed hand edit) against the measurement.

A plan that removes several directions per layer (`select.directions`) is checked here against the
measurement's extra directions, so select fails, in one line, rather than the evaluate or ablate after it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.errors import PipelineError
from pipeline.paths import user_path
from pipeline.plan import DIRECTION_SOURCES, plan_directions, read_plan
from pipeline.schema import ModeConfig, SelectConfig, check
from pipeline.measurement import Measurements, layers_by_quality
from pipeline.weight_edit import direction_basis, directions_for_plan

SECTIONS = {"mode": ModeConfig, "select": SelectConfig}
"""The sections selection reads; their types and ranges are the schema's (`pipeline.schema`)."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelectionSettings:
    """The effective mode and select settings, validated by `settings_from_config`."""

    mode: str
    min_quality: float
    top_n: int
    relative_min: float
    skip_first: float
    skip_last: float
    direction_from: str | float
    """"own", "best", or a depth fraction f: one direction for every layer, from layer f*(L-1) (interpolated)."""
    scale: float
    attn_scale: float | None
    """Scale for the attention output projection; None: the same as `scale`."""
    mlp_scale: float | None
    """Scale for the MLP down projections; None: the same as `scale`."""
    directions: int
    """Directions removed per layer (`pipeline.plan`: the refusal direction, then the measured extra ones)."""
    method: str


def _settings(config: Mapping[str, Any]) -> SelectionSettings:
    for name, schema in SECTIONS.items():
        if not isinstance(config.get(name), Mapping):
            fields = ", ".join(schema.__dataclass_fields__)
            raise PipelineError(f"config has no {name} section; add {name}: with keys {fields}")
        check(name, config[name])
    mode, select = config["mode"], config["select"]
    direction_from = select["direction_from"]
    is_depth = isinstance(direction_from, (int, float)) and not isinstance(direction_from, bool)
    if not (direction_from in DIRECTION_SOURCES or (is_depth and 0 <= direction_from <= 1)):
        raise PipelineError(
            f"select.direction_from must be one of {', '.join(DIRECTION_SOURCES)} or a depth fraction in [0, 1], "
            f"got {direction_from!r}"
        )
    return SelectionSettings(
        mode=mode["name"],
        min_quality=float(mode["min_quality"]),
        top_n=mode["top_n"],
        relative_min=float(select["relative_min"]),
        skip_first=float(select["skip_first"]),
        skip_last=float(select["skip_last"]),
        direction_from=direction_from if not is_depth else float(direction_from),
        scale=float(select["scale"]),
        attn_scale=None if select["attn_scale"] is None else float(select["attn_scale"]),
        mlp_scale=None if select["mlp_scale"] is None else float(select["mlp_scale"]),
        directions=select["directions"],
        method=str(select["method"]),
    )


def settings_from_config(config: Mapping[str, Any], source: str | None = None) -> SelectionSettings:
    """Validated settings from `{mode: {name, min_quality, top_n}, select: {...}}`.

    That is both the stage's config slice and the content of a committed
    `select.yaml`; `source` names the file in error messages. Types, ranges and
    keys are checked against the schema (`pipeline.schema.check`, strictly: a
    string is never a number); `select.direction_from`, a union, is checked here.
    """
    try:
        return _settings(config)
    except PipelineError as error:
        if source is None:
            raise
        raise PipelineError(f"{source}: {error}") from None


def depth_window(num_layers: int, settings: SelectionSettings) -> range:
    """The layers selection may choose: floor(skip_first*L) first and floor(skip_last*L) last layers excluded."""
    # The epsilon keeps 0.29 * 100 (= 28.999999999999996) from losing a layer to float rounding.
    first = math.floor(settings.skip_first * num_layers + 1e-9)
    last = math.floor(settings.skip_last * num_layers + 1e-9)
    if first + last >= num_layers:
        raise PipelineError(
            f"select.skip_first={settings.skip_first:g} and select.skip_last={settings.skip_last:g} exclude "
            f"all {num_layers} layers ({first} first, {last} last); lower them"
        )
    return range(first, num_layers - last)


def _round_down_one_digit(value: float) -> str:
    """The largest one-significant-digit number <= value, as text: 0.0093 -> '0.009'."""
    exponent = math.floor(math.log10(value))
    step = 10.0**exponent
    digit = math.floor(round(value / step, 9))
    return f"{digit * step:.{max(0, -exponent)}f}"


def _nothing_qualifies(
    quality: Sequence[float], candidates: Sequence[int], window: range, settings: SelectionSettings
) -> PipelineError:
    where = "no layer" if len(window) == len(quality) else f"no layer in {window.start}..{window.stop - 1}"
    best = quality[candidates[0]]
    if best <= 0:
        return PipelineError(
            f"{where} separates harmful from harmless activations (all qualities are 0); check the prompt sets"
        )
    shown = ", ".join(f"layer {layer} {quality[layer]:.4g}" for layer in candidates[:3])
    return PipelineError(
        f"{where} has quality >= {settings.min_quality:g} (best: {shown}); "
        f"try mode.min_quality={_round_down_one_digit(best)}"
    )


def select_layers(quality: Sequence[float], settings: SelectionSettings) -> list[int]:
    """The chosen layers, best first. Raises PipelineError rather than return an empty list.

    A layer of quality 0 has no direction (its class means coincide), so it is
    never chosen, even with `mode.min_quality=0`.
    """
    window = depth_window(len(quality), settings)
    candidates = [layer for layer in layers_by_quality(quality) if layer in window]
    floor = max(settings.min_quality, settings.relative_min * quality[candidates[0]])
    chosen = [layer for layer in candidates if quality[layer] >= floor and quality[layer] > 0][: settings.top_n]
    if not chosen:
        raise _nothing_qualifies(quality, candidates, window, settings)
    return chosen


def build_plan(measurements: Measurements, settings: SelectionSettings, source_measurement: str) -> dict:
    """The plan dict for `pipeline.plan.write_plan`: chosen layers sorted by layer number."""
    quality = measurements.quality
    chosen = select_layers(quality, settings)
    plan = {
        "model": measurements.meta["model_id"],
        "model_fingerprint": measurements.meta["model_fingerprint"],
        "hidden_size": int(measurements.meta["hidden_size"]),
        "num_layers": int(measurements.meta["num_layers"]),
        "source_measurement": source_measurement,
        "mode": settings.mode,
        "thresholds": {
            "min_quality": settings.min_quality,
            "top_n": settings.top_n,
            "relative_min": settings.relative_min,
            "skip_first": settings.skip_first,
            "skip_last": settings.skip_last,
        },
        "method": settings.method,
        **({} if settings.directions == 1 else {"directions": settings.directions}),
        "direction_source": settings.direction_from if isinstance(settings.direction_from, str) else "single",
        "layers": [
            {
                "layer": layer,
                "direction_from": direction_source_layer(settings.direction_from, layer, chosen, len(quality)),
                "scale": settings.scale,
                **({} if settings.attn_scale is None else {"attn_scale": settings.attn_scale}),
                **({} if settings.mlp_scale is None else {"mlp_scale": settings.mlp_scale}),
                "quality": quality[layer],
            }
            for layer in sorted(chosen)
        ],
    }
    check_directions(plan, measurements)
    return plan


def check_directions(plan: Mapping[str, Any], measurements: Measurements) -> None:
    """Refuse a plan whose directions the measurement cannot give: more per layer than it stores (a streamed
    collect stores none), or fewer at a planned layer's source than its prompts span. A one-direction plan is
    checked where it is applied, as before the option."""
    if plan_directions(plan) == 1:
        return
    table = directions_for_plan(measurements.tensors, plan)
    for entry in plan["layers"]:
        direction_basis(table, entry["direction_from"])


def direction_source_layer(direction_from: str | float, layer: int, chosen: Sequence[int], num_layers: int) -> int | float:
    """Where a planned layer takes its direction: itself, the best chosen layer, or a fixed depth.

    A depth fraction f names the (possibly fractional) layer f*(L-1), rounded to 2 decimals; the plan
    search samples this same setting, so its winners are select overrides.
    """
    if direction_from == "own":
        return layer
    if direction_from == "best":
        return chosen[0]
    position = round(float(direction_from) * (num_layers - 1), 2)
    return int(position) if position == int(position) else position


def replay_path(value: Any) -> Path:
    """The file named by `plan=`; a path that is not a file is the user's mistake, said in one line."""
    path = user_path(str(value))
    if not path.is_file():
        raise PipelineError(f"plan={value}: {path} does not exist; give the path of an ablation.yaml")
    return path


def replayed_plan(path: Path, measurements: Measurements) -> dict:
    """The plan in `path`, validated, after checking it was made for a model of the measured shape."""
    plan = read_plan(path)
    measured = {"hidden_size": int(measurements.meta["hidden_size"]), "num_layers": int(measurements.meta["num_layers"])}
    for key, value in measured.items():
        if plan[key] != value:
            raise PipelineError(
                f"plan {path} is for a model with {key}={plan[key]}, the measurement has {value}; "
                "replay a plan made for this model"
            )
    if plan["model_fingerprint"] != measurements.meta["model_fingerprint"]:
        log.warning("plan %s was made for another checkpoint of the same shape (%s); replaying it anyway", path, plan["model"])
    check_directions(plan, measurements)
    return plan
