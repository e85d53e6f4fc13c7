"""baseline: the original model's numbers on the held-out split, computed once per model, prompt set and ruler.

Every sweep point and every optimize trial compares against these, so they are a stage of their
own whose key does not depend on the plan. Artifacts: `baseline.json` (refusal rate with its
Wilson interval, class rates, over-refusal on the harmless prompts), `completions.jsonl` and
`harmless_completions.jsonl` (prompt, answer, class, reason), `harmless_logprobs.safetensors`
(first-position log-probabilities, the first-token KL reference) and `harmless_topk.safetensors`
(its own harmless completions' first `eval.kl_tokens` token ids and top-64 log-probabilities per
position, the per-token KL reference).
"""

from __future__ import annotations

from pipeline import input_digests
from pipeline.judge_models import make_judge, validate
from pipeline.model_cache import shared_model
from pipeline.scoring import baseline_topk, eval_prompts, score, write_baseline
from pipeline.stage import Stage, StageContext


def run(ctx: StageContext) -> None:
    eval_cfg = ctx.config["eval"]
    harmful, harmless = eval_prompts(ctx.config["prompts"], eval_cfg)
    original = shared_model(ctx.config["model"], ctx.model_store, progress=ctx.progress)  # kept for evaluate
    judge = make_judge(eval_cfg, ctx.model_store)
    scored = score(original.model, original.tokenizer, harmful, harmless, eval_cfg, judge, ctx.progress)
    topk = baseline_topk(original.model, original.tokenizer, scored, eval_cfg, ctx.progress)
    write_baseline(ctx.out_dir, scored, topk)


# Version 2: outcome classes and judges, answers of max_new_tokens (+ reasoning), harmless completions
# (over-refusal) and the per-token KL reference.
STAGE = Stage(
    name="baseline",
    version="2",
    needs=(),
    config_keys=("model", "prompts", "eval"),
    run=run,
    validate=validate,
    input_digest=input_digests.prompts_model_and_judge,
)
