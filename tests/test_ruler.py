"""The ruler on the tiny model (issue 17): early stopping never changes a class, the thinking switch and
reasoning budget, and the per-token KL."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pipeline.activations import render_prompts
from pipeline.evaluation import greedy_completions, per_token_kl, reference_topk, topk_kl
from pipeline.judge_models import MarkersJudge
from pipeline.judges import OUTCOMES, UNCLOSED, MarkerRules
from pipeline.model_cache import shared_model
from pipeline.models import byte_level_tokenizer
from pipeline.runner import config_slice
from pipeline.scoring import eval_prompts, judged_completions
from tiny_pipeline import SMALL, compose_config

QWEN3_LIKE = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}{%- endif %}"
)
R1_LIKE = "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}<|im_start|>assistant\n<think>\n"


@pytest.fixture(scope="module")
def tiny(model_store):
    plain = config_slice(compose_config([*SMALL, "eval.max_new_tokens=16"]), ("model", "prompts", "eval"))
    loaded = shared_model(plain["model"], model_store, progress=False)
    harmful, harmless = eval_prompts(plain["prompts"], plain["eval"])
    return loaded, harmful + harmless, plain["eval"]


def test_early_stop_gives_the_same_classes_and_is_greedy(tiny):
    loaded, prompts, eval_cfg = tiny
    eval_cfg = {**eval_cfg, "refusal_markers": ["q=", "uuuu"]}  # fire in the opening of some of the tiny model's rows
    judge = MarkersJudge(MarkerRules.from_config(eval_cfg))
    stopped = judged_completions(loaded.model, loaded.tokenizer, prompts, {**eval_cfg, "early_stop": True}, judge, False)
    full = judged_completions(loaded.model, loaded.tokenizer, prompts, {**eval_cfg, "early_stop": False}, judge, False)
    assert stopped.verdicts == full.verdicts
    lengths = [(len(a), len(b)) for a, b in zip(stopped.ids, full.ids)]
    assert any(a < b for a, b in lengths) and any(a == b for a, b in lengths), lengths
    for short, long in zip(stopped.ids, full.ids):
        assert long[: len(short)] == short  # the same greedy tokens, cut short
    assert {v.outcome for v in stopped.verdicts} >= {"refusal", "compliance"}


def test_thinking_switch_reaches_templates_that_read_it():
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = QWEN3_LIKE
    off, on, default = (render_prompts(tokenizer, ["hi"], mode)[0] for mode in ("off", "on", "template"))
    assert off.endswith("assistant<think>\n\n</think>")  # the template trims the newlines around its tags
    assert on.endswith("assistant") and default == on
    plain = byte_level_tokenizer()  # a template without the switch renders the same in every mode
    assert len({render_prompts(plain, ["hi"], mode)[0] for mode in ("off", "on", "template")}) == 1


def test_reasoning_budget_is_separate_and_an_unclosed_section_is_empty(tiny):
    loaded, prompts, eval_cfg = tiny
    model, tokenizer = loaded.model, copy.deepcopy(loaded.tokenizer)
    plain = greedy_completions(model, tokenizer, prompts[:4], 4, 4, False)
    budgeted = greedy_completions(model, tokenizer, prompts[:4], 4, 4, False, reasoning_tokens=8)
    assert budgeted == plain  # no reasoning: the answer budget stops every row at 4 tokens
    tokenizer.chat_template = R1_LIKE  # the prompt opens a section the random model never closes
    thinking = judged_completions(model, tokenizer, prompts[:4], {**eval_cfg, "max_new_tokens": 4, "reasoning_tokens": 8},
                                  MarkersJudge(MarkerRules.from_config(eval_cfg)), False)
    assert all(text.startswith("<think>") for text in thinking.completions)
    assert [len(ids) for ids in thinking.ids] == [12] * 4
    assert {(v.outcome, v.reason) for v in thinking.verdicts} == {("empty", UNCLOSED)}


def test_topk_kl_is_a_lower_bound_equal_to_the_full_kl_with_all_the_mass():
    torch.manual_seed(0)
    reference, edited = F.log_softmax(torch.randn(3, 5, 50), -1), F.log_softmax(torch.randn(3, 5, 50), -1)
    full = F.kl_div(edited.double(), reference.double(), log_target=True, reduction="none").sum(-1)
    top = reference.topk(50, dim=-1)
    assert torch.allclose(topk_kl(top.values, top.indices, edited), full)
    part = reference.topk(8, dim=-1)
    assert (topk_kl(part.values, part.indices, edited) <= full + 1e-12).all()
    assert topk_kl(part.values, part.indices, reference).abs().max() < 1e-12


def test_per_token_kl_is_zero_for_the_original_and_positive_for_an_edit(tiny):
    loaded, prompts, _ = tiny
    model, tokenizer = loaded.model, loaded.tokenizer
    generated = greedy_completions(model, tokenizer, prompts[:6], 8, 4, False)
    reference = reference_topk(model, tokenizer, prompts[:6], generated.ids, 4, progress=False)
    assert per_token_kl(reference, model, tokenizer, prompts[:6], 4, progress=False) == 0.0
    weight = model.model.layers[1].mlp.down_proj.weight
    original = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(0.5)
        assert per_token_kl(reference, model, tokenizer, prompts[:6], 4, progress=False) > 1e-6
    finally:
        with torch.no_grad():
            weight.copy_(original)


def test_evaluate_writes_classes_over_refusal_per_token_kl_and_a_report(reference):
    _, summary = reference
    evaluate_dir = Path(summary["stages"]["evaluate"]["dir"])
    metrics = json.loads((evaluate_dir / "metrics.json").read_text())
    for side in ("before", "after"):
        assert set(metrics[f"outcomes_{side}"]["rates"]) == set(OUTCOMES)
        assert {"rate", "wilson95"} <= set(metrics[f"refusal_{side}"]) and "rate" in metrics[f"over_refusal_{side}"]
    assert metrics["per_token_kl"] >= 0 and metrics["kl_divergence"] >= 0 and metrics["judge"] == "markers"
    row = json.loads((evaluate_dir / "completions.jsonl").read_text().splitlines()[0])
    assert {"class_before", "class_after", "reason_before", "reason_after", "refused_after"} <= set(row)
    assert (evaluate_dir / "harmless_completions.jsonl").is_file()
    assert (evaluate_dir / "report.md").read_text().startswith("# Evaluation")
    topk = load_file(Path(summary["stages"]["baseline"]["dir"]) / "harmless_topk.safetensors")
    assert topk["values"].shape[0] == metrics["n_kl_prompts"] and topk["values"].shape[1] <= metrics["kl_tokens"]
