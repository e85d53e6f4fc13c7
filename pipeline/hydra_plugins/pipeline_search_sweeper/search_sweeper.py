"""`SearchSweeper`: Hydra's Sweeper interface over `pipeline.search`, which holds the study and its rules.

Hydra instantiates it from `hydra.sweeper` (`pipeline.search_schema.SearchSweeperConf`); `sweep` asks the
study for batches of trials and hands them to whichever launcher `hydra/launcher` names.
"""

from __future__ import annotations

from typing import Any, List

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class SearchSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        # The settings are read from the composed config in `sweep` (`hydra.sweeper`), as every job sees them.
        super().__init__()
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: List[str]) -> Any:
        from pipeline.search import run_search

        return run_search(self, list(arguments))


def register() -> None:
    """Make the class known to Hydra where its plugin scan cannot list it (setuptools' default editable
    install serves the namespace through a path hook that `pkgutil.iter_modules` does not walk)."""
    Plugins.instance().register(SearchSweeper)
