"""The ablate stage: apply the selected plan to the checkpoint and write a loadable model directory.

It reads `ablation.yaml` from select and the direction tables from measure,
resolves the source checkpoint (hub snapshot, local directory, or a model
materialized into the model store), and copies it into `<artifact>/model/`
with the planned layers' tensors edited in the copy (`pipeline.checkpoint_copy`),
and writes the model card (README.md) that records the plan and its provenance.
The source's file hashes go into the manifest so the artifact says exactly
which bytes it was derived from. A model materialized into the model store
has just had every file verified against its own manifest by
`models.resolve_model_dir`, so those hashes are passed on rather than
computed a second time. Any other source is hashed while it is copied, and
its hashes are remembered against each file's stat identity
(`pipeline.source_hashes`), so the next ablate of the same, unchanged files
(the next sweep point) does not hash them again.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Mapping

from pipeline import artifacts, lora_export, models, source_hashes
from pipeline.architectures import Architecture, num_decoder_layers, text_config
from pipeline.checkpoint_copy import edit_checkpoint
from pipeline.measurement import check_measurement_matches, read_measurements
from pipeline.plan import plan_directions, read_plan
from pipeline.stage import Stage, StageContext
from pipeline.weight_edit import ResolvedPlan, directions_for_plan


def run(ctx: StageContext) -> None:
    plan = read_plan(ctx.inputs["select"] / "ablation.yaml")
    measurement_path = ctx.inputs["measure"] / "measurements.safetensors"
    measurements = read_measurements(measurement_path)
    directions = directions_for_plan(measurements.tensors, plan)  # a plan the measurement cannot serve fails here
    model_cfg = ctx.config["model"]
    lora = ctx.config["export"]["format"] == "lora"
    if lora:  # refused before any copy when the plan is not a low-rank edit
        lora_export.check_exportable(plan, ctx.config["ablate"]["embed"]["enabled"] is True)
    source = models.resolve_model_dir(model_cfg, ctx.model_store, ctx.progress)
    config = models.check_supported(source, model_cfg)
    check_measurement_matches(
        measurements.meta,
        hidden_size=int(text_config(config)["hidden_size"]),
        num_layers=num_decoder_layers(config),
        source=str(measurement_path),
    )
    stats = source_hashes.file_stats(source)
    report = edit_checkpoint(
        source,
        ctx.out_dir / "model",
        plan,
        directions,
        progress=ctx.progress,
        embed=ctx.config["ablate"]["embed"]["enabled"] is True,
        source_hashes=known_hashes(model_cfg, source, ctx.model_store, stats),
        hash_output=True,
        card=partial(model_card, plan, ctx.cache_keys),
    )
    if lora:
        ctx.manifest_extra["lora"] = lora_export.write_adapter(
            source, ctx.out_dir / "lora", plan, directions, plan.get("model", str(source)))
    source_hashes.check_unchanged(source, stats, report["source_files"])
    if model_cfg["source"] not in models.MATERIALIZED_SOURCES:
        source_hashes.remember(ctx.model_store, source, stats, report["source_files"])
    ctx.manifest_extra["source"] = {"dir": report["source"], "files": report["source_files"]}
    ctx.manifest_extra["edited_tensors"] = len(report["edited_tensors"])
    ctx.written_hashes.update({f"model/{name}": digest for name, digest in report["output_files"].items()})


def known_hashes(model_cfg: Mapping[str, Any], source: Path, model_store: Path, stats: source_hashes.Stats) -> Mapping[str, str]:
    """{file: sha256} that need not be computed again: a model-store model's, which `resolve_model_dir`
    has just verified against its manifest; for a local or hub directory, those remembered from an
    earlier ablate of the same, unchanged files."""
    if model_cfg["source"] not in models.MATERIALIZED_SOURCES:
        return source_hashes.remembered(model_store, source, stats)
    manifest = artifacts.read_manifest(source)
    return manifest["files"] if manifest else {}


def model_card(
    plan: Mapping[str, Any], cache_keys: Mapping[str, str], resolved: ResolvedPlan, arch: Architecture, source_dir: Path
) -> str:
    """The exported model's README.md: what was edited, from which source, and the cache keys
    ({stage: key}) of the runs that produced it, so a published model can be traced and rebuilt."""
    rows = "\n".join(
        f"| {entry['layer']} | {entry['direction_from']} | {layer.scales['attn']:g} | {layer.scales['mlp']:g} |"
        for entry in sorted(plan["layers"], key=lambda e: int(e["layer"]))
        for layer in [resolved.layers[int(entry["layer"])]]
    )
    model = plan.get("model", str(source_dir))
    embed = (
        f"Token embeddings: edited along layer {min(resolved.layers)}'s direction (scale {resolved.embed_scale:g}).\n"
        if resolved.embed_direction is not None
        else "Token embeddings: unchanged.\n"
    )
    caveat = f"\nNote: {arch.note}.\n" if arch.note else ""
    count = plan_directions(plan)
    removed = "the refusal direction" if count == 1 else (
        f"{count} directions (the refusal direction and the {count - 1} leading principal direction"
        f"{'s' if count > 2 else ''} of the harmful prompts' activations around it)"
    )
    keys = "".join(f"- {stage}: `{key}`\n" for stage, key in sorted(cache_keys.items()))
    provenance = f"\nPipeline cache keys (`<cache.dir>/<stage>/<key>/`):\n\n{keys}" if keys else ""
    return (
        f"---\nbase_model: {model}\ntags:\n- abliterated\n---\n\n"
        f"# {model} (abliterated)\n\n"
        f"Source: `{model}` (checkpoint folder `{source_dir.name}`).\n\n"
        f"Method: `{resolved.method}`. Each listed decoder layer (0-based) had {removed} removed "
        "from its attention output projection and its MLP down projections (all experts, shared experts "
        "and biases included).\n\n"
        "| layer | direction_from | attn scale | mlp scale |\n|---|---|---|---|\n"
        f"{rows}\n\n{embed}{caveat}{provenance}"
    )


# The whole `model` mapping is needed to resolve the checkpoint (a tiny or packaged model is
# rebuilt from arch / gguf fields); the runner drops its placement keys (device_map, ...) from the key.
# Version 4: the model card names the source folder, not its absolute path, so a rebuild elsewhere
# (python -m pipeline.reproduce) gives the same bytes. `export` (export.format=lora adds lora/) joined the key.
STAGE = Stage(name="ablate", version="4", needs=("select", "measure"), config_keys=("model", "ablate", "export"), run=run)
