"""baseline: the original model's numbers on the held-out split, computed once per model and prompt set.

Every sweep point and every optimize trial compares against these, so they are a stage of their
own whose key does not depend on the plan. Artifacts: `baseline.json` (refusal rate with its
Wilson interval), `completions.jsonl` (prompt, completion, refused) and
`harmless_logprobs.safetensors` (first-position log-probabilities, the KL reference).
"""

from __future__ import annotations

import json
from typing import Any, Mapping


from pipeline.artifacts import save_tensors, write_json
from pipeline.evaluation import first_token_logprobs, greedy_completions, is_refusal, refusal_summary
from pipeline.models import load_model
from pipeline.prompt_sets import prompt_splits
from pipeline.stage import Stage, StageContext
from pipeline.stages.collect import input_digest  # the same inputs: prompt files and the checkpoint


def eval_prompts(prompts_cfg: Mapping[str, Any], eval_cfg: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(harmful prompts for the refusal rate, harmless prompts for KL), both from the held-out split."""
    splits = prompt_splits(prompts_cfg)
    return list(splits.harmful_eval), list(splits.harmless_eval[: int(eval_cfg["kl_prompts"])])


def score_model(model, tokenizer, harmful: list[str], harmless: list[str], eval_cfg: Mapping[str, Any], progress: bool):
    """(completions, refusal flags, harmless first-token logprobs) for one model."""
    completions = greedy_completions(
        model, tokenizer, harmful, int(eval_cfg["max_new_tokens"]), int(eval_cfg["batch_size"]), progress
    )
    flags = [is_refusal(text, eval_cfg["refusal_markers"]) for text in completions]
    logprobs = first_token_logprobs(model, tokenizer, harmless, int(eval_cfg["batch_size"]), progress)
    return completions, flags, logprobs


def run(ctx: StageContext) -> None:
    eval_cfg = ctx.config["eval"]
    harmful, harmless = eval_prompts(ctx.config["prompts"], eval_cfg)
    model, tokenizer, _ = load_model(ctx.config["model"], ctx.model_store, progress=ctx.progress)
    completions, flags, logprobs = score_model(model, tokenizer, harmful, harmless, eval_cfg, ctx.progress)
    save_tensors({"logprobs": logprobs.contiguous()}, ctx.out_dir / "harmless_logprobs.safetensors")
    write_json(ctx.out_dir / "baseline.json", {"refusal": refusal_summary(flags), "n_kl_prompts": len(harmless)})
    with open(ctx.out_dir / "completions.jsonl", "w", encoding="utf-8") as handle:
        for prompt, completion, refused in zip(harmful, completions, flags):
            handle.write(json.dumps({"prompt": prompt, "completion": completion, "refused": refused}) + "\n")


STAGE = Stage(
    name="baseline",
    version="1",
    needs=(),
    config_keys=("model", "prompts", "eval"),
    run=run,
    input_digest=input_digest,
)
