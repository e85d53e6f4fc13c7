"""The stage registry: every stage module, in pipeline order."""

from __future__ import annotations

import importlib

from pipeline.stage import Stage

STAGE_MODULES = ("collect", "baseline", "measure", "select", "ablate", "evaluate")


def registry() -> dict[str, Stage]:
    """{name: Stage} in execution order (upstream first)."""
    stages = [importlib.import_module(f"pipeline.stages.{name}").STAGE for name in STAGE_MODULES]
    return {stage.name: stage for stage in stages}
