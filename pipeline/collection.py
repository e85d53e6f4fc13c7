"""Collection: each prompt's residual stream at the configured positions, every decoder layer, in the
collect artifact's format (`activations.safetensors`, `prompts.jsonl`, `meta.json`).

Index i of the layer axis is always the output of decoder layer i (0-based). `{label}` is `harmful` or
`harmless`; "the activation" of a prompt is its residual at `collect.positions`: the last token, or the
mean over the post-instruction tokens (for both `post_instruction` and `post_instruction_mean`).

`collect.keep_activations=true` (meta `activations: kept`), all float32:
  `{label}` [n, num_layers, hidden]; `{label}_embed` [n, hidden] (embedding output, same reduction);
  with `positions=post_instruction` also `{label}_positions` [n, num_layers, k, hidden], the k
  post-instruction tokens in prompt order (the last one is the `last` position).

`collect.keep_activations=false` (meta `activations: streamed`): float64 sums over prompts, so memory
does not grow with the number of prompts:
  `{label}_sum` [num_layers, hidden]; `{label}_sumsq` [num_layers] (sum of squared L2 norms);
  `{label}_count` [] (int64); `{label}_embed_sum` [hidden]; with `positions=post_instruction` also
  `{label}_positions_sum` [num_layers, k, hidden] and `{label}_positions_sumsq` [num_layers, k].
These give class means and the within-class spread E|x|^2 - |mean|^2, not the variance along the
refusal direction (that would need a hidden x hidden second moment per layer): measure writes NaN there.

Under `accelerate launch`/`torchrun` each process reads a contiguous shard of each prompt set and the
shards are gathered in prompt order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from pipeline import distributed
from pipeline.activations import (
    ResidualBatch,
    num_layers_and_hidden,
    position_span,
    prompt_tokens,
    render_prompts,
    residual_batches,
)
from pipeline.architectures import is_moe
from pipeline.artifacts import save_tensors, write_json
from pipeline.errors import PipelineError
from pipeline.layer_stream import LayerStream

LABELS = ("harmful", "harmless")
ACTIVATIONS = "activations.safetensors"
PROMPTS = "prompts.jsonl"


def validate(config: Mapping[str, Any]) -> None:
    """Refuse a bad `collect.batch_size` (a union the schema leaves to this step) in one line before any model
    is loaded. `collect.positions`, `collect.keep_activations` and `collect.dtype` are typed by the schema."""
    size = config["collect"]["batch_size"]
    if size != "auto" and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise PipelineError(f"collect.batch_size={size!r} must be a positive integer or auto")


def kept_tensors(
    label: str, batches: Iterable[ResidualBatch], rows: int, shape: tuple[int, int, int], positions: str
) -> dict[str, torch.Tensor]:
    """Every prompt's activations in prompt order; `shape` is (num_layers, span, hidden)."""
    num_layers, span, hidden = shape
    layers = torch.empty((rows, num_layers, span, hidden))
    embed = torch.empty((rows, span, hidden))
    for batch in batches:
        layers[batch.indices] = batch.layers
        embed[batch.indices] = batch.embed
    tensors = {label: layers.mean(dim=2), f"{label}_embed": embed.mean(dim=1)}  # exact for span 1
    if positions == "post_instruction":
        tensors[f"{label}_positions"] = layers
    return tensors


def streamed_tensors(
    label: str, batches: Iterable[ResidualBatch], shape: tuple[int, int, int], positions: str
) -> dict[str, torch.Tensor]:
    """float64 sums over prompts of the activations and of their squared norms."""
    num_layers, span, hidden = shape
    sums = {
        f"{label}_sum": torch.zeros((num_layers, hidden), dtype=torch.float64),
        f"{label}_sumsq": torch.zeros(num_layers, dtype=torch.float64),
        f"{label}_embed_sum": torch.zeros(hidden, dtype=torch.float64),
    }
    if positions == "post_instruction":
        sums[f"{label}_positions_sum"] = torch.zeros((num_layers, span, hidden), dtype=torch.float64)
        sums[f"{label}_positions_sumsq"] = torch.zeros((num_layers, span), dtype=torch.float64)
    count = 0
    for batch in batches:
        reduced = batch.layers.mean(dim=2).double()
        sums[f"{label}_sum"] += reduced.sum(dim=0)
        sums[f"{label}_sumsq"] += reduced.square().sum(dim=(0, 2))
        sums[f"{label}_embed_sum"] += batch.embed.mean(dim=1).double().sum(dim=0)
        if positions == "post_instruction":
            per_position = batch.layers.double()
            sums[f"{label}_positions_sum"] += per_position.sum(dim=0)
            sums[f"{label}_positions_sumsq"] += per_position.square().sum(dim=(0, 3))
        count += len(batch.indices)
    sums[f"{label}_count"] = torch.tensor(count, dtype=torch.int64)
    return sums


def collect_class(model, tokenizer, prompts: Sequence[str], label: str, *args, **kwargs) -> dict[str, torch.Tensor]:
    """The artifact tensors of one class (`collect_classes`' other arguments); in a data-parallel launch this
    process reads only its shard."""
    return collect_classes(model, tokenizer, {label: prompts}, *args, **kwargs)


def collect_classes(
    model,  # a loaded model, or a pipeline.layer_stream.LayerStream (collect.streaming=layers)
    tokenizer,
    sets: Mapping[str, Sequence[str]],
    positions: str = "last",
    keep_activations: bool = True,
    batch_size: int | str = 16,
    progress: bool = True,
    thinking: str = "off",
) -> dict[str, torch.Tensor]:
    """The artifact tensors of every class in `sets` (label -> prompts). A LayerStream runs all classes
    through each layer in one pass, so every weight is read once; a loaded model runs them one by one."""
    tokens = {label: prompt_tokens(tokenizer, prompts, thinking) for label, prompts in sets.items()}
    span = {label: position_span(tokenizer, lists, positions, thinking) for label, lists in tokens.items()}
    bounds = {label: distributed.shard_bounds(len(lists)) for label, lists in tokens.items()}
    local = {label: lists[bounds[label][0]:bounds[label][1]] for label, lists in tokens.items()}
    pad = tokenizer.pad_token_id
    if isinstance(model, LayerStream):
        spans = set(span.values())
        assert len(spans) == 1, spans  # 1, or the template's suffix length, for every class
        batches = dict(zip(local, model.residual_batches_of(list(local.values()), pad, batch_size, spans.pop(), progress)))
    else:  # lazy: one class after the other, as before
        batches = {
            label: residual_batches(model, lists, pad, batch_size, span[label], progress, f"collect {label}")
            for label, lists in local.items()
        }
    num_layers, hidden = num_layers_and_hidden(model)
    tensors: dict[str, torch.Tensor] = {}
    for label, (start, stop) in bounds.items():
        shape = (num_layers, span[label], hidden)
        if keep_activations:
            kept = kept_tensors(label, batches[label], stop - start, shape, positions)
            tensors.update({name: distributed.gather_rows(t, len(tokens[label])).contiguous() for name, t in kept.items()})
        else:
            sums = streamed_tensors(label, batches[label], shape, positions)
            tensors.update({name: distributed.sum_across(t) for name, t in sums.items()})
    return tensors


def artifact_meta(
    model, tokenizer, model_id: str, fingerprint: str, splits, settings: Mapping[str, Any]
) -> dict[str, Any]:
    """meta.json (and the safetensors metadata): which model, prompts and positions the activations are of."""
    positions = settings["positions"]
    text_config = model.config.get_text_config()
    num_layers, _ = num_layers_and_hidden(model)
    thinking = settings["thinking"]
    first = prompt_tokens(tokenizer, splits.harmful_train[:1], thinking)[0]
    span = position_span(tokenizer, [first], positions, thinking)
    return {
        "model_id": model_id,
        "model_fingerprint": fingerprint,
        "model_type": model.config.model_type,
        "hidden_size": text_config.hidden_size,
        "num_layers": num_layers,
        "is_moe": is_moe(text_config.to_dict()),
        "position": positions,
        "position_tokens": span,
        "position_text": tokenizer.decode(first[-span:]),
        "activations": "kept" if settings["keep_activations"] else "streamed",
        "harmful_sha256": splits.hashes["harmful"],
        "harmless_sha256": splits.hashes["harmless"],
        "n_harmful": len(splits.harmful_train),
        "n_harmless": len(splits.harmless_train),
        "dtype": settings["dtype"],
        "thinking": thinking,
        "hidden_state_index": "layer axis index i is the output of decoder layer i (0-based); *_embed is the embedding output",
    }


def write_artifact(
    out_dir: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], sets: Mapping[str, Sequence[str]], tokenizer,
    thinking: str = "off",
) -> None:
    """`activations.safetensors`, `meta.json` and `prompts.jsonl` (each prompt exactly as the model saw it)."""
    save_tensors(tensors, out_dir / ACTIVATIONS, metadata={key: _meta_text(value) for key, value in meta.items()})
    write_json(out_dir / "meta.json", meta)
    with open(out_dir / PROMPTS, "w", encoding="utf-8") as handle:
        for label, prompts in sets.items():
            for index, (prompt, rendered) in enumerate(zip(prompts, render_prompts(tokenizer, prompts, thinking))):
                handle.write(json.dumps({"set": label, "index": index, "prompt": prompt, "rendered": rendered}) + "\n")


def collected_prompts(collect_dir: Path) -> list[str]:
    """Every prompt a collect artifact used, both classes."""
    with open(collect_dir / PROMPTS, encoding="utf-8") as handle:
        return [json.loads(line)["prompt"] for line in handle if line.strip()]


def _meta_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
