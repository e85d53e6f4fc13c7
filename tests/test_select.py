"""The select stage, the mode presets and the plan format, on synthetic measurements."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tiny_pipeline import select_defaults

from pipeline.errors import PipelineError
from pipeline.measurement import Measurements, check_measurement_matches, read_measurements, write_measurements
from pipeline.plan import plan_to_text, read_plan, write_plan
from pipeline.stage import StageContext
from pipeline.stages import select
from pipeline.selection import (
    build_plan,
    direction_source_layer,
    select_layers,
    settings_from_config,
)

MODE_DIR = Path(__file__).resolve().parents[1] / "conf" / "mode"

# The design's worked example (shared/DESIGN.md, GLM-4.5-Air, 46 layers): 0-14 below 0.012, 15-20 at 0.0185-0.0431, rest below.
GLM_PEAK = {15: 0.0185, 16: 0.0262, 17: 0.0431, 18: 0.0397, 19: 0.0314, 20: 0.0220}
GLM_QUALITY = [GLM_PEAK.get(layer, 0.002 + 0.0004 * (layer % 23)) for layer in range(46)]


def mode_config(mode: str, kind: str) -> dict:
    """A mode file's effective values for a model kind, resolved the way the composed config resolves them."""
    composed = OmegaConf.merge({"model": {"kind": kind}}, {"mode": OmegaConf.load(MODE_DIR / f"{mode}.yaml")})
    return OmegaConf.to_container(composed.mode, resolve=True)


def config(mode: str = "balanced", kind: str = "moe", **overrides) -> dict:
    mode_section = mode_config(mode, kind)
    select_section = select_defaults()
    for key, value in overrides.items():
        section, name = key.split("__")
        (mode_section if section == "mode" else select_section)[name] = value
    return {"mode": mode_section, "select": select_section}


def settings(**kwargs):
    return settings_from_config(config(**kwargs))


def synthetic_measurements(quality: list[float], hidden: int = 8, **meta) -> Measurements:
    layers = len(quality)
    random = torch.randn(layers, hidden, generator=torch.Generator().manual_seed(0))
    directions = torch.nn.functional.normalize(random, dim=1)
    zeros = torch.zeros(layers, dtype=torch.float64)
    tensors = {
        "harmful_mean": directions,
        "harmless_mean": -directions,
        "refusal_direction": directions,
        "biprojected_direction": directions,
        "signal_quality": torch.tensor(quality, dtype=torch.float64),
        **{
            name: zeros
            for name in ("cos", "snr", "harmful_spread", "harmless_spread", "harmful_proj_var", "harmless_proj_var")
        },
    }
    tensors = {name: tensor.clone() for name, tensor in tensors.items()}  # safetensors refuses shared storage
    meta = {
        "model_id": "zai-org/GLM-4.5-Air",
        "model_fingerprint": "abc123",
        "model_type": "glm4_moe",
        "hidden_size": str(hidden),
        "num_layers": str(layers),
        "is_moe": "true",
        "position": "last",
        "harmful_sha256": "0" * 64,
        "harmless_sha256": "1" * 64,
        "formula_version": "1",
        **meta,
    }
    return Measurements(meta=meta, tensors=tensors)


# --- presets ---------------------------------------------------------------------------------------------------

PRESETS = {
    ("conservative", "moe"): (0.020, 16),
    ("balanced", "moe"): (0.012, 26),
    ("aggressive", "moe"): (0.008, 36),
    ("conservative", "dense"): (0.025, 8),
    ("balanced", "dense"): (0.015, 12),
    ("aggressive", "dense"): (0.010, 20),
}


@pytest.mark.parametrize(("mode", "kind"), sorted(PRESETS))
def test_mode_file_resolves_the_preset_for_the_model_kind(mode, kind):
    resolved = mode_config(mode, kind)
    assert resolved["name"] == mode
    assert (resolved["min_quality"], resolved["top_n"]) == PRESETS[(mode, kind)]


def test_hydra_compose_takes_the_preset_for_the_kind_and_honours_overrides(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(MODE_DIR, conf / "mode")
    (conf / "config.yaml").write_text("defaults:\n  - mode: balanced\n  - _self_\nmodel:\n  kind: dense\n")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        def effective(*overrides: str) -> tuple[float, int]:
            mode = compose(config_name="config", overrides=list(overrides)).mode
            return mode.min_quality, mode.top_n

        assert effective() == (0.015, 12)
        assert effective("model.kind=moe") == (0.012, 26)
        assert effective("mode=aggressive") == (0.010, 20)
        assert effective("mode=conservative", "model.kind=moe") == (0.020, 16)
        assert effective("mode.min_quality=0.01", "mode.top_n=3") == (0.01, 3)
        assert effective("mode=aggressive", "model.kind=moe", "mode.top_n=3") == (0.008, 3)


# --- selection -------------------------------------------------------------------------------------------------


def test_glm_worked_example_selects_layers_15_to_20_best_first():
    chosen = select_layers(GLM_QUALITY, settings(mode="balanced", kind="moe"))
    assert chosen == [17, 18, 19, 16, 20, 15]
    plan = build_plan(synthetic_measurements(GLM_QUALITY), settings(mode="balanced", kind="moe"), "measure-key")
    assert [entry["layer"] for entry in plan["layers"]] == [15, 16, 17, 18, 19, 20]
    assert plan["layers"][2] == {"layer": 17, "direction_from": 17, "scale": 1.0, "quality": 0.0431}
    assert plan["thresholds"] == {
        "min_quality": 0.012, "top_n": 26, "relative_min": 0.0, "skip_first": 0.0, "skip_last": 0.0
    }


def test_glm_example_under_the_other_presets():
    assert select_layers(GLM_QUALITY, settings(mode="conservative", kind="moe")) == [17, 18, 19, 16, 20]
    assert select_layers(GLM_QUALITY, settings(mode="balanced", kind="dense")) == [17, 18, 19, 16, 20, 15]
    assert select_layers(GLM_QUALITY, settings(mode="conservative", kind="dense")) == [17, 18, 19, 16]
    # Aggressive MoE (0.008) also reaches the 0.0080-0.0108 tail: layers 21-22 and 38-45, ties to the lower layer.
    assert select_layers(GLM_QUALITY, settings(mode="aggressive", kind="moe")) == [
        17, 18, 19, 16, 20, 15, 22, 45, 21, 44, 43, 42, 41, 40, 39, 38
    ]


def test_top_n_stops_the_selection():
    assert select_layers(GLM_QUALITY, settings(mode__top_n=3)) == [17, 18, 19]
    assert select_layers(GLM_QUALITY, settings(mode__top_n=1)) == [17]


def test_min_quality_is_inclusive_and_respected():
    assert select_layers(GLM_QUALITY, settings(mode__min_quality=0.0314)) == [17, 18, 19]
    assert select_layers(GLM_QUALITY, settings(mode__min_quality=0.0315)) == [17, 18]


def test_relative_min_is_a_fraction_of_the_best_quality():
    # 0.6 * 0.0431 = 0.02586: 16 (0.0262) stays, 20 (0.0220) goes.
    assert select_layers(GLM_QUALITY, settings(select__relative_min=0.6)) == [17, 18, 19, 16]


def test_depth_window_excludes_floor_of_fraction_times_layers():
    # floor(0.4 * 46) = 18 first layers out: 17 and 16 and 15 are gone.
    assert select_layers(GLM_QUALITY, settings(select__skip_first=0.4)) == [18, 19, 20]
    # floor(0.6 * 46) = 27 last layers out as well: only layer 18 is left in the window.
    assert select_layers(GLM_QUALITY, settings(select__skip_first=0.4, select__skip_last=0.6)) == [18]
    # relative_min counts from the best layer inside the window (18: 0.0397), not 17.
    assert select_layers(GLM_QUALITY, settings(select__skip_first=0.4, select__relative_min=0.75)) == [18, 19]


def test_ties_go_to_the_lower_layer_and_zero_quality_is_never_chosen():
    assert select_layers([0.02, 0.03, 0.03, 0.0], settings(mode__min_quality=0.0)) == [1, 2, 0]


def test_best_direction_source_points_every_layer_at_the_best_selected_layer():
    best = settings(select__direction_from="best", select__scale=0.5)
    plan = build_plan(synthetic_measurements(GLM_QUALITY), best, "k")
    assert plan["direction_source"] == "best"
    assert {entry["direction_from"] for entry in plan["layers"]} == {17}
    assert {entry["scale"] for entry in plan["layers"]} == {0.5}


# --- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mode__top_n": 0}, "mode.top_n must be >= 1, got 0"),
        ({"mode__top_n": "3"}, "mode.top_n must be an integer, got '3'"),
        ({"mode__min_quality": -1}, "mode.min_quality must be >= 0, got -1"),
        ({"select__relative_min": 1.5}, r"select.relative_min must be within \[0, 1\], got 1.5"),
        ({"select__skip_first": 1.0}, r"select.skip_first must be within \[0, 1\), got 1.0"),
        ({"select__skip_last": -0.1}, r"select.skip_last must be within \[0, 1\), got -0.1"),
        ({"select__direction_from": "mine"}, r"select.direction_from must be one of own, best or a depth fraction in \[0, 1\], got 'mine'"),
        ({"select__direction_from": 1.5}, r"select.direction_from must be one of own, best or a depth fraction in \[0, 1\], got 1.5"),
        ({"select__method": "svd"}, "select.method must be one of orthogonal, norm_preserving, got 'svd'"),
        ({"select__scale": float("nan")}, "select.scale must be a finite number, got nan"),
        ({"select__extra": 1}, "select has unknown key select.extra; remove it"),
    ],
)
def test_invalid_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(PipelineError, match=f"^{message}") as caught:
        settings(**overrides)
    assert "\n" not in str(caught.value)


def test_a_depth_window_that_leaves_no_layer_is_refused():
    message = r"skip_first=0.5 and select.skip_last=0.5 exclude all 46 layers \(23 first, 23 last\); lower them"
    with pytest.raises(PipelineError, match=message):
        select_layers(GLM_QUALITY, settings(select__skip_first=0.5, select__skip_last=0.5))


def test_nothing_qualifies_names_the_best_layers_and_the_override():
    quality = [0.001] * 16 + [0.0081, 0.0093, 0.0075, 0.002, 0.001, 0.001, 0.001, 0.001]
    with pytest.raises(PipelineError) as caught:
        select_layers(quality, settings(mode="balanced", kind="dense"))
    assert str(caught.value) == (
        "no layer has quality >= 0.015 (best: layer 17 0.0093, layer 16 0.0081, layer 18 0.0075); "
        "try mode.min_quality=0.009"
    )
    assert select_layers(quality, settings(mode__min_quality=0.009)) == [17]


def test_nothing_qualifies_inside_a_depth_window_says_so():
    quality = [0.05] + [0.001] * 9
    with pytest.raises(PipelineError, match=r"^no layer in 2\.\.9 has quality >= 0.012 \(best: layer 2 0.001, "):
        select_layers(quality, settings(select__skip_first=0.2))


def test_measurement_from_another_model_shape_is_refused(tmp_path):
    message = "^measurement m.safetensors is from a model with hidden size 896, this model has 64;"
    with pytest.raises(PipelineError, match=message):
        check_measurement_matches({"hidden_size": "896", "num_layers": "24"}, 64, 24, "m.safetensors")
    with pytest.raises(PipelineError, match="is from a model with 24 layers, this model has 4;"):
        check_measurement_matches({"hidden_size": "64", "num_layers": "24"}, 64, 4, "m.safetensors")
    # A file whose metadata disagrees with its own tensors is refused on reading.
    path = tmp_path / "measurements.safetensors"
    write_measurements(path, synthetic_measurements(GLM_QUALITY, hidden=64, hidden_size="896"))
    with pytest.raises(PipelineError, match="hidden size 896, this model has 64"):
        read_measurements(path)


@pytest.mark.parametrize("suffix", [".pt", ".pkl", ".bin"])
def test_pickle_measurement_files_are_refused(tmp_path, suffix):
    path = tmp_path / f"measurements{suffix}"
    path.write_bytes(b"\x80\x04not read")
    with pytest.raises(PipelineError, match="we never unpickle; measurements must be .safetensors"):
        read_measurements(path)


# --- the plan format -------------------------------------------------------------------------------------------

SMALL_PLAN_TEXT = """\
# ablation plan (select, optimize or by hand); replay: python -m pipeline plan=<file>; regen: python -m pipeline.regen
# layer numbers are 0-based decoder layers
direction_source: "own"
hidden_size: 8
layers:
- {direction_from: 1, layer: 1, quality: 0.030000, scale: 1.000000}
- {direction_from: 2, layer: 2, quality: 0.040000, scale: 1.000000}
method: "orthogonal"
mode: "balanced"
model: "zai-org/GLM-4.5-Air"
model_fingerprint: "abc123"
num_layers: 4
source_measurement: "0f3a"
thresholds:
  min_quality: 0.012000
  relative_min: 0.000000
  skip_first: 0.000000
  skip_last: 0.000000
  top_n: 26
"""


def test_plan_text_is_exact_and_byte_identical_across_runs(tmp_path):
    measurements = synthetic_measurements([0.001, 0.03, 0.04, 0.002])
    texts = []
    for attempt in range(2):
        path = tmp_path / f"plan{attempt}.yaml"
        write_plan(path, build_plan(measurements, settings(), "0f3a"))
        texts.append(path.read_bytes())
    assert texts[0] == texts[1] == SMALL_PLAN_TEXT.encode()


def test_plan_round_trips_through_read_plan(tmp_path):
    plan = build_plan(synthetic_measurements(GLM_QUALITY), settings(), "key")
    path = tmp_path / "ablation.yaml"
    write_plan(path, plan)
    assert read_plan(path) == plan
    assert plan_to_text(read_plan(path)) == path.read_text()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text: "mode:\n  name: balanced\n", "is not an ablation plan: plan is missing model,"),
        (lambda text: text.replace("layers:\n", "layers: []\nx:\n"), "is not an ablation plan: plan has unknown key x"),
        (lambda text: re.sub(r"layers:\n(- .*\n)+", "layers: []\n", text), "layers is empty"),
        (lambda text: text.replace("layer: 2,", 'layer: "2",'), r"layers\[1\].layer must be an integer, got '2'"),
        (lambda text: text.replace("scale: 1.000000}", 'scale: "1"}', 1), r"layers\[0\].scale must be a finite number"),
        (lambda text: text.replace("layer: 2,", "layer: 9,"), "layer 9 is outside 0..3"),
        (lambda text: "[unclosed", r"invalid YAML"),
    ],
)
def test_read_plan_refuses_files_that_are_not_plans(tmp_path, edit, message):
    path = tmp_path / "ablation.yaml"
    path.write_text(edit(SMALL_PLAN_TEXT))
    with pytest.raises(PipelineError, match=f"^{path}.*{message}"):
        read_plan(path)


# --- the stage -------------------------------------------------------------------------------------------------


def run_select(tmp_path: Path, measurements: Measurements, stage_config: dict) -> Path:
    measure_dir = tmp_path / "cache" / "measure" / "7c1e9a"
    measure_dir.mkdir(parents=True)
    write_measurements(measure_dir / "measurements.safetensors", measurements)
    out_dir = tmp_path / "select_out"
    out_dir.mkdir()
    ctx = StageContext(
        config=stage_config, out_dir=out_dir, inputs={"measure": measure_dir}, model_store=tmp_path, seed=0
    )
    select.STAGE.run(ctx)
    return out_dir


def test_stage_writes_the_plan_and_a_selection_figure(tmp_path):
    out = run_select(tmp_path, synthetic_measurements(GLM_QUALITY), config(mode="balanced", kind="moe"))
    plan = read_plan(out / "ablation.yaml")
    assert plan["source_measurement"] == "7c1e9a"
    assert plan["model"] == "zai-org/GLM-4.5-Air" and plan["num_layers"] == 46 and plan["hidden_size"] == 8
    assert [entry["layer"] for entry in plan["layers"]] == [15, 16, 17, 18, 19, 20]
    assert (out / "selection.png").read_bytes()[:4] == b"\x89PNG"


def test_stage_writes_nothing_when_nothing_qualifies(tmp_path):
    with pytest.raises(PipelineError, match="try mode.min_quality=0.04"):
        run_select(tmp_path, synthetic_measurements(GLM_QUALITY), config(mode__min_quality=0.05))
    assert list((tmp_path / "select_out").iterdir()) == []


def test_depth_fraction_gives_every_layer_one_interpolated_direction():
    """direction_from=0.55 on 24 layers: every planned layer ablates the direction at layer 12.65."""
    assert direction_source_layer(0.55, 3, [7, 3], 24) == 12.65
    assert direction_source_layer(0.5, 3, [7, 3], 21) == 10
    assert direction_source_layer("own", 3, [7, 3], 24) == 3
    assert direction_source_layer("best", 3, [7, 3], 24) == 7


def test_band_preset_plans_the_window_with_one_direction_and_split_scales():
    """mode=band on 24 layers: layers 3..18, direction from layer 0.6*23 = 13.8, MLP scale 1.2, attention 1.0."""
    band = OmegaConf.to_container(OmegaConf.load(MODE_DIR / "band.yaml"), resolve=True)
    chosen = settings_from_config(
        {"mode": band["mode"], "select": {**config()["select"], **band["select"]}}
    )
    plan = build_plan(synthetic_measurements([0.001 * (i + 1) for i in range(24)]), chosen, "key")
    assert [entry["layer"] for entry in plan["layers"]] == list(range(3, 19))
    assert {entry["direction_from"] for entry in plan["layers"]} == {13.8}
    assert {(entry["scale"], entry["attn_scale"]) for entry in plan["layers"]} == {(1.2, 1.0)}
    assert plan["method"] == "norm_preserving" and plan["direction_source"] == "single"
