"""The two field constructors of the typed config (`pipeline.schema`, `pipeline.eval_schema`): a setting with its
allowed range, and a nested section."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from omegaconf import MISSING


def setting(default: Any = MISSING, *, ge: float | None = None, lt: float | None = None, le: float | None = None,
            optional: bool = False) -> Any:
    """A field with its allowed range. MISSING (the default) makes it required; `optional` lets a config
    leave it out (it is then not part of a stage's config slice)."""
    return field(default=default, metadata={"ge": ge, "lt": lt, "le": le, "optional": optional})


def section(schema: type, optional: bool = False) -> Any:
    """A nested section; `optional`: None (the default), for configs that have no such section."""
    if optional:
        return field(default=None, metadata={"optional": True})
    return field(default_factory=schema)
