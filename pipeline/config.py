"""What `import pipeline` registers for the config files: OmegaConf resolvers and the config schema.

The schema (`pipeline.schema.Config`) is stored in Hydra's ConfigStore as `base_config`, the first entry of
`conf/config.yaml`'s defaults, so every composition (the command line, `hydra.compose` in tests) is typed.
`check_overrides` adds what OmegaConf's conversions let through on the command line: only the literals
true/false are booleans (OmegaConf would read `no`, `off` or `1` as one), and a quoted string is never a number.
"""

from __future__ import annotations

import difflib
from dataclasses import is_dataclass
from typing import Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from pipeline import search_schema
from pipeline.errors import PipelineError
from pipeline.paths import package_file
from pipeline.schema import Config, check, lookup, unwrap_optional

SCHEMA_NAME = "base_config"


def _model_kind(arch: DictConfig | None) -> str:
    from pipeline.models import model_kind

    return model_kind(OmegaConf.to_container(arch, resolve=True) if arch is not None else None)


def compute_dtype(requested: str = "auto") -> str:
    """The dtype to compute in: `auto` picks bfloat16 only where it is fast.

    On a GPU, or a CPU with AVX512-BF16/AMX, bfloat16 halves memory and is about 2x faster; on a
    CPU without them (e.g. AVX2-only EPYC) PyTorch emulates it and a forward pass of the 0.5B
    default is about 6x slower than float32 (measured: 48 s vs 8 s for 16x40 tokens, one thread).
    Resolved when the config is composed, so the dtype actually used is part of every cache key.
    """
    if requested != "auto":
        return requested
    import torch

    if torch.cuda.is_available():
        return "bfloat16"
    try:
        flags = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        flags = ""
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


def register_resolvers() -> None:
    """`${model_kind:${model.arch}}` -> "moe" | "dense"; `${compute_dtype:auto}` -> a torch dtype name;
    and the schema every config is composed onto (`base_config`)."""
    OmegaConf.register_new_resolver("model_kind", _model_kind, replace=True)
    OmegaConf.register_new_resolver("compute_dtype", compute_dtype, replace=True)
    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)
    search_schema.register()  # hydra/sweeper=pipeline_search, the plan search's settings (+search=default)


def _unknown_setting(key: str) -> PipelineError:
    parent, _, name = key.rpartition(".")
    found = lookup(parent) if parent else (Config, {})
    known = list(getattr(found[0], "__dataclass_fields__", {})) if found else []
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {parent + '.' if parent else ''}{close[0]}?" if close else "remove it"
    return PipelineError(f"{key} is not a setting; {hint}")


def schema_error_line(error: BaseException) -> str | None:
    """One line for a schema violation OmegaConf reported while composing (a preset file's misspelled key,
    a value of the wrong type), in the words `check` uses; None when `error` is something else."""
    cause = error.__cause__ or error.__context__
    if not isinstance(cause, (ConfigKeyError, ValidationError)) or not cause.full_key or cause.full_key.startswith("hydra."):
        return None  # hydra.* (the search's hydra.sweeper too) is Hydra's schema: its own message says it
    message = str(error)
    where = message[4:].split("'", 1)[0] + ": " if message.startswith("In '") else ""
    if isinstance(cause, ConfigKeyError):
        return where + str(_unknown_setting(cause.full_key))
    try:
        check(cause.full_key, cause.value)
    except PipelineError as described:
        return where + str(described)
    return None


def check_overrides(overrides: Sequence[str]) -> None:
    """Refuse in one line a command line value the schema's type does not take as it is typed.

    Types only: ranges (mode.top_n=0) are the stages' validate step, so one bad sweep point is recorded
    and the sweep goes on. Overrides Hydra cannot parse are left to Hydra's own report.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException:
        return
    for override in parsed:
        key = override.key_or_group
        if override.package is not None or override.is_delete() or override.is_hydra_override():
            continue
        found = lookup(key)
        if found is None and package_file(f"conf/{key}").is_dir():
            continue  # a group outside the job's config: +search=default (it sets hydra.sweeper)
        if found is None:
            raise _unknown_setting(key)
        kind = found[0]
        if is_dataclass(unwrap_optional(kind)[0]):
            continue  # a group choice (model=tiny) or a whole section
        value = override.value()
        if isinstance(value, ChoiceSweep):
            values = value.list
        elif override.is_sweep_override():
            continue  # range()/interval() sweeps produce numbers
        else:
            values = [value]
        for item in values:
            if not (isinstance(item, str) and "${" in item):  # interpolations are checked when resolved
                check(key, item, kind, {})
