"""The plan search's space: `hydra.sweeper.*` validated, and a trial's values as the overrides of its pipeline job.

A searched parameter is any setting of the pipeline's config, nested as in the config itself
(`select: {scale: {low: 0.0, high: 1.5, step: 0.05}}`), so one YAML line searches one more setting. A leaf
is a range (`low`, `high`, optional `step`) or a list of `choices`; a range is sampled as integers when the
setting is an integer in the schema (`select.directions`), as numbers otherwise. A trial's values become
overrides (`select.scale=1.25`) of an ordinary `python -m pipeline` job, so the trial's plan is the one
select writes for them, and the chosen trial's overrides reproduce it in a single run.

Every bound, choice and seed value must be a value the setting takes: the schema's types and ranges
(`pipeline.schema.check`, e.g. `select.scale` <= 4) here, the stages' own validate steps where the search
starts (`pipeline.search.point_checker`). The depth window never excludes every layer: when both
`select.skip_first` and `select.skip_last` are searched their highs must sum to less than 1, so
floor(skip_first*L) + floor(skip_last*L) < L for every sampled point and every depth L.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException

from pipeline.errors import PipelineError
from pipeline.schema import check, lookup, unwrap_optional
from pipeline.search_schema import SearchSweeperConf

NODE = "hydra.sweeper"
RANGE_KEYS, CHOICE_KEYS = frozenset({"low", "high", "step"}), frozenset({"choices"})
WINDOW = ("select.skip_first", "select.skip_last")
"""Searched together, their highs must sum to < 1 (a window that keeps at least one layer)."""
PLAIN_TEXT = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Param:
    """One searched setting: `key` is its dotted name in the config (`select.scale`)."""

    key: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    choices: tuple[Any, ...] | None = None
    integer: bool = False

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1))
        return trial.suggest_float(self.key, self.low, self.high, step=self.step)

    def contains(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high

    def endpoints(self) -> tuple[Any, ...]:
        return self.choices if self.choices is not None else (self.low, self.high)

    def describe(self) -> dict[str, Any]:
        return {"choices": list(self.choices)} if self.choices is not None else {
            "low": self.low, "high": self.high, "step": self.step, "integer": self.integer}


@dataclass(frozen=True)
class Search:
    """`hydra.sweeper.*`, validated by `validate`."""

    n_trials: int
    n_jobs: int | None
    max_kl: float
    startup_trials: int
    export: bool
    trial_overrides: tuple[str, ...]
    params: tuple[Param, ...]
    seeds: tuple[dict[str, Any], ...]
    """Each a complete point: {param key: value}."""

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(param.key for param in self.params)


def flat(tree: Mapping[str, Any], is_leaf: Callable[[Any], bool], prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf} of a nested mapping (`{select: {scale: x}}` -> `{select.scale: x}`)."""
    leaves = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if is_leaf(value):
            leaves[key] = value
        elif isinstance(value, Mapping) and value:
            leaves.update(flat(value, is_leaf, f"{key}."))
        else:
            raise PipelineError(f"{NODE}.params.{key} must be {{low, high[, step]}} or {{choices: [...]}}, got {value!r}")
    return leaves


def _is_param(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and set(value) <= RANGE_KEYS | CHOICE_KEYS


def _param(key: str, leaf: Mapping[str, Any], check_value: Callable[[str, Any], None]) -> Param:
    where = f"{NODE}.params.{key}"
    found = lookup(key)
    kind = unwrap_optional(found[0])[0] if found is not None else None
    if found is None or hasattr(kind, "__dataclass_fields__"):
        raise PipelineError(f"{where}: {key} is not a setting of the pipeline; name one, e.g. select.scale")
    if set(leaf) & CHOICE_KEYS:
        choices = leaf["choices"]
        if set(leaf) != CHOICE_KEYS or not isinstance(choices, (list, tuple)) or not choices:
            raise PipelineError(f"{where} must be {{choices: [a, b, ...]}} (non-empty, no low/high), got {dict(leaf)}")
        param = Param(key, choices=tuple(choices))
    else:
        low, high, step = leaf.get("low"), leaf.get("high"), leaf.get("step")
        numbers = [value for value in (low, high, step) if value is not None]
        if low is None or high is None or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in numbers):
            raise PipelineError(f"{where} must be {{low: <number>, high: <number>, step: <number or null>}}, got {dict(leaf)}")
        if not (low < high and (step is None or step > 0)):
            raise PipelineError(f"{where} needs low < high and step > 0, got {dict(leaf)}")
        integer = kind is int
        if integer and not all(float(value).is_integer() for value in numbers):
            raise PipelineError(f"{where}: {key} is an integer setting; give whole-number low, high and step")
        param = Param(key, low, high, step, integer=integer)
    for value in param.endpoints():
        try:
            check_value(key, value)
        except PipelineError as error:
            raise PipelineError(f"{where} reaches a value {key} does not take: {error}") from None
    return param


def _seed(number: int, seed: Any, params: tuple[Param, ...], check_value: Callable[[str, Any], None]) -> dict[str, Any]:
    where = f"{NODE}.seeds[{number}]"
    point = flat(seed, lambda value: not isinstance(value, Mapping)) if isinstance(seed, Mapping) else None
    keys = [param.key for param in params]
    if point is None or sorted(point) != sorted(keys):
        raise PipelineError(f"{where} must set exactly the searched settings ({', '.join(keys)}), got {seed!r}")
    for param in params:
        if not param.contains(point[param.key]):
            raise PipelineError(f"{where} lies outside {NODE}.params: {param.key}={point[param.key]!r}")
        check_value(param.key, point[param.key])
    return point


def _trial_overrides(overrides: Any, keys: tuple[str, ...]) -> tuple[str, ...]:
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as error:
        raise PipelineError(f"{NODE}.trial_overrides: cannot parse {error.override!r}") from None
    for override in parsed:
        if override.is_sweep_override() or override.key_or_group in keys:
            raise PipelineError(
                f"{NODE}.trial_overrides: {override.input_line!r} sweeps or sets a searched setting; give single "
                "values of other settings (e.g. eval.max_new_tokens=8)"
            )
    return tuple(overrides)


def validate(settings: Mapping[str, Any], check_value: Callable[[str, Any], None] = check) -> Search:
    """Every rule on `hydra.sweeper.*`: types and ranges from `SearchSweeperConf`, the params and seeds
    against the pipeline's settings (`check_value`); mistakes are one-line PipelineErrors."""
    check(NODE, dict(settings), SearchSweeperConf, {})
    params = tuple(_param(key, leaf, check_value) for key, leaf in flat(settings["params"], _is_param).items())
    if not params:
        raise PipelineError(f"{NODE}.params is empty; search at least one setting (conf/search/default.yaml)")
    ranges = {param.key: param for param in params if param.choices is None}
    if all(key in ranges for key in WINDOW) and sum(ranges[key].high for key in WINDOW) >= 1:
        raise PipelineError(
            f"{NODE}.params: the highs of {' and '.join(WINDOW)} sum to >= 1, so a window may exclude every layer; "
            "lower them so they sum to less than 1"
        )
    keys = tuple(param.key for param in params)
    return Search(
        n_trials=settings["n_trials"],
        n_jobs=settings["n_jobs"],
        max_kl=float(settings["max_kl"]),
        startup_trials=settings["startup_trials"],
        export=settings["export"] is True,
        trial_overrides=_trial_overrides(settings["trial_overrides"], keys),
        params=params,
        seeds=tuple(_seed(number, seed, params, check_value) for number, seed in enumerate(settings["seeds"])),
    )


def values(params: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's values, Optuna's grid floats rounded (0.15000000000000002 -> 0.15)."""
    return {key: round(value, 6) if isinstance(value, float) else value for key, value in params.items()}


def override_value(value: Any) -> str:
    """`value` as Hydra's override grammar reads it back."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, str) and not PLAIN_TEXT.fullmatch(value):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def overrides(params: Mapping[str, Any]) -> list[str]:
    """The overrides that make `python -m pipeline` run the trial's settings."""
    return [f"{key}={override_value(value)}" for key, value in values(params).items()]


def plan_summary(plan: Mapping[str, Any]) -> dict[str, Any]:
    """What the settings do on this model: the (first) direction's layer position and the planned layers."""
    layers = [entry["layer"] for entry in plan["layers"]]
    return {
        "direction_layer": plan["layers"][0]["direction_from"],
        "first_layer": min(layers),
        "last_layer": max(layers),
        "n_layers": len(layers),
    }
