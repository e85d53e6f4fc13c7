"""The plan search's settings: the `hydra.sweeper` node of `python -m pipeline -m +search=default`.

The search is Hydra's sweeper over the pipeline (the `pipeline_search` sweeper, `pipeline.search`), so its
settings live where every Hydra sweeper keeps its own: under `hydra.sweeper`, typed by the dataclass below,
stored in Hydra's ConfigStore as `hydra/sweeper/pipeline_search` when `pipeline` is imported
(`pipeline.config`). `conf/search/default.yaml` selects it and sets every value (each documented there).

`params` and `seeds` are nested like the pipeline's own config (`select: {scale: ...}`), so searching one
more setting is one YAML line; their leaves are checked against the pipeline's schema and the stages'
validate steps by `pipeline.search_space.validate`, not here, because a leaf's type is the searched setting's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from pipeline.schema_fields import setting

SWEEPER_NAME = "pipeline_search"
SWEEPER_TARGET = "hydra_plugins.pipeline_search_sweeper.search_sweeper.SearchSweeper"
"""Hydra instantiates sweepers only from the `hydra_plugins` namespace; the class there is a thin shell."""


@dataclass
class SearchSweeperConf:
    _target_: str = SWEEPER_TARGET
    n_trials: int = setting(ge=1)  # trials that ran to an end (complete or failed) wanted in the study
    n_jobs: Optional[int] = setting(ge=1)  # trials asked for and launched together; null: the launcher's n_jobs, else 1
    max_kl: float = setting(ge=0)  # the chosen plan: fewest refusals among trials with KL <= max_kl
    startup_trials: int = setting(ge=0)  # trials (seeds included) before TPE models the front
    export: bool = MISSING  # run ablate + evaluate for the chosen plan as the sweep's last job
    trial_overrides: List[str] = MISSING  # overrides for trials only (the export is scored without them)
    params: Dict[str, Any] = field(default_factory=dict)  # {section: {setting: {low, high, step} | {choices}}}
    seeds: List[Dict[str, Any]] = field(default_factory=list)  # points tried first: {section: {setting: value}}


def register() -> None:
    ConfigStore.instance().store(group="hydra/sweeper", name=SWEEPER_NAME, node=SearchSweeperConf, provider="pipeline")
