"""The architecture table: name matching by parsed layer number, MoE detection, unknown families."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from pipeline.architectures import (
    ARCHITECTURES,
    decoder_layers,
    get_architecture,
    is_moe,
    num_decoder_layers,
    residual_writers,
)
from pipeline.errors import PipelineError


def test_unknown_model_type_lists_families_in_one_line() -> None:
    with pytest.raises(PipelineError) as raised:
        get_architecture("falcon")
    message = str(raised.value)
    assert "\n" not in message
    assert "'falcon'" in message
    for family in ("llama", "qwen2", "qwen3", "qwen3_moe", "mistral", "mixtral", "gemma3_text", "glm4_moe", "gpt_oss", "deepseek_v3"):
        assert family in message


def test_plan_layer_1_never_matches_layers_10_and_11() -> None:
    arch = get_architecture("glm4_moe")
    names = [
        name
        for layer in range(12)
        for name in (
            f"model.layers.{layer}.self_attn.o_proj.weight",
            f"model.layers.{layer}.mlp.experts.{layer + 3}.down_proj.weight",
            f"model.layers.{layer}.mlp.shared_experts.down_proj.weight",
            f"model.layers.{layer}.mlp.experts.1.up_proj.weight",
        )
    ]
    layer_1 = [name for name in names if (m := residual_writers(arch, name, 12, "disk")) and m.layer == 1]
    assert layer_1 == [
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.1.mlp.experts.4.down_proj.weight",
        "model.layers.1.mlp.shared_experts.down_proj.weight",
    ]
    later = [n for n in names if n.startswith(("model.layers.10.", "model.layers.11.")) and "up_proj" not in n]
    assert sorted({residual_writers(arch, n, 12, "disk").layer for n in later}) == [10, 11]


def test_layers_past_num_hidden_layers_are_never_writers() -> None:
    """GLM-4.5-Air stores its MTP layer 46 in the checkpoint; the model runs layers 0-45."""
    arch = get_architecture("glm4_moe")
    assert residual_writers(arch, "model.layers.45.mlp.experts.7.down_proj.weight", 46, "disk").layer == 45
    assert residual_writers(arch, "model.layers.46.mlp.experts.7.down_proj.weight", 46, "disk") is None
    assert residual_writers(arch, "model.layers.46.self_attn.o_proj.weight", 46, "disk") is None


@pytest.mark.parametrize(
    ("model_type", "where", "name", "axis", "component"),
    [
        ("llama", "disk", "model.layers.3.self_attn.o_proj.weight", 0, "attn"),
        ("llama", "disk", "model.layers.3.mlp.down_proj.weight", 0, "mlp"),
        ("mixtral", "disk", "model.layers.3.block_sparse_moe.experts.7.w2.weight", 0, "mlp"),
        ("mixtral", "memory", "model.layers.3.mlp.experts.down_proj", 1, "mlp"),
        ("qwen3_moe", "memory", "model.layers.3.mlp.experts.down_proj", 1, "mlp"),
        ("glm4_moe", "memory", "model.layers.3.mlp.shared_experts.down_proj.weight", 0, "mlp"),
        ("gpt_oss", "disk", "model.layers.3.mlp.experts.down_proj", 2, "mlp"),
        ("gpt_oss", "memory", "model.layers.3.mlp.experts.down_proj_bias", 1, "mlp"),
        ("gpt_oss", "memory", "model.layers.3.self_attn.o_proj.bias", 0, "attn"),
        ("gemma3", "disk", "language_model.model.layers.3.mlp.down_proj.weight", 0, "mlp"),
        ("gemma3", "memory", "model.language_model.layers.3.self_attn.o_proj.weight", 0, "attn"),
    ],
)
def test_writer_axes(model_type: str, where: str, name: str, axis: int, component: str) -> None:
    match = residual_writers(get_architecture(model_type), name, 4, where)
    assert (match.layer, match.hidden_axis, match.component) == (3, axis, component)


@pytest.mark.parametrize(
    ("model_type", "name"),
    [
        ("llama", "model.layers.3.mlp.up_proj.weight"),
        ("llama", "model.layers.3.self_attn.q_proj.weight"),
        ("mixtral", "model.layers.3.block_sparse_moe.experts.7.w1.weight"),
        ("mixtral", "model.layers.3.block_sparse_moe.gate.weight"),
        ("glm4_moe", "model.layers.3.mlp.gate.e_score_correction_bias"),
        ("gpt_oss", "model.layers.3.mlp.experts.gate_up_proj_bias"),
        ("gpt_oss", "model.layers.3.mlp.experts.down_proj_blocks"),
        ("gemma3", "model.layers.3.mlp.down_proj.weight"),  # text-only spelling in a multimodal checkpoint
        ("llama", "lm_head.weight"),
    ],
)
def test_non_writers_do_not_match(model_type: str, name: str) -> None:
    assert residual_writers(get_architecture(model_type), name, 4, "disk") is None
    assert residual_writers(get_architecture(model_type), name, 4, "memory") is None


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"model_type": "glm4_moe", "n_routed_experts": 128}, True),
        ({"model_type": "qwen3_moe", "num_experts": 128}, True),
        ({"model_type": "mixtral", "num_local_experts": 8}, True),
        ({"model_type": "gpt_oss", "num_local_experts": 32}, True),
        ({"model_type": "deepseek_v3", "n_routed_experts": 256}, True),
        ({"model_type": "qwen3_moe", "num_experts": 0}, False),
        ({"model_type": "qwen2", "num_experts": None}, False),
        ({"model_type": "llama"}, False),
        ({"model_type": "qwen2", "num_experts": 64}, False),  # qwen2 has no experts field in the table
        ({"model_type": "something_new", "num_local_experts": 4}, True),
        ({"model_type": "something_new", "num_experts": None}, False),
        ({"model_type": "gemma3", "text_config": {"num_hidden_layers": 48}}, False),
    ],
)
def test_is_moe_reads_config_fields(config: dict, expected: bool) -> None:
    assert is_moe(config) is expected


def test_num_decoder_layers_reads_nested_text_config() -> None:
    assert num_decoder_layers({"model_type": "gemma3", "text_config": {"num_hidden_layers": 48}}) == 48
    assert num_decoder_layers({"model_type": "glm4_moe", "num_hidden_layers": 46, "num_nextn_predict_layers": 1}) == 46
    with pytest.raises(PipelineError):
        num_decoder_layers({"model_type": "llama"})


def test_every_family_has_both_components_in_both_spellings() -> None:
    for arch in ARCHITECTURES.values():
        for where in ("disk", "memory"):
            assert {writer.component for writer in arch.writers[where]} == {"attn", "mlp"}, arch.model_type


def test_decoder_layers_finds_the_module_list() -> None:
    config = AutoConfig.for_model(
        "qwen3_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=64, num_experts=4, num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    layers = decoder_layers(model)
    assert len(layers) == 3
    assert layers[2] is model.model.layers[2]


PRESET_KINDS = {
    "glm45air": True, "qwen25_7b": False, "qwen3_8b": False, "qwen3_30b_a3b": True, "llama31_8b": False,
    "gemma3_12b": False, "mistral_7b": False, "mixtral_8x7b": True, "gpt_oss_20b": True, "deepseek_v3": True,
}


@pytest.mark.parametrize(("preset", "moe"), PRESET_KINDS.items())
def test_presets_name_a_supported_family(preset: str, moe: bool) -> None:
    text = (Path(__file__).parents[1] / "conf" / "model" / f"{preset}.yaml").read_text()
    config = yaml.safe_load(text)
    assert config["name"] == preset and config["source"] == "hub"
    get_architecture(config["arch"]["model_type"])
    assert is_moe(config["arch"]) is moe
    assert num_decoder_layers(config["arch"]) == config["arch"]["num_hidden_layers"]
