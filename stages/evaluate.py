"""evaluate: refusal rate and refusal score before/after and KL divergence for the selected plan, without a checkpoint.

Applies select's plan to the original model in memory (the process's shared copy,
`pipeline.model_cache`), rounded to the checkpoint's storage dtype exactly as the ablate stage rounds
the files it writes (`pipeline.plan_trial`), scores it, and restores the model: the numbers are those of
the exported model, but a sweep point writes no checkpoint and loads nothing. The original model's
numbers come from `baseline`. Checks that no evaluation prompt was used to find the direction, and
writes `metrics.json` (refusal rate before/after with Wilson intervals, the other classes' rates, over-refusal
on the harmless prompts, the refusal score, first-token and per-token KL, both per harmless category, and `measured`: how each was measured),
`completions.jsonl` and `harmless_completions.jsonl` (prompt, before, after, classes and the judge's reasons) and
`report.md`. With `eval.generate=false` it reports only the forward-only numbers (refusal score, first-token KL),
with the plan applied to each decoder layer as it is read when `eval.streaming` chooses layers
(`pipeline.forward_scores`), and writes no completions.
"""

from __future__ import annotations

import logging

from pipeline import input_digests
from pipeline.artifacts import write_json
from pipeline.collection import collected_prompts
from pipeline.eval_report import write_report
from pipeline.evaluation import per_token_kl
from pipeline.forward_scores import choose_streaming, streamed_scores, validate
from pipeline.judge_models import make_judge
from pipeline.measurement import read_measurements
from pipeline.plan import read_plan
from pipeline.plan_trial import InMemoryModel
from pipeline.prompt_sets import check_disjoint, prompt_categories
from pipeline.scoring import ModelScore, eval_prompts, evaluate_metrics, paired_rows, read_baseline, score, write_jsonl
from pipeline.stage import Stage, StageContext

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> None:
    eval_cfg, model_cfg = ctx.config["eval"], ctx.config["model"]
    harmful, harmless = eval_prompts(ctx.config["prompts"], eval_cfg)
    check_disjoint(collected_prompts(ctx.inputs["collect"]), harmful + harmless, "collect vs evaluate")
    baseline = read_baseline(ctx.inputs["baseline"], len(harmless))
    plan = read_plan(ctx.inputs["select"] / "ablation.yaml")
    measurements = read_measurements(ctx.inputs["measure"] / "measurements.safetensors").tensors
    embed = ctx.config["ablate.embed"]["enabled"] is True
    chosen, why = choose_streaming(eval_cfg, model_cfg, ctx.model_store, ctx.progress)
    log.info("evaluate: streaming=%s (%s)", chosen, why)
    ctx.manifest_extra["streaming"] = {"setting": str(eval_cfg["streaming"]), "chosen": chosen, "why": why}
    token_kl = None
    if chosen == "layers":  # generation is off (forward_scores.validate): one decoder layer in memory at a time
        forward = streamed_scores(model_cfg, ctx.model_store, harmful, harmless, eval_cfg, ctx.progress, plan,
                                  measurements, embed)
        scored = ModelScore(None, None, forward)
    else:
        original = InMemoryModel(model_cfg, ctx.model_store, ctx.progress)
        judge = make_judge(eval_cfg, ctx.model_store) if eval_cfg["generate"] is True else None
        with original.applied(plan, measurements, embed) as model:
            scored = score(model, original.tokenizer, harmful, harmless, eval_cfg, judge, ctx.progress)
            if scored.harmless is not None:
                token_kl = per_token_kl(baseline.topk, model, original.tokenizer, harmless,
                                        int(eval_cfg["batch_size"]), str(eval_cfg["thinking"]), ctx.progress)
    categories = prompt_categories(ctx.config["prompts"]["harmless"])
    metrics = evaluate_metrics(baseline, scored, harmless, token_kl, eval_cfg, categories)
    metrics["layers"] = [int(entry["layer"]) for entry in plan["layers"]]
    write_json(ctx.out_dir / "metrics.json", metrics)
    rows = harmless_rows = []
    if scored.harmful is not None:
        rows = paired_rows(baseline.completions, scored.harmful)
        harmless_rows = paired_rows(baseline.harmless_completions, scored.harmless)
        write_jsonl(ctx.out_dir / "completions.jsonl", rows)
        write_jsonl(ctx.out_dir / "harmless_completions.jsonl", harmless_rows)
    write_report(ctx.out_dir / "report.md", metrics, rows, harmless_rows)


# Version 2: the plan is applied in memory instead of loading ablate's checkpoint (same numbers, to the digit).
# Version 3: outcome classes and judges, over-refusal, per-token KL, report.md.
# Version 4: the refusal score and `measured` in metrics.json; eval.generate=false (forward-only, optionally streamed).
# Version 5: first-token KL and over-refusal per harmless category (`harmless_by_category`).
STAGE = Stage(
    name="evaluate",
    version="5",
    needs=("collect", "baseline", "measure", "select"),
    config_keys=("model", "prompts", "eval", "ablate.embed"),
    run=run,
    validate=validate,
    input_digest=input_digests.judge,
)
