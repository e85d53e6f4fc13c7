"""What does the longer ruler cost? The evaluate stage at `eval.max_new_tokens=128` against 32, same run.

Issue 17's cost target: evaluate at 128 tokens <= 2x its 32-token time on the packaged model. Each setting
first runs once (collect, measure, select, a baseline per setting since the eval settings are in its key,
and evaluate, timed: round "w"); then `--rounds` rounds force only evaluate, alternating which setting goes first, each a
fresh `python -m pipeline` process. Figures: evaluate's wall seconds from its manifest, the load average
when it started, and the 128-token run's numbers (refusal after, degenerate rate, over-refusal
before/after, first-token and per-token KL), which re-check the shipped default plan with the new ruler.

    python bench/ruler.py --work /tmp/$USER/bench-ruler                      # the packaged model, defaults
    python bench/ruler.py --work /tmp/x prompts.n_eval=16 eval.kl_prompts=16  # a quicker, smaller split

Last line: `evaluate128/evaluate32=<median ratio>`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENS = (32, 128)


def run(work: Path, tokens: int, overrides: list[str], name: str, force: bool) -> dict:
    run_dir = work / "runs" / name
    command = [sys.executable, "-m", "pipeline", f"cache.dir={work / 'cache'}", f"hydra.run.dir={run_dir}",
               "run.export=false", "run.progress=false", f"eval.max_new_tokens={tokens}", *overrides]
    if force:
        command.append("run.force=[evaluate]")
    load = os.getloadavg()[0]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((run_dir / "run.json").read_text())
    evaluate = summary["stages"]["evaluate"]
    manifest = json.loads((Path(evaluate["dir"]) / "manifest.json").read_text())
    metrics = json.loads((Path(evaluate["dir"]) / "metrics.json").read_text())
    return {"tokens": tokens, "seconds": manifest["seconds"], "load": load, "metrics": metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="extra pipeline overrides (e.g. prompts.n_eval=16)")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()}", flush=True)
    times: dict[int, list[float]] = {tokens: [] for tokens in TOKENS}
    last: dict[int, dict] = {}
    for tokens in TOKENS:  # the first run of each setting computes evaluate too: it is a measurement (round "w")
        warm = run(args.work, tokens, args.overrides, f"warm-{tokens}", force=False)
        times[tokens].append(warm["seconds"])
        last[tokens] = warm["metrics"]
        print(f"round w {tokens:>3} tokens: evaluate {warm['seconds']:.1f} s (load {warm['load']:.1f})", flush=True)
    for round_ in range(args.rounds):
        for tokens in (TOKENS if round_ % 2 == 0 else TOKENS[::-1]):
            result = run(args.work, tokens, args.overrides, f"round{round_}-{tokens}", force=True)
            times[tokens].append(result["seconds"])
            last[tokens] = result["metrics"]
            print(f"round {round_} {tokens:>3} tokens: evaluate {result['seconds']:.1f} s (load {result['load']:.1f})", flush=True)
    for tokens, metrics in last.items():
        print(f"{tokens} tokens: refusal {metrics['refusal_before']['rate']:.3f} -> {metrics['refusal_after']['rate']:.3f}, "
              f"degenerate {metrics['outcomes_before']['rates']['degenerate']:.3f} -> "
              f"{metrics['outcomes_after']['rates']['degenerate']:.3f}, over-refusal "
              f"{metrics['over_refusal_before']['rate']:.3f} -> {metrics['over_refusal_after']['rate']:.3f}, "
              f"KL first {metrics['kl_divergence']:.4f} per-token {metrics['per_token_kl']:.4f}")
    ratios = [long / short for long, short in zip(times[128], times[32])]
    print(f"evaluate128/evaluate32={statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
