"""evaluate without a checkpoint: the plan applied in memory scores exactly what the exported model scores,
one model load serves a whole run, and `run.export` decides whether ablate writes the model directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline import model_cache
from pipeline.errors import PipelineError
from pipeline.evaluation import per_token_kl
from pipeline.judge_models import make_judge
from pipeline.models import load_model
from pipeline.prompt_sets import prompt_categories
from pipeline.runner import config_slice, with_export
from pipeline.scoring import eval_prompts, evaluate_metrics, read_baseline, score
from pipeline.stages import registry
from tiny_pipeline import SMALL, compose_config, run_in_process


def exported_metrics(summary: dict, overrides: list[str], model_store: Path) -> dict:
    """metrics.json as the evaluate stage's ruler (`pipeline.scoring`) computes it for the ablate artifact's
    `model/` directory, loaded from disk."""
    plain = config_slice(compose_config([*SMALL, *overrides]), ("model", "prompts", "eval"))
    eval_cfg = plain["eval"]
    exported = {**plain["model"], "source": "local", "id": str(Path(summary["stages"]["ablate"]["dir"]) / "model")}
    model, tokenizer, _ = load_model(exported, model_store, progress=False)
    harmful, harmless = eval_prompts(plain["prompts"], eval_cfg)
    baseline = read_baseline(Path(summary["stages"]["baseline"]["dir"]), len(harmless))
    scored = score(model, tokenizer, harmful, harmless, eval_cfg, make_judge(eval_cfg, model_store), False)
    token_kl = per_token_kl(baseline.topk, model, tokenizer, harmless, int(eval_cfg["batch_size"]),
                            str(eval_cfg["thinking"]), False)
    categories = prompt_categories(plain["prompts"]["harmless"])
    metrics = evaluate_metrics(baseline, scored, harmless, token_kl, eval_cfg, categories)
    return json.loads(json.dumps(metrics))  # as metrics.json holds it


@pytest.mark.parametrize("model", ["tiny", "tiny_moe"])
@pytest.mark.parametrize("method", ["orthogonal", "norm_preserving"])
def test_in_memory_metrics_equal_the_exported_models_to_the_last_digit(model, method, tmp_path_factory, model_store):
    cache = tmp_path_factory.getbasetemp() / f"in-memory-{model}"  # shared by both methods: upstream computed once
    overrides = [f"model={model}", f"select.method={method}", "select.direction_from=0.55", f"cache.dir={cache}",
                 f"cache.models={model_store}"]
    model_cache.release()
    before = model_cache.loads()
    summary = run_in_process(overrides)
    assert "ablate" in summary["stages"], "a single run exports by default"
    assert model_cache.loads() == before + 1  # collect (first run only), baseline and evaluate share one load
    model_cfg = config_slice(compose_config([*SMALL, *overrides]), ("model",))["model"]
    held = model_cache.shared_model(model_cfg, model_store).model.state_dict()
    fresh = load_model(model_cfg, model_store, progress=False)[0].state_dict()
    assert held.keys() == fresh.keys() and all(held[name].equal(fresh[name]) for name in held), "left edited"
    metrics = json.loads((Path(summary["stages"]["evaluate"]["dir"]) / "metrics.json").read_text())
    assert metrics["kl_divergence"] > 1e-5, "the plan must change the model for the comparison to mean anything"
    assert metrics == {**exported_metrics(summary, overrides, model_store), "layers": metrics["layers"]}


def test_the_held_model_is_replaced_when_its_key_changes(model_store):
    model_cfg = config_slice(compose_config(SMALL), ("model",))["model"]
    first = model_cache.shared_model(model_cfg, model_store, progress=False)
    before = model_cache.loads()
    assert model_cache.shared_model(model_cfg, model_store, progress=False) is first and model_cache.loads() == before
    other = model_cache.shared_model(model_cfg, model_store, "bfloat16", progress=False)
    assert model_cache.loads() == before + 1 and other.model.dtype == torch.bfloat16
    assert json.loads(model_cache.load_key(model_cfg, model_store, "bfloat16"))["dtype"] == "bfloat16"
    model_cache.release()


def test_export_runs_ablate_only_when_asked():
    stages = registry()
    default = ["collect", "measure", "select", "evaluate"]
    assert with_export(stages, default, "auto", multirun=False)[-1] == "ablate"
    assert "ablate" not in with_export(stages, default, "auto", multirun=True)
    assert with_export(stages, default, True, multirun=True)[-1] == "ablate"
    assert "ablate" not in with_export(stages, default, False, multirun=False)
    assert with_export(stages, ["ablate"], False, multirun=True) == ["ablate"]  # named: always runs
    assert with_export(stages, ["collect", "measure"], True, multirun=False) == ["collect", "measure"]  # no plan, no export
    with pytest.raises(PipelineError, match="run.export='yes' is not one of auto, true, false"):
        with_export(stages, default, "yes", multirun=False)
