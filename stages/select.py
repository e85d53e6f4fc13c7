"""The select stage: choose the layers to ablate from a measurement, and write the plan.

Layers are ranked by signal quality (best first, ties to the lower layer),
restricted to a depth window, and kept while their quality clears both the
absolute floor `mode.min_quality` and `select.relative_min` times the best
quality in the window; at most `mode.top_n` are kept. The same function
serves the stage and `python -m pipeline.regen`, so a committed plan is
exactly what the stage would write.

Selection never writes an empty plan: when nothing qualifies it fails with
the best qualities it saw and the override that would select them.

With `plan=<ablation.yaml>` the stage selects nothing: it replays that plan
(a search's winner, a reviewed hand edit) after checking it against the
measurement, and writes it back in canonical form. The file's sha256 is part
of the cache key, so editing the file re-runs select and everything after it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.artifacts import sha256_file
from pipeline.errors import PipelineError
from pipeline.paths import user_path
from pipeline.plan import DIRECTION_SOURCES, METHODS, read_plan, write_plan
from pipeline.stage import Stage, StageContext
from pipeline.stages.measure import Measurements, layers_by_quality, plot_quality, read_measurements

MODE_KEYS = ("name", "min_quality", "top_n")
MODE_IGNORED = ("presets",)
"""The mode group's per-kind presets have already been resolved into min_quality/top_n."""
SELECT_KEYS = ("relative_min", "skip_first", "skip_last", "direction_from", "scale", "attn_scale", "method")

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
    """Scale for the attention output projection; None: the same as `scale` (which covers the MLP writers)."""
    method: str


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PipelineError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def _section(config: Mapping[str, Any], name: str, keys: Sequence[str], ignored: Sequence[str]) -> Mapping[str, Any]:
    section = config.get(name)
    if not isinstance(section, Mapping):
        raise PipelineError(f"config has no {name} section; add {name}: with keys {', '.join(keys)}")
    missing = [key for key in keys if key not in section]
    unknown = sorted(str(key) for key in section if key not in keys and key not in ignored)
    if missing:
        raise PipelineError(f"{name} is missing {', '.join(f'{name}.{key}' for key in missing)}")
    if unknown:
        raise PipelineError(f"{name} has unknown key {', '.join(f'{name}.{key}' for key in unknown)}; remove it")
    return section


def _settings(config: Mapping[str, Any]) -> SelectionSettings:
    mode = _section(config, "mode", MODE_KEYS, MODE_IGNORED)
    select = _section(config, "select", SELECT_KEYS, ())
    top_n = mode["top_n"]
    if isinstance(top_n, bool) or not isinstance(top_n, int):
        raise PipelineError(f"mode.top_n must be an integer, got {top_n!r}")
    if top_n < 1:
        raise PipelineError(f"mode.top_n must be >= 1, got {top_n}")
    min_quality = _number(mode["min_quality"], "mode.min_quality")
    if min_quality < 0:
        raise PipelineError(f"mode.min_quality must be >= 0, got {mode['min_quality']}")
    relative_min = _number(select["relative_min"], "select.relative_min")
    if not 0 <= relative_min <= 1:
        raise PipelineError(f"select.relative_min must be within [0, 1], got {select['relative_min']}")
    for key in ("skip_first", "skip_last"):
        if not 0 <= _number(select[key], f"select.{key}") < 1:
            raise PipelineError(f"select.{key} must be within [0, 1), got {select[key]}")
    direction_from = select["direction_from"]
    is_depth = isinstance(direction_from, (int, float)) and not isinstance(direction_from, bool)
    if not (direction_from in DIRECTION_SOURCES or (is_depth and 0 <= direction_from <= 1)):
        raise PipelineError(
            f"select.direction_from must be one of {', '.join(DIRECTION_SOURCES)} or a depth fraction in [0, 1], "
            f"got {direction_from!r}"
        )
    if select["method"] not in METHODS:
        raise PipelineError(f"select.method must be one of {', '.join(METHODS)}, got {select['method']!r}")
    if not isinstance(mode["name"], str):
        raise PipelineError(f"mode.name must be a string, got {mode['name']!r}")
    return SelectionSettings(
        mode=mode["name"],
        min_quality=min_quality,
        top_n=top_n,
        relative_min=relative_min,
        skip_first=float(select["skip_first"]),
        skip_last=float(select["skip_last"]),
        direction_from=direction_from if not is_depth else float(direction_from),
        scale=_number(select["scale"], "select.scale"),
        attn_scale=None if select["attn_scale"] is None else _number(select["attn_scale"], "select.attn_scale"),
        method=select["method"],
    )


def settings_from_config(config: Mapping[str, Any], source: str | None = None) -> SelectionSettings:
    """Validated settings from `{mode: {name, min_quality, top_n}, select: {...}}`.

    That is both the stage's config slice and the content of a committed
    `select.yaml`; `source` names the file in error messages.
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
    return {
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
        "direction_source": settings.direction_from if isinstance(settings.direction_from, str) else "single",
        "layers": [
            {
                "layer": layer,
                "direction_from": direction_source_layer(settings.direction_from, layer, chosen, len(quality)),
                "scale": settings.scale,
                **({} if settings.attn_scale is None else {"attn_scale": settings.attn_scale}),
                "quality": quality[layer],
            }
            for layer in sorted(chosen)
        ],
    }


def direction_source_layer(direction_from: str | float, layer: int, chosen: Sequence[int], num_layers: int) -> int | float:
    """Where a planned layer takes its direction: itself, the best chosen layer, or a fixed depth.

    A depth fraction f names the (possibly fractional) layer f*(L-1), rounded to 2 decimals, the same
    convention as `python -m pipeline.optimize`'s `direction_depth`, so its winners translate directly.
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
    return plan


def input_digest(config: Mapping[str, Any], model_store: Path) -> dict[str, str]:
    """The replayed plan's content, so editing the file (not only renaming it) invalidates select."""
    if config.get("plan") is None:
        return {}
    return {"plan": sha256_file(replay_path(config["plan"]))}


def run(ctx: StageContext) -> None:
    measure_dir = ctx.inputs["measure"]
    measurements = read_measurements(measure_dir / "measurements.safetensors")
    if ctx.config.get("plan") is None:
        plan = build_plan(measurements, settings_from_config(ctx.config), source_measurement=measure_dir.name)
        title, threshold = f"{plan['model']}: mode {plan['mode']}, selected in red", plan["thresholds"]["min_quality"]
    else:
        path = replay_path(ctx.config["plan"])
        plan = replayed_plan(path, measurements)
        title, threshold = f"{plan['model']}: replayed {path.name}, planned layers in red", None
    write_plan(ctx.out_dir / "ablation.yaml", plan)
    plot_quality(
        ctx.out_dir / "selection.png",
        measurements.quality,
        title=title,
        selected=[entry["layer"] for entry in plan["layers"]],
        threshold=threshold,
    )


STAGE = Stage(
    name="select",
    version="1",
    needs=("measure",),
    config_keys=("mode", "select", "plan"),
    run=run,
    validate=settings_from_config,
    input_digest=input_digest,
)
