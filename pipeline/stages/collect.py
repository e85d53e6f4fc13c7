"""collect: residual-stream activations of the harmful and harmless training prompts, every decoder layer.

Artifacts: `activations.safetensors` (float32 `harmful`/`harmless` [n, num_layers, hidden] where index i
is the output of decoder layer i, plus `harmful_embed`/`harmless_embed` [n, hidden]), `prompts.jsonl`
(the exact rendered prompts) and `meta.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping


from pipeline.activations import collect_residuals, render_prompts
from pipeline.architectures import is_moe
from pipeline.artifacts import save_tensors, write_json
from pipeline.models import load_model, model_fingerprint, resolve_model_dir
from pipeline.prompt_sets import prompt_splits
from pipeline.stage import Stage, StageContext

POSITIONS = ("last", "post_instruction_mean")


def input_digest(config: Mapping[str, Any], model_store: Path) -> dict[str, str]:
    """Prompt file contents and the checkpoint's identity: editing either invalidates the cache."""
    hashes = prompt_splits(config["prompts"]).hashes
    model_dir = resolve_model_dir(config["model"], model_store)
    return {"harmful": hashes["harmful"], "harmless": hashes["harmless"], "model": model_fingerprint(model_dir)}


def run(ctx: StageContext) -> None:
    settings = ctx.config["collect"]
    if settings["positions"] not in POSITIONS:
        from pipeline.errors import PipelineError

        raise PipelineError(f"collect.positions={settings['positions']!r} is not one of {', '.join(POSITIONS)}")
    splits = prompt_splits(ctx.config["prompts"])
    model, tokenizer, model_dir = load_model(ctx.config["model"], ctx.model_store, settings["dtype"], ctx.progress)
    sets = {"harmful": splits.harmful_train, "harmless": splits.harmless_train}
    tensors = {}
    for label, prompts in sets.items():
        residuals = collect_residuals(
            model, tokenizer, prompts, settings["batch_size"], settings["positions"], ctx.progress, f"collect {label}"
        )
        tensors[label] = residuals.decoder_outputs.contiguous()
        tensors[f"{label}_embed"] = residuals.embed.contiguous()
    text_config = model.config.get_text_config()
    meta = {
        "model_id": str(ctx.config["model"]["id"]),
        "model_fingerprint": model_fingerprint(model_dir),
        "model_type": model.config.model_type,
        "hidden_size": text_config.hidden_size,
        "num_layers": tensors["harmful"].shape[1],
        "is_moe": is_moe(text_config.to_dict()),
        "position": settings["positions"],
        "harmful_sha256": splits.hashes["harmful"],
        "harmless_sha256": splits.hashes["harmless"],
        "n_harmful": len(splits.harmful_train),
        "n_harmless": len(splits.harmless_train),
        "dtype": settings["dtype"],
        "hidden_state_index": "activations[:, i] is the output of decoder layer i (0-based); *_embed is the embedding output",
    }
    save_tensors(tensors, ctx.out_dir / "activations.safetensors", metadata={k: _meta_text(v) for k, v in meta.items()})
    write_json(ctx.out_dir / "meta.json", meta)
    with open(ctx.out_dir / "prompts.jsonl", "w", encoding="utf-8") as handle:
        for label, prompts in sets.items():
            for index, (prompt, rendered) in enumerate(zip(prompts, render_prompts(tokenizer, prompts))):
                handle.write(json.dumps({"set": label, "index": index, "prompt": prompt, "rendered": rendered}) + "\n")


def _meta_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


STAGE = Stage(
    name="collect",
    version="1",
    needs=(),
    config_keys=("model", "prompts", "collect"),
    run=run,
    input_digest=input_digest,
)
