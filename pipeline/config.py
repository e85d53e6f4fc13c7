"""OmegaConf resolvers the config files use, registered once when `pipeline` is imported."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf


def _model_kind(arch: DictConfig | None) -> str:
    from pipeline.models import model_kind

    return model_kind(OmegaConf.to_container(arch, resolve=True) if arch is not None else None)


def register_resolvers() -> None:
    """`${model_kind:${model.arch}}` -> "moe" | "dense", derived from the model's config fields."""
    OmegaConf.register_new_resolver("model_kind", _model_kind, replace=True)
