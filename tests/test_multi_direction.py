"""Several directions per layer (`select.directions`), attention-only and MLP-only edits.

The oracle is the one of tests/test_weight_edit.py, generalized: the unedited model with forward hooks
that apply h <- h - s Q^T (Q h) to the attention output projection's and the MLP block's output of each
planned layer, with Q the layer's orthonormal basis, and hooks only on the component whose scale is not 0.
The checkpoint the ablate stage writes must give its logits (orthogonal); the plan applied in memory
(`pipeline.plan_trial`, what evaluate scores) must equal that checkpoint tensor for tensor (both methods).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from pipeline.architectures import decoder_layers
from pipeline.errors import PipelineError
from pipeline.measurement import COPIED_METADATA, EXTRA_DIRECTIONS, read_measurements
from pipeline.plan import plan_to_text, read_plan, validate_plan
from pipeline.plan_trial import InMemoryModel
from pipeline.refusal_direction import measure_activations
from pipeline.runner import config_slice
from pipeline.selection import build_plan, settings_from_config
from pipeline.weight_edit import direction_basis, direction_for, directions_for_plan, norm_preserving, orthogonalize
from tiny_pipeline import ROOT, SMALL, compose_config, run_cli, run_in_process

HIDDEN = 64
VARIANTS = {  # select overrides (on mode=band's scale 1.2, attn_scale 1.0) -> (attention, MLP) scale of every layer
    "both": (["select.attn_scale=0.5"], (0.5, 1.2)),
    "attention only": (["select.mlp_scale=0"], (1.0, 0.0)),
    "mlp only": (["select.attn_scale=0"], (0.0, 1.2)),
}
SOURCES = {2: "own", 3: 0.55}
"""k=2 takes each layer's own directions; k=3 one basis from layer 0.55*3 = 1.65, blended between layers 1 and 2."""


# --- the edit math -----------------------------------------------------------------------------


def random_rows(k: int, seed: int) -> torch.Tensor:
    return torch.randn(k, HIDDEN, generator=torch.Generator().manual_seed(seed))


def test_orthogonalize_removes_the_subspace_and_keeps_its_complement() -> None:
    weight, rows = torch.randn(HIDDEN, 32, generator=torch.Generator().manual_seed(1)), random_rows(3, 2)
    q = torch.linalg.qr(rows.T.double())[0].T.float()
    edited = orthogonalize(weight, rows, 1.0, 0)
    assert (q @ edited).norm() / (q @ weight).norm() < 1e-6
    complement = torch.linalg.qr(torch.cat([rows, random_rows(2, 3)]).T.double())[0].T[3:].float()
    torch.testing.assert_close(complement @ edited, complement @ weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(q @ orthogonalize(weight, rows, 0.25, 0), 0.75 * (q @ weight), atol=1e-5, rtol=0)
    bias = torch.randn(HIDDEN)
    torch.testing.assert_close(orthogonalize(bias, rows, 1.0, 0), bias - q.T @ (q @ bias), atol=1e-6, rtol=0)


def test_norm_preserving_removes_the_subspace_keeps_norms_and_is_the_one_direction_rule_for_k_1() -> None:
    weight, rows = torch.randn(4, HIDDEN, 16, generator=torch.Generator().manual_seed(4)), random_rows(2, 5)
    q = torch.linalg.qr(rows.T.double())[0].T.float()
    edited = norm_preserving(weight, rows, 1.0, 1)
    assert (q @ edited).norm() / (q @ weight).norm() < 1e-6
    torch.testing.assert_close(edited.norm(dim=1), weight.norm(dim=1))
    half = norm_preserving(weight, rows, 0.5, 1)
    assert 0.3 < (q @ half).norm() / (q @ weight).norm() < 0.9  # shrunk (then rescaled), not removed
    one = rows[:1]
    torch.testing.assert_close(norm_preserving(weight, one, 0.7, 1), norm_preserving(weight, one[0], 0.7, 1),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(orthogonalize(weight, one, 0.7, 1), orthogonalize(weight, one[0], 0.7, 1),
                               atol=1e-6, rtol=0)


def projector(basis: torch.Tensor) -> torch.Tensor:
    return basis.double().T @ basis.double()


def test_direction_basis_at_a_layer_and_between_two() -> None:
    table = torch.randn(3, 3, HIDDEN, generator=torch.Generator().manual_seed(6))
    basis = direction_basis(table, 1)
    torch.testing.assert_close(basis @ basis.T, torch.eye(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(basis[0], direction_for(table[:, 0], 1))
    expected = torch.linalg.qr(table[1].T.double())[0]  # Gram-Schmidt of the layer's rows, first row first
    torch.testing.assert_close(projector(basis), expected @ expected.T, atol=1e-6, rtol=0)

    blended = direction_basis(table, 1.25)
    torch.testing.assert_close(blended @ blended.T, torch.eye(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(blended[0], direction_for(table[:, 0], 1.25))
    flipped = table.clone()
    flipped[2, 1:] = -flipped[2, [2, 1]]  # the upper layer's extra rows negated and swapped: the same subspace
    torch.testing.assert_close(projector(direction_basis(flipped, 1.25)), projector(blended), atol=1e-6, rtol=0)
    shared = table.clone()
    shared[2, 1:] = table[1, 1:]  # both layers measured the same extra subspace: the blend keeps it
    extra = projector(direction_basis(shared, 1.25)) - projector(blended[:1])
    other = shared[1, 1:].double() - (shared[1, 1:].double() @ blended[0].double()).unsqueeze(1) * blended[0].double()
    torch.testing.assert_close(extra @ other.T, other.T, atol=1e-6, rtol=0)

    table[1, 2] = 0.0  # the layer's prompts spanned one extra direction only
    with pytest.raises(PipelineError, match="direction_from 1: layer 1 has fewer than 2 extra directions"):
        direction_basis(table, 1)
    with pytest.raises(PipelineError, match="layer 1 has fewer"):
        direction_basis(table, 0.5)


# --- measure ---------------------------------------------------------------------------------------


def fabricate_collect(directory: Path, harmful: torch.Tensor, harmless: torch.Tensor) -> Path:
    directory.mkdir(parents=True)
    meta = {key: "x" for key in COPIED_METADATA}
    meta.update(num_layers=str(harmful.shape[1]), hidden_size=str(harmful.shape[2]))
    path = directory / "activations.safetensors"
    save_file({"harmful": harmful.contiguous(), "harmless": harmless.contiguous()}, str(path), metadata=meta)
    return path


def test_measure_recovers_a_planted_subspace(tmp_path: Path) -> None:
    """Harmful activations = their mean + large variation along a planted plane u, v (orthogonal to the mean
    difference) + small noise: the first two extra directions span that plane, orthogonal to the refusal one."""
    generator = torch.Generator().manual_seed(7)
    n, d = 200, 32
    frame = torch.linalg.qr(torch.randn(d, d, generator=generator))[0].T  # orthonormal rows
    refusal, u, v = frame[0], frame[1], frame[2]
    noise = lambda: 0.05 * torch.randn(n, d, generator=generator)  # noqa: E731
    harmless = noise() + frame[3]
    harmful = noise() + frame[3] + 2.0 * refusal + 3.0 * torch.randn(n, 1, generator=generator) * u \
        + 2.0 * torch.randn(n, 1, generator=generator) * v
    activations = torch.stack([harmful, harmful * 0.5], 1), torch.stack([harmless, harmless * 0.5], 1)  # 2 layers
    measured = measure_activations(fabricate_collect(tmp_path / "collect", *activations)).tensors
    extra = measured[EXTRA_DIRECTIONS]
    assert extra.shape == (2, 3, d) and extra.dtype == torch.float32
    for layer in range(2):
        rows = torch.cat([measured["refusal_direction"][layer : layer + 1], extra[layer]]).double()
        assert (rows @ rows.T - torch.eye(4, dtype=torch.float64)).abs().max() < 1e-5
        cosines = torch.linalg.svdvals(extra[layer, :2].double() @ torch.stack([u, v]).double().T)
        assert cosines.min() > 0.99, cosines  # the principal angles between the two planes are ~0


def test_an_old_measurement_loads_and_serves_one_direction_only() -> None:
    folder = ROOT / "tests" / "plans" / "example_dense"  # measured before the extra directions existed
    measurements = read_measurements(folder / "measurements.safetensors")
    assert EXTRA_DIRECTIONS not in measurements.tensors
    settings = yaml.safe_load((folder / "select.yaml").read_text())
    plan = build_plan(measurements, settings_from_config(settings), folder.name)
    assert plan_to_text(plan) == (folder / "ablation.yaml").read_text()  # k = 1: the committed bytes
    settings["select"]["directions"] = 2
    with pytest.raises(PipelineError, match="removes 2 directions per layer but the measurement has 0 extra"):
        build_plan(measurements, settings_from_config(settings), "measure")


# --- the plan ----------------------------------------------------------------------------------------


def test_the_plan_records_k_only_when_above_one() -> None:
    plan = {"model": "m", "model_fingerprint": "f", "hidden_size": HIDDEN, "num_layers": 4, "source_measurement": "s",
            "mode": "band", "method": "orthogonal", "direction_source": "own",
            "layers": [{"layer": 1, "direction_from": 1, "scale": 1.0, "mlp_scale": 0.0}]}
    assert "directions" not in validate_plan({**plan, "directions": 1}, "p")
    assert plan_to_text({**plan, "directions": 1}) == plan_to_text(plan) and "directions" not in plan_to_text(plan)
    text = plan_to_text({**plan, "directions": 3})
    assert "\ndirections: 3\n" in text and "mlp_scale: 0.000000" in text
    assert plan_to_text(validate_plan(yaml.safe_load(text), "p")) == text
    for bad in (0, 5):
        with pytest.raises(PipelineError, match=f"directions must be within 1..4, got {bad}"):
            validate_plan({**plan, "directions": bad}, "p")


@pytest.mark.parametrize(("override", "says"), [
    ("select.directions=5", "select.directions must be within [1, 4], got 5"),
    ("select.directions=0", "select.directions must be within [1, 4], got 0"),
    ("select.mlp_scale=-1", "select.mlp_scale must be within [0, 4], got -1.0"),
])
def test_bad_values_fail_in_one_line_before_any_work(override, says, tmp_path, capsys, monkeypatch) -> None:
    cache = tmp_path / "cache"
    status, err = run_cli(["model=tiny", "run.progress=false", override, f"cache.dir={cache}",
                           f"cache.models={tmp_path / 'models'}", f"hydra.run.dir={tmp_path / 'run'}"], capsys, monkeypatch)
    assert (status, err.strip().splitlines()) == (2, [f"error: {says}"])
    assert not [path for path in tmp_path.rglob("*") if cache in path.parents or path == tmp_path / "models"]


# --- the exported checkpoint against the hooked model, and against the plan applied in memory ---------------


def ablated(model: str, model_store: Path, tmp_path_factory: pytest.TempPathFactory, *overrides: str) -> dict[str, Any]:
    """A run of `python -m pipeline model=<model> <overrides> run.stages=[ablate]` on a cache shared by the
    module's runs of that model (collect and measure run once), and what it wrote."""
    cache = tmp_path_factory.getbasetemp() / f"multi-direction-{model}"
    args = [f"model={model}", f"cache.dir={cache}", f"cache.models={model_store}", "run.stages=[ablate]", *overrides]
    summary = run_in_process(args)
    stages = {name: Path(stage["dir"]) for name, stage in summary["stages"].items()}
    ablate = stages["ablate"]
    return {
        "plan": read_plan(stages["select"] / "ablation.yaml"),
        "measurements": read_measurements(stages["measure"] / "measurements.safetensors").tensors,
        "model_cfg": config_slice(compose_config([*SMALL, *args]), ("model",))["model"],
        "ablate": ablate,
        "exported": AutoModelForCausalLM.from_pretrained(ablate / "model", dtype=torch.float32).eval(),
    }


def remove_span(output: Any, basis: torch.Tensor, scale: float) -> Any:
    hidden = output[0] if isinstance(output, tuple) else output
    projected = hidden - scale * (hidden @ basis.T) @ basis
    return (projected, *output[1:]) if isinstance(output, tuple) else projected


def hooked_logits(model: torch.nn.Module, ids: torch.Tensor, edits: dict[int, tuple[torch.Tensor, float, float]]) -> torch.Tensor:
    """Logits of the unedited model with span(Q) scaled out of the outputs of the components whose scale is not 0."""
    layers, handles = decoder_layers(model), []
    for layer, (basis, attn_scale, mlp_scale) in edits.items():
        for module, scale in ((layers[layer].self_attn.o_proj, attn_scale), (layers[layer].mlp, mlp_scale)):
            if scale:
                handles.append(module.register_forward_hook(lambda _m, _i, out, q=basis, s=scale: remove_span(out, q, s)))
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        for handle in handles:
            handle.remove()


def in_memory_equals_exported(run: dict[str, Any], model_store: Path) -> torch.nn.Module:
    """The plan applied in memory, as evaluate applies it, holds the exported checkpoint's tensors bit for bit."""
    loaded = InMemoryModel(run["model_cfg"], model_store, progress=False)
    exported = run["exported"].state_dict()
    with loaded.applied(run["plan"], run["measurements"]) as model:
        edited = model.state_dict()
        assert edited.keys() == exported.keys()
        assert [name for name in edited if not torch.equal(edited[name], exported[name])] == []
    return loaded.model


IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 100, 7], [4, 8, 15, 16, 23, 42, 99, 3]])


ORTHOGONAL_CASES = [(model, k, "both") for model in ("tiny", "tiny_moe") for k in (2, 3)] + [
    (model, 2, variant) for model in ("tiny", "tiny_moe") for variant in ("attention only", "mlp only")]


@pytest.mark.parametrize(("model", "k", "variant"), ORTHOGONAL_CASES)
def test_orthogonal_checkpoint_equals_the_hooked_model(model, k, variant, model_store, tmp_path_factory) -> None:
    """The checkpoint = the hooked model; the in-memory plan = the checkpoint; with both components edited the
    run also exports the LoRA adapter (rank k), and base + adapter = the checkpoint."""
    overrides, scales = VARIANTS[variant]
    lora = variant == "both"
    run = ablated(model, model_store, tmp_path_factory, "select.method=orthogonal", f"select.directions={k}",
                  f"select.direction_from={SOURCES[k]}", *overrides, *(["export.format=lora"] if lora else []))
    plan, measurements = run["plan"], run["measurements"]
    assert plan["directions"] == k and len(plan["layers"]) >= 2
    assert {(entry.get("attn_scale", entry["scale"]), entry.get("mlp_scale", entry["scale"])) for entry in plan["layers"]} \
        == {scales}
    for layer in range(4):  # measure's extra directions: orthonormal, and orthogonal to the refusal direction
        rows = torch.cat([measurements["refusal_direction"][layer : layer + 1], measurements[EXTRA_DIRECTIONS][layer]])
        assert (rows.double() @ rows.double().T - torch.eye(4, dtype=torch.float64)).abs().max() < 1e-5, layer
    table = directions_for_plan(measurements, plan)
    assert table.shape == (4, k, HIDDEN)
    edits = {entry["layer"]: (direction_basis(table, entry["direction_from"]), *scales) for entry in plan["layers"]}
    original = in_memory_equals_exported(run, model_store)  # restored on leaving the block
    with torch.no_grad():
        got = run["exported"](input_ids=IDS).logits
        assert (got - original(input_ids=IDS).logits).abs().max() > 1e-3  # the edit changed something
    torch.testing.assert_close(got, hooked_logits(original, IDS, edits), atol=1e-4, rtol=0)
    card = (run["ablate"] / "model" / "README.md").read_text()
    assert f"had {k} directions (the refusal direction and the {k - 1} leading principal direction" in card
    if lora:
        adapter = json.loads((run["ablate"] / "lora" / "adapter_config.json").read_text())
        assert (adapter["r"], adapter["lora_alpha"]) == (k, k)
        with torch.no_grad():
            base = AutoModelForCausalLM.from_pretrained(original.name_or_path, dtype=torch.float32)
            peft = pytest.importorskip("peft")
            merged = peft.PeftModel.from_pretrained(base, str(run["ablate"] / "lora")).merge_and_unload()(IDS).logits
        torch.testing.assert_close(merged, got, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("model", "k"), [("tiny", 2), ("tiny_moe", 3)])
def test_norm_preserving_checkpoint_equals_the_in_memory_plan(model, k, model_store, tmp_path_factory) -> None:
    run = ablated(model, model_store, tmp_path_factory, "select.method=norm_preserving", f"select.directions={k}",
                  f"select.direction_from={SOURCES[k]}")
    original = in_memory_equals_exported(run, model_store)
    table = directions_for_plan(run["measurements"], run["plan"])
    entry = run["plan"]["layers"][-1]
    basis = direction_basis(table, entry["direction_from"])
    torch.testing.assert_close(basis[0], direction_for(run["measurements"]["biprojected_direction"], entry["direction_from"]))
    name = f"model.layers.{entry['layer']}.self_attn.o_proj.weight"
    before, after = original.get_parameter(name).detach(), run["exported"].get_parameter(name).detach()
    scale = entry.get("attn_scale", entry["scale"])
    assert scale == 1.0 and (basis @ after).norm() < 1e-5 * (basis @ before).norm()  # the whole subspace is gone ...
    torch.testing.assert_close(after.norm(dim=0), before.norm(dim=0))  # ... and every column keeps its norm
