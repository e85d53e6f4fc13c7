"""What does a sweep point cost, against scoring its plan and nothing else?

A 3x3 multirun on the packaged model (`model=qwen25_coder_05b`, mode=band): `select.direction_from` x
`select.scale`, run in this process through `python -m pipeline -m` on Hydra's basic launcher, after one
warm-up run that computes collect, baseline and measure (and materializes the packaged model into the model
store on first use). Each point runs select and evaluate; evaluate applies the plan to the loaded model
in memory, so no point writes a checkpoint and the process loads the source model once.

Then, in the same process and on the same loaded model, one *bare* evaluate of each point's plan: the evaluate
stage's own `run` (from the registry) called directly on the job's inputs, into a scratch dir: the plan applied
in memory, scored, restored, metrics written; no runner, no Hydra, no cache. That is the floor a sweep point
cannot go under.

Printed: per point, its wall time (Hydra's job start to job end, from a callback) against the bare evaluate
of its plan; bytes written per point (everything new under the cache and the sweep dir, and the same without
evaluate's metrics.json/completions.jsonl); peak RSS of the process. Last line:

    point/bare=<ratio> bytes/point=<int> loads=<int>

(ratio: median point time / median bare time, medians because on a shared machine one stray neighbour's burst
can multiply a single measurement; loads: source-model loads of the whole process). Prompt
counts default small enough to finish in a few minutes on a 2-core CPU (see --help and bench/RESULTS.md):

    python bench/sweep.py --work /tmp/$USER/bench-sweep
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

ROOT = Path(__file__).resolve().parents[1]
DIRECTIONS = "0.5,0.6,0.7"
SCALES = "1.0,1.2,1.4"
SCORE_FILES = ("metrics.json", "completions.jsonl")
JOB_SECONDS: dict[str, float] = {}


class JobTimer(Callback):
    """Hydra callback (`+hydra.callbacks.bench_timer._target_=__main__.JobTimer`): wall time of each job."""

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        self.started = time.perf_counter()

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        JOB_SECONDS[str(config.hydra.job.num)] = time.perf_counter() - self.started


def run_cli(args: list[str]) -> None:
    """`python -m pipeline <args>` in this process (so the model loaded by one run is there for the next)."""
    from pipeline.__main__ import cli

    sys.argv = ["pipeline", *args]
    try:
        cli()
    except SystemExit as exit_:
        if exit_.code:
            raise SystemExit(f"python -m pipeline {' '.join(args)} failed with status {exit_.code}")


def files(*directories: Path) -> dict[Path, int]:
    return {path: path.stat().st_size for directory in directories if directory.exists()
            for path in directory.rglob("*") if path.is_file() and not path.is_symlink()}


def bare_evaluate(overrides: list[str], stages: dict, out_dir: Path) -> float:
    """Seconds of the evaluate stage's own `run` on this job's inputs, called directly: the plan applied in
    memory, scored, restored, metrics written; no runner (keys, locks, manifest), no Hydra, no cache."""
    from hydra import compose, initialize_config_dir

    from pipeline.paths import user_path
    from pipeline.runner import config_slice
    from pipeline.stage import StageContext
    from pipeline.stages import registry

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    stage = registry()["evaluate"]
    out_dir.mkdir(parents=True)
    context = StageContext(config=config_slice(cfg, stage.config_keys), out_dir=out_dir, model_store=user_path(cfg.cache.models),
                           inputs={name: Path(stages[name]["dir"]) for name in stage.needs}, seed=0, progress=False)
    started = time.perf_counter()
    stage.run(context)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch dir: the bench's cache and sweep dir")
    parser.add_argument("--n-train", type=int, default=32, help="prompts.n_train (per class)")
    parser.add_argument("--n-eval", type=int, default=8, help="prompts.n_eval (per class)")
    parser.add_argument("--kl-prompts", type=int, default=8, help="eval.kl_prompts")
    parser.add_argument("--max-new-tokens", type=int, default=12, help="eval.max_new_tokens")
    parser.add_argument("--model", default="qwen25_coder_05b")
    args = parser.parse_args()

    from pipeline import model_cache

    shutil.rmtree(args.work, ignore_errors=True)
    cache, sweep_dir = args.work / "cache", args.work / "sweep"
    common = [f"model={args.model}", f"prompts.n_train={args.n_train}", f"prompts.n_eval={args.n_eval}",
              f"eval.kl_prompts={args.kl_prompts}", f"eval.max_new_tokens={args.max_new_tokens}",
              "run.progress=false", f"cache.dir={cache}", f"cache.models={ROOT / 'outputs' / 'cache' / 'models'}"]
    started = time.perf_counter()
    run_cli([*common, "run.stages=[measure,baseline]", f"hydra.run.dir={args.work / 'warmup'}"])
    warmup = time.perf_counter() - started
    before = files(cache, sweep_dir)
    started = time.perf_counter()
    run_cli(["-m", *common, f"select.direction_from={DIRECTIONS}", f"select.scale={SCALES}",
             f"hydra.sweep.dir={sweep_dir}", "+hydra.callbacks.bench_timer._target_=__main__.JobTimer"])
    sweep_seconds = time.perf_counter() - started
    new = {path: size for path, size in files(cache, sweep_dir).items() if path not in before}
    runs = {path.parent.name: json.loads(path.read_text()) for path in sweep_dir.glob("*/run.json")}
    jobs = sorted(runs, key=int)
    if len(jobs) != 9 or any("error" in runs[job] for job in jobs):
        raise SystemExit(f"the sweep did not evaluate 9 points: {[runs[job].get('error') for job in jobs]}")

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.2f}; "
          f"warm-up (collect+baseline+measure, model load) {warmup:.1f} s; sweep {sweep_seconds:.1f} s")
    print("job  overrides                                        point_s  bare_s  ratio")
    points, bares = [], []
    for job in jobs:
        stages = runs[job]["stages"]
        varying = [item for item in runs[job]["overrides"] if item.startswith(("select.direction_from", "select.scale"))]
        bare = bare_evaluate(runs[job]["overrides"], stages, args.work / "bare" / job)
        point = JOB_SECONDS[job]
        points.append(point), bares.append(bare)
        print(f"{job:>3}  {' '.join(varying):<47}  {point:7.2f}  {bare:6.2f}  {point / bare:5.2f}")
    written = sum(new.values())
    scores = sum(size for path, size in new.items() if path.name in SCORE_FILES)
    checkpoints = [path for path in new if path.suffix == ".safetensors" and "model" in path.parts]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    point_mid, bare_mid = statistics.median(points), statistics.median(bares)
    print(f"# per point: median {point_mid:.2f} s, mean {sum(points) / 9:.2f} s (bare: median {bare_mid:.2f} s, mean "
          f"{sum(bares) / 9:.2f} s); {written / 9:.0f} bytes written, "
          f"{(written - scores) / 9:.0f} besides metrics.json/completions.jsonl; checkpoint files written: {len(checkpoints)}; "
          f"peak RSS {peak_mb:.0f} MiB")
    print(f"point/bare={point_mid / bare_mid:.3f} bytes/point={written // 9} loads={model_cache.loads()}")


if __name__ == "__main__":
    main()
