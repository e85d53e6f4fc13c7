"""measure: per decoder layer, the refusal direction and how well harmful and harmless activations separate.

Artifacts: `measurements.safetensors` (`pipeline.measurement`), `layers.csv` (quality and rank per
layer) and `quality.png`. The formulas are in `pipeline.refusal_direction`.
"""

from __future__ import annotations

from pipeline.measurement import write_layers_csv, write_measurements
from pipeline.plots import plot_quality
from pipeline.refusal_direction import measure_activations
from pipeline.stage import Stage, StageContext


def run(ctx: StageContext) -> None:
    measurements = measure_activations(ctx.inputs["collect"] / "activations.safetensors")
    write_measurements(ctx.out_dir / "measurements.safetensors", measurements)
    write_layers_csv(ctx.out_dir / "layers.csv", measurements.tensors)
    plot_quality(ctx.out_dir / "quality.png", measurements.quality, title=measurements.meta["model_id"])


# Version 2: the formula version is the code's (pipeline.refusal_direction.FORMULA_VERSION), no longer a config key.
# Version 3: measurements.safetensors also holds `directions_extra` (select.directions > 1) from kept activations.
STAGE = Stage(name="measure", version="3", needs=("collect",), config_keys=(), run=run)
