"""collect: residual-stream activations of the harmful and harmless training prompts, every decoder layer.

Artifacts: `activations.safetensors`, `prompts.jsonl` (the exact rendered prompts) and `meta.json`, in
the format `pipeline.collection` documents. Under `accelerate launch`/`torchrun` every process runs
this stage on its shard of the prompts; only the main process writes files.
"""

from __future__ import annotations

import logging

from pipeline import distributed, input_digests, layer_stream
from pipeline.collection import LABELS, artifact_meta, collect_classes, validate, write_artifact
from pipeline.model_cache import shared_model
from pipeline.models import model_fingerprint, resolve_model_dir
from pipeline.prompt_sets import prompt_splits
from pipeline.stage import Stage, StageContext

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> None:
    settings = ctx.config["collect"]
    main = distributed.is_main_process()
    splits = prompt_splits(ctx.config["prompts"])
    model_cfg = dict(ctx.config["model"])
    model_cfg["device_map"] = distributed.local_device_map(model_cfg["device_map"])
    chosen, why = layer_stream.choose(
        settings["streaming"], model_cfg, resolve_model_dir(model_cfg, ctx.model_store, ctx.progress and main), settings["dtype"]
    )
    log.info("collect: streaming=%s (%s)", chosen, why)
    ctx.manifest_extra["streaming"] = {"setting": str(settings["streaming"]), "chosen": chosen, "why": why}
    if chosen == "layers":  # one decoder layer in memory at a time (pipeline.layer_stream)
        model, tokenizer, model_dir = layer_stream.open_stream(model_cfg, ctx.model_store, settings["dtype"], ctx.progress and main)
    else:
        loaded = shared_model(model_cfg, ctx.model_store, settings["dtype"], ctx.progress and main)
        model, tokenizer, model_dir = loaded.model, loaded.tokenizer, loaded.model_dir
    sets = dict(zip(LABELS, (splits.harmful_train, splits.harmless_train)))
    tensors = collect_classes(
        model, tokenizer, sets, settings["positions"], settings["keep_activations"], settings["batch_size"],
        ctx.progress and main, settings["thinking"],
    )
    ctx.manifest_extra["world_size"] = distributed.world_size()
    if main:
        meta = artifact_meta(model, tokenizer, str(model_cfg["id"]), model_fingerprint(model_dir, ctx.model_store), splits, settings)
        write_artifact(ctx.out_dir, tensors, meta, sets, tokenizer, settings["thinking"])


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
