"""select: choose the layers to ablate from a measurement and write the plan (`ablation.yaml`, `selection.png`).

With `plan=<ablation.yaml>` the stage selects nothing: it replays that plan (a search's winner, a
reviewed hand edit) after checking it against the measurement, and writes it back in canonical form.
The file's sha256 is part of the cache key, so editing the file re-runs select and everything after it.
The selection rules are in `pipeline.selection`.
"""

from __future__ import annotations

from pipeline import input_digests
from pipeline.measurement import read_measurements
from pipeline.plan import write_plan
from pipeline.plots import plot_quality
from pipeline.selection import build_plan, replay_path, replayed_plan, settings_from_config
from pipeline.stage import Stage, StageContext


def run(ctx: StageContext) -> None:
    measure_dir = ctx.inputs["measure"]
    measurements = read_measurements(measure_dir / "measurements.safetensors")
    if ctx.config.get("plan") is None:
        plan = build_plan(measurements, settings_from_config(ctx.config), source_measurement=measure_dir.name)
        title, threshold = f"{plan['model']}: mode {plan['mode']}, selected in red", plan["thresholds"]["min_quality"]
    else:
        path = replay_path(ctx.config["plan"])
        plan = replayed_plan(path, measurements)
        title, threshold = f"{plan['model']}: replayed {path.name}, planned layers in red", None
    write_plan(ctx.out_dir / "ablation.yaml", plan)
    plot_quality(
        ctx.out_dir / "selection.png",
        measurements.quality,
        title=title,
        selected=[entry["layer"] for entry in plan["layers"]],
        threshold=threshold,
    )


STAGE = Stage(
    name="select",
    version="1",
    needs=("measure",),
    config_keys=("mode", "select", "plan"),
    run=run,
    validate=settings_from_config,
    input_digest=input_digests.replayed_plan,
)
