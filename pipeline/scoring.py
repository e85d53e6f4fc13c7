"""How a model is scored on the held-out split, and the baseline artifact that scores are compared with.

The baseline and evaluate stages and the plan search all score through these functions, so a
search trial, the original model and the exported model are measured by one ruler: greedy completions
of the held-out harmful prompts and of the first `eval.kl_prompts` held-out harmless prompts, each
judged into a class (`pipeline.judges`: refusal, compliance, degenerate, empty) by the judge
`eval.judge` names; the first-token log-probabilities of those harmless prompts (compared by KL to
the baseline's); and the per-token KL over the baseline's own harmless completions.
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
from pipeline.evaluation import (
    first_token_logprobs, greedy_completions, outcome_summary, refusal_summary, reference_topk, special_tokens,
)
from pipeline.judge_models import MarkersJudge, make_judge
from pipeline.judges import REASONING_SECTIONS, MarkerRules, Verdict, answer_text
from pipeline.prompt_sets import prompt_splits

BASELINE_JSON = "baseline.json"
BASELINE_COMPLETIONS = "completions.jsonl"
BASELINE_HARMLESS = "harmless_completions.jsonl"
BASELINE_LOGPROBS = "harmless_logprobs.safetensors"
BASELINE_TOPK = "harmless_topk.safetensors"


def eval_prompts(prompts_cfg: Mapping[str, Any], eval_cfg: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(harmful prompts for the refusal rate, harmless prompts for KL and over-refusal), both held out."""
    splits = prompt_splits(prompts_cfg)
    return list(splits.harmful_eval), list(splits.harmless_eval[: int(eval_cfg["kl_prompts"])])


@dataclass(frozen=True)
class Judged:
    """Greedy completions of one prompt set and their verdicts, in prompt order."""

    prompts: list[str]
    completions: list[str]
    """Raw: reasoning and special tokens included (`evaluation.Generation.texts`)."""
    answers: list[str]
    """What was judged: reasoning cut out, special tokens removed."""
    verdicts: list[Verdict]
    ids: list[list[int]]

    @property
    def outcomes(self) -> list[str]:
        return [verdict.outcome for verdict in self.verdicts]

    @property
    def flags(self) -> list[bool]:
        return [verdict.outcome == "refusal" for verdict in self.verdicts]

    def rows(self) -> list[dict]:
        rows = []
        for prompt, raw, answer, verdict in zip(self.prompts, self.completions, self.answers, self.verdicts):
            row = {"prompt": prompt, "completion": answer, "class": verdict.outcome, "reason": verdict.reason}
            if any(opener in raw for opener, _ in REASONING_SECTIONS):
                row["raw"] = raw  # the reasoning the judge did not see
            rows.append(row)
        return rows


def judged_completions(model, tokenizer, prompts: Sequence[str], eval_cfg: Mapping[str, Any], judge, progress: bool) -> Judged:
    """Generate (stopping rows early where the markers judge allows it) and judge."""
    early = eval_cfg["early_stop"] is True and isinstance(judge, MarkersJudge)
    generated = greedy_completions(
        model, tokenizer, prompts, int(eval_cfg["max_new_tokens"]), int(eval_cfg["batch_size"]), progress,
        str(eval_cfg["thinking"]), int(eval_cfg["reasoning_tokens"]),
        MarkerRules.from_config(eval_cfg) if early else None,
    )
    specials = special_tokens(tokenizer)
    answers = [answer_text(text, specials) for text in generated.texts]
    verdicts = judge.verdicts(list(prompts), answers)
    return Judged(list(prompts), generated.texts, [a.text for a in answers], verdicts, generated.ids)


def refusals(model, tokenizer, harmful: Sequence[str], eval_cfg: Mapping[str, Any], progress: bool,
             judge=None) -> tuple[list[str], list[bool]]:
    """(judged answers, refusal flags) of the harmful prompts: the plan search's objective."""
    judged = judged_completions(model, tokenizer, harmful, eval_cfg, judge or make_judge(eval_cfg), progress)
    return judged.answers, judged.flags


def harmless_logprobs(model, tokenizer, harmless: Sequence[str], eval_cfg: Mapping[str, Any], progress: bool) -> torch.Tensor:
    """[n, vocab] first-token log-probabilities of the harmless prompts: the KL reference or its comparison."""
    return first_token_logprobs(model, tokenizer, harmless, int(eval_cfg["batch_size"]), progress,
                                str(eval_cfg["thinking"]))


@dataclass(frozen=True)
class ModelScore:
    harmful: Judged
    harmless: Judged
    logprobs: torch.Tensor
    """[n_harmless, vocab] first-token log-probabilities."""


def score(model, tokenizer, harmful: list[str], harmless: list[str], eval_cfg: Mapping[str, Any], judge,
          progress: bool) -> ModelScore:
    harmless_cfg = {**eval_cfg, "max_new_tokens": int(eval_cfg["harmless_max_new_tokens"])}
    return ModelScore(
        judged_completions(model, tokenizer, harmful, eval_cfg, judge, progress),
        judged_completions(model, tokenizer, harmless, harmless_cfg, judge, progress),
        harmless_logprobs(model, tokenizer, harmless, eval_cfg, progress),
    )


def score_model(model, tokenizer, harmful: list[str], harmless: list[str], eval_cfg: Mapping[str, Any], progress: bool):
    """(judged answers, refusal flags, harmless first-token logprobs) for one model (harmful prompts only)."""
    answers, flags = refusals(model, tokenizer, harmful, eval_cfg, progress)
    return answers, flags, harmless_logprobs(model, tokenizer, harmless, eval_cfg, progress)


def side_summary(scored: ModelScore) -> dict:
    """One model's numbers: refusal rate (Wilson) and class rates on harmful and on harmless prompts."""
    return {
        "refusal": refusal_summary(scored.harmful.flags),
        "outcomes": outcome_summary(scored.harmful.outcomes),
        "over_refusal": refusal_summary(scored.harmless.flags),
        "harmless_outcomes": outcome_summary(scored.harmless.outcomes),
    }


@dataclass(frozen=True)
class Baseline:
    """The original model's numbers, as the baseline stage wrote them."""

    summary: dict
    """`side_summary` of the original model, plus n_kl_prompts."""
    logprobs: torch.Tensor
    """[n_kl_prompts, vocab] the first-token KL reference."""
    topk: dict[str, torch.Tensor]
    """`evaluation.reference_topk` of its own harmless completions: the per-token KL reference."""
    completions: list[dict]
    """One `Judged.rows()` row per harmful eval prompt, in prompt order."""
    harmless_completions: list[dict]

    @property
    def refusal(self) -> dict:
        return self.summary["refusal"]


def baseline_topk(model, tokenizer, scored: ModelScore, eval_cfg: Mapping[str, Any], progress: bool) -> dict[str, torch.Tensor]:
    """The per-token KL reference: the first `eval.kl_tokens` tokens of the harmless completions."""
    completions = [ids[: int(eval_cfg["kl_tokens"])] for ids in scored.harmless.ids]
    return reference_topk(model, tokenizer, scored.harmless.prompts, completions, int(eval_cfg["batch_size"]),
                          str(eval_cfg["thinking"]), progress)


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_baseline(out_dir: Path, scored: ModelScore, topk: Mapping[str, torch.Tensor]) -> None:
    save_tensors({"logprobs": scored.logprobs.contiguous()}, out_dir / BASELINE_LOGPROBS)
    save_tensors({name: tensor.contiguous() for name, tensor in topk.items()}, out_dir / BASELINE_TOPK)
    write_json(out_dir / BASELINE_JSON, {**side_summary(scored), "n_kl_prompts": int(scored.logprobs.shape[0])})
    write_jsonl(out_dir / BASELINE_COMPLETIONS, scored.harmful.rows())
    write_jsonl(out_dir / BASELINE_HARMLESS, scored.harmless.rows())


def read_baseline(baseline_dir: Path, n_kl_prompts: int) -> Baseline:
    """The baseline artifact, refused when it holds another number of KL prompts than the eval split has."""
    logprobs = load_file(baseline_dir / BASELINE_LOGPROBS)["logprobs"]
    if logprobs.shape[0] != n_kl_prompts:
        raise PipelineError(
            f"baseline {baseline_dir} holds {logprobs.shape[0]} KL prompts, the eval split has "
            f"{n_kl_prompts}; re-run the baseline stage"
        )
    summary = json.loads((baseline_dir / BASELINE_JSON).read_text(encoding="utf-8"))
    return Baseline(
        summary=summary, logprobs=logprobs, topk=load_file(baseline_dir / BASELINE_TOPK),
        completions=read_jsonl(baseline_dir / BASELINE_COMPLETIONS),
        harmless_completions=read_jsonl(baseline_dir / BASELINE_HARMLESS),
    )


def evaluate_metrics(baseline: Baseline, scored: ModelScore, kl: float, token_kl: float, eval_cfg: Mapping[str, Any]) -> dict:
    """metrics.json: each figure before (the baseline's) and after, the refusal rate first."""
    after = side_summary(scored)
    before = baseline.summary
    metrics: dict[str, Any] = {}
    for name in ("refusal", "outcomes", "over_refusal", "harmless_outcomes"):
        metrics[f"{name}_before"], metrics[f"{name}_after"] = before[name], after[name]
    metrics.update({
        "kl_divergence": kl,
        "per_token_kl": token_kl,
        "kl_tokens": int(eval_cfg["kl_tokens"]),
        "n_kl_prompts": len(scored.harmless.prompts),
        "judge": str(eval_cfg["judge"]),
        "max_new_tokens": int(eval_cfg["max_new_tokens"]),
        "harmless_max_new_tokens": int(eval_cfg["harmless_max_new_tokens"]),
    })
    return metrics


def paired_rows(before: Sequence[Mapping[str, Any]], after: Judged) -> list[dict]:
    """completions.jsonl rows: the prompt, both answers, their classes and the judge's reasons."""
    rows = []
    for old, new in zip(before, after.rows()):
        row = {"prompt": new["prompt"], "before": old["completion"], "after": new["completion"],
               "class_before": old["class"], "class_after": new["class"],
               "reason_before": old["reason"], "reason_after": new["reason"],
               "refused_before": old["class"] == "refusal", "refused_after": new["class"] == "refusal"}
        if "raw" in new:
            row["raw_after"] = new["raw"]
        rows.append(row)
    return rows
