"""Try a plan without writing a checkpoint: the original model loaded once, each plan applied in memory and undone.

`InMemoryModel.applied(plan, ...)` edits the loaded parameters as the ablate stage edits the
checkpoint's files (`pipeline.weight_edit.apply_plan_in_memory`), then rounds the edited tensors to
the checkpoint's storage dtype, as the ablate stage's files are rounded: a bf16 checkpoint computed in
fp32 scores in memory exactly what its ablated copy scores after loading. On leaving the block the
exact original tensors are put back. The evaluate stage scores a sweep point this way, and so a plan
search's trials (`pipeline.search`). `LayerPlan` is the same edit for a model that is never whole in
memory (`pipeline.layer_stream`): each decoder layer is edited as it is read.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch

from pipeline.model_cache import shared_model
from pipeline.models import read_model_config
from pipeline.architectures import get_architecture
from pipeline.weight_edit import RestoreHandle, apply_plan_in_memory, directions_for_plan, plan_editor


def checkpoint_dtype(model_dir: Path) -> torch.dtype | None:
    """The dtype the checkpoint stores its weights in (config.json), or None when it does not say."""
    config = read_model_config(model_dir)
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, str(name), None) if name else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


@torch.no_grad()
def round_parameter(parameter: torch.nn.Parameter, storage_dtype: torch.dtype | None) -> None:
    """Round an edited parameter as the ablate stage's files round it (a bf16 checkpoint computed in fp32)."""
    if storage_dtype is not None and parameter.dtype != storage_dtype:
        parameter.data.copy_(parameter.data.to(storage_dtype).to(parameter.dtype))


def round_to_storage(model: torch.nn.Module, handle: RestoreHandle, storage_dtype: torch.dtype | None) -> None:
    """`round_parameter` for every parameter `handle` edited."""
    for name in handle.edited:
        round_parameter(model.get_parameter(name), storage_dtype)


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
        directions = directions_for_plan(measurements, plan)
        handle = apply_plan_in_memory(self.model, plan, directions, embed)
        try:
            round_to_storage(self.model, handle, self.storage_dtype)
            yield self.model
        finally:
            handle.restore()


class LayerPlan:
    """`plan` applied to a `pipeline.layer_stream.LayerStream`, one decoder layer at a time as each is read.

    The edit is `apply_plan_in_memory`'s (the same `PlanEditor`, on the same in-memory parameter names and
    layouts) and the rounding `InMemoryModel.applied`'s, so a streamed forward pass computes what the in-memory
    one computes on the applied plan. Nothing is undone: a streamed layer is freed after use, and the stream's
    embedding (edited with `embed`) belongs to the stream alone.
    """

    def __init__(self, stream: Any, plan: Mapping[str, Any], measurements: Mapping[str, torch.Tensor], embed: bool):
        directions = directions_for_plan(measurements, plan)
        self.editor = plan_editor(stream.config.to_dict(), plan, directions, embed, "memory")
        self.layers_path = get_architecture(stream.config.model_type).layers_path
        self.storage_dtype = checkpoint_dtype(stream.model_dir)
        # Coverage from the skeleton's names (its layers are on meta), so a table mismatch fails before any read.
        self.editor.check_coverage({target[3] for name, _ in stream.skeleton.named_parameters()
                                    if (target := self.editor.target(name)) is not None})

    @torch.no_grad()
    def edit(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]]) -> None:
        """Edit and round, in place, the parameters (named as in the whole model) that the plan touches."""
        for name, parameter in named_parameters:
            result = self.editor.edit(name, parameter)
            if result is not None:
                parameter.data.copy_(result[0])
                round_parameter(parameter, self.storage_dtype)

    def edit_layer(self, index: int, layer: torch.nn.Module) -> None:
        """Decoder layer `index`, just read from the shards."""
        self.edit(layer.named_parameters(prefix=f"{self.layers_path}.{index}"))
