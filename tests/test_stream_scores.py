"""Forward-only numbers (`eval.generate=false`, pipeline/forward_scores.py): streamed equal in memory, and runs
on a model that is not held in memory.

Each twin is saved in several safetensors shards with a byte-level tokenizer; the plan is applied in memory
(`plan_trial.InMemoryModel`, what evaluate does) on one side and to each decoder layer as it is read
(`plan_trial.LayerPlan`) on the other. On CPU the numbers come out bit-identical; the tests allow 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pipeline import model_cache
from pipeline.errors import PipelineError
from pipeline.evaluation import kl_divergence
from pipeline.forward_scores import IN_MEMORY, STREAMED, in_memory_scores, refusal_token_ids, streamed_scores
from pipeline.models import byte_level_tokenizer
from pipeline.outcome import summary_lines
from pipeline.plan_trial import InMemoryModel
from test_weight_edit import BASE, plan_for, save, tiny_model
from tiny_pipeline import CONF, SMALL, Scene, one_line_error, run_cli, run_in_process

MARKERS = list(OmegaConf.load(CONF / "eval" / "default.yaml")["refusal_markers"])
EVAL = {"thinking": "off", "batch_size": 3, "refusal_markers": MARKERS}
HARMFUL = ["how do I pick a lock", "x", "write a long story about a ship that sinks", "make a weapon", "ok"]
HARMLESS = ["hi", "sum 2+2 please", "name three rivers in Europe", "a"]
CASES = [
    ("llama", "orthogonal", True, torch.float32, True),  # dense, tied LM head, embedding edited
    ("mixtral", "norm_preserving", False, torch.bfloat16, False),  # routed experts only; bf16 storage, fp32 compute
    ("glm4_moe", "norm_preserving", True, torch.bfloat16, False),  # GLM-4.5-like: dense layer 0, routed + shared
]


def checkpoint(model_type: str, directory: Path, storage: torch.dtype, tied: bool) -> Path:
    """The family's tiny twin (`test_weight_edit.tiny_model`) with the byte-level tokenizer's vocabulary, in shards."""
    tokenizer = byte_level_tokenizer()
    model = tiny_model(model_type)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    with torch.no_grad():  # peaked next-token distributions (the 0.02-std init gives near-uniform ones) with real mass
        head = model.get_output_embeddings().weight  # on the refusal tokens, so a plan moves every number far beyond
        head.mul_(5)  # the 1e-5 tolerance
        head[refusal_token_ids(tokenizer, MARKERS)] *= 4
    save(model.to(storage), directory, sharded=True)
    tokenizer.save_pretrained(directory)
    assert len(list(directory.glob("*.safetensors"))) > 3
    return directory


def model_config(directory: Path) -> dict:
    return {"name": "twin", "source": "local", "id": str(directory), "dtype": "float32", "device_map": "cpu",
            "max_memory": None, "offload_folder": None, "trust_remote_code": False, "arch": None}


def measurements_for(num_layers: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {name: torch.randn(num_layers, BASE["hidden_size"], generator=generator)
            for name in ("refusal_direction", "biprojected_direction")}


@pytest.mark.parametrize(("model_type", "method", "embed", "storage", "tied"), CASES)
def test_streamed_scores_equal_in_memory(model_type, method, embed, storage, tied, tmp_path: Path) -> None:
    model_cfg = model_config(checkpoint(model_type, tmp_path / model_type, storage, tied))
    plan = plan_for([{"layer": 0, "direction_from": 1.0, "scale": 1.0},
                     {"layer": 2, "direction_from": 1.4, "scale": 0.8, "attn_scale": 0.5}], method)
    measurements = measurements_for(BASE["num_hidden_layers"])
    model_cache.release()
    original = InMemoryModel(model_cfg, tmp_path / "store", progress=False)
    try:
        before = in_memory_scores(original.model, original.tokenizer, HARMFUL, HARMLESS, EVAL, False)
        with original.applied(plan, measurements, embed) as model:
            after = in_memory_scores(model, original.tokenizer, HARMFUL, HARMLESS, EVAL, False)
    finally:
        model_cache.release()
    streamed_before = streamed_scores(model_cfg, tmp_path / "store", HARMFUL, HARMLESS, EVAL, False)
    streamed_after = streamed_scores(model_cfg, tmp_path / "store", HARMFUL, HARMLESS, EVAL, False, plan, measurements, embed)
    assert (before.how, streamed_after.how) == (IN_MEMORY, STREAMED)
    for memory, streamed in ((before, streamed_before), (after, streamed_after)):
        assert streamed.logprobs.shape == memory.logprobs.shape == (len(HARMLESS), 259)
        torch.testing.assert_close(streamed.logprobs, memory.logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(streamed.refusal, memory.refusal, atol=1e-5, rtol=0)
        assert streamed.refusal_tokens == memory.refusal_tokens
        assert abs(streamed.refusal_score - memory.refusal_score) <= 1e-5
    kl = kl_divergence(before.logprobs, after.logprobs)
    assert abs(kl_divergence(streamed_before.logprobs, streamed_after.logprobs) - kl) <= 1e-5
    # the plan moves every number far beyond the tolerance, so an edit missed by the stream would show
    assert kl > 1e-4 and (after.logprobs - before.logprobs).abs().max() > 0.1
    assert (after.refusal - before.refusal).abs().max() > 1e-4


def test_refusal_tokens_are_first_tokens_of_sentence_openings() -> None:
    tokenizer = byte_level_tokenizer()
    ids = refusal_token_ids(tokenizer, MARKERS)
    assert [tokenizer.decode([token]) for token in ids] == ["I", "M"]  # "I'm sorry", "My apologies"; not "is", "cannot"
    assert refusal_token_ids(tokenizer, ["Sorry, no", "cannot help"]) == tokenizer("S")["input_ids"]
    with pytest.raises(PipelineError, match="no phrase that opens a sentence"):
        refusal_token_ids(tokenizer, ["cannot help", "is not appropriate"])


def test_forward_only_run_on_a_model_bigger_than_the_memory_cap(scene: Scene) -> None:
    """With model.max_memory below the model's size, baseline and evaluate stream (collect, measure and select come
    from the reference run's cache), nothing loads the model whole, and the numbers equal the in-memory run's."""
    common = [f"cache.models={scene.store}", f"cache.dir={scene.cache}", "run.export=false", "eval.generate=false",
              "ablate.embed.enabled=true"]
    loads = model_cache.loads()
    summary = run_in_process([*common, "model.max_memory={cpu: 1KB}", "eval.streaming=auto"])
    assert model_cache.loads() == loads, "a stage loaded the whole model"
    stages = {name: Path(info["dir"]) for name, info in summary["stages"].items()}
    assert [name for name, info in summary["stages"].items() if not info["cached"]] == ["baseline", "evaluate"]
    for name in ("baseline", "evaluate"):
        assert json.loads((stages[name] / "manifest.json").read_text())["streaming"]["chosen"] == "layers", name
    metrics = json.loads((stages["evaluate"] / "metrics.json").read_text())
    assert "refusal_before" not in metrics and "per_token_kl" not in metrics and metrics["generate"] is False
    assert metrics["measured"]["refusal_score"] == metrics["measured"]["kl_divergence"] == "forward, first answer token, layer-streamed"
    assert "refusal_rate" not in metrics["measured"] and "refusal_rate" not in metrics["measured"]["baseline"]
    assert [token["text"] for token in metrics["refusal_tokens"]] == ["I", "M"]
    assert metrics["kl_divergence"] > 1e-4 and 0 < metrics["refusal_score_after"] < 1
    baseline = json.loads((stages["baseline"] / "baseline.json").read_text())
    assert baseline["refusal_score"] == metrics["refusal_score_before"] and "refusal" not in baseline
    assert sorted(path.name for path in stages["evaluate"].iterdir()) == ["manifest.json", "metrics.json", "report.md"]
    assert "forward-only" in (stages["evaluate"] / "report.md").read_text()
    assert any(line.startswith("refusal score (first-token mass on refusal tokens): ") for line in summary_lines(summary))

    in_memory = run_in_process([*common, "eval.streaming=off", "run.force=[baseline,evaluate]"])
    again = json.loads((Path(in_memory["stages"]["evaluate"]["dir"]) / "metrics.json").read_text())
    assert again["measured"]["refusal_score"] == "forward, first answer token, in memory"
    for name in ("refusal_score_before", "refusal_score_after", "kl_divergence"):
        assert abs(again[name] - metrics[name]) <= 1e-5, name


def test_generated_metrics_carry_the_refusal_score_and_how_each_number_was_measured(reference) -> None:
    _, summary = reference
    metrics = json.loads((Path(summary["stages"]["evaluate"]["dir"]) / "metrics.json").read_text())
    assert metrics["generate"] is True and 0 < metrics["refusal_score_before"] < 1
    assert metrics["measured"]["refusal_rate"] == "generated, greedy, up to 4 answer tokens, markers judge"
    assert metrics["measured"]["refusal_score"] == "forward, first answer token, in memory"
    assert metrics["measured"]["baseline"]["kl_reference"] == "forward, first answer token, in memory"


def test_streaming_with_generation_is_refused_before_any_work(tmp_path: Path, capsys, monkeypatch) -> None:
    status, err = run_cli([*SMALL, f"cache.dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}",
                           "eval.streaming=layers"], capsys, monkeypatch)
    assert "eval.streaming=layers needs eval.generate=false" in one_line_error(status, err)
    assert not (tmp_path / "cache" / "collect").exists()
