"""The measure stage: formulas on hand-computed data, and recovery of a direction planted in a real model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_pipeline import select_defaults
from transformers import Qwen2Config, Qwen2Model

from pipeline.errors import PipelineError
from pipeline.stage import StageContext
from pipeline.measurement import layers_by_quality, read_measurements
from pipeline.selection import select_layers, settings_from_config
from pipeline.stages import measure


def fabricate_collect(directory: Path, harmful: torch.Tensor, harmless: torch.Tensor, **meta_overrides: str) -> Path:
    """A collect artifact directory as the collect stage writes it, from [n, layers, hidden] tensors."""
    directory.mkdir(parents=True, exist_ok=True)
    _, num_layers, hidden = harmful.shape
    meta = {
        "model_id": "test/tiny",
        "model_fingerprint": "fingerprint-0",
        "model_type": "qwen2",
        "hidden_size": str(hidden),
        "num_layers": str(num_layers),
        "is_moe": "false",
        "position": "last",
        "harmful_sha256": hashlib.sha256(b"harmful").hexdigest(),
        "harmless_sha256": hashlib.sha256(b"harmless").hexdigest(),
        **meta_overrides,
    }
    tensors = {
        "harmful": harmful.to(torch.float32).contiguous(),
        "harmless": harmless.to(torch.float32).contiguous(),
        "harmful_embed": torch.zeros(harmful.shape[0], hidden),
        "harmless_embed": torch.zeros(harmless.shape[0], hidden),
    }
    save_file(tensors, str(directory / "activations.safetensors"), metadata=meta)
    (directory / "meta.json").write_text(json.dumps(meta, sort_keys=True))
    return directory


def run_measure(tmp_path: Path, collect_dir: Path) -> Path:
    out_dir = tmp_path / "measure_out"
    out_dir.mkdir()
    ctx = StageContext(
        config={},
        out_dir=out_dir,
        inputs={"collect": collect_dir},
        model_store=tmp_path / "models",
        seed=0,
    )
    measure.STAGE.run(ctx)
    return out_dir


def test_formulas_match_hand_computed_values(tmp_path):
    # Layer 0: harmful mean (3, 0), harmless mean (0, 2): orthogonal means, d = (3, -2).
    # Layer 1: identical class means: no direction, quality 0 (and no NaN).
    harmful = torch.tensor([[[2.0, 0.0], [1.0, 1.0]], [[4.0, 0.0], [1.0, 1.0]]])
    harmless = torch.tensor([[[0.0, 1.0], [1.0, 0.9]], [[0.0, 3.0], [1.0, 1.1]]])
    out = run_measure(tmp_path, fabricate_collect(tmp_path / "collect", harmful, harmless))

    result = read_measurements(out / "measurements.safetensors")
    t = result.tensors
    root13 = 13**0.5
    assert t["harmful_mean"][0].tolist() == [3.0, 0.0]
    assert t["harmless_mean"][0].tolist() == [0.0, 2.0]
    assert t["refusal_direction"][0].tolist() == pytest.approx([3 / root13, -2 / root13])
    assert t["biprojected_direction"][0].tolist() == pytest.approx([1.0, 0.0])
    assert t["cos"].tolist() == pytest.approx([0.0, 1.0])
    assert t["snr"].tolist() == pytest.approx([root13 / 2.5, 0.0])
    assert t["signal_quality"].tolist() == pytest.approx([root13 / 2.5, 0.0])
    assert t["refusal_direction"][1].tolist() == [0.0, 0.0]
    assert t["harmful_spread"].tolist() == pytest.approx([1.0, 0.0])
    assert t["harmless_spread"].tolist() == pytest.approx([1.0, 0.01])
    assert t["harmful_proj_var"][0].item() == pytest.approx(9 / 13)
    assert t["harmless_proj_var"][0].item() == pytest.approx(4 / 13)
    assert t["signal_quality"].dtype == torch.float64 and t["refusal_direction"].dtype == torch.float32

    assert result.meta["formula_version"] == "1"
    assert result.meta["model_fingerprint"] == "fingerprint-0"
    assert result.meta["hidden_size"] == "2" and result.meta["num_layers"] == "2"
    assert (out / "layers.csv").read_text() == (
        "layer,cos,snr,quality,rank\n"
        "0,0.000000,1.442221,1.442221,1\n"
        "1,1.000000,0.000000,0.000000,2\n"
    )
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rank_ties_go_to_the_lower_layer():
    assert layers_by_quality([0.1, 0.3, 0.3, 0.2]) == [1, 2, 3, 0]


def test_collect_artifact_that_disagrees_with_its_metadata_is_refused(tmp_path):
    data = torch.ones(2, 3, 4)
    collect_dir = fabricate_collect(tmp_path / "collect", data, data.clone(), hidden_size="8")
    with pytest.raises(PipelineError, match=r"tensor harmful has shape \[2, 3, 4\], expected \[n >= 1, 3, 8\]"):
        run_measure(tmp_path, collect_dir)


# --- a direction planted in a real (tiny, random) model --------------------------------------------------------

HIDDEN, LAYERS, VOCAB, TRIGGERS, SEQ, SAMPLES = 64, 4, 128, range(120, 128), 8, 48
PLANT = 4.0
"""Planted strength: 25x the embedding rows' norm (about 0.16 at initializer_range 0.02)."""


def tiny_qwen2() -> Qwen2Model:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return Qwen2Model(config).eval()


def planted_unit_vector() -> torch.Tensor:
    u = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(1))
    return u / u.norm()


def last_token_residuals(
    model: Qwen2Model, ids: torch.Tensor, add_after_layer: dict[int, torch.Tensor]
) -> torch.Tensor:
    """[n, layers, hidden]: each decoder layer's output at the last token, captured by forward hooks.

    Hooks rather than `hidden_states`, whose last element has the final norm
    applied. `add_after_layer` adds a vector to a layer's output at the last
    token, so later layers see it as part of the residual stream.
    """
    captured: dict[int, torch.Tensor] = {}

    def hook_for(index: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if index in add_after_layer:
                hidden = hidden.clone()
                hidden[:, -1] += add_after_layer[index]
            captured[index] = hidden[:, -1].clone()
            if index in add_after_layer:
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
            return None

        return hook

    handles = [layer.register_forward_hook(hook_for(i)) for i, layer in enumerate(model.layers)]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([captured[i] for i in range(LAYERS)], dim=1)


def cos_with(measurements, u: torch.Tensor) -> list[float]:
    return (measurements.tensors["refusal_direction"].double() @ u.double()).abs().tolist()


def select_with(measurements, **select_overrides) -> list[int]:
    config = {
        "mode": {"name": "balanced", "min_quality": 0.015, "top_n": 12},
        "select": {**select_defaults(), **select_overrides},
    }
    return select_layers(measurements.quality, settings_from_config(config))


def test_direction_planted_in_trigger_embeddings_is_recovered_at_every_layer(tmp_path):
    model = tiny_qwen2()
    u = planted_unit_vector()
    with torch.no_grad():
        model.embed_tokens.weight[list(TRIGGERS)] += PLANT * u
    generator = torch.Generator().manual_seed(2)
    harmless_ids = torch.randint(0, TRIGGERS.start, (SAMPLES, SEQ), generator=generator)
    harmful_ids = torch.randint(0, TRIGGERS.start, (SAMPLES, SEQ), generator=generator)
    harmful_ids[:, -1] = torch.randint(TRIGGERS.start, TRIGGERS.stop, (SAMPLES,), generator=generator)

    collect_dir = fabricate_collect(
        tmp_path / "collect",
        last_token_residuals(model, harmful_ids, {}),
        last_token_residuals(model, harmless_ids, {}),
    )
    measurements = read_measurements(run_measure(tmp_path, collect_dir) / "measurements.safetensors")

    # Only the harmful inputs carry the trigger, so the planted vector is the
    # whole difference of means at the embedding and stays dominant as the
    # residual stream carries it through all four layers.
    assert min(cos_with(measurements, u)) > 0.99
    assert sorted(select_with(measurements)) == [0, 1, 2, 3]


def test_direction_planted_mid_stack_is_found_only_where_present_and_selected(tmp_path):
    model = tiny_qwen2()
    u = planted_unit_vector()
    generator = torch.Generator().manual_seed(3)
    harmless_ids = torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=generator)
    harmful_ids = torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=generator)

    collect_dir = fabricate_collect(
        tmp_path / "collect",
        last_token_residuals(model, harmful_ids, {1: PLANT * u}),
        last_token_residuals(model, harmless_ids, {}),
    )
    measurements = read_measurements(run_measure(tmp_path, collect_dir) / "measurements.safetensors")

    cos = cos_with(measurements, u)
    # Planted after layer 1: present at layers 1, 2, 3; layer 0 only sees two samples of the same token distribution.
    assert min(cos[1:]) > 0.99
    assert cos[0] < 0.5
    quality = measurements.quality
    assert min(quality[1:]) > 3 * quality[0]
    # Half the best quality is the bar: the planted layers clear it, layer 0 does not.
    assert select_with(measurements, relative_min=0.5) == sorted(range(1, LAYERS), key=lambda i: -quality[i])
