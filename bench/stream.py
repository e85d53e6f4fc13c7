"""Layer-streamed collect (`collect.streaming=layers`) against the in-memory collect, a sequential read of the
checkpoint and a bare forward.

    python bench/stream.py --cache-models outputs/cache/models --prompts 64 --batch-size 16

The packaged model (`model=qwen25_coder_05b`, materialized into the model store on first use) and the same
prompts of the shipped training split (half harmful, half harmless), last-token positions, the compute dtype
collect uses. Each task runs in its own child process, which reports its wall seconds and peak RSS
(`ru_maxrss`):

- streamed: `LayerStream.residual_batches_of` over both classes (skeleton, non-layer tensors, every layer read
  once with the next one prefetched, all batches through it): what `collect.streaming=layers` runs;
- memory: `load_model` + `residual_batches` per class: what `collect.streaming=off` runs (load included);
- read: one sequential read of every safetensors file of the checkpoint (16 MiB chunks);
- forward: the loaded model's base forward on the same batches, load excluded.

The yardsticks are read+forward (time: what streaming cannot beat, the weights read once plus the work) and
layer+states+1GiB (memory: the largest decoder layer in the compute dtype, every prompt's hidden state, and 1 GiB
for the Python runtime with torch and transformers imported). The last line is
`stream/(read+forward)=<ratio> rss/(layer+states+1GiB)=<ratio>` (targets: both <= 1.5).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

import pipeline
from pipeline.activations import left_padded_batch, length_order, prompt_tokens, residual_batches
from pipeline.layer_stream import LayerStream
from pipeline.models import load_model, load_tokenizer, resolve_model_dir
from pipeline.prompt_sets import prompt_splits

CONF = Path(pipeline.__file__).resolve().parents[1] / "conf"
GiB = 2**30


def setup(args: argparse.Namespace) -> tuple[dict, Path, str, list[list[list[int]]]]:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="config", overrides=[f"model={args.model}", f"cache.models={args.cache_models}"])
    model_cfg = dict(cfg.model)
    model_dir = resolve_model_dir(model_cfg, Path(args.cache_models), progress=False)
    tokenizer = load_tokenizer(model_dir)
    splits = prompt_splits(cfg.prompts)
    half = args.prompts // 2
    groups = [prompt_tokens(tokenizer, splits.harmful_train[:half]), prompt_tokens(tokenizer, splits.harmless_train[:half])]
    return model_cfg, model_dir, str(cfg.collect.dtype), groups


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model_cfg, model_dir, dtype, groups = setup(args)
    pad = load_tokenizer(model_dir).pad_token_id
    start = time.perf_counter()
    if args.child == "streamed":
        stream = LayerStream(model_dir, dtype)
        stream.residual_batches_of(groups, pad, args.batch_size, 1, progress=False)
    elif args.child == "memory":
        model, _, _ = load_model(model_cfg, Path(args.cache_models), dtype, progress=False)
        for tokens in groups:
            list(residual_batches(model, tokens, pad, args.batch_size, 1, progress=False))
    elif args.child == "read":
        for path in sorted(model_dir.glob("*.safetensors")):
            with open(path, "rb", buffering=0) as handle:
                while handle.read(16 * 2**20):
                    pass
    elif args.child == "forward":
        model, _, _ = load_model(model_cfg, Path(args.cache_models), dtype, progress=False)
        start = time.perf_counter()
        with torch.inference_mode():
            for tokens in groups:
                order = length_order([len(t) for t in tokens])
                for first in range(0, len(order), args.batch_size):
                    batch = left_padded_batch([tokens[i] for i in order[first:first + args.batch_size]], pad)
                    model.base_model(**batch, use_cache=False)
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "rss": rss}))


def run_child(args: argparse.Namespace, task: str) -> dict:
    command = [sys.executable, __file__, "--child", task, "--cache-models", args.cache_models, "--model", args.model,
               "--prompts", str(args.prompts), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-models", default="outputs/cache/models", help="the model store (packaged model built there on first use)")
    parser.add_argument("--model", default="qwen25_coder_05b")
    parser.add_argument("--prompts", type=int, default=64, help="prompts in all, half from each class")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every child")
    parser.add_argument("--child", choices=("streamed", "memory", "read", "forward"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    _, model_dir, dtype, groups = setup(args)
    stream = LayerStream(model_dir, dtype)
    layer = max(stream.layer_bytes())
    hidden = int(stream.config.get_text_config().hidden_size)
    itemsize = getattr(torch, dtype).itemsize
    states = 0
    for tokens in groups:
        order = length_order([len(t) for t in tokens])
        for first in range(0, len(order), args.batch_size):
            batch = [tokens[i] for i in order[first:first + args.batch_size]]
            states += len(batch) * max(map(len, batch)) * hidden * itemsize
    checkpoint = sum(path.stat().st_size for path in model_dir.glob("*.safetensors"))
    del stream
    print(f"model {model_dir.name}: {checkpoint / GiB:.2f} GiB on disk, {dtype}; largest decoder layer {layer / 2**20:.1f} MiB, "
          f"hidden states {states / 2**20:.1f} MiB; {args.prompts} prompts, batch {args.batch_size}, {args.threads} threads")
    results: dict[str, list[dict]] = {task: [] for task in ("read", "streamed", "forward", "memory")}
    run_child(args, "read")  # page cache warm for every task, as a second collect would find it
    for _ in range(args.repeats):
        for task in results:
            results[task].append(run_child(args, task))
            print(f"  {task}: {results[task][-1]['seconds']:.2f} s, peak RSS {results[task][-1]['rss'] / 2**20:.0f} MiB", flush=True)
    best = {task: min(runs, key=lambda run: run["seconds"]) for task, runs in results.items()}
    yard_time = best["read"]["seconds"] + best["forward"]["seconds"]
    yard_rss = layer + states + GiB
    streamed_rss = max(run["rss"] for run in results["streamed"])
    print(f"streamed {best['streamed']['seconds']:.2f} s vs read {best['read']['seconds']:.2f} + forward "
          f"{best['forward']['seconds']:.2f} s; in-memory collect {best['memory']['seconds']:.2f} s")
    print(f"peak RSS streamed {streamed_rss / 2**20:.0f} MiB vs in-memory {best['memory']['rss'] / 2**20:.0f} MiB "
          f"vs layer+states+1GiB {yard_rss / 2**20:.0f} MiB")
    print(f"stream/(read+forward)={best['streamed']['seconds'] / yard_time:.2f} rss/(layer+states+1GiB)={streamed_rss / yard_rss:.2f}")


if __name__ == "__main__":
    main()
