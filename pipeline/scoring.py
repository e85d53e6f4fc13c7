"""How a model is scored on the held-out split, and the baseline artifact that scores are compared with.

The baseline and evaluate stages and the plan search all score through these functions, so a
search trial, the original model and the exported model are measured by one ruler: refusal flags of
greedy completions of the held-out harmful prompts, and first-token log-probabilities of the first
`eval.kl_prompts` held-out harmless prompts (compared by KL to the baseline's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load_file

from pipeline.artifacts import save_tensors, write_json
from pipeline.errors import PipelineError
from pipeline.evaluation import first_token_logprobs, greedy_completions, is_refusal, refusal_summary
from pipeline.prompt_sets import prompt_splits

BASELINE_JSON = "baseline.json"
BASELINE_COMPLETIONS = "completions.jsonl"
BASELINE_LOGPROBS = "harmless_logprobs.safetensors"


def eval_prompts(prompts_cfg: Mapping[str, Any], eval_cfg: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(harmful prompts for the refusal rate, harmless prompts for KL), both from the held-out split."""
    splits = prompt_splits(prompts_cfg)
    return list(splits.harmful_eval), list(splits.harmless_eval[: int(eval_cfg["kl_prompts"])])


def refusals(model, tokenizer, harmful: Sequence[str], eval_cfg: Mapping[str, Any], progress: bool) -> tuple[list[str], list[bool]]:
    """(greedy completions, refusal flags) of the harmful prompts."""
    completions = greedy_completions(
        model, tokenizer, harmful, int(eval_cfg["max_new_tokens"]), int(eval_cfg["batch_size"]), progress
    )
    return completions, [is_refusal(text, eval_cfg["refusal_markers"]) for text in completions]


def harmless_logprobs(model, tokenizer, harmless: Sequence[str], eval_cfg: Mapping[str, Any], progress: bool) -> torch.Tensor:
    """[n, vocab] first-token log-probabilities of the harmless prompts: the KL reference or its comparison."""
    return first_token_logprobs(model, tokenizer, harmless, int(eval_cfg["batch_size"]), progress)


def score_model(model, tokenizer, harmful: list[str], harmless: list[str], eval_cfg: Mapping[str, Any], progress: bool):
    """(completions, refusal flags, harmless first-token logprobs) for one model."""
    completions, flags = refusals(model, tokenizer, harmful, eval_cfg, progress)
    return completions, flags, harmless_logprobs(model, tokenizer, harmless, eval_cfg, progress)


@dataclass(frozen=True)
class Baseline:
    """The original model's numbers, as the baseline stage wrote them."""

    refusal: dict
    """`refusal_summary` of the original model's completions."""
    logprobs: torch.Tensor
    """[n_kl_prompts, vocab] the KL reference."""
    completions: list[dict]
    """One {prompt, completion, refused} per harmful eval prompt, in prompt order."""


def write_baseline(
    out_dir: Path, harmful: Sequence[str], completions: Sequence[str], flags: Sequence[bool], logprobs: torch.Tensor
) -> None:
    save_tensors({"logprobs": logprobs.contiguous()}, out_dir / BASELINE_LOGPROBS)
    write_json(out_dir / BASELINE_JSON, {"refusal": refusal_summary(flags), "n_kl_prompts": int(logprobs.shape[0])})
    with open(out_dir / BASELINE_COMPLETIONS, "w", encoding="utf-8") as handle:
        for prompt, completion, refused in zip(harmful, completions, flags):
            handle.write(json.dumps({"prompt": prompt, "completion": completion, "refused": refused}) + "\n")


def read_baseline(baseline_dir: Path, n_kl_prompts: int) -> Baseline:
    """The baseline artifact, refused when it holds another number of KL prompts than the eval split has."""
    logprobs = load_file(baseline_dir / BASELINE_LOGPROBS)["logprobs"]
    if logprobs.shape[0] != n_kl_prompts:
        raise PipelineError(
            f"baseline {baseline_dir} holds {logprobs.shape[0]} KL prompts, the eval split has "
            f"{n_kl_prompts}; re-run the baseline stage"
        )
    summary = json.loads((baseline_dir / BASELINE_JSON).read_text(encoding="utf-8"))
    with open(baseline_dir / BASELINE_COMPLETIONS, encoding="utf-8") as handle:
        completions = [json.loads(line) for line in handle if line.strip()]
    return Baseline(refusal=summary["refusal"], logprobs=logprobs, completions=completions)
