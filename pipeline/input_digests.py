"""Digests of a stage's external inputs (their contents, never their paths), for the runner's cache keys.

Each function has the `Stage.input_digest` signature: (config slice, model store) -> {name: sha256}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from pipeline.artifacts import sha256_file
from pipeline.judge_models import classifier_digest
from pipeline.models import model_fingerprint, resolve_model_dir
from pipeline.plan import read_plan
from pipeline.prompt_sets import prompt_splits
from pipeline.selection import replay_path


def prompts_and_model(config: Mapping[str, Any], model_store: Path) -> dict[str, str]:
    """Prompt file contents and the checkpoint's contents: editing either invalidates the cache."""
    hashes = prompt_splits(config["prompts"]).hashes
    model_dir = resolve_model_dir(config["model"], model_store)
    return {"harmful": hashes["harmful"], "harmless": hashes["harmless"], "model": model_fingerprint(model_dir, model_store)}


def replayed_plan(config: Mapping[str, Any], model_store: Path) -> dict[str, str]:
    """The replayed plan's content, so editing the file (not only renaming it) invalidates select.

    The plan is read and validated here, while keys are computed, so a hostile or broken plan file
    is refused before any stage runs rather than after collect.
    """
    if config["plan"] is None:
        return {}
    path = replay_path(config["plan"])
    read_plan(path)
    return {"plan": sha256_file(path)}


def prompts_model_and_judge(config: Mapping[str, Any], model_store: Path) -> dict[str, str]:
    """`prompts_and_model` plus the judge's own model (eval.judge=classifier: its files' contents)."""
    return {**prompts_and_model(config, model_store), **classifier_digest(config["eval"])}


def judge(config: Mapping[str, Any], model_store: Path) -> dict[str, str]:
    """The classifier judge's files' contents (nothing for the other judges)."""
    return classifier_digest(config["eval"])
