"""evaluate: refusal rate before/after and KL divergence for the ablated model.

Reads the ablated checkpoint written by `ablate` and the original model's numbers from
`baseline`, checks that no evaluation prompt was used to find the direction, and writes
`metrics.json` and `completions.jsonl` (prompt, before, after, refused flags).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from safetensors.torch import load_file

from pipeline.artifacts import write_json
from pipeline.evaluation import kl_divergence, refusal_summary
from pipeline.models import load_model
from pipeline.prompt_sets import check_disjoint
from pipeline.stage import Stage, StageContext
from pipeline.stages.baseline import eval_prompts, score_model


def collected_prompts(collect_dir: Path) -> list[str]:
    with open(collect_dir / "prompts.jsonl", encoding="utf-8") as handle:
        return [json.loads(line)["prompt"] for line in handle if line.strip()]


def ablated_model_config(model_cfg: Mapping[str, Any], model_dir: Path) -> dict[str, Any]:
    """The source model's settings (dtype, placement) pointed at the ablated directory."""
    return {**model_cfg, "source": "local", "id": str(model_dir)}


def run(ctx: StageContext) -> None:
    eval_cfg = ctx.config["eval"]
    harmful, harmless = eval_prompts(ctx.config["prompts"], eval_cfg)
    check_disjoint(collected_prompts(ctx.inputs["collect"]), harmful + harmless, "collect vs evaluate")
    baseline = json.loads((ctx.inputs["baseline"] / "baseline.json").read_text(encoding="utf-8"))
    reference = load_file(ctx.inputs["baseline"] / "harmless_logprobs.safetensors")["logprobs"]
    with open(ctx.inputs["baseline"] / "completions.jsonl", encoding="utf-8") as handle:
        before = [json.loads(line) for line in handle]

    model_cfg = ablated_model_config(ctx.config["model"], ctx.inputs["ablate"] / "model")
    model, tokenizer, _ = load_model(model_cfg, ctx.model_store, progress=ctx.progress)
    completions, flags, logprobs = score_model(model, tokenizer, harmful, harmless, eval_cfg, ctx.progress)
    plan_layers = _plan_layers(ctx.inputs["select"])
    metrics = {
        "refusal_before": baseline["refusal"],
        "refusal_after": refusal_summary(flags),
        "kl_divergence": kl_divergence(reference, logprobs),
        "n_kl_prompts": len(harmless),
        "layers": plan_layers,
    }
    write_json(ctx.out_dir / "metrics.json", metrics)
    with open(ctx.out_dir / "completions.jsonl", "w", encoding="utf-8") as handle:
        for old, completion, refused in zip(before, completions, flags):
            row = {"prompt": old["prompt"], "before": old["completion"], "after": completion,
                   "refused_before": old["refused"], "refused_after": refused}
            handle.write(json.dumps(row) + "\n")


def _plan_layers(select_dir: Path) -> list[int]:
    from pipeline.plan import read_plan

    return [int(entry["layer"]) for entry in read_plan(select_dir / "ablation.yaml")["layers"]]


STAGE = Stage(
    name="evaluate",
    version="1",
    needs=("collect", "baseline", "select", "ablate"),
    config_keys=("model", "prompts", "eval"),
    run=run,
)
