"""How fast and how lean is the ablate stage, measured against copying the same files?

The ablate stage streams a checkpoint shard by shard (`pipeline.checkpoint_copy.edit_checkpoint`):
it should cost little more than copying the checkpoint, and hold about one shard in memory
whatever the model's size. This bench re-saves the packaged 0.5B model into many ~100 MB
shards, then, side by side on the same machine, rotating the order of the tasks in each round
and reporting medians (every source file is read once beforehand, so all start from the same,
warm page cache):

* `copy`: `shutil.copyfile` of every file into a fresh directory (the issue's yardstick);
* `copy+sha256`: the same, then the sha256 of every copied file: what any cached stage that
  writes these bytes pays, since its manifest records their hashes;
* `edit`: `edit_checkpoint` with a plan over every decoder layer (random unit directions), the
  source's sha256 sums handed in, output not hashed: the edit itself;
* `stage`: the same with `hash_output=True`, as the ablate stage runs it for a model from the model
  store (whose verified manifest gives the source sums) or a local directory ablated before
  (whose sums it remembers): the stage's whole work, manifest hashes included;
* `stage-first`: `stage` with the source's sums unknown, as on a local directory's first ablate.

The edit tasks run in a child process, timed inside it around `edit_checkpoint` only (interpreter
start-up, imports and the hashes handed in are not counted). CPU seconds are printed next to wall
seconds: the edit spreads over threads, so its CPU seconds exceed its wall seconds. Peak RSS is
`ru_maxrss` of the children (`RUSAGE_CHILDREN`), after a child that only imports torch and
safetensors (the floor), and again after the edit children; the parent never loads a model.

    python bench/ablate.py --work /tmp/me/bench-ablate

Last line: `ablate/copy=<ratio> rss/shard=<ratio>`, the ratio for `edit`: the edited copy against
the plain copy. The line before gives `stage` and `stage-first`, which add the sha256 of what is
read and written; on a CPU where sha256 is slower than a kernel copy they are bound by the hashing,
and `stage/(copy+sha256)` compares them with a copy that pays the same hashing. Targets:
ablate/copy <= 1.5, and peak RSS <= 1.5 x largest shard + 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ROOT / "outputs" / "cache" / "models"
MODEL_GLOB = "qwen25_coder_05b-*"
SEED = 0
GIB = 1 << 30
MIB = 1 << 20
TASKS = ["copy", "copy+sha256", "edit", "stage", "stage-first"]
EDIT_FLAGS = {"edit": ["--known"], "stage": ["--known", "--hash-output"], "stage-first": ["--hash-output"]}


def packaged_model(models_dir: Path) -> Path:
    """The materialized packaged model (a directory with manifest.json, i.e. complete)."""
    found = sorted(path for path in models_dir.glob(MODEL_GLOB) if (path / "manifest.json").is_file())
    if not found:
        sys.exit(f"no complete {MODEL_GLOB} in {models_dir}; run `python -m pipeline run.stages=[collect]` first or pass --source")
    return found[-1]


def reshard(source: Path, target: Path, shard_size: str) -> Path:
    """`save_pretrained(max_shard_size=shard_size)` of `source` into `target` (reused when already done)."""
    stamp = target / "bench-source.json"
    wanted = {"source": str(source), "manifest": (source / "manifest.json").read_text(), "shard_size": shard_size}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return target
    shutil.rmtree(target, ignore_errors=True)
    run_child("--child-reshard", str(source), str(target), shard_size)
    for path in source.iterdir():  # tokenizer and chat template: edit_checkpoint copies them too
        if path.is_file() and path.suffix != ".safetensors" and path.name != "manifest.json" and not (target / path.name).exists():
            shutil.copyfile(path, target / path.name)
    stamp.write_text(json.dumps(wanted))
    return target


def checkpoint_files(directory: Path) -> list[Path]:
    return sorted(path for path in directory.iterdir() if path.is_file() and path.name != "bench-source.json")


def warm_page_cache(files: list[Path]) -> None:
    for path in files:
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass


def timed_copy(files: list[Path], out_dir: Path, hashed: bool) -> dict:
    """Copy `files` into `out_dir` (then, with `hashed`, sha256 every copy); wall and CPU seconds."""
    from pipeline.artifacts import sha256_file

    out_dir.mkdir(parents=True)
    wall, cpu = time.perf_counter(), time.process_time()
    for path in files:
        shutil.copyfile(path, out_dir / path.name)
    if hashed:
        for path in files:
            sha256_file(out_dir / path.name)
    return {"seconds": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def run_child(*args: str) -> dict:
    """Run this script with a --child-* mode in a fresh interpreter; returns the JSON it prints last."""
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"child {args[0]} failed:\n{result.stderr[-3000:]}")
    lines = result.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


# --- children: these import torch; the parent never does -------------------------------------------


def child_reshard(source: Path, target: Path, shard_size: str) -> None:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(source, dtype="auto").save_pretrained(target, max_shard_size=shard_size)


def child_edit(source: Path, out_dir: Path, known: bool, hash_output: bool) -> None:
    """Edit every decoder layer of `source` into `out_dir`; print wall and CPU seconds as JSON.

    With `known`, the source's sha256 sums are computed first (untimed) and handed to
    `edit_checkpoint`, as the ablate stage hands it a model-store manifest's or remembered sums;
    otherwise it hashes every source file beside its copy. `hash_output` as the ablate stage does.
    """
    import torch

    from pipeline import artifacts
    from pipeline.architectures import num_decoder_layers, text_config
    from pipeline.checkpoint_copy import edit_checkpoint

    config = json.loads((source / "config.json").read_text())
    num_layers, hidden = num_decoder_layers(config), int(text_config(config)["hidden_size"])
    directions = torch.randn(num_layers, hidden, generator=torch.Generator().manual_seed(SEED))
    directions /= directions.norm(dim=-1, keepdim=True)
    plan = {
        "model": "bench",
        "method": "orthogonal",
        "layers": [{"layer": layer, "direction_from": layer, "scale": 1.0} for layer in range(num_layers)],
    }
    source_hashes = artifacts.file_hashes(source) if known else None
    wall, cpu = time.perf_counter(), time.process_time()
    report = edit_checkpoint(
        source, out_dir, plan, directions, progress=False, source_hashes=source_hashes, hash_output=hash_output
    )
    print(json.dumps({
        "seconds": time.perf_counter() - wall,
        "cpu": time.process_time() - cpu,
        "edited": len(report["edited_tensors"]),
    }))


# --- the bench ------------------------------------------------------------------------------------


def children_peak_rss() -> int:
    """Largest peak RSS among finished children, bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def median(runs: list[dict], key: str = "seconds") -> float:
    return statistics.median(run[key] for run in runs)


def listed(runs: list[dict]) -> str:
    return ", ".join(f"{run['seconds']:.2f}" for run in runs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, help=f"checkpoint to re-shard (default: {DEFAULT_MODELS}/{MODEL_GLOB})")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-ablate"), help="scratch directory (needs ~3x the model)")
    parser.add_argument("--shard-size", default="100MB")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each task, rotating their order")
    parser.add_argument("--child-edit", nargs=2, type=Path, metavar=("SOURCE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--known", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--hash-output", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-reshard", nargs=3, metavar=("SOURCE", "OUT", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_edit:
        return child_edit(*args.child_edit, known=args.known, hash_output=args.hash_output)
    if args.child_reshard:
        return child_reshard(Path(args.child_reshard[0]), Path(args.child_reshard[1]), args.child_reshard[2])

    source = args.source or packaged_model(DEFAULT_MODELS)
    sharded = reshard(source, args.work / "sharded", args.shard_size)
    files = checkpoint_files(sharded)
    shards = [path for path in files if path.suffix == ".safetensors"]
    total, largest = sum(path.stat().st_size for path in files), max(path.stat().st_size for path in shards)
    print(f"checkpoint: {sharded} (from {source})")
    print(f"  {len(shards)} shards, largest {largest / MIB:.0f} MiB, {total / MIB:.0f} MiB in {len(files)} files")
    print(f"machine: {os.cpu_count()} CPUs {platform.machine()}, load average {os.getloadavg()[0]:.1f}, "
          f"python {platform.python_version()}")

    subprocess.run([sys.executable, "-c", "import torch, safetensors"], check=True)
    floor = children_peak_rss()

    warm_page_cache(files)
    runs: dict[str, list[dict]] = {task: [] for task in TASKS}
    for repeat in range(args.repeats):
        for task in TASKS[repeat % len(TASKS) :] + TASKS[: repeat % len(TASKS)]:
            out_dir = args.work / f"out-{task}"
            shutil.rmtree(out_dir, ignore_errors=True)
            if task in EDIT_FLAGS:
                runs[task].append(run_child("--child-edit", str(sharded), str(out_dir), *EDIT_FLAGS[task]))
            else:
                runs[task].append(timed_copy(files, out_dir, hashed=task == "copy+sha256"))
            shutil.rmtree(out_dir)
    peak = children_peak_rss()

    copy_s = median(runs["copy"])
    print(f"{'task':<12} {'wall s':>7} {'CPU s':>6} {'/copy':>6}  runs (wall s)")
    for task in TASKS:
        print(f"{task:<12} {median(runs[task]):7.2f} {median(runs[task], 'cpu'):6.2f} "
              f"{median(runs[task]) / copy_s:6.2f}  {listed(runs[task])}")
    print(f"{runs['edit'][0]['edited']} tensors edited; stage/(copy+sha256) = "
          f"{median(runs['stage']) / median(runs['copy+sha256']):.2f}")
    budget = 1.5 * largest + GIB
    print(f"peak RSS: edit children {peak / MIB:.0f} MiB, bare `import torch, safetensors` child {floor / MIB:.0f} MiB; "
          f"budget 1.5 x largest shard + 1 GiB = {budget / MIB:.0f} MiB ({'within' if peak <= budget else 'OVER'})")
    print(f"stage/copy={median(runs['stage']) / copy_s:.2f} stage-first/copy={median(runs['stage-first']) / copy_s:.2f}")
    print(f"ablate/copy={median(runs['edit']) / copy_s:.2f} rss/shard={peak / largest:.2f}")


if __name__ == "__main__":
    main()
