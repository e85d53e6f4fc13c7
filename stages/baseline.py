"""baseline: the original model's numbers on the held-out split, computed once per model and prompt set.

Every sweep point and every optimize trial compares against these, so they are a stage of their
own whose key does not depend on the plan. Artifacts: `baseline.json` (refusal rate with its
Wilson interval), `completions.jsonl` (prompt, completion, refused) and
`harmless_logprobs.safetensors` (first-position log-probabilities, the KL reference).
"""

from __future__ import annotations

from pipeline import input_digests
from pipeline.models import load_model
from pipeline.scoring import eval_prompts, score_model, write_baseline
from pipeline.stage import Stage, StageContext


def run(ctx: StageContext) -> None:
    eval_cfg = ctx.config["eval"]
    harmful, harmless = eval_prompts(ctx.config["prompts"], eval_cfg)
    model, tokenizer, _ = load_model(ctx.config["model"], ctx.model_store, progress=ctx.progress)
    completions, flags, logprobs = score_model(model, tokenizer, harmful, harmless, eval_cfg, ctx.progress)
    write_baseline(ctx.out_dir, harmful, completions, flags, logprobs)


STAGE = Stage(
    name="baseline",
    version="1",
    needs=(),
    config_keys=("model", "prompts", "eval"),
    run=run,
    input_digest=input_digests.prompts_and_model,
)
