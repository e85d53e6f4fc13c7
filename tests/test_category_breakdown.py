"""Per-category harmless numbers: the means and counts evaluate reports beside the split's overall KL."""

from __future__ import annotations

import pytest
import torch

from tiny_pipeline import compose_config
from pipeline.evaluation import kl_divergence, kl_per_prompt
from pipeline.prompt_sets import prompt_categories
from pipeline.scoring import category_breakdown, eval_prompts
from tiny_pipeline import compose_config


def test_breakdown_means_and_counts() -> None:
    torch.manual_seed(0)
    reference = torch.log_softmax(torch.randn(6, 11), dim=-1)
    edited = torch.log_softmax(torch.randn(6, 11), dim=-1)
    prompts = [f"p{i}" for i in range(6)]
    categories = {"p0": "code", "p1": "maths", "p2": "code", "p3": "code", "p4": "maths", "p5": "advice"}
    rows = kl_per_prompt(reference, edited)
    breakdown = category_breakdown(prompts, rows, categories, [True, False, False, True, False, False],
                                   [False, False, True, False, True, False])
    assert list(breakdown) == ["advice", "code", "maths"]
    assert breakdown["code"]["n"] == 3
    assert breakdown["code"]["kl"] == pytest.approx(float(rows[[0, 2, 3]].mean()), abs=1e-12)
    assert (breakdown["code"]["over_refusal_before"], breakdown["code"]["over_refusal_after"]) == (2, 1)
    assert (breakdown["maths"]["over_refusal_before"], breakdown["maths"]["over_refusal_after"]) == (0, 1)
    weighted = sum(entry["n"] * entry["kl"] for entry in breakdown.values()) / 6
    assert weighted == pytest.approx(kl_divergence(reference, edited), abs=1e-12)


def test_breakdown_without_categories_or_generation() -> None:
    rows = torch.tensor([0.5, 0.25], dtype=torch.float64)
    assert category_breakdown(["a", "b"], rows, {}, None, None) == {}
    assert category_breakdown(["a", "b"], rows, {"a": "x", "b": "x"}, None, None) == {"x": {"n": 2, "kl": 0.375}}


@pytest.mark.parametrize("split", ["eval", "validation"])
def test_shipped_held_out_prompts_all_have_a_category(split: str) -> None:
    config = compose_config([f"eval.split={split}"])
    _, harmless = eval_prompts(config["prompts"], config["eval"])
    categories = prompt_categories(config["prompts"]["harmless"])
    assert all(prompt in categories for prompt in harmless)
    assert len({categories[prompt] for prompt in harmless}) == 8
