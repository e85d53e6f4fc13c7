"""evaluate: refusal rate before/after and KL divergence for the selected plan, without a checkpoint.

Applies select's plan to the original model in memory (the process's shared copy,
`pipeline.model_cache`), rounded to the checkpoint's storage dtype exactly as the ablate stage rounds
the files it writes (`pipeline.plan_trial`), scores it, and restores the model: the numbers are those of
the exported model, but a sweep point writes no checkpoint and loads nothing. The original model's
numbers come from `baseline`. Checks that no evaluation prompt was used to find the direction, and
writes `metrics.json` (refusal rate before/after with Wilson intervals, the other classes' rates, over-refusal
on the harmless prompts, first-token and per-token KL), `completions.jsonl` and `harmless_completions.jsonl`
(prompt, before, after, classes and the judge's reasons) and `report.md`.
"""

from __future__ import annotations

import json

from pipeline import input_digests
from pipeline.artifacts import write_json
from pipeline.collection import collected_prompts
from pipeline.eval_report import write_report
from pipeline.evaluation import kl_divergence, per_token_kl
from pipeline.judge_models import make_judge, validate
from pipeline.measurement import read_measurements
from pipeline.plan import read_plan
from pipeline.plan_trial import InMemoryModel
from pipeline.prompt_sets import check_disjoint
from pipeline.scoring import eval_prompts, evaluate_metrics, paired_rows, read_baseline, score, write_jsonl
from pipeline.stage import Stage, StageContext


def run(ctx: StageContext) -> None:
    eval_cfg = ctx.config["eval"]
    harmful, harmless = eval_prompts(ctx.config["prompts"], eval_cfg)
    check_disjoint(collected_prompts(ctx.inputs["collect"]), harmful + harmless, "collect vs evaluate")
    baseline = read_baseline(ctx.inputs["baseline"], len(harmless))
    plan = read_plan(ctx.inputs["select"] / "ablation.yaml")
    measurements = read_measurements(ctx.inputs["measure"] / "measurements.safetensors")
    original = InMemoryModel(ctx.config["model"], ctx.model_store, ctx.progress)
    judge = make_judge(eval_cfg, ctx.model_store)
    with original.applied(plan, measurements.tensors, ctx.config["ablate.embed"]["enabled"] is True) as model:
        scored = score(model, original.tokenizer, harmful, harmless, eval_cfg, judge, ctx.progress)
        token_kl = per_token_kl(baseline.topk, model, original.tokenizer, harmless, int(eval_cfg["batch_size"]),
                                str(eval_cfg["thinking"]), ctx.progress)
    metrics = evaluate_metrics(baseline, scored, kl_divergence(baseline.logprobs, scored.logprobs), token_kl, eval_cfg)
    metrics["layers"] = [int(entry["layer"]) for entry in plan["layers"]]
    write_json(ctx.out_dir / "metrics.json", metrics)
    rows = paired_rows(baseline.completions, scored.harmful)
    harmless_rows = paired_rows(baseline.harmless_completions, scored.harmless)
    write_jsonl(ctx.out_dir / "completions.jsonl", rows)
    write_jsonl(ctx.out_dir / "harmless_completions.jsonl", harmless_rows)
    write_report(ctx.out_dir / "report.md", metrics, rows, harmless_rows)


# Version 2: the plan is applied in memory instead of loading ablate's checkpoint (same numbers, to the digit).
# Version 3: outcome classes and judges, over-refusal, per-token KL, report.md.
STAGE = Stage(
    name="evaluate",
    version="3",
    needs=("collect", "baseline", "measure", "select"),
    config_keys=("model", "prompts", "eval", "ablate.embed"),
    run=run,
    validate=validate,
    input_digest=input_digests.judge,
)
