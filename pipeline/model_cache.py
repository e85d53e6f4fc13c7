"""One loaded source model per process: the stages of a run and the jobs of a multirun share it.

collect, baseline and evaluate (and the plan search's trials) all read the same original weights, so
loading them once per process is enough: Hydra's basic launcher runs a sweep's jobs one after another
in one process, and a joblib worker runs several. The cache holds one model, keyed by everything that
defines the loaded weights: the resolved checkpoint directory and the fingerprint of its contents, the
compute dtype, the placement (`device_map`, `max_memory`, `offload_folder`) and `trust_remote_code`.
A different key frees the model held before loading the next one, so memory stays at one model (plus
the edited tensors' originals while evaluate applies a plan, `pipeline.plan_trial`).

Whoever takes the shared model must hand it back as it found it: hooks removed (`pipeline.activations`
does), a plan applied in memory restored (`InMemoryModel.applied` does, also when the edit fails).
`loads()` counts the loads of this process, for the tests and `bench/sweep.py`.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pipeline import artifacts
from pipeline.models import load_model, model_fingerprint, resolve_model_dir

PLACEMENT_KEYS = ("device_map", "max_memory", "offload_folder", "trust_remote_code")


@dataclass(frozen=True)
class LoadedModel:
    model: Any
    tokenizer: Any
    model_dir: Path


_held: tuple[str, LoadedModel] | None = None
_loads = 0


def load_key(model_cfg: Mapping[str, Any], model_store: Path, dtype: str | None = None) -> str:
    """What the loaded weights depend on, as one string: equal keys load equal models."""
    model_dir = resolve_model_dir(model_cfg, model_store, progress=False)
    return artifacts.canonical_json(
        {
            "dir": str(Path(model_dir).resolve()),
            "fingerprint": model_fingerprint(model_dir, model_store),
            "dtype": str(dtype or model_cfg["dtype"]),
            **{key: model_cfg.get(key) for key in PLACEMENT_KEYS},
        }
    )


def shared_model(model_cfg: Mapping[str, Any], model_store: Path, dtype: str | None = None, progress: bool = True) -> LoadedModel:
    """The model of `model_cfg` (in `dtype`, default `model.dtype`), loaded once per process and key."""
    global _held, _loads
    key = load_key(model_cfg, model_store, dtype)
    if _held is not None and _held[0] == key:
        return _held[1]
    release()
    model, tokenizer, model_dir = load_model(dict(model_cfg), model_store, dtype, progress)
    _loads += 1
    _held = (key, LoadedModel(model, tokenizer, model_dir))
    return _held[1]


def release() -> None:
    """Drop the held model (its memory is freed once no caller still holds it)."""
    global _held
    if _held is None:
        return
    _held = None
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def loads() -> int:
    """How many times this process has loaded a source model through the cache."""
    return _loads
