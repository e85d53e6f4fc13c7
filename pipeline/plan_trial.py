"""Try a plan without writing a checkpoint: the original model loaded once, each plan applied in memory and undone.

`InMemoryModel.applied(plan, ...)` edits the loaded parameters as the ablate stage edits the
checkpoint's files (`pipeline.weight_edit.apply_plan_in_memory`), then rounds the edited tensors to
the checkpoint's storage dtype, as the ablate stage's files are rounded: a bf16 checkpoint computed in
fp32 scores in memory exactly what its ablated copy scores after loading. On leaving the block the
exact original tensors are put back. The evaluate stage scores a sweep point this way, and the plan
search (`pipeline.optimize`) its trials.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from pipeline.model_cache import shared_model
from pipeline.models import read_model_config
from pipeline.weight_edit import RestoreHandle, apply_plan_in_memory, directions_for_method


def checkpoint_dtype(model_dir: Path) -> torch.dtype | None:
    """The dtype the checkpoint stores its weights in (config.json), or None when it does not say."""
    config = read_model_config(model_dir)
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, str(name), None) if name else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


@torch.no_grad()
def round_to_storage(model: torch.nn.Module, handle: RestoreHandle, storage_dtype: torch.dtype | None) -> None:
    """Round the edited parameters as the ablate stage's files round them (a bf16 checkpoint computed in fp32)."""
    if storage_dtype is None:
        return
    for name in handle.edited:
        parameter = model.get_parameter(name)
        if parameter.dtype != storage_dtype:
            parameter.data.copy_(parameter.data.to(storage_dtype).to(parameter.dtype))


class InMemoryModel:
    """The original model of `model_cfg` (the process's shared copy, `pipeline.model_cache`), onto which
    plans are applied and undone."""

    def __init__(self, model_cfg: Mapping[str, Any], model_store: Path, progress: bool = True):
        loaded = shared_model(model_cfg, model_store, progress=progress)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.storage_dtype = checkpoint_dtype(loaded.model_dir)

    @contextmanager
    def applied(
        self, plan: Mapping[str, Any], measurements: Mapping[str, torch.Tensor], embed: bool = False
    ) -> Iterator[torch.nn.Module]:
        """The model with `plan` applied (as the ablate stage would write it) inside the block, original after.

        `measurements` are the measure stage's tensors (the direction tables); `embed` is `ablate.embed.enabled`.
        """
        directions = directions_for_method(measurements, plan["method"])
        handle = apply_plan_in_memory(self.model, plan, directions, embed)
        try:
            round_to_storage(self.model, handle, self.storage_dtype)
            yield self.model
        finally:
            handle.restore()
