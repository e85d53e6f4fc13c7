"""Removing a refusal direction from the tensors that write into the residual stream.

Two edits, both applied column by column, where a "column" is one vector along
the tensor's hidden axis (the vectors the tensor can add to the residual):

* `orthogonalize`: W' = W - s * r (r^T W). With s=1 nothing the tensor writes
  has a component along r; 0<s<1 shrinks that component to (1-s) of itself.
* `norm_preserving`: the same removal, then each column is rescaled to its
  original norm, so the layer's output magnitudes are kept. The caller passes
  the *biprojected* direction for this method (see `directions_for_method`).

With `directions: k` in the plan the edit removes a k-dimensional subspace with
orthonormal basis Q (rows q_1..q_k, `direction_basis`) instead of one direction:
W' = W - s * Q^T (Q W) for `orthogonalize`, and for `norm_preserving` the same
removal followed by the same per-column rescale to the original norm. For k = 1
both are the one-direction edits above, computed by the same code (rank-1
updates), so plans with one direction give the same bytes as before the option.

All arithmetic runs in float32 whatever the storage dtype, and the result is
cast back to the original dtype. Two ways to apply a plan share the `PlanEditor`
here: `apply_plan_in_memory` (evaluate, a sweep's points and a search's trials; restorable) and
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
from pipeline.measurement import EXTRA_DIRECTIONS
from pipeline.plan import plan_directions

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


def orthonormal_rows(rows: Tensor) -> Tensor:
    """Gram-Schmidt of `rows` [k, hidden] in their order (a float64 QR), as float32: row i becomes the unit part of
    rows[i] orthogonal to the rows before it, so the first row keeps its direction."""
    work = rows.detach().to(torch.float64)
    if not torch.isfinite(work).all():
        raise PipelineError("a refusal direction is not finite; re-run the measure stage")
    q, r = torch.linalg.qr(work.T)
    diagonal = r.diagonal()
    if (diagonal.abs() <= 1e-6 * work.norm(dim=1)).any() or (work.norm(dim=1) == 0).any():
        raise PipelineError(
            "the directions of a planned layer are zero or not independent of each other; lower select.directions"
        )
    return (q * torch.sign(diagonal)).T.to(torch.float32)


def _basis(direction: Tensor) -> Tensor:
    """The unit vector of one direction [hidden], or orthonormal rows [k, hidden] for a subspace."""
    return _unit(direction) if direction.dim() == 1 else orthonormal_rows(direction)


def _edit(tensor: Tensor, direction: Tensor, scale: float, hidden_axis: int, keep_norms: bool) -> Tensor:
    r = _basis(direction).to(tensor.device)
    hidden = r.shape[-1]
    hidden_axis %= tensor.dim()
    if tensor.shape[hidden_axis] != hidden:
        raise PipelineError(
            f"tensor axis {hidden_axis} has length {tensor.shape[hidden_axis]} but the direction has {hidden}; "
            "the measurements come from a different model"
        )
    # One contiguous float32 copy, edited in place: viewed as [before, hidden, after], every slice is a
    # matrix whose vectors along `hidden` get a rank-1 (rank-k) update, with no full-size temporaries.
    work = tensor.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    before, after = math.prod(work.shape[:hidden_axis]), math.prod(work.shape[hidden_axis + 1 :])
    if after == 1:  # hidden is the last axis (embeddings, biases, gpt-oss experts): rows are the vectors
        _remove_along(work.view(before, hidden), r, scale, 1, keep_norms)
    else:
        for block in work.view(before, hidden, after):  # before > 1 only for fused experts
            _remove_along(block, r, scale, 0, keep_norms)
    return work.to(tensor.dtype)


def _remove_along(matrix: Tensor, r: Tensor, scale: float, axis: int, keep_norms: bool) -> None:
    """In place, for every vector v along `axis` (0: columns, 1: rows) of a float32 matrix:
    v <- v - s * r (r^T v) for a unit r [hidden], v <- v - s * Q^T (Q v) for orthonormal rows Q [k, hidden];
    then (keep_norms) rescaled to its old norm."""
    old_norms = matrix.norm(dim=axis, keepdim=True) if keep_norms else None
    if r.dim() == 2:
        if axis == 0:
            matrix.addmm_(r.T, r @ matrix, alpha=-scale)
        else:
            matrix.addmm_(matrix @ r.T, r, alpha=-scale)
    elif axis == 0:
        matrix.addr_(r, r @ matrix, alpha=-scale)
    else:
        matrix.addr_(matrix @ r, r, alpha=-scale)
    if old_norms is not None:
        new_norms = matrix.norm(dim=axis, keepdim=True)
        # A vector lying exactly along r vanishes at s=1 and has no direction left to rescale: it stays zero.
        matrix.mul_(torch.where(new_norms > 0, old_norms / new_norms, torch.zeros_like(new_norms)))


def orthogonalize(tensor: Tensor, direction: Tensor, scale: float, hidden_axis: int) -> Tensor:
    """W' = W - s * r (r^T W) along `hidden_axis` (for a bias: b' = b - s * r (r^T b)); r is normalized here.
    `direction` may be k rows [k, hidden]: W' = W - s * Q^T (Q W) with Q their orthonormalization (`orthonormal_rows`)."""
    return _edit(tensor, direction, scale, hidden_axis, keep_norms=False)


def norm_preserving(tensor: Tensor, direction: Tensor, scale: float, hidden_axis: int) -> Tensor:
    """column' = normalize(col - s * r (r^T col)) * ||col|| for every vector along `hidden_axis`.

    `s` interpolates how much of the component along r is removed before the rescale: s=0 is the
    identity, s=1 leaves r^T W' = 0 exactly with every column norm unchanged. Uses the direction it is
    given; for this method the caller passes the biprojected direction. With k rows [k, hidden] the removal is
    col - s * Q^T (Q col) (Q orthonormal, the first row's direction kept), then the same rescale: at s=1 the whole
    subspace is gone from every column and every norm is kept; for k=1 it is the one-direction rule exactly.
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


def direction_basis(directions: Tensor, direction_from: float) -> Tensor:
    """What one plan layer removes: the unit direction [hidden] from a [num_layers, hidden] table (`direction_for`),
    or from a [num_layers, k, hidden] table (`directions_for_method` with k > 1) an orthonormal basis [k, hidden]
    whose first row is that same unit direction and whose other rows span the layer's extra directions,
    orthogonalized against it.

    At a fractional position between layers a and a+1 (weight w) the extra rows are the top k-1 principal
    directions of the two layers' extra rows, weighted sqrt(1-w) and sqrt(w), with the first direction projected
    out: the subspace nearest to both, as the first direction is their blend. It depends on the measured subspaces
    only, not on the signs or the order of their rows.
    """
    if directions.dim() == 2:
        return direction_for(directions, direction_from)
    first = direction_for(directions[:, 0], direction_from)
    low = math.floor(direction_from)
    weight = direction_from - low
    for layer in (low, low + 1) if weight > 0 else (low,):
        if (directions[layer, 1:].norm(dim=1) == 0).any():
            raise PipelineError(
                f"direction_from {direction_from}: layer {layer} has fewer than {directions.shape[1] - 1} extra "
                "directions (its harmful prompts vary along fewer); lower select.directions"
            )
    extra = directions[low, 1:].to(torch.float64)
    if weight > 0:
        unit = first.to(torch.float64)
        stacked = torch.cat([math.sqrt(1 - weight) * extra, math.sqrt(weight) * directions[low + 1, 1:].to(torch.float64)])
        stacked = stacked - torch.outer(stacked @ unit, unit)
        extra = torch.linalg.svd(stacked, full_matrices=False)[2][: extra.shape[0]]
    return orthonormal_rows(torch.cat([first.to(torch.float64).unsqueeze(0), extra]))


def directions_for_method(measurements: Mapping[str, Tensor], method: str, directions: int = 1) -> Tensor:
    """The direction table a method uses: refusal for orthogonal, biprojected for norm_preserving; [num_layers,
    hidden] for one direction per layer, else [num_layers, directions, hidden] with the measurement's extra
    directions (`measurement.EXTRA_DIRECTIONS`) after the method's own."""
    key = METHOD_DIRECTION[method]
    if key not in measurements:
        raise PipelineError(f"measurements have no {key!r} tensor (needed by method {method}); re-run the measure stage")
    if directions == 1:
        return measurements[key]
    extra = measurements.get(EXTRA_DIRECTIONS)
    available = 0 if extra is None else extra.shape[1]
    if available < directions - 1:
        raise PipelineError(
            f"the plan removes {directions} directions per layer but the measurement has {available} extra directions "
            "per layer (measure finds them in kept activations only: collect.keep_activations=true); lower select.directions"
        )
    return torch.cat([measurements[key].unsqueeze(1), extra[:, : directions - 1]], dim=1)


def directions_for_plan(measurements: Mapping[str, Tensor], plan: Mapping[str, Any]) -> Tensor:
    """The direction table for a validated plan: its method's, with as many directions per layer as it removes."""
    return directions_for_method(measurements, plan["method"], plan_directions(plan))


@dataclass(frozen=True)
class LayerEdit:
    """One planned layer, resolved: what it removes and the scale per component."""

    layer: int
    direction: Tensor
    """The unit direction [hidden], or an orthonormal basis [k, hidden] for a plan with `directions: k`."""
    scale: float
    scales: Mapping[Component, float]


@dataclass(frozen=True)
class ResolvedPlan:
    """A plan turned into what the edit needs: per-layer unit directions (or bases) and scales."""

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
    the direction (or subspace) of the lowest planned layer at that layer's `scale`. `directions` is the table
    of `directions_for_plan`: [num_layers, hidden], or [num_layers, k, hidden] for k directions per layer.
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
            direction=direction_basis(directions, entry["direction_from"]),
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
        """(unit direction or orthonormal basis, scale, hidden axis, hit) when the plan edits tensor `name`, else None."""
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

    `directions` is the table for the plan's method and direction count (`directions_for_plan`).
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
