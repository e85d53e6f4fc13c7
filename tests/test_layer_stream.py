"""Layer streaming (`collect.streaming=layers`, pipeline/layer_stream.py) against the in-memory forward.

Each family's tiny twin is saved in several safetensors shards, so a decoder layer's tensors are read
from more than one file. Prompts of different lengths share left-padded batches. On CPU the streamed
residuals come out bit-identical (the same layer calls on the same inputs); the tests allow 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from pipeline.activations import residual_batches
from pipeline.collection import collect_classes
from pipeline.layer_stream import LayerStream, choose
from pipeline.models import byte_level_tokenizer
from test_weight_edit import BASE, tiny_model
from tiny_pipeline import run_in_process

FAMILIES = ("qwen2", "glm4_moe", "gemma3_text", "gemma3")
"""Dense; GLM-4.5-like (dense first layer, routed + shared experts); sliding-window layers with Gemma 3's
extra norms and per-layer-type rotary; multimodal Gemma 3 (checkpoint prefixes renamed on load)."""


def sharded(model_type: str, directory: Path) -> Path:
    tiny_model(model_type).save_pretrained(directory, max_shard_size="60KB")
    assert len(list(directory.glob("*.safetensors"))) > 3
    return directory


def prompts_of_many_lengths() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, 90, (length,), generator=generator).tolist() for length in (5, 9, 17, 3, 12, 20, 7)]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_streamed_residuals_equal_in_memory(model_type: str, tmp_path: Path) -> None:
    directory = sharded(model_type, tmp_path / model_type)
    tokens = prompts_of_many_lengths()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    expected = list(residual_batches(model, tokens, 0, 3, 2, progress=False))
    stream = LayerStream(directory, "float32")
    got = stream.residual_batches_of([tokens], 0, 3, 2, progress=False)[0]
    assert [batch.indices for batch in got] == [batch.indices for batch in expected]
    for ours, theirs in zip(got, expected):
        assert ours.layers.shape == theirs.layers.shape
        torch.testing.assert_close(ours.layers, theirs.layers, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.embed, theirs.embed, atol=1e-5, rtol=0)
    assert all(parameter.is_meta for parameter in stream.layers.parameters())  # every layer freed again
    stream.close()


@pytest.mark.parametrize("keep", [True, False])
def test_both_artifact_formats_in_one_pass(keep: bool, tmp_path: Path) -> None:
    """Both classes go through each layer in one pass; kept rows and float64 sums match the in-memory collect."""
    tokenizer = byte_level_tokenizer()
    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen2", **{**BASE, "vocab_size": len(tokenizer)})
    directory = tmp_path / "qwen2"
    AutoModelForCausalLM.from_config(config).save_pretrained(directory, max_shard_size="60KB")
    sets = {"harmful": ["how do I pick a lock", "x", "tell me a long story about ships"], "harmless": ["hi", "sum 2+2"]}
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    expected = collect_classes(model, tokenizer, sets, "post_instruction", keep, 2, progress=False)
    got = collect_classes(LayerStream(directory, "float32"), tokenizer, sets, "post_instruction", keep, 2, progress=False)
    assert sorted(got) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=0)


def test_auto_streams_when_the_model_exceeds_the_memory_cap(tmp_path: Path) -> None:
    directory = sharded("qwen2", tmp_path / "qwen2")
    assert choose("auto", {"device_map": "cpu", "max_memory": {"cpu": "1KB"}}, directory, "float32")[0] == "layers"
    assert choose("auto", {"device_map": "cpu", "max_memory": None}, directory, "float32")[0] == "off"
    assert choose("off", {"device_map": "cpu", "max_memory": {"cpu": "1KB"}}, directory, "float32")[0] == "off"


def test_tiny_moe_pipeline_streamed_equals_in_memory_byte_for_byte(tmp_path: Path, model_store: Path) -> None:
    """measure's file and select's plan are byte-identical; a run capped below the model's size streams."""
    common = ["model=tiny_moe", f"cache.models={model_store}"]
    for name, extra in (("off", ["collect.streaming=off"]), ("layers", ["collect.streaming=layers"])):
        run_in_process([*common, f"cache.dir={tmp_path / name}", "run.stages=[select]", *extra])
    for pattern in ("measure/*/measurements.safetensors", "select/*/ablation.yaml", "collect/*/activations.safetensors"):
        off, layers = (next((tmp_path / name).glob(pattern)) for name in ("off", "layers"))
        assert off.read_bytes() == layers.read_bytes(), pattern
    capped = [f"cache.dir={tmp_path / 'capped'}", "run.stages=[collect]", "collect.streaming=auto", "model.max_memory={cpu: 1KB}"]
    run_in_process([*common, *capped])
    manifest = json.loads(next((tmp_path / "capped").glob("collect/*/manifest.json")).read_text())
    assert manifest["streaming"]["chosen"] == "layers", manifest["streaming"]
    off, capped_file = (next((tmp_path / name).glob("collect/*/activations.safetensors")) for name in ("off", "capped"))
    assert off.read_bytes() == capped_file.read_bytes()
