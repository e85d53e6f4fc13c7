"""The stage protocol: what every stage module exposes to the runner.

A stage is a pure function of (its config slice, its upstream artifacts, its
version). It never decides whether to run, never builds cache paths and never
looks at other stages' config: the runner does all of that and hands the
stage a `StageContext`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class StageContext:
    """Everything a stage may read, and the one directory it may write."""

    config: Mapping[str, Any]
    """The stage's config slice: {dotted key: resolved plain value} for each of `Stage.config_keys`."""
    out_dir: Path
    """A fresh, empty temporary directory; the runner renames it into the cache when `run` returns."""
    inputs: Mapping[str, Path]
    """Upstream stage name -> its finished artifact directory (read-only by convention)."""
    model_store: Path
    """Where materialized models (packaged GGUF, tiny twins) live; see `pipeline.models`."""
    seed: int
    progress: bool = True
    cache_keys: Mapping[str, str] = field(default_factory=dict)
    """{stage name: cache key} of this stage and every stage it depends on, directly or not: the
    provenance a stage may write into what it publishes (the ablate model card)."""
    manifest_extra: dict[str, Any] = field(default_factory=dict)
    """A stage may add JSON-serializable facts here (e.g. `source` hashes); the runner writes them into manifest.json."""
    written_hashes: dict[str, str] = field(default_factory=dict)
    """{path relative to out_dir: sha256} of files the stage hashed itself once it had finished writing
    them (ablate hashes a model's shards beside its copy); the manifest takes these instead of reading
    the files again. A wrong one is caught as damage by the next `artifacts.verify`."""


@dataclass(frozen=True)
class Stage:
    name: str
    version: str
    """Bump when the stage's code changes what it writes: old cache entries stop matching."""
    needs: tuple[str, ...]
    config_keys: tuple[str, ...]
    """Dotted config keys whose values affect the output (e.g. "model", "collect", "mode.top_n")."""
    run: Callable[[StageContext], None]
    validate: Callable[[Mapping[str, Any]], None] | None = None
    """Optional: raise PipelineError for a bad config slice. The runner calls it for every stage before
    any stage runs, so `mode.top_n=0` fails in a second instead of after a long collect."""
    input_digest: Callable[[Mapping[str, Any], Path], Mapping[str, str]] | None = None
    """Optional: (config slice, model_store) -> {name: sha256} of external input *contents* (prompt files,
    model fingerprint). Hashed into the cache key so an edited prompt file invalidates `collect`."""
    unkeyed: tuple[str, ...] = ()
    """Dotted keys inside `config_keys` that cannot change this stage's output, left out of its cache key (baseline
    reads only the held-out prompts, which `prompts.*.train_categories` never moves: tests/test_prompt_splits.py)."""
    data_parallel: bool = False
    """True when every process of an `accelerate launch`/`torchrun` launch runs `run` together (each on
    its shard; only the main process writes). Other stages run on the main process alone."""
