"""The plan search's space (`python -m pipeline.optimize`): `optimize.*` validated, and a trial's parameters as select settings.

A trial's parameters ARE select settings: `direction_from` (the depth fraction of the one shared
direction), `skip_first` / `skip_last` (the depth window), `scale` (the MLP writers), `attn_scale`
(the attention output) and `method`. The trial's plan is what `pipeline.selection.build_plan` writes
for them with every layer of the window kept (min_quality 0, relative_min 0, top_n = all layers), the
rule `mode=band` ships with; so a winner is the `mode=band select.*=...` overrides of `preset`.

The window never excludes every layer: `validate` requires the highs of `space.skip_first` and
`space.skip_last` to sum to less than 1, so floor(skip_first*L) + floor(skip_last*L) < L for every
sampled point and every depth L (the space is constrained, nothing sampled is thrown away).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import optuna
import yaml

from pipeline.errors import PipelineError
from pipeline.measurement import Measurements
from pipeline.plan import METHODS, plan_to_text, validate_plan
from pipeline.schema import check
from pipeline.selection import build_plan, settings_from_config

FLOAT_PARAMS = ("direction_from", "skip_first", "skip_last", "scale", "attn_scale")
"""The searched select settings besides `method`, as `optimize.space` names them: [low, high, step]."""
PARAMS = ("method", *FLOAT_PARAMS)
SEARCH_MODE = {"name": "search", "min_quality": 0.0}
"""The mode a trial's plan records; with top_n = all layers it keeps every layer of the window."""


@dataclass(frozen=True)
class Search:
    """`optimize.*`, validated by `validate`."""

    trials: int
    max_kl: float
    prune_above_kl: float | None
    export: bool
    startup_trials: int
    trial_max_new_tokens: int | None
    floats: Mapping[str, tuple[float, float, float]]
    """name -> (low, high, step)"""
    methods: tuple[str, ...]
    seeds: tuple[Mapping[str, Any], ...]


def _bounds(space: Mapping[str, Any]) -> dict[str, tuple[float, float, float]]:
    floats = {}
    for name in FLOAT_PARAMS:
        bounds = space.get(name)
        if not isinstance(bounds, Sequence) or len(bounds) != 3:
            raise PipelineError(f"optimize.space.{name} must be [low, high, step], got {bounds!r}")
        low, high, step = (float(value) for value in bounds)
        if not (low < high and step > 0) or (name == "direction_from" and not 0 <= low < high <= 1):
            raise PipelineError(f"optimize.space.{name}={list(bounds)} needs low < high, step > 0 (depths within [0, 1])")
        try:  # every point must be a setting select takes: its ranges are the schema's (select.scale <= 4, ...)
            for value in (low, high):
                check(f"select.{name}", value)
        except PipelineError as error:
            raise PipelineError(f"optimize.space.{name}={list(bounds)} leaves select's range: {error}") from None
        floats[name] = (low, high, step)
    highs = floats["skip_first"][1], floats["skip_last"][1]
    if sum(highs) >= 1:
        raise PipelineError(
            f"optimize.space.skip_first and skip_last may exclude every layer (highs {highs[0]:g} + {highs[1]:g} >= 1); "
            "lower their highs so they sum to less than 1"
        )
    return floats


def validate(settings: Mapping[str, Any]) -> Search:
    """Every rule on `optimize.*`, the cross-field ones included; mistakes are one-line PipelineErrors."""
    trials, max_kl, prune_above_kl = int(settings["trials"]), float(settings["max_kl"]), settings["prune_above_kl"]
    if trials < 1 or not (math.isfinite(max_kl) and max_kl >= 0):
        raise PipelineError(f"optimize.trials must be >= 1 and optimize.max_kl >= 0, got {trials} and {max_kl}")
    if prune_above_kl is not None and not float(prune_above_kl) >= max_kl:
        raise PipelineError(
            f"optimize.prune_above_kl={prune_above_kl} is below optimize.max_kl={max_kl:g}: trials that could be "
            "exported would never be generated for; raise it or set it to null"
        )
    tokens, startup = settings["trial_max_new_tokens"], int(settings["startup_trials"])
    if startup < 0 or (tokens is not None and int(tokens) < 1):
        raise PipelineError(
            f"optimize.startup_trials must be >= 0 and optimize.trial_max_new_tokens null or >= 1, got {startup} and {tokens}"
        )
    floats = _bounds(settings["space"])
    methods = tuple(settings["space"]["methods"])
    if not methods or any(method not in METHODS for method in methods):
        raise PipelineError(f"optimize.space.methods must be a non-empty subset of {', '.join(METHODS)}, got {methods}")
    seeds = tuple(dict(seed) for seed in settings["seeds"] or ())
    for number, seed in enumerate(seeds):
        if set(seed) != set(PARAMS):
            raise PipelineError(f"optimize.seeds[{number}] must set exactly {', '.join(sorted(PARAMS))}")
        outside = [name for name in FLOAT_PARAMS if not floats[name][0] <= seed[name] <= floats[name][1]]
        if outside or seed["method"] not in methods:
            raise PipelineError(f"optimize.seeds[{number}] lies outside optimize.space ({outside or seed['method']})")
    return Search(
        trials=trials,
        max_kl=max_kl,
        prune_above_kl=None if prune_above_kl is None else float(prune_above_kl),
        export=settings["export"] is True,
        startup_trials=startup,
        trial_max_new_tokens=None if tokens is None else int(tokens),
        floats=floats,
        methods=methods,
        seeds=seeds,
    )


def suggest(trial: optuna.Trial, search: Search) -> dict[str, Any]:
    params: dict[str, Any] = {
        name: trial.suggest_float(name, low, high, step=step) for name, (low, high, step) in search.floats.items()
    }
    params["method"] = trial.suggest_categorical("method", list(search.methods))
    return params


def select_values(params: Mapping[str, Any]) -> dict[str, Any]:
    """The trial's `select.*` values (Optuna's grid floats rounded: 0.15000000000000002 -> 0.15)."""
    return {name: params[name] if name == "method" else round(float(params[name]), 6) for name in PARAMS}


def selection_config(params: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """The `{mode, select}` config slice select reads (`settings_from_config`) that a trial stands for."""
    return {"mode": {**SEARCH_MODE, "top_n": num_layers}, "select": {"relative_min": 0.0, **select_values(params)}}


def trial_plan(params: Mapping[str, Any], measurements: Measurements, source_measurement: str) -> dict:
    """The plan select writes for the trial's settings, read back from its text: exactly what the export replays."""
    config = selection_config(params, int(measurements.meta["num_layers"]))
    settings = settings_from_config(config, "the trial's select settings")
    text = plan_to_text(build_plan(measurements, settings, source_measurement))
    return validate_plan(yaml.safe_load(text), "the trial's plan")


def preset(params: Mapping[str, Any]) -> list[str]:
    """The overrides that make `python -m pipeline` select the trial's layers, direction, scales and method.

    mode=band keeps every layer of the window; the plan select then writes differs from the trial's
    only in `mode` and `thresholds.top_n` (add mode.name=search mode.top_n=<num_layers> for the same bytes).
    """
    return ["mode=band", *(f"select.{name}={value}" for name, value in select_values(params).items())]


def plan_summary(plan: Mapping[str, Any]) -> dict[str, Any]:
    """What the settings do on this model: the direction's layer position and the window's layers."""
    layers = [entry["layer"] for entry in plan["layers"]]
    return {
        "direction_layer": plan["layers"][0]["direction_from"],
        "first_layer": min(layers),
        "last_layer": max(layers),
        "n_layers": len(layers),
    }
