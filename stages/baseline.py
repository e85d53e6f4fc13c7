"""baseline: the original model's numbers on the held-out split, computed once per model, prompt set and ruler.

Every sweep point and every search trial compares against these, so they are a stage of their
own whose key does not depend on the plan. Artifacts: `baseline.json` (refusal rate with its
Wilson interval, class rates, over-refusal on the harmless prompts, the refusal score and its tokens,
and `measured`: how each number was measured), `completions.jsonl` and `harmless_completions.jsonl`
(prompt, answer, class, reason), `harmless_logprobs.safetensors` (first-position log-probabilities, the
first-token KL reference) and `harmless_topk.safetensors` (its own harmless completions' first
`eval.kl_tokens` token ids and top-64 log-probabilities per position, the per-token KL reference).
With `eval.generate=false` only the forward-only numbers are measured (baseline.json's refusal score and
the first-token KL reference), layer-streamed when `eval.streaming` chooses it (`pipeline.forward_scores`).
"""

from __future__ import annotations

import logging

from pipeline import input_digests
from pipeline.forward_scores import choose_streaming, streamed_scores, validate
from pipeline.judge_models import make_judge
from pipeline.model_cache import shared_model
from pipeline.scoring import ModelScore, baseline_topk, eval_prompts, score, write_baseline
from pipeline.stage import Stage, StageContext

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> None:
    eval_cfg, model_cfg = ctx.config["eval"], ctx.config["model"]
    harmful, harmless = eval_prompts(ctx.config["prompts"], eval_cfg)
    chosen, why = choose_streaming(eval_cfg, model_cfg, ctx.model_store, ctx.progress)
    log.info("baseline: streaming=%s (%s)", chosen, why)
    ctx.manifest_extra["streaming"] = {"setting": str(eval_cfg["streaming"]), "chosen": chosen, "why": why}
    if chosen == "layers":  # generation is off (forward_scores.validate): one decoder layer in memory at a time
        forward = streamed_scores(model_cfg, ctx.model_store, harmful, harmless, eval_cfg, ctx.progress)
        write_baseline(ctx.out_dir, ModelScore(None, None, forward), None, eval_cfg)
        return
    original = shared_model(model_cfg, ctx.model_store, progress=ctx.progress)  # kept for evaluate
    judge = make_judge(eval_cfg, ctx.model_store) if eval_cfg["generate"] is True else None
    scored = score(original.model, original.tokenizer, harmful, harmless, eval_cfg, judge, ctx.progress)
    topk = None
    if scored.harmless is not None:  # the per-token KL reference: teacher-forced on its own generated completions
        topk = baseline_topk(original.model, original.tokenizer, scored, eval_cfg, ctx.progress)
    write_baseline(ctx.out_dir, scored, topk, eval_cfg)


# Version 2: outcome classes and judges, answers of max_new_tokens (+ reasoning), harmless completions
# (over-refusal) and the per-token KL reference.
# Version 3: the refusal score and `measured` in baseline.json; eval.generate=false (forward-only, optionally streamed).
STAGE = Stage(
    name="baseline",
    version="3",
    needs=(),
    config_keys=("model", "prompts", "eval"),
    run=run,
    validate=validate,
    input_digest=input_digests.prompts_model_and_judge,
    unkeyed=("prompts.harmful.train_categories", "prompts.harmless.train_categories"),
)
