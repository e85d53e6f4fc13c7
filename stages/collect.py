"""collect: residual-stream activations of the harmful and harmless training prompts, every decoder layer.

Artifacts: `activations.safetensors`, `prompts.jsonl` (the exact rendered prompts) and `meta.json`, in
the format `pipeline.collection` documents. Under `accelerate launch`/`torchrun` every process runs
this stage on its shard of the prompts; only the main process writes files.
"""

from __future__ import annotations

import torch

from pipeline import distributed, input_digests
from pipeline.collection import LABELS, artifact_meta, collect_class, validate, write_artifact
from pipeline.models import load_model, model_fingerprint
from pipeline.prompt_sets import prompt_splits
from pipeline.stage import Stage, StageContext


def run(ctx: StageContext) -> None:
    settings = ctx.config["collect"]
    main = distributed.is_main_process()
    splits = prompt_splits(ctx.config["prompts"])
    model_cfg = dict(ctx.config["model"])
    model_cfg["device_map"] = distributed.local_device_map(model_cfg["device_map"])
    model, tokenizer, model_dir = load_model(model_cfg, ctx.model_store, settings["dtype"], ctx.progress and main)
    sets = dict(zip(LABELS, (splits.harmful_train, splits.harmless_train)))
    tensors: dict[str, torch.Tensor] = {}
    for label, prompts in sets.items():
        tensors.update(
            collect_class(
                model, tokenizer, prompts, label, settings["positions"], settings["keep_activations"],
                settings["batch_size"], ctx.progress and main,
            )
        )
    ctx.manifest_extra["world_size"] = distributed.world_size()
    if main:
        meta = artifact_meta(model, tokenizer, str(model_cfg["id"]), model_fingerprint(model_dir, ctx.model_store), splits, settings)
        write_artifact(ctx.out_dir, tensors, meta, sets, tokenizer)


STAGE = Stage(
    name="collect",
    version="2",
    needs=(),
    config_keys=("model", "prompts", "collect"),
    run=run,
    input_digest=input_digests.prompts_and_model,
    validate=validate,
    data_parallel=True,
)
