"""Collect-stage throughput against a bare base-model forward and against the naive hidden-states loop.

    python bench/collect.py --cache-models /work/main/outputs/cache/models --prompts 32 --batch-size 8

All three read the same prompts of the shipped training split (half harmful, half harmless) with the
packaged model (`model=qwen25_coder_05b`) in the compute dtype collect uses:

- collect: `pipeline.collection.collect_class`, what the stage runs per class (templating,
  tokenization, length-sorted left-padded batches, hooks on every decoder layer, CPU copies, prompt order);
- bare: the base model's forward alone on the same batches, pre-tokenized: the floor collect can reach;
- naive: what peers write: the full model (lm_head and logits over every position, default KV cache)
  with `output_hidden_states=True`, stacking each layer's last-token state, on the same batches;
- lm_head: the output projection alone on the same batches' final states, to explain naive/bare.

The machine is shared and oversubscribed, so wall-clock time mostly measures the neighbours. The
methods are interleaved batch by batch (the order rotating), each batch's time is the median of its
repeats, a method's time is the sum over batches, and the figures that count are CPU seconds of this
process: the work done, not the time spent waiting for a core. One thread by default, so that CPU time
holds no spin-waiting of OpenMP threads whose sibling was descheduled. Wall-clock ratios are printed too.
The last line is `collect/bare=<ratio> collect/naive=<ratio>`, ratios of throughput in CPU time
(>1 means collect is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from hydra import compose, initialize_config_dir

import pipeline
from pipeline.activations import left_padded_batch, length_sorted_batches, prompt_tokens
from pipeline.models import load_model
from pipeline.prompt_sets import prompt_splits
from pipeline.collection import collect_class

CONF = Path(pipeline.__file__).resolve().parents[1] / "conf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-models", required=True, help="a model store holding the materialized packaged model")
    parser.add_argument("--model", default="qwen25_coder_05b")
    parser.add_argument("--prompts", type=int, default=32, help="prompts in all, half from each class")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see the docstring)")
    args = parser.parse_args()

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="config", overrides=[f"model={args.model}", f"cache.models={args.cache_models}"])
    torch.set_num_threads(args.threads)
    dtype = str(cfg.collect.dtype)
    model, tokenizer, _ = load_model(dict(cfg.model), Path(args.cache_models), dtype, progress=False)
    device = model.get_input_embeddings().weight.device
    splits = prompt_splits(cfg.prompts)
    half = args.prompts // 2
    work = []  # (prompts of one batch, its model inputs): the unit every method is timed on
    for prompts in (splits.harmful_train[:half], splits.harmless_train[:half]):
        tokens = prompt_tokens(tokenizer, prompts)
        for batch in length_sorted_batches([len(t) for t in tokens], args.batch_size):
            inputs = left_padded_batch([tokens[i] for i in batch], tokenizer.pad_token_id)
            work.append(([prompts[i] for i in batch], {name: value.to(device) for name, value in inputs.items()}))
    n_tokens = sum(int(inputs["attention_mask"].sum()) for _, inputs in work)
    with torch.inference_mode():
        final_states = [model.base_model(**inputs, use_cache=False).last_hidden_state for _, inputs in work]

    # Inside collect, the base model's forward is timed too: collect's own work is the difference, measured
    # within the same calls, so it does not depend on the machine's load changing between methods.
    forward = model.base_model.forward
    forward_cpu: list[float] = []

    def timed_forward(*positional, **named):
        started = time.process_time()
        try:
            return forward(*positional, **named)
        finally:
            forward_cpu.append(time.process_time() - started)

    # Each method reads batch `index` of `work`.
    def collect(index: int) -> None:
        model.base_model.forward = timed_forward
        try:
            collect_class(model, tokenizer, work[index][0], "harmful", "last", True, args.batch_size, progress=False)
        finally:
            del model.base_model.forward  # back to the class's method

    @torch.inference_mode()
    def bare(index: int) -> None:
        model.base_model(**work[index][1], use_cache=False)

    @torch.no_grad()
    def naive(index: int) -> None:
        output = model(**work[index][1], output_hidden_states=True)
        torch.stack([hidden[:, -1, :] for hidden in output.hidden_states[1:]], dim=1).float().cpu()

    @torch.inference_mode()
    def lm_head(index: int) -> None:
        model.get_output_embeddings()(final_states[index])

    methods: dict[str, Callable[[int], None]] = {"collect": collect, "bare": bare, "naive": naive, "lm_head": lm_head}
    print(
        f"{args.model} {dtype}, {args.prompts} prompts ({n_tokens} tokens) in {len(work)} batches of <= "
        f"{args.batch_size}, {torch.get_num_threads()} threads, {args.repeats} repeats"
    )
    bare(0)  # warm-up: first-call allocations and kernel selection, shared by all
    # times[clock][method][batch] lists one figure per repeat. Methods alternate batch by batch (order
    # rotating), so a change in the machine's load hits all of them alike instead of one whole pass.
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    times = {clock: {name: [[] for _ in work] for name in methods} for clock in clocks}
    names = list(methods)
    for repeat in range(args.repeats):
        for index in range(len(work)):
            shift = (repeat + index) % len(names)
            for name in names[shift:] + names[:shift]:
                started = {clock: read() for clock, read in clocks.items()}
                methods[name](index)
                for clock, read in clocks.items():
                    times[clock][name][index].append(read() - started[clock])
        print(f"  repeat {repeat + 1} wall s: " + "  ".join(f"{n} {sum(t[-1] for t in times['wall'][n]):.1f}" for n in names))
    total = {
        clock: {name: sum(statistics.median(runs) for runs in per_batch) for name, per_batch in by_method.items()}
        for clock, by_method in times.items()
    }
    for name in names:
        wall, cpu = total["wall"][name], total["cpu"][name]
        print(f"{name:8s} wall {wall:7.2f} s  cpu {cpu:7.2f} s  {n_tokens / cpu:7.1f} tokens per cpu s (sums of per-batch medians)")
    outside = sum(map(sum, times["cpu"]["collect"])) - sum(forward_cpu)
    print(f"collect's own work outside the forward: {outside:.3f} cpu s of {sum(map(sum, times['cpu']['collect'])):.1f}")
    print(f"the lm_head alone (logits of every position) costs {total['cpu']['lm_head'] / total['cpu']['bare']:.2f}x a bare forward")
    wall = total["wall"]
    print(f"wall clock: collect/bare={wall['bare'] / wall['collect']:.3f} collect/naive={wall['naive'] / wall['collect']:.3f}")
    cpu = total["cpu"]
    print(f"collect/bare={cpu['bare'] / cpu['collect']:.3f} collect/naive={cpu['naive'] / cpu['collect']:.3f}")


if __name__ == "__main__":
    main()
