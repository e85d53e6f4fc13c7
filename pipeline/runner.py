"""The runner: stage order, cache keys, skip-or-run, atomic artifacts, run.json.

Stages stay pure; everything about *whether* and *where* a stage runs lives
here. A stage's cache key is the sha256 of the canonical JSON of
(name, version, its config slice, its upstream keys, digests of external
inputs it declares). Its artifact is `<cache.dir>/<stage>/<key>/`, complete
exactly when `manifest.json` verifies.

Every key is computed before any stage runs, so a bad prompt file or model
path fails in a second, before anything is written. Writing, locking,
verifying and cleaning up artifacts is `pipeline.store.ArtifactStore`'s job,
one store per stage directory.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Collection, Iterator, Mapping, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from safetensors import SafetensorError

from pipeline import artifacts, distributed, schema
from pipeline.errors import PipelineError
from pipeline.stage import Stage, StageContext
from pipeline.store import ArtifactStore

log = logging.getLogger(__name__)

# Config fields that cannot change a stage's artifact beyond float round-off: how work is batched and
# where tensors are placed. They are dropped before hashing so a user may change them without losing
# the cache. This is the one reviewed list; add to it only what is provably content-neutral.
# eval.batch_size is not here: in bfloat16 a prompt's first-token log-probabilities depend on the batch it is padded
# into (batch 1 vs 16 on the packaged model: KL 1e-3 between them; float32: 0), so a cached score belongs to its batch size.
NON_SEMANTIC_KEYS = frozenset(
    {
        "collect.batch_size",
        "collect.streaming",  # layer-streamed activations are bit-identical to in-memory ones (tests/test_layer_stream.py)
        "eval.streaming",  # streamed first-token numbers equal in-memory ones within 1e-5 (tests/test_stream_scores.py)
        "model.device_map",
        "model.max_memory",
        "model.offload_folder",
        "plan",  # the replayed plan's path: select hashes the file's content instead (its input_digest)
    }
)
LIBRARIES = ("torch", "transformers", "accelerate", "safetensors", "hydra-core", "omegaconf", "datasets")
FAULT_ENV = "PIPELINE_FAULT"
"""Test hook (docs/troubleshooting.md): PIPELINE_FAULT=<stage> makes the process SIGKILL itself right after that
stage's `run` returns, before its manifest and rename, so tests can reproduce `kill -9` at the worst moment."""


@dataclass(frozen=True)
class StageResult:
    key: str
    dir: Path
    cached: bool
    seconds: float


def config_slice(cfg: DictConfig, keys: Sequence[str]) -> dict[str, Any]:
    """{dotted key: resolved plain value}; for a config composed onto the schema, checked against it
    (`pipeline.schema.check`: types, ranges, required and unknown keys), so a bad value fails here,
    before any stage runs.

    Plain means what is hashed: enum members become their strings, and a setting the config leaves out
    (an optional section set to None, an unset `???` value) is not in the slice, so adding an optional
    field to the schema never changes a cache key.
    """

    def plain(value: Any, key: str) -> Any:
        if isinstance(value, Enum):
            return value.value
        if isinstance(value, dict):
            kept = {}
            for name, item in value.items():
                found = schema.lookup(f"{key}.{name}")
                if item == MISSING or (item is None and found is not None and schema.drops_when_none(*found)):
                    continue
                kept[name] = plain(item, f"{key}.{name}")
            return kept
        if isinstance(value, list):
            return [plain(item, key) for item in value]
        return value

    typed = OmegaConf.get_type(cfg) is schema.Config  # composed onto the schema (a hand-made test config is not)
    values = {}
    for key in keys:
        try:
            node = OmegaConf.select(cfg, key, throw_on_missing=True)
        except MissingMandatoryValue:
            raise PipelineError(f"{key} is not set; set it in its config group or on the command line") from None
        if OmegaConf.is_config(node):
            node = OmegaConf.to_container(node, resolve=True, throw_on_missing=False)
        values[key] = plain(node, key)
        if typed and schema.lookup(key) is not None:
            schema.check(key, values[key])
    return values


def hashed_slice(values: Mapping[str, Any], unkeyed: Collection[str] = ()) -> dict[str, Any]:
    """The part of a config slice that goes into the key: non-semantic fields (and a stage's `unkeyed`) removed."""
    dropped = NON_SEMANTIC_KEYS | frozenset(unkeyed)

    def strip(prefix: str, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(f"{prefix}.{k}", v) for k, v in value.items() if f"{prefix}.{k}" not in dropped}
        return value

    return {key: strip(key, value) for key, value in values.items() if key not in dropped}


def cache_key(stage: Stage, values: Mapping[str, Any], upstream: Mapping[str, str], digests: Mapping[str, str]) -> str:
    payload = {
        "stage": stage.name,
        "version": stage.version,
        "config": hashed_slice(values, stage.unkeyed),
        "upstream": dict(upstream),
        "inputs": dict(digests),
    }
    return artifacts.content_key(payload)


def ensure_writable(directory: Path, setting: str) -> None:
    """Create `directory` and prove a file can be written there, or fail in one line naming `setting`."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise PipelineError(
            f"{setting}={directory} is not writable ({error.strerror or error}); choose a writable directory, "
            f"e.g. {setting}=/tmp/pipeline-cache"
        ) from error


def execution_order(registry: Mapping[str, Stage], requested: Sequence[str]) -> list[str]:
    """Requested stages plus everything they need, upstream first, in registry order."""
    if not requested:
        raise PipelineError(f"run.stages is empty, so there is nothing to do; name stages from {', '.join(registry)}")
    unknown = [name for name in requested if name not in registry]
    if unknown:
        raise PipelineError(
            f"unknown stage {unknown[0]!r} in run.stages; choose from {', '.join(registry)}"
        )
    needed: set[str] = set()

    def visit(name: str) -> None:
        if name not in needed:
            needed.add(name)
            for upstream in registry[name].needs:
                visit(upstream)

    for name in requested:
        visit(name)
    return [name for name in registry if name in needed]


EXPORT_STAGE = "ablate"
"""The stage that writes the model directory; `run.export` decides whether a run that evaluates adds it."""
EXPORT_VALUES = ("auto", True, False)


def sweeping() -> bool:
    """True inside a Hydra multirun job (`-m`), on any launcher."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def with_export(registry: Mapping[str, Stage], requested: Sequence[str], export: Any, multirun: bool) -> list[str]:
    """`run.stages`, plus the export stage when the run evaluates a plan and `run.export` asks for it.

    evaluate scores the plan in memory and needs no checkpoint, so the model directory is written only
    on request: `run.export=true`, or `auto` (the default) in a single run; a multirun (`-m`) exports
    nothing under `auto`. Naming the stage in `run.stages` always runs it (`run.stages=[ablate]` exports
    one sweep point from the cache, the command summary.csv gives each point).
    """
    if export not in EXPORT_VALUES or isinstance(export, int) and not isinstance(export, bool):
        raise PipelineError(f"run.export={export!r} is not one of auto, true, false")
    wanted = not multirun if export == "auto" else export is True
    stages = list(requested)
    if wanted and EXPORT_STAGE in registry and EXPORT_STAGE not in stages and "evaluate" in execution_order(registry, stages):
        stages.append(EXPORT_STAGE)
    return stages


class Runner:
    """Runs stages for one composed config against one shared cache directory."""

    def __init__(self, cfg: DictConfig, registry: Mapping[str, Stage], cache_dir: Path, model_store: Path):
        self.cfg = cfg
        self.registry = registry
        self.cache_dir = cache_dir
        self.model_store = model_store
        self.results: dict[str, StageResult] = {}

    def run(self, requested: Sequence[str], force: Sequence[str] = ()) -> dict[str, StageResult]:
        unknown = [name for name in force if name not in self.registry]
        if unknown:
            raise PipelineError(f"unknown stage {unknown[0]!r} in run.force; choose from {', '.join(self.registry)}")
        export = OmegaConf.select(self.cfg, "run.export", default="auto")
        order = execution_order(self.registry, with_export(self.registry, requested, export, sweeping()))
        if distributed.world_size() > 1:
            return self._run_launched(order, force)
        ensure_writable(self.cache_dir, "cache.dir")
        keys = self.plan(order)
        for name in order:
            self.results[name] = self._ensure(self.registry[name], *keys[name], force=name in force)
        return self.results

    def plan(self, order: Sequence[str]) -> dict[str, tuple[str, dict[str, Any], dict[str, str]]]:
        """{stage: (key, config slice, input digests)} for stages in execution order, upstream first.

        Computing every key first reads every external input (prompt files, model directories) before any
        stage runs, so a mistake in them costs no work and writes nothing.
        """
        slices = {name: config_slice(self.cfg, self.registry[name].config_keys) for name in order}
        for name in order:
            if self.registry[name].validate:
                self.registry[name].validate(slices[name])
        keys: dict[str, tuple[str, dict[str, Any], dict[str, str]]] = {}
        for name in order:
            stage = self.registry[name]
            values = slices[name]
            digests = dict(stage.input_digest(values, self.model_store)) if stage.input_digest else {}
            upstream = {need: keys[need][0] for need in stage.needs}
            keys[name] = (cache_key(stage, values, upstream, digests), values, digests)
        return keys

    def store(self, stage: Stage) -> ArtifactStore:
        """The store of `stage`'s artifacts: `<cache.dir>/<stage>/`."""
        return ArtifactStore(self.cache_dir / stage.name)

    def _ensure(self, stage: Stage, key: str, values: dict, digests: dict, force: bool) -> StageResult:
        store = self.store(stage)
        if not force and store.usable(key, stage.name):
            log.info("%s: cached %s", stage.name, store.path(key))
            return StageResult(key, store.path(key), True, 0.0)
        with self._writing(stage, key, force) as out_dir:
            if out_dir is None:  # another job finished this key while we waited for its lock
                return StageResult(key, store.path(key), True, 0.0)
            seconds = self._compute(stage, key, values, digests, out_dir)
        return StageResult(key, store.path(key), False, seconds)

    @contextmanager
    def _writing(self, stage: Stage, key: str, force: bool) -> Iterator[Path | None]:
        """`ArtifactStore.writing`, with a write failure said in one line naming the stage."""
        try:
            with self.store(stage).writing(key, force) as out_dir:
                yield out_dir
        except OSError as error:
            raise PipelineError(
                f"{stage.name}: could not write the artifact ({error.strerror or error}: {error.filename or self.cache_dir}); "
                "free disk space or choose a writable cache.dir"
            ) from error
        except SafetensorError as error:  # safetensors reports a failed write (a full disk) as its own error type
            raise PipelineError(
                f"{stage.name}: could not write a safetensors file ({str(error).splitlines()[0]}); "
                "free disk space or choose a writable cache.dir"
            ) from error

    def _run_launched(self, order: Sequence[str], force: Sequence[str]) -> dict[str, StageResult]:
        """Under `accelerate launch`/`torchrun`: the main process alone writes the cache and model store.

        All processes go through the stages up to the last data-parallel one together (`_ensure_together`);
        then the helper processes are done and the main process runs the rest alone. Helpers compute their
        keys only after the main process has planned, so every model is already materialized for them.
        """
        shared = [index for index, name in enumerate(order) if self.registry[name].data_parallel]
        joint = list(order[: shared[-1] + 1]) if shared else []
        main = distributed.is_main_process()
        if main:
            ensure_writable(self.cache_dir, "cache.dir")
            keys = self.plan(order)
        distributed.barrier()
        if not main:
            keys = self.plan(joint)
        for name in order if main else joint:
            together = name in joint
            ensure = self._ensure_together if together else self._ensure
            self.results[name] = ensure(self.registry[name], *keys[name], force=name in force)
        return self.results

    def _ensure_together(self, stage: Stage, key: str, values: dict, digests: dict, force: bool) -> StageResult:
        """One stage in a launch: the main process decides skip-or-run under the key's lock and broadcasts
        "<key> <decision>"; helpers run a data-parallel stage into a scratch directory outside the cache
        (the stage itself writes only on the main process) and wait at a barrier until the rename is done."""
        final = self.store(stage).path(key)
        if distributed.is_main_process():
            with self._writing(stage, key, force) as out_dir:
                distributed.broadcast_text(f"{key} {'cached' if out_dir is None else 'run'}")
                seconds = 0.0 if out_dir is None else self._compute(stage, key, values, digests, out_dir)
            distributed.barrier()
            return StageResult(key, final, out_dir is None, seconds)
        main_key, decision = distributed.broadcast_text(None).split()
        if main_key != key:
            raise PipelineError(
                f"{stage.name}: this process computed cache key {key}, the main process {main_key}; "
                "every process of a launch must see the same config and inputs"
            )
        started = time.perf_counter()
        if decision == "run" and stage.data_parallel:
            with tempfile.TemporaryDirectory(prefix=f"pipeline-{stage.name}-rank{distributed.process_index()}-") as scratch:
                stage.run(self._context(stage, key, values, Path(scratch), progress=False))
        distributed.barrier()
        return StageResult(key, final, decision == "cached", time.perf_counter() - started)

    def _context(self, stage: Stage, key: str, values: dict, out_dir: Path, progress: bool) -> StageContext:
        return StageContext(
            config=values,
            out_dir=out_dir,
            inputs={name: self.results[name].dir for name in stage.needs},
            model_store=self.model_store,
            seed=int(self.cfg.run.seed),
            progress=progress,
            cache_keys=self._lineage(stage, key),
        )

    def _lineage(self, stage: Stage, key: str) -> dict[str, str]:
        """{name: cache key} of `stage` and of every stage upstream of it (all already resolved)."""
        keys, pending = {stage.name: key}, list(stage.needs)
        while pending:
            name = pending.pop()
            if name not in keys:
                keys[name] = self.results[name].key
                pending.extend(self.registry[name].needs)
        return keys

    def _compute(self, stage: Stage, key: str, values: dict, digests: dict, out_dir: Path) -> float:
        """Run `stage` into `out_dir` and write its manifest; returns the seconds it took."""
        started = time.perf_counter()
        context = self._context(stage, key, values, out_dir, progress=self.cfg.run.progress is True)
        log.info("%s: computing %s", stage.name, key)
        stage.run(context)
        if os.environ.get(FAULT_ENV) == stage.name:  # the one test hook, see FAULT_ENV
            os.kill(os.getpid(), signal.SIGKILL)
        seconds = time.perf_counter() - started
        artifacts.write_manifest(
            out_dir,
            {
                "stage": stage.name,
                "version": stage.version,
                "key": key,
                "config": values,
                "upstream": {name: self.results[name].key for name in stage.needs},
                "inputs": digests,
                "seconds": round(seconds, 3),
                "peak_rss_mb": round(peak_rss_mb(), 1),
                "libraries": library_versions(),
                "python": sys.version.split()[0],
                "code_commit": code_commit(),
                "seed": context.seed,
                **context.manifest_extra,
            },
            known=context.written_hashes,
        )
        return seconds


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def code_commit() -> str:
    """The git commit of the pipeline code (with a +dirty mark), or "unknown" outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "."], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
