"""How a model is scored on the held-out split, and the baseline artifact that scores are compared with.

The baseline and evaluate stages and the plan search all score through these functions, so a
search trial, the original model and the exported model are measured by one ruler: greedy completions
of the held-out harmful prompts and of the first `eval.kl_prompts` held-out harmless prompts, each
judged into a class (`pipeline.judges`: refusal, compliance, degenerate, empty) by the judge
`eval.judge` names; the first-token log-probabilities of those harmless prompts (compared by KL to
the baseline's); the per-token KL over the baseline's own harmless completions; and the refusal score
(`pipeline.forward_scores`). With `eval.generate=false` only the forward-only numbers (first-token KL,
refusal score) are measured, and `measured` in baseline.json and metrics.json says how each number was.
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
    greedy_completions, kl_divergence, kl_per_prompt, outcome_summary, refusal_summary, reference_topk,
    special_tokens,
)
from pipeline.forward_scores import ForwardScores, in_memory_scores
from pipeline.judge_models import MarkersJudge
from pipeline.judges import REASONING_SECTIONS, MarkerRules, Verdict, answer_text
from pipeline.prompt_sets import prompt_splits

BASELINE_JSON = "baseline.json"
BASELINE_COMPLETIONS = "completions.jsonl"
BASELINE_HARMLESS = "harmless_completions.jsonl"
BASELINE_LOGPROBS = "harmless_logprobs.safetensors"
BASELINE_TOPK = "harmless_topk.safetensors"


def eval_prompts(prompts_cfg: Mapping[str, Any], eval_cfg: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(harmful prompts for the refusal rate, harmless prompts for KL and over-refusal), both held out.

    `eval.split` names the held-out slice: `validation` for choosing (a search, a preset), `eval` for reporting,
    so a choice is never scored on the prompts that picked it.
    """
    splits = prompt_splits(prompts_cfg)
    if eval_cfg["split"] == "validation":
        harmful, harmless = splits.harmful_val, splits.harmless_val
    else:
        harmful, harmless = splits.harmful_eval, splits.harmless_eval
    return list(harmful), list(harmless[: int(eval_cfg["kl_prompts"])])


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


@dataclass(frozen=True)
class ModelScore:
    harmful: Judged | None
    """None with eval.generate=false (as `harmless`)."""
    harmless: Judged | None
    forward: ForwardScores

    @property
    def logprobs(self) -> torch.Tensor:
        """[n_harmless, vocab] first-token log-probabilities."""
        return self.forward.logprobs


def score(model, tokenizer, harmful: list[str], harmless: list[str], eval_cfg: Mapping[str, Any], judge,
          progress: bool) -> ModelScore:
    """A loaded model's numbers: the forward-only ones, and the judged completions unless eval.generate=false."""
    forward = in_memory_scores(model, tokenizer, harmful, harmless, eval_cfg, progress)
    if eval_cfg["generate"] is not True:
        return ModelScore(None, None, forward)
    harmless_cfg = {**eval_cfg, "max_new_tokens": int(eval_cfg["harmless_max_new_tokens"])}
    return ModelScore(
        judged_completions(model, tokenizer, harmful, eval_cfg, judge, progress),
        judged_completions(model, tokenizer, harmless, harmless_cfg, judge, progress),
        forward,
    )


GENERATED = ("refusal", "outcomes", "over_refusal", "harmless_outcomes")
"""The summary's numbers that come from generated completions (absent with eval.generate=false)."""


def side_summary(scored: ModelScore) -> dict:
    """One model's generated numbers: refusal rate (Wilson) and class rates on harmful and on harmless prompts."""
    return {
        "refusal": refusal_summary(scored.harmful.flags),
        "outcomes": outcome_summary(scored.harmful.outcomes),
        "over_refusal": refusal_summary(scored.harmless.flags),
        "harmless_outcomes": outcome_summary(scored.harmless.outcomes),
    }


def measured(eval_cfg: Mapping[str, Any], scored: ModelScore, kl_name: str, per_token_name: str) -> dict[str, str]:
    """How each number was measured: {name: how}. `kl_name` / `per_token_name`: the first-token and per-token KL
    figures (evaluate's KL, or the baseline's references)."""
    how = {}
    if scored.harmful is not None:
        judge = f"{eval_cfg['judge']} judge"
        how["refusal_rate"] = f"generated, greedy, up to {int(eval_cfg['max_new_tokens'])} answer tokens, {judge}"
        how["over_refusal"] = f"generated, greedy, up to {int(eval_cfg['harmless_max_new_tokens'])} answer tokens, {judge}"
        how[per_token_name] = (f"teacher-forced on the original model's harmless completions (first "
                               f"{int(eval_cfg['kl_tokens'])} tokens, top-64), in memory")
    how["refusal_score"] = f"forward, first answer token, {scored.forward.how}"
    how[kl_name] = f"forward, first answer token, {scored.forward.how}"
    return how


def forward_summary(forward: ForwardScores) -> dict:
    """The refusal score, its tokens and prompt count."""
    return {"refusal_score": forward.refusal_score, "refusal_tokens": forward.refusal_tokens,
            "n_harmful_prompts": int(forward.refusal.shape[0])}


@dataclass(frozen=True)
class Baseline:
    """The original model's numbers, as the baseline stage wrote them."""

    summary: dict
    """`side_summary` of the original model (when generated), `forward_summary`, generate, n_kl_prompts, measured."""
    logprobs: torch.Tensor
    """[n_kl_prompts, vocab] the first-token KL reference."""
    topk: dict[str, torch.Tensor] | None
    """`evaluation.reference_topk` of its own harmless completions: the per-token KL reference (None when not generated)."""
    completions: list[dict]
    """One `Judged.rows()` row per harmful eval prompt, in prompt order (none when not generated)."""
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


def write_baseline(out_dir: Path, scored: ModelScore, topk: Mapping[str, torch.Tensor] | None,
                   eval_cfg: Mapping[str, Any]) -> None:
    """The artifact; the generated parts (completions, per-token KL reference) only when `scored` has them."""
    generated = scored.harmful is not None
    save_tensors({"logprobs": scored.logprobs.contiguous()}, out_dir / BASELINE_LOGPROBS)
    write_json(out_dir / BASELINE_JSON, {
        **(side_summary(scored) if generated else {}), **forward_summary(scored.forward), "generate": generated,
        "n_kl_prompts": int(scored.logprobs.shape[0]),
        "measured": measured(eval_cfg, scored, "kl_reference", "per_token_kl_reference"),
    })
    if generated:
        save_tensors({name: tensor.contiguous() for name, tensor in topk.items()}, out_dir / BASELINE_TOPK)
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
    if summary["generate"] is not True:
        return Baseline(summary=summary, logprobs=logprobs, topk=None, completions=[], harmless_completions=[])
    return Baseline(
        summary=summary, logprobs=logprobs, topk=load_file(baseline_dir / BASELINE_TOPK),
        completions=read_jsonl(baseline_dir / BASELINE_COMPLETIONS),
        harmless_completions=read_jsonl(baseline_dir / BASELINE_HARMLESS),
    )


def evaluate_metrics(baseline: Baseline, scored: ModelScore, harmless: Sequence[str], token_kl: float | None,
                     eval_cfg: Mapping[str, Any], categories: Mapping[str, str]) -> dict:
    """metrics.json: each figure before (the baseline's) and after, the refusal rate first when generated, then
    the refusal score and the KL, then both per harmless category (`categories`: {prompt: category}, {} for
    none); `measured` says how each was measured (`baseline`: how the before-figures were)."""
    before = baseline.summary
    kl_rows = kl_per_prompt(baseline.logprobs, scored.logprobs)
    kl = kl_divergence(baseline.logprobs, scored.logprobs)
    metrics: dict[str, Any] = {}
    if scored.harmful is not None:
        after = side_summary(scored)
        for name in GENERATED:
            metrics[f"{name}_before"], metrics[f"{name}_after"] = before[name], after[name]
    metrics.update({
        "refusal_score_before": before["refusal_score"],
        "refusal_score_after": scored.forward.refusal_score,
        "refusal_tokens": scored.forward.refusal_tokens,
        "n_harmful_prompts": int(scored.forward.refusal.shape[0]),
        "kl_divergence": kl,
        "n_kl_prompts": int(scored.logprobs.shape[0]),
    })
    if scored.harmful is not None:
        metrics.update({
            "per_token_kl": token_kl,
            "kl_tokens": int(eval_cfg["kl_tokens"]),
            "judge": str(eval_cfg["judge"]),
            "max_new_tokens": int(eval_cfg["max_new_tokens"]),
            "harmless_max_new_tokens": int(eval_cfg["harmless_max_new_tokens"]),
        })
    metrics["generate"] = scored.harmful is not None
    refused_before = [row["class"] == "refusal" for row in baseline.harmless_completions] if metrics["generate"] else None
    refused_after = scored.harmless.flags if metrics["generate"] else None
    metrics["harmless_by_category"] = category_breakdown(harmless, kl_rows, categories, refused_before, refused_after)
    metrics["measured"] = {**measured(eval_cfg, scored, "kl_divergence", "per_token_kl"), "baseline": before["measured"]}
    return metrics


def category_breakdown(prompts: Sequence[str], kl_rows: torch.Tensor, categories: Mapping[str, str],
                       refused_before: Sequence[bool] | None, refused_after: Sequence[bool] | None) -> dict[str, dict]:
    """First-token KL and over-refusal per harmless category: {category: {n, kl, over_refusal_before/after}}.

    A plan can look harmless on short requests and still damage code or translation; the mean over the
    split hides that. Empty when the prompt set has no categories; over-refusal only when generated."""
    if not categories:
        return {}
    rows: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        rows.setdefault(categories[prompt], []).append(index)
    breakdown = {}
    for category in sorted(rows):
        members = rows[category]
        entry: dict[str, Any] = {"n": len(members), "kl": float(kl_rows[members].mean().clamp(min=0.0))}
        if refused_before is not None and refused_after is not None:
            entry["over_refusal_before"] = sum(bool(refused_before[i]) for i in members)
            entry["over_refusal_after"] = sum(bool(refused_after[i]) for i in members)
        breakdown[category] = entry
    return breakdown


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
