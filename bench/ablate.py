"""How fast and how lean is the ablate edit, measured against copying the same files?

The ablate stage streams a checkpoint shard by shard (`pipeline.weight_edit.edit_checkpoint`):
it should cost little more than copying the checkpoint, and hold about one shard in memory
whatever the model's size. This bench re-saves the packaged 0.5B model into many ~100 MB
shards, then, side by side on the same machine:

* times `shutil.copyfile` of every file into a fresh directory, and `edit_checkpoint` with a
  plan over every decoder layer (random unit directions) into another, alternating which runs
  first and reporting medians; every source file is read once beforehand so both start from
  the same, warm page cache. The edit runs in a child process; its time is taken inside the
  child around `edit_checkpoint`, so interpreter start-up and imports are not counted; it
  includes the sha256 of every source file (for the manifest), whose own wall time is reported too.
* reads the children's peak RSS (`getrusage(RUSAGE_CHILDREN)`) after a child that only imports
  torch and safetensors (the floor), and again after the edit children.

    python bench/ablate.py --work /tmp/me/bench-ablate

Last line: `ablate/copy=<ratio> rss/shard=<ratio>`. Targets: ablate/copy <= 1.5, and peak RSS
<= 1.5 x largest shard + 1 GiB.
"""

from __future__ import annotations

import argparse
import json
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


def packaged_model(models_dir: Path) -> Path:
    """The materialized packaged model (a directory with manifest.json, i.e. complete)."""
    found = sorted(path for path in models_dir.glob(MODEL_GLOB) if (path / "manifest.json").is_file())
    if not found:
        sys.exit(f"no complete {MODEL_GLOB} in {models_dir}; run `python -m pipeline run.stages=[collect]` first or pass --source")
    return found[-1]


def reshard(source: Path, target: Path, shard_size: str) -> Path:
    """`save_pretrained(max_shard_size=shard_size)` of `source` into `target` (reused when already done).

    Done in a child: a parent that once held the model would pass its peak RSS on to every child
    it forks, and RUSAGE_CHILDREN would report the parent's model instead of the children's work.
    """
    stamp = target / "bench-source.json"
    wanted = {"source": str(source), "manifest": (source / "manifest.json").read_text(), "shard_size": shard_size}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return target
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run([sys.executable, __file__, "--child-reshard", str(source), str(target), shard_size], check=True)
    for path in source.iterdir():  # tokenizer and chat template: edit_checkpoint copies them too
        if path.is_file() and path.suffix != ".safetensors" and path.name != "manifest.json" and not (target / path.name).exists():
            shutil.copyfile(path, target / path.name)
    stamp.write_text(json.dumps(wanted))
    return target


def child_reshard(source: Path, target: Path, shard_size: str) -> None:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(source, dtype="auto").save_pretrained(target, max_shard_size=shard_size)


def checkpoint_files(directory: Path) -> list[Path]:
    return sorted(path for path in directory.iterdir() if path.is_file() and path.name != "bench-source.json")


def warm_page_cache(files: list[Path]) -> None:
    for path in files:
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass


def copy_seconds(files: list[Path], out_dir: Path) -> float:
    out_dir.mkdir(parents=True)
    started = time.perf_counter()
    for path in files:
        shutil.copyfile(path, out_dir / path.name)
    return time.perf_counter() - started


def edit_in_child(source: Path, out_dir: Path) -> dict:
    """Run `--child-edit` in a fresh interpreter; returns its timings."""
    result = subprocess.run(
        [sys.executable, __file__, "--child-edit", str(source), str(out_dir)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        sys.exit(f"edit child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def child_edit(source: Path, out_dir: Path) -> None:
    """In the child: edit every decoder layer of `source` into `out_dir`, print timings as JSON."""
    import torch

    from pipeline import weight_edit
    from pipeline.architectures import num_decoder_layers, text_config

    config = json.loads((source / "config.json").read_text())
    num_layers, hidden = num_decoder_layers(config), int(text_config(config)["hidden_size"])
    generator = torch.Generator().manual_seed(SEED)
    directions = torch.randn(num_layers, hidden, generator=generator)
    directions /= directions.norm(dim=-1, keepdim=True)
    plan = {
        "model": "bench",
        "method": "orthogonal",
        "layers": [{"layer": layer, "direction_from": layer, "scale": 1.0} for layer in range(num_layers)],
    }
    hashing = [0.0]
    hash_files = weight_edit._hash_files

    def timed_hash_files(*args, **kwargs) -> dict:
        started = time.perf_counter()
        try:
            return hash_files(*args, **kwargs)
        finally:
            hashing[0] += time.perf_counter() - started

    weight_edit._hash_files = timed_hash_files
    started = time.perf_counter()
    report = weight_edit.edit_checkpoint(source, out_dir, plan, directions, progress=False)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "hash_seconds": hashing[0], "edited": len(report["edited_tensors"])}))


def children_peak_rss() -> int:
    """Largest peak RSS among finished children, bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, help=f"checkpoint to re-shard (default: {DEFAULT_MODELS}/{MODEL_GLOB})")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-ablate"), help="scratch directory (needs ~3x the model)")
    parser.add_argument("--shard-size", default="100MB")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each, alternating which goes first")
    parser.add_argument("--child-edit", nargs=2, type=Path, metavar=("SOURCE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--child-reshard", nargs=3, metavar=("SOURCE", "OUT", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_edit:
        child_edit(*args.child_edit)
        return
    if args.child_reshard:
        child_reshard(Path(args.child_reshard[0]), Path(args.child_reshard[1]), args.child_reshard[2])
        return

    source = args.source or packaged_model(DEFAULT_MODELS)
    sharded = reshard(source, args.work / "sharded", args.shard_size)
    files = checkpoint_files(sharded)
    shards = [path for path in files if path.suffix == ".safetensors"]
    total, largest = sum(path.stat().st_size for path in files), max(path.stat().st_size for path in shards)
    print(f"checkpoint: {sharded} from {source}")
    print(f"  {len(shards)} shards, largest {largest / MIB:.0f} MiB, {total / MIB:.0f} MiB in {len(files)} files")
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")

    subprocess.run([sys.executable, "-c", "import torch, safetensors"], check=True)
    floor = children_peak_rss()

    warm_page_cache(files)
    copies: list[float] = []
    edits: list[dict] = []
    for repeat in range(args.repeats):
        for task in ("copy", "edit") if repeat % 2 == 0 else ("edit", "copy"):
            out_dir = args.work / f"out-{task}"
            shutil.rmtree(out_dir, ignore_errors=True)
            if task == "copy":
                copies.append(copy_seconds(files, out_dir))
            else:
                edits.append(edit_in_child(sharded, out_dir))
            shutil.rmtree(out_dir)
            print(f"  run {repeat}: {task} {copies[-1] if task == 'copy' else edits[-1]['seconds']:.2f}s")
    peak = children_peak_rss()

    copy_median = statistics.median(copies)
    edit_median = statistics.median(run["seconds"] for run in edits)
    hash_median = statistics.median(run["hash_seconds"] for run in edits)
    budget = 1.5 * largest + GIB
    print(f"copy:   median {copy_median:.2f}s of {[round(s, 2) for s in copies]}")
    print(f"ablate: median {edit_median:.2f}s of {[round(r['seconds'], 2) for r in edits]} "
          f"({edits[0]['edited']} tensors edited); sha256 of the source took {hash_median:.2f}s of it, on its own thread")
    print(f"peak RSS: ablate child {peak / MIB:.0f} MiB, bare `import torch, safetensors` child {floor / MIB:.0f} MiB; "
          f"budget 1.5 x shard + 1 GiB = {budget / MIB:.0f} MiB ({'within' if peak <= budget else 'OVER'})")
    print(f"ablate/copy={edit_median / copy_median:.2f} rss/shard={peak / largest:.2f}")


if __name__ == "__main__":
    main()
