"""Removing a refusal direction from the tensors that write into the residual stream.

Two edits, both applied column by column, where a "column" is one vector along
the tensor's hidden axis (the vectors the tensor can add to the residual):

* `orthogonalize`: W' = W - s * r (r^T W). With s=1 nothing the tensor writes
  has a component along r; 0<s<1 shrinks that component to (1-s) of itself.
* `norm_preserving`: the same removal, then each column is rescaled to its
  original norm, so the layer's output magnitudes are kept. The caller passes
  the *biprojected* direction for this method (see `directions_for_method`).

All arithmetic runs in float32 whatever the storage dtype, and the result is
cast back to the original dtype. Two ways to apply a plan share the `PlanEditor`
here: `apply_plan_in_memory` (evaluate / optimize trials, restorable) and
`pipeline.checkpoint_copy.edit_checkpoint` (the ablate stage: copies the
checkpoint to a new directory, overwriting only the edited tensors' bytes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from pipeline.architectures import Architecture, Component, Where, get_architecture, num_decoder_layers, residual_writers
from pipeline.errors import PipelineError

METHOD_DIRECTION = {"orthogonal": "refusal_direction", "norm_preserving": "biprojected_direction"}
"""The measurement tensor each method (`pipeline.plan.METHODS`) takes its directions from."""
Hit = tuple[int, str]
"""(layer, component) of an edited residual writer; `EMBED_HIT` for the token embedding."""
EMBED_HIT: Hit = (-1, "embed")


def _unit(direction: Tensor) -> Tensor:
    direction = direction.detach().to(torch.float32).flatten()
    norm = direction.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise PipelineError("refusal direction is zero or not finite; re-run the measure stage")
    return direction / norm


def _edit(tensor: Tensor, direction: Tensor, scale: float, hidden_axis: int, keep_norms: bool) -> Tensor:
    r = _unit(direction).to(tensor.device)
    hidden_axis %= tensor.dim()
    if tensor.shape[hidden_axis] != r.shape[0]:
        raise PipelineError(
            f"tensor axis {hidden_axis} has length {tensor.shape[hidden_axis]} but the direction has {r.shape[0]}; "
            "the measurements come from a different model"
        )
    # One contiguous float32 copy, edited in place: viewed as [before, hidden, after], every slice is a
    # matrix whose vectors along `hidden` get a rank-1 update (addr_), with no full-size temporaries.
    work = tensor.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    before, after = math.prod(work.shape[:hidden_axis]), math.prod(work.shape[hidden_axis + 1 :])
    if after == 1:  # hidden is the last axis (embeddings, biases, gpt-oss experts): rows are the vectors
        _remove_along(work.view(before, r.shape[0]), r, scale, 1, keep_norms)
    else:
        for block in work.view(before, r.shape[0], after):  # before > 1 only for fused experts
            _remove_along(block, r, scale, 0, keep_norms)
    return work.to(tensor.dtype)


def _remove_along(matrix: Tensor, r: Tensor, scale: float, axis: int, keep_norms: bool) -> None:
    """In place, for every vector v along `axis` (0: columns, 1: rows) of a float32 matrix:
    v <- v - s * r (r^T v), then (keep_norms) rescaled to its old norm."""
    old_norms = matrix.norm(dim=axis, keepdim=True) if keep_norms else None
    if axis == 0:
        matrix.addr_(r, r @ matrix, alpha=-scale)
    else:
        matrix.addr_(matrix @ r, r, alpha=-scale)
    if old_norms is not None:
        new_norms = matrix.norm(dim=axis, keepdim=True)
        # A vector lying exactly along r vanishes at s=1 and has no direction left to rescale: it stays zero.
        matrix.mul_(torch.where(new_norms > 0, old_norms / new_norms, torch.zeros_like(new_norms)))


def orthogonalize(tensor: Tensor, direction: Tensor, scale: float, hidden_axis: int) -> Tensor:
    """W' = W - s * r (r^T W) along `hidden_axis` (for a bias: b' = b - s * r (r^T b)); r is normalized here."""
    return _edit(tensor, direction, scale, hidden_axis, keep_norms=False)


def norm_preserving(tensor: Tensor, direction: Tensor, scale: float, hidden_axis: int) -> Tensor:
    """column' = normalize(col - s * r (r^T col)) * ||col|| for every vector along `hidden_axis`.

    `s` interpolates how much of the component along r is removed before the rescale: s=0 is the
    identity, s=1 leaves r^T W' = 0 exactly with every column norm unchanged. Uses the direction it is
    given; for this method the caller passes the biprojected direction.
    """
    return _edit(tensor, direction, scale, hidden_axis, keep_norms=True)


EDITS: dict[str, Callable[[Tensor, Tensor, float, int], Tensor]] = {
    "orthogonal": orthogonalize,
    "norm_preserving": norm_preserving,
}


def direction_for(directions: Tensor, direction_from: float) -> Tensor:
    """Unit float32 direction for a (possibly fractional) layer index into `directions` [num_layers, hidden].

    12.4 blends rows 12 and 13 as 0.6 * d12 + 0.4 * d13, then renormalizes. The plan only knows the
    layer count it was written for, so the range is checked here against the table actually given.
    """
    last = directions.shape[0] - 1
    if not 0 <= direction_from <= last:
        raise PipelineError(
            f"direction_from {direction_from} is outside the measured layers 0-{last}; fix the plan or re-run measure"
        )
    low = math.floor(direction_from)
    weight = direction_from - low
    direction = directions[low].to(torch.float32)
    if weight > 0:
        direction = (1 - weight) * direction + weight * directions[low + 1].to(torch.float32)
    return _unit(direction)


def directions_for_method(measurements: Mapping[str, Tensor], method: str) -> Tensor:
    """The [num_layers, hidden] direction table a method uses: refusal for orthogonal, biprojected for norm_preserving."""
    key = METHOD_DIRECTION[method]
    if key not in measurements:
        raise PipelineError(f"measurements have no {key!r} tensor (needed by method {method}); re-run the measure stage")
    return measurements[key]


@dataclass(frozen=True)
class LayerEdit:
    """One planned layer, resolved: its unit direction and the scale per component."""

    layer: int
    direction: Tensor
    scale: float
    scales: Mapping[Component, float]


@dataclass(frozen=True)
class ResolvedPlan:
    """A plan turned into what the edit needs: per-layer unit directions and scales."""

    method: str
    layers: Mapping[int, LayerEdit]
    embed_direction: Tensor | None
    embed_scale: float


def resolve_plan(plan: Mapping[str, Any], directions: Tensor, num_layers: int, embed: bool = False) -> ResolvedPlan:
    """Turn a plan that `pipeline.plan.validate_plan` accepted into per-layer edits for a model with
    `num_layers` decoder layers.

    The plan's own checks know the layer count it was written for, not the model it is applied to, so
    its layers are checked against this model here. A layer listed twice is refused rather than
    letting one entry silently replace the other. With `embed`, the token embeddings are edited along
    the direction of the lowest planned layer at that layer's `scale`.
    """
    layers: dict[int, LayerEdit] = {}
    for entry in plan["layers"]:
        layer, scale = entry["layer"], entry["scale"]
        if not 0 <= layer < num_layers:
            raise PipelineError(
                f"plan layer {layer} is out of range: the model has {num_layers} decoder layers (0-{num_layers - 1})"
            )
        if layer in layers:
            raise PipelineError(f"plan lists layer {layer} twice; keep one entry per layer")
        layers[layer] = LayerEdit(
            layer=layer,
            direction=direction_for(directions, entry["direction_from"]),
            scale=scale,
            scales={"attn": entry.get("attn_scale", scale), "mlp": entry.get("mlp_scale", scale)},
        )
    first = layers[min(layers)]
    return ResolvedPlan(
        method=plan["method"],
        layers=layers,
        embed_direction=first.direction if embed else None,
        embed_scale=first.scale,
    )


@dataclass(frozen=True)
class PlanEditor:
    """A resolved plan bound to one model: which of its tensor names (spelled as on disk or as in
    memory) the plan edits, and how. Both ways of applying a plan go through it, so they edit alike."""

    arch: Architecture
    num_layers: int
    plan: ResolvedPlan
    where: Where

    def target(self, name: str) -> tuple[Tensor, float, int, Hit] | None:
        """(unit direction, scale, hidden axis, hit) when the plan edits tensor `name`, else None."""
        plan = self.plan
        if plan.embed_direction is not None and name == self.arch.embed_names[self.where]:
            return plan.embed_direction, plan.embed_scale, 1, EMBED_HIT
        match = residual_writers(self.arch, name, self.num_layers, self.where)
        if match is None or match.layer not in plan.layers:
            return None
        layer = plan.layers[match.layer]
        return layer.direction, layer.scales[match.component], match.hidden_axis, (match.layer, match.component)

    def edit(self, name: str, tensor: Tensor) -> tuple[Tensor, Hit] | None:
        """The edited tensor (and its hit) when the plan touches `name`, else None."""
        target = self.target(name)
        if target is None:
            return None
        direction, scale, hidden_axis, hit = target
        return EDITS[self.plan.method](tensor, direction, scale, hidden_axis), hit

    def check_coverage(self, hits: set[Hit]) -> None:
        """Every planned layer must have edited both an attention and an MLP writer (and the embedding
        when asked): a silent no-op would mean the table no longer matches the tensor names."""
        if self.plan.embed_direction is not None and EMBED_HIT not in hits:
            raise PipelineError(
                f"no tensor named {self.arch.embed_names[self.where]} to edit for ablate.embed; "
                "the checkpoint's tensor names differ from pipeline/architectures.py"
            )
        for layer in sorted(self.plan.layers):
            for component in ("attn", "mlp"):
                if (layer, component) not in hits:
                    raise PipelineError(
                        f"plan layer {layer}: no {component} tensor matched the {self.arch.model_type} table in "
                        "pipeline/architectures.py; the checkpoint's tensor names differ from the table"
                    )


def plan_editor(
    config: Mapping[str, Any], plan: Mapping[str, Any], directions: Tensor, embed: bool, where: Where
) -> PlanEditor:
    """The editor for the model described by `config` (config.json as a dict), with `plan` resolved
    against that model's own layer count."""
    arch = get_architecture(config.get("model_type", "<missing model_type>"))
    num_layers = num_decoder_layers(config)
    return PlanEditor(arch, num_layers, resolve_plan(plan, directions, num_layers, embed), where)


@dataclass
class RestoreHandle:
    """The original values of the parameters `apply_plan_in_memory` edited (kept on CPU)."""

    originals: dict[str, tuple[nn.Parameter, Tensor]] = field(default_factory=dict)

    @property
    def edited(self) -> list[str]:
        return sorted(self.originals)

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the exact original tensors (bit-identical); safe to call more than once."""
        for parameter, original in self.originals.values():
            parameter.data.copy_(original)


@torch.no_grad()
def apply_plan_in_memory(
    model: nn.Module, plan: Mapping[str, Any], directions: Tensor, embed: bool = False
) -> RestoreHandle:
    """Edit the loaded model's parameters in place, as `edit_checkpoint` would edit its files.

    `directions` is the [num_layers, hidden] table for the plan's method (`directions_for_method`).
    Only the edited tensors are cloned (to CPU, so GPU memory is not doubled); `.restore()` undoes the edit.
    """
    editor = plan_editor(model.config.to_dict(), plan, directions, embed, "memory")
    handle = RestoreHandle()
    hits: set[Hit] = set()
    try:
        for name, parameter in model.named_parameters():
            if parameter.device.type == "meta" and editor.target(name) is not None:
                raise PipelineError(
                    f"{name} is offloaded (meta device) and cannot be edited in memory; give the planned layers "
                    "GPU or CPU memory (model.max_memory, no offload_folder) so evaluate can apply the plan"
                )
            result = editor.edit(name, parameter)
            if result is None:
                continue
            edited, hit = result
            handle.originals[name] = (parameter, parameter.detach().to("cpu", copy=True))
            parameter.data.copy_(edited)
            hits.add(hit)
        editor.check_coverage(hits)
    except BaseException:
        handle.restore()  # a shared model (pipeline.model_cache) must never keep half a plan
        raise
    return handle
