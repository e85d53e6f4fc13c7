"""How fast and how lean is the ablate edit, measured against copying the same files?

The ablate stage streams a checkpoint shard by shard (`pipeline.weight_edit.edit_checkpoint`):
it should cost little more than copying the checkpoint, and hold about one shard in memory
whatever the model's size. This bench re-saves the packaged 0.5B model into many ~100 MB
shards, then, side by side on the same machine:

* times `shutil.copyfile` of every file into a fresh directory, and `edit_checkpoint` with a
  plan over every decoder layer (random unit directions) into another, with and without the
  source hashing, rotating which runs first and reporting medians; every source file is read once beforehand so both start from
  the same, warm page cache. The edit runs in a child process and is timed inside it, around
  `edit_checkpoint` only (interpreter start-up and imports are not counted). That time includes
  the sha256 of every source file (for the manifest), computed on a thread beside the edit; the
  thread's own time, and the time to hash the files alone, are reported too. CPU seconds are
  printed next to wall seconds: on a shared machine they move much less from run to run.
* reads the children's peak RSS (`getrusage(RUSAGE_CHILDREN)`) after a child that only imports
  torch and safetensors (the floor), and again after the edit children. The parent itself never
  loads a model: a child inherits its parent's peak RSS into ru_maxrss.

    python bench/ablate.py --work /tmp/me/bench-ablate

Last line: `ablate/copy=<ratio> rss/shard=<ratio>`. Targets: ablate/copy <= 1.5, and peak RSS
<= 1.5 x largest shard + 1 GiB.
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
TASKS = ["copy", "edit", "edit-unhashed"]


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


def timed_copy(files: list[Path], out_dir: Path) -> dict:
    out_dir.mkdir(parents=True)
    wall, cpu = time.perf_counter(), time.process_time()
    for path in files:
        shutil.copyfile(path, out_dir / path.name)
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


def child_edit(source: Path, out_dir: Path, hashed: bool) -> None:
    """Edit every decoder layer of `source` into `out_dir`; print wall, CPU and hashing seconds as JSON.

    With `hashed` False the source sha256 is replaced by nothing: what the edit path alone costs.
    """
    import torch

    from pipeline import weight_edit
    from pipeline.architectures import num_decoder_layers, text_config

    config = json.loads((source / "config.json").read_text())
    num_layers, hidden = num_decoder_layers(config), int(text_config(config)["hidden_size"])
    directions = torch.randn(num_layers, hidden, generator=torch.Generator().manual_seed(SEED))
    directions /= directions.norm(dim=-1, keepdim=True)
    plan = {
        "model": "bench",
        "method": "orthogonal",
        "layers": [{"layer": layer, "direction_from": layer, "scale": 1.0} for layer in range(num_layers)],
    }
    hashing = {"seconds": 0.0}
    hash_files = weight_edit._hash_files

    def timed_hash_files(*args, **kwargs) -> dict:
        started = time.perf_counter()
        try:
            return hash_files(*args, **kwargs) if hashed else {}
        finally:
            hashing["seconds"] += time.perf_counter() - started

    weight_edit._hash_files = timed_hash_files
    wall, cpu = time.perf_counter(), time.process_time()
    report = weight_edit.edit_checkpoint(source, out_dir, plan, directions, progress=False)
    print(json.dumps({
        "seconds": time.perf_counter() - wall,
        "cpu": time.process_time() - cpu,
        "hash_seconds": hashing["seconds"],
        "edited": len(report["edited_tensors"]),
    }))


def child_hash(source: Path) -> None:
    """sha256 of every checkpoint file, exactly as edit_checkpoint computes it, and nothing else."""
    import threading

    from pipeline.weight_edit import _hash_files

    wall, cpu = time.perf_counter(), time.process_time()
    _hash_files(source, checkpoint_files(source), threading.Event())
    print(json.dumps({"seconds": time.perf_counter() - wall, "cpu": time.process_time() - cpu}))


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
    parser.add_argument("--unhashed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-hash", type=Path, metavar="SOURCE", help=argparse.SUPPRESS)
    parser.add_argument("--child-reshard", nargs=3, metavar=("SOURCE", "OUT", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_edit:
        return child_edit(*args.child_edit, hashed=not args.unhashed)
    if args.child_hash:
        return child_hash(args.child_hash)
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
            if task == "copy":
                runs[task].append(timed_copy(files, out_dir))
            else:
                flags = ["--unhashed"] if task == "edit-unhashed" else []
                runs[task].append(run_child("--child-edit", str(sharded), str(out_dir), *flags))
            shutil.rmtree(out_dir)
    copies, edits, unhashed = runs["copy"], runs["edit"], runs["edit-unhashed"]
    peak = children_peak_rss()  # before the hash-only children, which map whole shards too
    hashes = [run_child("--child-hash", str(sharded)) for _ in range(args.repeats)]

    copy_s, edit_s = median(copies), median(edits)
    budget = 1.5 * largest + GIB
    print(f"copy:        median {copy_s:.2f}s wall, {median(copies, 'cpu'):.2f}s CPU  (runs: {listed(copies)})")
    print(f"ablate edit: median {edit_s:.2f}s wall, {median(edits, 'cpu'):.2f}s CPU  (runs: {listed(edits)}; "
          f"{edits[0]['edited']} tensors edited)")
    print(f"  of which sha256 of the source, on its own thread: median {median(edits, 'hash_seconds'):.2f}s wall")
    print(f"ablate edit without the sha256: median {median(unhashed):.2f}s wall, {median(unhashed, 'cpu'):.2f}s CPU  "
          f"(runs: {listed(unhashed)})")
    print(f"sha256 alone: median {median(hashes):.2f}s wall, {median(hashes, 'cpu'):.2f}s CPU  (runs: {listed(hashes)})")
    print(f"ratios to copy: ablate CPU {median(edits, 'cpu') / median(copies, 'cpu'):.2f}, "
          f"ablate without sha256 wall {median(unhashed) / copy_s:.2f}, sha256 alone wall {median(hashes) / copy_s:.2f}")
    print(f"peak RSS: edit children {peak / MIB:.0f} MiB, bare `import torch, safetensors` child {floor / MIB:.0f} MiB; "
          f"budget 1.5 x largest shard + 1 GiB = {budget / MIB:.0f} MiB ({'within' if peak <= budget else 'OVER'})")
    print(f"ablate/copy={edit_s / copy_s:.2f} rss/shard={peak / largest:.2f}")


if __name__ == "__main__":
    main()
