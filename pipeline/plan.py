"""The ablation plan (`ablation.yaml`): which layers to ablate, with which direction and scale.

The plan is the hand-off between `select` and `ablate`, and a file people
review, commit and replay (`python -m pipeline plan=<ablation.yaml>`). So its text is deterministic:
sorted keys, fixed float formatting, one line per layer, no timestamps. The
same inputs give byte-identical files, which is what lets CI regenerate plans
and diff them (`python -m pipeline.regen --check`).

A plan may remove more than one direction per layer: `directions: k` (top level, 2 to
`schema.MAX_DIRECTIONS`; absent means 1, and a plan with k = 1 never carries the key, so its text is what
it was before the option existed). Each planned layer then removes the k-dimensional subspace spanned by
its first direction (what `direction_from` gives today) and the first k-1 extra directions of the
measurement (`measurement.EXTRA_DIRECTIONS`), taken from the same layer `direction_from` names; for a
fractional `direction_from` the extra subspaces of the two neighbouring layers are blended the way the
first direction is (`weight_edit.direction_basis`), and the whole basis is orthonormalized with the first
direction first.

This module owns the format only; choosing layers is `pipeline.selection`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from pipeline.errors import PipelineError
from pipeline.safe_yaml import load_yaml_file
from pipeline.schema import MAX_DIRECTIONS, SCALE_RANGE

METHODS = ("orthogonal", "norm_preserving")
DIRECTION_SOURCES = ("own", "best")
"""What `select.direction_from` may ask for: each layer's own direction, or the best selected layer's."""
PLAN_DIRECTION_SOURCES = (*DIRECTION_SOURCES, "single")
"""What a plan may record: `single` is one shared direction chosen by a search (`pipeline.search`),
possibly interpolated between two layers (direction_from 12.5 blends layers 12 and 13)."""
HEADER = (
    "# ablation plan (select, optimize or by hand); replay: python -m pipeline plan=<file>; regen: python -m pipeline.regen\n"
    "# layer numbers are 0-based decoder layers\n"
)

_TOP_LEVEL = {
    "model": str,
    "model_fingerprint": str,
    "hidden_size": int,
    "num_layers": int,
    "source_measurement": str,
    "mode": str,
    "method": str,
    "direction_source": str,
    "layers": list,
}
_TOP_LEVEL_OPTIONAL = {"thresholds": dict, "directions": int}
"""select writes the thresholds that chose its layers; a plan found by a search has none. `directions`:
how many directions each layer removes, written only when more than one."""
_THRESHOLDS = {"min_quality": float, "top_n": int, "relative_min": float, "skip_first": float, "skip_last": float}
LAYER_INDEX = "layer index"
"""Type tag for `direction_from`: an integer layer, or a fractional position between two layers."""
_LAYER_REQUIRED = {"layer": int, "direction_from": LAYER_INDEX, "scale": float}
_LAYER_OPTIONAL = {"quality": float, "attn_scale": float, "mlp_scale": float}
"""`quality` is informational: select always writes it, a hand-edited plan may drop it.
`attn_scale` / `mlp_scale` override `scale` for the attention output / the MLP down projections."""


MAX_TEXT = 500
"""Longest string a plan may hold; strings are single-line printable text (they go into a model card header)."""


def _shown(value: Any) -> str:
    """A value for an error message: its repr, cut short so a hostile value cannot flood the terminal."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


class _NotAPlan(Exception):
    """Internal: what is wrong with a plan; `validate_plan` turns it into a PipelineError naming the file."""


def _typed(value: Any, kind: type | str, where: str) -> Any:
    if kind == LAYER_INDEX:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _NotAPlan(f"{where} must be a layer number (integer or fractional), got {_shown(value)}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _NotAPlan(f"{where} must be an integer, got {_shown(value)}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _NotAPlan(f"{where} must be a finite number, got {_shown(value)}")
        return float(value)
    if not isinstance(value, kind):
        raise _NotAPlan(f"{where} must be a {kind.__name__}, got {_shown(value)}")
    if kind is str and (len(value) > MAX_TEXT or not value.isprintable()):
        raise _NotAPlan(f"{where} must be one line of printable text of at most {MAX_TEXT} characters, got {_shown(value)}")
    return value


def _fields(
    mapping: Any, required: Mapping[str, type | str], optional: Mapping[str, type | str], where: str
) -> dict:
    if not isinstance(mapping, dict):
        raise _NotAPlan(f"{where} must be a mapping, got {_shown(mapping)}")
    missing = [key for key in required if key not in mapping]
    unknown = sorted(str(key)[:80] for key in mapping if key not in required and key not in optional)
    if missing:
        raise _NotAPlan(f"{where} is missing {', '.join(missing)}")
    if unknown:
        raise _NotAPlan(f"{where} has unknown key {', '.join(unknown[:3])}")
    kinds = {**required, **optional}
    return {
        key: _typed(value, kinds[key], key if where == "plan" else f"{where}.{key}") for key, value in mapping.items()
    }


def _normalized(plan: Any) -> dict:
    """A checked copy of `plan` with plain types and layers sorted by layer number."""
    plan = _fields(plan, _TOP_LEVEL, _TOP_LEVEL_OPTIONAL, "plan")
    if "thresholds" in plan:
        plan["thresholds"] = _fields(plan["thresholds"], _THRESHOLDS, {}, "thresholds")
    if plan["method"] not in METHODS:
        raise _NotAPlan(f"method must be one of {', '.join(METHODS)}, got {plan['method']!r}")
    if plan["direction_source"] not in PLAN_DIRECTION_SOURCES:
        raise _NotAPlan(
            f"direction_source must be one of {', '.join(PLAN_DIRECTION_SOURCES)}, got {plan['direction_source']!r}"
        )
    if not 1 <= plan.get("directions", 1) <= MAX_DIRECTIONS:
        raise _NotAPlan(f"directions must be within 1..{MAX_DIRECTIONS}, got {plan['directions']}")
    if plan.get("directions") == 1:
        del plan["directions"]  # the canonical form of one direction is no key: the text of every earlier plan
    if plan["hidden_size"] < 1 or plan["num_layers"] < 1:
        raise _NotAPlan("hidden_size and num_layers must be >= 1")
    if not plan["layers"]:
        raise _NotAPlan("layers is empty; a plan must ablate at least one layer")
    layers = [
        _fields(entry, _LAYER_REQUIRED, _LAYER_OPTIONAL, f"layers[{number}]")
        for number, entry in enumerate(plan["layers"])
    ]
    numbers = [entry["layer"] for entry in layers]
    if len(set(numbers)) != len(numbers):
        raise _NotAPlan(f"layers lists a layer twice: {sorted(numbers)}")
    low, high = SCALE_RANGE
    for entry in layers:
        for key in ("layer", "direction_from"):
            if not 0 <= entry[key] <= plan["num_layers"] - 1:
                raise _NotAPlan(f"{key} {entry[key]} is outside 0..{plan['num_layers'] - 1}")
        for key in ("scale", "attn_scale", "mlp_scale"):
            if key in entry and not low <= entry[key] <= high:
                raise _NotAPlan(f"layer {entry['layer']}: {key} {entry[key]:g} is outside [{low:g}, {high:g}]")
    source = plan["direction_source"]
    if source in ("own", "best") and any(entry["direction_from"] != int(entry["direction_from"]) for entry in layers):
        raise _NotAPlan(f"direction_source is {source} but a direction_from is fractional; use single")
    if source == "own" and any(e["layer"] != e["direction_from"] for e in layers):
        raise _NotAPlan("direction_source is own but a layer takes its direction from another layer")
    if source in ("best", "single") and len({e["direction_from"] for e in layers}) != 1:
        raise _NotAPlan(f"direction_source is {source} but the layers take directions from different layers")
    plan["layers"] = sorted(layers, key=lambda entry: entry["layer"])
    return plan


def plan_directions(plan: Mapping[str, Any]) -> int:
    """How many directions each layer of a validated plan removes (1 when the plan does not say)."""
    return int(plan.get("directions", 1))


def validate_plan(plan: Any, source: str) -> dict:
    """Check a plan's keys, types and layer numbers; returns a normalized copy or raises PipelineError."""
    try:
        return _normalized(plan)
    except _NotAPlan as problem:
        raise PipelineError(f"{source} is not an ablation plan: {problem}") from None


def _scalar(value: Any) -> str:
    """Strings JSON-quoted, integers bare, floats as %.6f: re-reading and re-rendering gives the same text."""
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a YAML double-quoted scalar: no surprises like `yes`
    if isinstance(value, int):
        return str(value)
    return f"{value:.6f}"


def plan_to_text(plan: Mapping[str, Any]) -> str:
    """The plan as deterministic YAML text: sorted keys, `%.6f` floats, one flow mapping per layer."""
    return _render(validate_plan(dict(plan), "plan"))


def _render(plan: dict) -> str:
    lines = [HEADER.rstrip("\n")]
    for key in sorted(plan):
        value = plan[key]
        if key == "thresholds":
            lines.append(f"{key}:")
            lines.extend(f"  {name}: {_scalar(value[name])}" for name in sorted(value))
        elif key == "layers":
            lines.append(f"{key}:")
            for entry in value:
                fields = ", ".join(f"{name}: {_scalar(entry[name])}" for name in sorted(entry))
                lines.append(f"- {{{fields}}}")
        else:
            lines.append(f"{key}: {_scalar(value)}")
    return "\n".join(lines) + "\n"


def write_plan(path: Path, plan: Mapping[str, Any]) -> None:
    """Write `plan` to `path` as `plan_to_text` renders it (never an invalid or empty plan)."""
    text = _render(validate_plan(dict(plan), f"the plan for {path}"))
    Path(path).write_text(text, encoding="utf-8")


def read_plan(path: Path) -> dict:
    """Load and validate an `ablation.yaml`; a PipelineError names the file when it is not a plan."""
    return validate_plan(load_yaml_file(path, "an ablation plan"), str(path))
