"""The config schema: one dataclass per config group and top-level section, composed under every config.

`conf/config.yaml` lists `base_config` (the `Config` below, registered in Hydra's ConfigStore by
`pipeline.config`) first in its defaults, so every group file and override is merged onto these types:
an unknown key (`trust_remote_cod:` in a model preset), a value OmegaConf cannot convert
(`prompts.n_train=abc`, `prompts.n_train=1.5`) or a value outside a closed set (`select.method=nonsense`)
fails while the config is composed, before any stage runs.

Closed sets are `StrEnum`s whose member names equal their values: OmegaConf refuses other strings, and
a member still compares and serializes as the plain string (`runner.config_slice` hashes plain strings).
Unions (`collect.batch_size`: int or "auto"; `select.direction_from`: own, best or a depth) are `Any` and
are checked by their stage's validate step.

`check` holds plain values (a stage's config slice, a hand-written `select.yaml`, a command line value)
to the same types, strictly (a string is never a number or a boolean), and to the ranges declared here
with `setting(ge=..., le=..., lt=...)`: each range is written once, on its field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, is_dataclass
from enum import Enum, StrEnum
from functools import cache
from typing import Any, Dict, List, Mapping, Optional, Union, get_args, get_origin, get_type_hints

from omegaconf import MISSING

from pipeline.errors import PipelineError
from pipeline.eval_schema import EvalConfig, Streaming, Thinking
from pipeline.schema_fields import section, setting

SCALE_RANGE = (0.0, 4.0)
"""Ablation scales (select.scale / select.attn_scale, and every scale a plan file carries): 0 leaves a layer
unchanged, 1 removes the direction's component, 2 reflects it; beyond that the edit only amplifies the
reversed component, and far beyond it the weights blow up (at 1e36 every logit is 0). The band preset uses 1.2."""
MAX_DIRECTIONS = 4
"""Most directions a plan may remove per layer (`select.directions`): measure stores MAX_DIRECTIONS - 1 extra
directions per layer beside the refusal direction, so the range is checked before any stage runs."""


class ModelSource(StrEnum):
    hub = "hub"
    local = "local"
    gguf = "gguf"
    packaged = "packaged"
    tiny = "tiny"


class ModelKind(StrEnum):
    moe = "moe"
    dense = "dense"


class DType(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Positions(StrEnum):
    last = "last"
    post_instruction = "post_instruction"
    post_instruction_mean = "post_instruction_mean"


class Method(StrEnum):
    orthogonal = "orthogonal"
    norm_preserving = "norm_preserving"


# --- model ---------------------------------------------------------------------------------------------


@dataclass
class GgufConfig:
    packages: List[str] = MISSING
    size: int = setting(ge=1)
    sha256: str = MISSING


@dataclass
class TinyConfig:
    seed: int = MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    source: ModelSource = MISSING
    id: str = MISSING
    revision: Optional[str] = MISSING
    gguf: Optional[GgufConfig] = section(GgufConfig, optional=True)  # source=packaged
    tiny: Optional[TinyConfig] = section(TinyConfig, optional=True)  # source=tiny
    dtype: DType = MISSING
    device_map: Any = MISSING  # "cpu", "auto", or {module: device}
    max_memory: Any = MISSING  # null or {device: size}
    offload_folder: Optional[str] = MISSING
    trust_remote_code: bool = MISSING
    arch: Dict[str, Any] = MISSING  # the checkpoint's config.json facts; model-specific keys
    kind: ModelKind = MISSING


# --- prompts, eval ---------------------------------------------------------------------------------------


@dataclass
class PromptSource:
    source: str = MISSING
    field: Optional[str] = MISSING
    split: Optional[str] = MISSING
    subset: Optional[str] = setting(optional=True)  # hf sources only
    category_field: Optional[str] = MISSING  # column naming each row's category; null: a set without categories
    train_categories: Optional[List[str]] = MISSING  # collect trains on these categories only; null: every prompt


@dataclass
class PromptsConfig:
    name: str = MISSING
    harmful: PromptSource = section(PromptSource)
    harmless: PromptSource = section(PromptSource)
    seed: int = MISSING
    n_train: int = setting(ge=1)
    n_eval: int = setting(ge=1)
    n_val: int = setting(ge=1)


# --- mode, select ------------------------------------------------------------------------------------------


@dataclass
class ModePreset:
    min_quality: float = setting(ge=0)
    top_n: int = setting(ge=1)


@dataclass
class ModeConfig:
    name: str = MISSING
    presets: Optional[Dict[str, ModePreset]] = section(dict, optional=True)  # {moe: ..., dense: ...}; not in mode=band
    min_quality: float = setting(ge=0)
    top_n: int = setting(ge=1)


@dataclass
class SelectConfig:
    relative_min: float = setting(ge=0, le=1)
    skip_first: float = setting(ge=0, lt=1)
    skip_last: float = setting(ge=0, lt=1)
    direction_from: Any = MISSING  # own | best | a depth fraction in [0, 1] (checked by pipeline.selection)
    scale: float = setting(ge=SCALE_RANGE[0], le=SCALE_RANGE[1])
    attn_scale: Optional[float] = setting(ge=SCALE_RANGE[0], le=SCALE_RANGE[1])
    mlp_scale: Optional[float] = setting(ge=SCALE_RANGE[0], le=SCALE_RANGE[1])
    directions: int = setting(ge=1, le=MAX_DIRECTIONS)  # directions removed per layer (1: the refusal direction only)
    method: Method = MISSING


# --- top-level sections -------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    stages: List[str] = MISSING
    force: List[str] = MISSING
    seed: int = MISSING
    progress: bool = MISSING
    export: Any = MISSING  # auto | true | false: also run ablate (write the model directory); auto = single runs only


@dataclass
class CacheConfig:
    dir: str = MISSING
    models: str = MISSING


@dataclass
class CollectConfig:
    batch_size: Any = MISSING  # a positive integer or "auto" (checked by pipeline.collection.validate)
    dtype: DType = MISSING
    positions: Positions = MISSING
    keep_activations: bool = MISSING
    thinking: Thinking = MISSING
    streaming: Streaming = MISSING  # off | layers | auto (not in the cache key: both give bit-identical activations)


@dataclass
class EmbedConfig:
    enabled: bool = MISSING


@dataclass
class AblateConfig:
    embed: EmbedConfig = section(EmbedConfig)


class ExportFormat(StrEnum):
    safetensors = "safetensors"
    lora = "lora"


@dataclass
class ExportConfig:
    format: ExportFormat = MISSING  # safetensors: the model directory; lora: also a PEFT adapter beside it


@dataclass
class Config:
    model: ModelConfig = section(ModelConfig)
    select: SelectConfig = section(SelectConfig)
    mode: ModeConfig = section(ModeConfig)
    prompts: PromptsConfig = section(PromptsConfig)
    eval: EvalConfig = section(EvalConfig)
    run: RunConfig = section(RunConfig)
    plan: Optional[str] = None
    cache: CacheConfig = section(CacheConfig)
    collect: CollectConfig = section(CollectConfig)
    ablate: AblateConfig = section(AblateConfig)
    export: ExportConfig = section(ExportConfig)


# --- plain values against the schema ---------------------------------------------------------------------------


@cache
def _hints(schema: type) -> dict[str, Any]:
    return get_type_hints(schema)


def unwrap_optional(kind: Any) -> tuple[Any, bool]:
    if get_origin(kind) is Union and type(None) in get_args(kind):
        (inner,) = [arg for arg in get_args(kind) if arg is not type(None)]
        return inner, True
    return kind, False


def _rules(schema: type) -> dict[str, Mapping[str, Any]]:
    return {item.name: item.metadata for item in fields(schema)}


def lookup(key: str, schema: type = Config) -> tuple[Any, Mapping[str, Any]] | None:
    """(type, range metadata) of the setting at dotted `key`, or None when the schema has no such setting.
    Keys inside a `Dict[str, Any]` (model.arch.*) are `Any`."""
    kind: Any = schema
    rules: Mapping[str, Any] = {}
    for part in key.split("."):
        kind, _ = unwrap_optional(kind)
        if kind is Any:
            return Any, {}
        if is_dataclass(kind):
            if part not in _hints(kind):
                return None
            kind, rules = _hints(kind)[part], _rules(kind)[part]
        elif get_origin(kind) in (dict, Dict):
            kind, rules = get_args(kind)[1], {}
        else:
            return None
    return kind, rules


def drops_when_none(kind: Any, rules: Mapping[str, Any]) -> bool:
    """An optional *section* set to None is absent (a leaf's explicit null is a value and stays)."""
    inner, _ = unwrap_optional(kind)
    return bool(rules.get("optional")) and (is_dataclass(inner) or get_origin(inner) in (dict, Dict))


def _type_error(key: str, value: Any, kind: Any) -> PipelineError | None:
    """The one-line complaint when `value` is not of `kind` (None when it is)."""
    if kind is Any:
        return None
    if isinstance(kind, type) and issubclass(kind, Enum):
        if isinstance(value, str) and value in kind.__members__:
            return None
        return PipelineError(f"{key} must be one of {', '.join(kind.__members__)}, got {value!r}")
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind)
    if expected is not None:
        # A number is a fine string (model.revision=20240101), but never a boolean, nor a string a number.
        accepted = {bool: bool, int: int, float: (int, float), str: (str, int, float)}[kind]
        ok = isinstance(value, accepted) and (kind is bool or not isinstance(value, bool))
        if not ok:
            return PipelineError(f"{key} must be {expected}, got {value!r}")
        if kind is float and not math.isfinite(value):
            return PipelineError(f"{key} must be a finite number, got {value!r}")
        return None
    if get_origin(kind) in (list, List) and not isinstance(value, (list, tuple)):
        return PipelineError(f"{key} must be a list, got {value!r}")
    if (is_dataclass(kind) or get_origin(kind) in (dict, Dict)) and not isinstance(value, Mapping):
        return PipelineError(f"{key} must be a mapping, got {value!r}")
    return None


def _range_error(key: str, value: Any, rules: Mapping[str, Any]) -> PipelineError | None:
    ge, lt, le = rules.get("ge"), rules.get("lt"), rules.get("le")
    if ge is None or value is None:
        return None
    high = le if le is not None else lt
    if value >= ge and (high is None or (value <= le if le is not None else value < lt)):
        return None
    if high is None:
        return PipelineError(f"{key} must be >= {ge:g}, got {value!r}")
    return PipelineError(f"{key} must be within [{ge:g}, {high:g}{']' if le is not None else ')'}, got {value!r}")


def check(key: str, value: Any, kind: Any = None, rules: Mapping[str, Any] | None = None) -> None:
    """Raise a one-line PipelineError unless plain `value` fits the setting at `key` (type, range, keys).

    `kind`/`rules` default to the schema's for `key`. A mapping for a section must hold every required
    setting and no other; a string is never a number or a boolean, an integer never a boolean.
    """
    if kind is None:
        found = lookup(key)
        if found is None:
            raise PipelineError(f"{key} is not a setting; remove it or fix its spelling")
        kind, rules = found
    rules = rules or {}
    kind, nullable = unwrap_optional(kind)
    if value is None and nullable:
        return
    if (error := _type_error(key, value, kind) or _range_error(key, value, rules)) is not None:
        raise error
    if is_dataclass(kind):
        _check_section(key, value, kind)
    elif get_origin(kind) in (list, List):
        for index, item in enumerate(value):
            check(f"{key}[{index}]", item, get_args(kind)[0], {})
    elif get_origin(kind) in (dict, Dict):
        for name, item in value.items():
            check(f"{key}.{name}", item, get_args(kind)[1], {})


def _check_section(key: str, value: Mapping[str, Any], schema: type) -> None:
    hints, rules = _hints(schema), _rules(schema)
    unknown = sorted(str(name) for name in value if name not in hints)
    if unknown:
        raise PipelineError(f"{key} has unknown key {', '.join(f'{key}.{name}' for name in unknown)}; remove it")
    missing = [name for name in hints if name not in value and not rules[name].get("optional")]
    if missing:
        raise PipelineError(f"{key} is missing {', '.join(f'{key}.{name}' for name in missing)}; add it")
    for name, item in value.items():
        check(f"{key}.{name}", item, hints[name], rules[name])
