"""collect: what it stores is the decoder layers' outputs, whatever the batching, placement or process count."""

from __future__ import annotations

import re
import json
from pathlib import Path

import pytest
from hydra.errors import HydraException
import torch
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from pipeline import distributed
from pipeline.activations import post_instruction_ids, prompt_tokens
from pipeline.errors import PipelineError
from pipeline.models import byte_level_tokenizer, load_model
from pipeline.collection import collect_class
from tiny_pipeline import compose_config, pipeline_command, run_command, run_in_process

PROMPTS = [
    "hi",
    "Explain in detail how rivers carve canyons over millions of years, with examples from three continents.",
    "Write a poem.",
    "What is 2+2?",
    "Summarize the plot of a long novel about a sailor, a whale and an obsession, in two sentences please.",
    "List five fruits.",
    "Why is the sky blue during the day but red at sunset?",
]
"""Seven prompts of 2 to about 100 characters: every batch of several prompts needs left padding."""
TOLERANCE = 1e-5
DP_OVERRIDES = ("prompts.n_train=15", "collect.positions=post_instruction", "run.stages=[measure]")
"""15 prompts per class: two processes get uneven shards (8 and 7)."""


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer): a seeded random 4-layer Qwen2 with the byte-level ChatML tokenizer."""
    tokenizer = byte_level_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval(), tokenizer


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[name].double() - b[name].double()).abs().max().item() for name in a)


def test_batch_size_and_padding_do_not_change_activations(tiny):
    model, tokenizer = tiny
    runs = {size: collect_class(model, tokenizer, PROMPTS, "harmful", "post_instruction", True, size, False) for size in (1, 3, 16)}
    assert max_difference(runs[1], runs[3]) < TOLERANCE and max_difference(runs[1], runs[16]) < TOLERANCE

    k = len(post_instruction_ids(tokenizer))
    positions = runs[16]["harmful_positions"]
    assert positions.shape == (len(PROMPTS), 4, k, 64)
    assert torch.equal(runs[16]["harmful"], positions.mean(dim=2))
    last = collect_class(model, tokenizer, PROMPTS, "harmful", "last", True, 3, False)["harmful"]
    assert (last - positions[:, :, -1]).abs().max() < TOLERANCE
    mean = collect_class(model, tokenizer, PROMPTS, "harmful", "post_instruction_mean", True, 3, False)["harmful"]
    assert (mean - runs[16]["harmful"]).abs().max() < TOLERANCE
    # The positions really differ: a bug that read the same token k times would pass the checks above.
    assert (positions[:, :, 0] - positions[:, :, -1]).abs().max() > 1000 * TOLERANCE


def test_layer_i_is_the_output_of_decoder_layer_i(tiny):
    """Against an unbatched forward: hidden_states[i + 1] for i < L - 1, the final norm's input for the last."""
    model, tokenizer = tiny
    stored = collect_class(model, tokenizer, PROMPTS, "harmful", "last", True, 4, False)
    before_norm: list[torch.Tensor] = []
    handle = model.model.norm.register_forward_pre_hook(lambda _module, args: before_norm.append(args[0]))
    try:
        for row, tokens in enumerate(prompt_tokens(tokenizer, PROMPTS)):
            with torch.no_grad():
                hidden = model(torch.tensor([tokens]), output_hidden_states=True).hidden_states
            assert (stored["harmful_embed"][row] - hidden[0][0, -1]).abs().max() < TOLERANCE
            for layer in range(3):
                assert (stored["harmful"][row, layer] - hidden[layer + 1][0, -1]).abs().max() < TOLERANCE
            assert (stored["harmful"][row, 3] - before_norm[-1][0, -1]).abs().max() < TOLERANCE
            assert (stored["harmful"][row, 3] - hidden[4][0, -1]).abs().max() > 0.1, "the last layer is stored before the final norm"
    finally:
        handle.remove()


def test_auto_batch_size_backs_off_on_out_of_memory_to_a_fixed_size_run(tiny, monkeypatch):
    model, tokenizer = tiny
    reference = collect_class(model, tokenizer, PROMPTS, "harmful", "last", True, 2, False)
    forward = model.model.forward
    attempts: list[int] = []

    def forward_with_two_prompts_of_memory(*args, **kwargs):
        attempts.append(kwargs["input_ids"].shape[0])
        if attempts[-1] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.model, "forward", forward_with_two_prompts_of_memory)
    backed_off = collect_class(model, tokenizer, PROMPTS, "harmful", "last", True, "auto", False)
    assert attempts == [7, 4, 2, 2, 2, 1]  # 64 -> all 7; below 7 -> 4; -> 2, then the rest at 2
    assert all(torch.equal(backed_off[name], reference[name]) for name in reference)
    with pytest.raises(torch.OutOfMemoryError):
        collect_class(model, tokenizer, PROMPTS, "harmful", "last", True, 3, False)


def test_disk_offloaded_layers_give_the_same_activations(model_store, tmp_path):
    """Layers alternately on the CPU and offloaded to disk (weights on the meta device between calls)."""
    model_cfg = dict(compose_config(["model=tiny"]).model)
    placed = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "disk"}
    placed |= {f"model.layers.{layer}": ("disk" if layer % 2 else "cpu") for layer in range(4)}
    model, tokenizer, _ = load_model({**model_cfg, "device_map": "cpu"}, model_store, progress=False)
    reference = collect_class(model, tokenizer, PROMPTS, "harmful", "post_instruction", True, 3, False)
    offload = {**model_cfg, "device_map": placed, "offload_folder": str(tmp_path / "offload")}
    model, tokenizer, _ = load_model(offload, model_store, progress=False)
    assert model.model.layers[1].mlp.down_proj.weight.device.type == "meta"
    assert max_difference(collect_class(model, tokenizer, PROMPTS, "harmful", "post_instruction", True, 3, False), reference) < 1e-6


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory, model_store) -> dict[str, Path]:
    """{"kept" | "streamed": cache dir} of in-process collect + measure runs with the data-parallel test's config."""
    caches = {}
    for label, keep in (("kept", "true"), ("streamed", "false")):
        caches[label] = tmp_path_factory.mktemp(f"collect-{label}")
        run_in_process([*DP_OVERRIDES, f"collect.keep_activations={keep}", f"cache.dir={caches[label]}", f"cache.models={model_store}"])
    return caches


def only_dir(parent: Path) -> Path:
    (directory,) = [path for path in parent.iterdir() if path.is_dir()]
    return directory


def test_streamed_statistics_give_the_same_measurement(single_process):
    kept_dir, streamed_dir = only_dir(single_process["kept"] / "collect"), only_dir(single_process["streamed"] / "collect")
    kept = load_file(kept_dir / "activations.safetensors")
    streamed = load_file(streamed_dir / "activations.safetensors")
    assert json.loads((kept_dir / "meta.json").read_text())["activations"] == "kept"
    assert json.loads((streamed_dir / "meta.json").read_text())["activations"] == "streamed"
    for label in ("harmful", "harmless"):
        activations = kept[label].double()
        assert streamed[f"{label}_count"].item() == 15 == activations.shape[0]
        assert torch.allclose(streamed[f"{label}_sum"], activations.sum(dim=0), rtol=0, atol=1e-9)
        assert torch.allclose(streamed[f"{label}_sumsq"], activations.square().sum(dim=(0, 2)), rtol=1e-12, atol=0)
        assert torch.allclose(streamed[f"{label}_positions_sum"], kept[f"{label}_positions"].double().sum(dim=0), atol=1e-9)
        assert streamed[f"{label}_positions_sumsq"].shape == kept[f"{label}_positions"].shape[1:3]

    kept_measure, streamed_measure = only_dir(single_process["kept"] / "measure"), only_dir(single_process["streamed"] / "measure")
    assert (kept_measure / "layers.csv").read_text() == (streamed_measure / "layers.csv").read_text()
    a = load_file(kept_measure / "measurements.safetensors")
    b = load_file(streamed_measure / "measurements.safetensors")
    for name in ("harmful_mean", "harmless_mean", "refusal_direction", "biprojected_direction", "cos", "snr", "signal_quality"):
        assert torch.allclose(a[name], b[name], rtol=1e-6, atol=1e-7), name
    for name in ("harmful_spread", "harmless_spread"):
        assert torch.allclose(a[name], b[name], rtol=1e-9, atol=0), name
    assert a["harmful_proj_var"].isfinite().all() and b["harmful_proj_var"].isnan().all()


def relative_paths(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def test_bad_settings_fail_before_any_work(tmp_path):
    with pytest.raises(PipelineError, match="collect.batch_size=0 must be a positive integer or auto"):
        run_in_process(["collect.batch_size=0", f"cache.dir={tmp_path / 'cache'}", f"cache.models={tmp_path / 'models'}"])
    assert not (tmp_path / "models").exists(), "validation runs before the model is materialized"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("collect.positions=first", "Invalid value 'first', expected one of \\[last, post_instruction, post_instruction_mean\\]"),
        ("collect.keep_activations=maybe", "Value 'maybe' is not a valid bool"),
    ],
)
def test_settings_of_the_wrong_type_fail_when_the_config_is_composed(override, message):
    with pytest.raises(HydraException) as raised:
        compose_config([override])
    assert re.search(message, str(raised.value.__cause__)), str(raised.value.__cause__)


def test_contiguous_shards_cover_the_prompts_in_order():
    for total in (0, 1, 7, 15, 16):
        bounds = [distributed.shard_bounds(total, world=3, index=rank) for rank in range(3)]
        assert bounds[0][0] == 0 and bounds[-1][1] == total
        assert all(stop == next_start for (_, stop), (next_start, _) in zip(bounds, bounds[1:]))
        sizes = [stop - start for start, stop in bounds]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_two_processes_write_what_one_process_writes(single_process, model_store, tmp_path):
    """torchrun with 2 CPU processes (gloo): same key, same activations, one writer."""
    cache = tmp_path / "cache"
    python, *arguments = pipeline_command(*DP_OVERRIDES, f"cache.dir={cache}", f"cache.models={model_store}", f"hydra.run.dir={tmp_path / 'run'}")
    launcher = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = run_command([*launcher, *arguments], timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    reference_dir = only_dir(single_process["kept"] / "collect")
    launched_dir = cache / "collect" / reference_dir.name  # same cache key: the process count is not part of it
    launched = load_file(launched_dir / "activations.safetensors")
    assert max_difference(launched, load_file(reference_dir / "activations.safetensors")) < TOLERANCE
    assert (launched_dir / "meta.json").read_text() == (reference_dir / "meta.json").read_text()
    assert json.loads((launched_dir / "manifest.json").read_text())["world_size"] == 2
    assert json.loads((reference_dir / "manifest.json").read_text())["world_size"] == 1
    # One writer: the cache holds exactly the files the single-process run left (no helper temporaries).
    # The main process alone ran measure after the helper had left: its artifact is there too.
    assert relative_paths(cache) == relative_paths(single_process["kept"])
