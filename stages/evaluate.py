"""evaluate: refusal rate before/after and KL divergence for the ablated model.

Reads the ablated checkpoint written by `ablate` and the original model's numbers from
`baseline`, checks that no evaluation prompt was used to find the direction, and writes
`metrics.json` and `completions.jsonl` (prompt, before, after, refused flags).
"""

from __future__ import annotations

import json

from pipeline.artifacts import write_json
from pipeline.collection import collected_prompts
from pipeline.evaluation import kl_divergence, refusal_summary
from pipeline.models import load_model
from pipeline.plan import read_plan
from pipeline.prompt_sets import check_disjoint
from pipeline.scoring import eval_prompts, read_baseline, score_model
from pipeline.stage import Stage, StageContext


def run(ctx: StageContext) -> None:
    eval_cfg = ctx.config["eval"]
    harmful, harmless = eval_prompts(ctx.config["prompts"], eval_cfg)
    check_disjoint(collected_prompts(ctx.inputs["collect"]), harmful + harmless, "collect vs evaluate")
    baseline = read_baseline(ctx.inputs["baseline"], len(harmless))
    ablated = {**ctx.config["model"], "source": "local", "id": str(ctx.inputs["ablate"] / "model")}
    model, tokenizer, _ = load_model(ablated, ctx.model_store, progress=ctx.progress)
    completions, flags, logprobs = score_model(model, tokenizer, harmful, harmless, eval_cfg, ctx.progress)
    plan = read_plan(ctx.inputs["select"] / "ablation.yaml")
    metrics = {
        "refusal_before": baseline.refusal,
        "refusal_after": refusal_summary(flags),
        "kl_divergence": kl_divergence(baseline.logprobs, logprobs),
        "n_kl_prompts": len(harmless),
        "layers": [int(entry["layer"]) for entry in plan["layers"]],
    }
    write_json(ctx.out_dir / "metrics.json", metrics)
    with open(ctx.out_dir / "completions.jsonl", "w", encoding="utf-8") as handle:
        for old, completion, refused in zip(baseline.completions, completions, flags):
            row = {"prompt": old["prompt"], "before": old["completion"], "after": completion,
                   "refused_before": old["refused"], "refused_after": refused}
            handle.write(json.dumps(row) + "\n")


STAGE = Stage(
    name="evaluate",
    version="1",
    needs=("collect", "baseline", "select", "ablate"),
    config_keys=("model", "prompts", "eval"),
    run=run,
)
