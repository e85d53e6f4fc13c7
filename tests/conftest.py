"""Fixtures shared by the test modules: one materialized tiny model, and one reference run of every stage.

Both live in pytest's base temp directory under fixed names, so the second module that asks for the
reference run finds every stage in the cache and pays only for key computation.
"""

from __future__ import annotations

from pathlib import Path

import shutil

import pytest

from tiny_pipeline import Scene, run_in_process


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One materialized tiny model for every test (`cache.models=<this>`)."""
    return tmp_path_factory.getbasetemp() / "shared-model-store"


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> tuple[Path, dict]:
    """(cache dir, run.json) of one uninterrupted SMALL run of every stage: what faulted runs must reproduce."""
    cache = tmp_path_factory.getbasetemp() / "reference-cache"
    summary = run_in_process([f"cache.dir={cache}", f"cache.models={model_store}"])
    return cache, summary


@pytest.fixture
def scene(tmp_path: Path, reference, model_store: Path) -> Scene:
    reference_cache, summary = reference
    shutil.copytree(reference_cache, tmp_path / "cache")
    return Scene(tmp=tmp_path, cache=tmp_path / "cache", store=model_store, reference=summary)
