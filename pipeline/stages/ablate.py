"""The ablate stage: apply the selected plan to the checkpoint and write a loadable model directory.

It reads `ablation.yaml` from select and the direction tables from measure,
resolves the source checkpoint (hub snapshot, local directory, or a model
materialized into the model store), and copies it into `<artifact>/model/`
with the planned layers' tensors edited in the copy (`pipeline.weight_edit`).
The source's file hashes go into the manifest so the artifact says exactly
which bytes it was derived from. A model materialized into the model store
has just had every file verified against its own manifest by
`models.resolve_model_dir`, so those hashes are passed on rather than
computed a second time; any other source is hashed as it is copied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from pipeline import artifacts, models
from pipeline.architectures import num_decoder_layers, text_config
from pipeline.plan import check_measurement_matches, read_plan
from pipeline.stage import Stage, StageContext
from pipeline.stages.measure import read_measurements
from pipeline.weight_edit import directions_for_method, edit_checkpoint

"""Sources that `models.resolve_model_dir` materializes into the model store and verifies by manifest."""


def run(ctx: StageContext) -> None:
    plan = read_plan(ctx.inputs["select"] / "ablation.yaml")
    measurement_path = ctx.inputs["measure"] / "measurements.safetensors"
    measurements = read_measurements(measurement_path)
    model_cfg = ctx.config["model"]
    source = models.resolve_model_dir(model_cfg, ctx.model_store, ctx.progress)
    config = models.check_supported(source, model_cfg)
    check_measurement_matches(
        measurements.meta,
        hidden_size=int(text_config(config)["hidden_size"]),
        num_layers=num_decoder_layers(config),
        source=str(measurement_path),
    )
    report = edit_checkpoint(
        source,
        ctx.out_dir / "model",
        plan,
        directions_for_method(measurements.tensors, plan["method"]),
        progress=ctx.progress,
        embed=bool(ctx.config["ablate"]["embed"]["enabled"]),
        source_hashes=verified_hashes(model_cfg, source),
    )
    ctx.manifest_extra["source"] = {"dir": report["source"], "files": report["source_files"]}
    ctx.manifest_extra["edited_tensors"] = len(report["edited_tensors"])


def verified_hashes(model_cfg: Mapping[str, Any], source: Path) -> Mapping[str, str] | None:
    """{file: sha256} of a model-store model, which `resolve_model_dir` has just verified against its
    manifest; None for a local or hub directory, whose files no one has hashed yet."""
    if model_cfg["source"] not in models.MATERIALIZED_SOURCES:
        return None
    manifest = artifacts.read_manifest(source)
    return manifest["files"] if manifest else None


# The whole `model` mapping is needed to resolve the checkpoint (a tiny or packaged model is
# rebuilt from arch / gguf fields); the runner drops its placement keys (device_map, ...) from the key.
STAGE = Stage(name="ablate", version="2", needs=("select", "measure"), config_keys=("model", "ablate"), run=run)
