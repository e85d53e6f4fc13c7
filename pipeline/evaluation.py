"""The numbers every run is judged by: generation, class rates (refusal with a Wilson interval) and KL divergence.

Generation: greedy completions, batched by length, with per-row stopping (`RowStops`: a refusal in the
answer's opening, or the answer budget after a reasoning section). Classes come from `pipeline.judges`.
KL: between the original and the edited model's next-token distributions, KL(original || edited)
averaged over prompts, at the first generated position of held-out harmless prompts (the figure peers
report) and per token over the original model's own harmless completions, teacher-forced (`per_token_kl`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from pipeline.activations import left_padded_batch, length_sorted_batches, render_prompts
from pipeline.judges import OUTCOMES, REASONING_SECTIONS, MarkerRules, answer_text


def wilson_interval(successes: int, trials: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion; sensible at 0 and at n."""
    if trials <= 0:
        return (0.0, 1.0)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return (max(0.0, centre - half_width), min(1.0, centre + half_width))


def refusal_summary(flags: Sequence[bool]) -> dict:
    refused = sum(bool(flag) for flag in flags)
    low, high = wilson_interval(refused, len(flags))
    return {"refused": refused, "n": len(flags), "rate": refused / max(1, len(flags)), "wilson95": [low, high]}


def outcome_summary(outcomes: Sequence[str]) -> dict:
    """{class: rate} over OUTCOMES, plus the counts and n: the classes reported beside the refusal rate."""
    n = len(outcomes)
    counts = {name: sum(outcome == name for outcome in outcomes) for name in OUTCOMES}
    return {"n": n, "counts": counts, "rates": {name: count / max(1, n) for name, count in counts.items()}}


def special_tokens(tokenizer) -> list[str]:
    """Every special token's text (named and added ones), removed from an answer before judging."""
    added = [token.content for token in getattr(tokenizer, "added_tokens_decoder", {}).values() if token.special]
    return sorted(set(tokenizer.all_special_tokens) | set(added))


def prompt_opens_reasoning(rendered: str) -> str:
    """The reasoning opener a rendered prompt leaves open (DeepSeek-R1 templates end with `<think>\\n`), else ""."""
    for opener, closer in REASONING_SECTIONS:
        if opener in rendered and rendered.rfind(opener) > rendered.rfind(closer):
            return opener
    return ""


@dataclass(frozen=True)
class Generation:
    texts: list[str]
    """Each completion decoded with its special tokens (padding removed), prefixed with the reasoning opener
    its prompt left open: the input of `judges.answer_text`."""
    ids: list[list[int]]
    """The generated token ids, through the first end-of-sequence token."""


class RowStops(StoppingCriteria):
    """Marks a row finished when its answer opens with a refusal (`rules`), or when its answer (the text
    after a closed reasoning section, else all of it) has `answer_budget` tokens. Finished rows are padded
    by generate(), which stops once every row is finished."""

    def __init__(self, tokenizer, width: int, prefixes: Sequence[str], rules: MarkerRules | None, answer_budget: int | None):
        self.tokenizer, self.width, self.prefixes = tokenizer, width, list(prefixes)
        self.rules, self.budget, self.specials = rules, answer_budget, special_tokens(tokenizer)
        self.answer_from: list[int | None] = [None] * len(prefixes)
        self.done = torch.zeros(len(prefixes), dtype=torch.bool)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.width:].cpu()
        steps = new.shape[1]
        for row in range(new.shape[0]):
            if self.done[row]:
                continue
            text = self.prefixes[row] + self.tokenizer.decode(new[row], skip_special_tokens=False)
            answer = answer_text(text, self.specials)
            if answer.unclosed:
                continue
            if self.answer_from[row] is None:
                self.answer_from[row] = steps if any(opener in text for opener, _ in REASONING_SECTIONS) else 0
            if self.budget is not None and steps - self.answer_from[row] >= self.budget:
                self.done[row] = True
            elif self.rules is not None and answer.text and self.rules.opening_refusal(answer.text) is not None:
                self.done[row] = True
        return self.done.clone().to(input_ids.device)


def _until_eos(ids: list[int], eos: set[int], pad: int | None) -> list[int]:
    for position, token in enumerate(ids):
        if token in eos:
            return ids[: position + 1]
    while ids and ids[-1] == pad:
        ids = ids[:-1]
    return ids


@torch.inference_mode()
def greedy_completions(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int, progress: bool = True,
    thinking: str = "off", reasoning_tokens: int = 0, stop_rules: MarkerRules | None = None,
) -> Generation:
    """Greedy continuations, batched by length with left padding, returned in prompt order.

    `max_new_tokens` is the answer's budget; a reasoning section before it may use `reasoning_tokens` more.
    `stop_rules`: stop a row as soon as its answer opens with a refusal (the markers judge's rule 2).
    """
    rendered = render_prompts(tokenizer, prompts, thinking)
    tokens = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]
    prefixes = [prompt_opens_reasoning(text) for text in rendered]
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    texts, ids = [""] * len(prompts), [[] for _ in prompts]
    device = model.get_input_embeddings().weight.device
    batches = length_sorted_batches([len(t) for t in tokens], batch_size)
    for batch in tqdm(batches, desc="generate", disable=not progress, unit="batch"):
        inputs = left_padded_batch([tokens[i] for i in batch], tokenizer.pad_token_id)
        del inputs["position_ids"]  # generate() derives positions from the attention mask
        inputs = {k: v.to(device) for k, v in inputs.items()}
        width = inputs["input_ids"].shape[1]
        budget = max_new_tokens if reasoning_tokens > 0 else None
        stops = [] if stop_rules is None and budget is None else [
            RowStops(tokenizer, width, [prefixes[i] for i in batch], stop_rules, budget)]
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens + reasoning_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
            stopping_criteria=StoppingCriteriaList(stops),
        )
        for row, index in enumerate(batch):
            ids[index] = _until_eos(output[row, width:].tolist(), eos_ids, tokenizer.pad_token_id)
            texts[index] = prefixes[index] + tokenizer.decode(ids[index], skip_special_tokens=False)
    return Generation(texts, ids)


def _encoded(tokenizer, prompts: Sequence[str], thinking: str = "off") -> list[list[int]]:
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in render_prompts(tokenizer, prompts, thinking)]


@torch.inference_mode()
def first_token_logprobs(
    model, tokenizer, prompts: Sequence[str], batch_size: int, progress: bool = True, thinking: str = "off"
) -> torch.Tensor:
    """log p(next token | prompt) at the first generated position: [n_prompts, vocab], float32, prompt order."""
    tokens = _encoded(tokenizer, prompts, thinking)
    device = model.get_input_embeddings().weight.device
    result: torch.Tensor | None = None
    for batch in tqdm(length_sorted_batches([len(t) for t in tokens], batch_size), desc="kl", disable=not progress):
        inputs = {k: v.to(device) for k, v in left_padded_batch([tokens[i] for i in batch], tokenizer.pad_token_id).items()}
        logits = model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1, :].float()
        logprobs = F.log_softmax(logits, dim=-1).cpu()
        if result is None:
            result = torch.empty((len(prompts), logprobs.shape[-1]))
        result[batch] = logprobs
    assert result is not None
    return result


def kl_per_prompt(reference_logprobs: torch.Tensor, edited_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(reference || edited) of each prompt's first-token distribution, in nats (float64, unclamped)."""
    if reference_logprobs.shape != edited_logprobs.shape:
        raise ValueError(f"logprob shapes differ: {tuple(reference_logprobs.shape)} vs {tuple(edited_logprobs.shape)}")
    return F.kl_div(edited_logprobs.double(), reference_logprobs.double(), log_target=True, reduction="none").sum(-1)


def kl_divergence(reference_logprobs: torch.Tensor, edited_logprobs: torch.Tensor) -> float:
    """Mean over prompts of KL(reference || edited), in nats; 0 for identical models."""
    return float(kl_per_prompt(reference_logprobs, edited_logprobs).mean().clamp(min=0.0))


# --- per-token KL over the original model's own completions ----------------------------------------------

TOP_K = 64
"""Reference log-probabilities kept per position (the rest of the distribution is one bucket): 64 x 32
positions x 64 prompts is 1 MiB, where the full [64, 32, 151936] table of the packaged model is 1.2 GiB."""


@torch.inference_mode()
def completion_logprobs(
    model, tokenizer, prompts: Sequence[str], completions: Sequence[Sequence[int]], batch_size: int,
    thinking: str = "off", progress: bool = True,
):
    """Teacher-forced log p(. | prompt, completion[:t]) at each completion position t, one batch at a time:
    yields (indices, logprobs [b, T, vocab] float32 on CPU, lengths [b]); row i is valid for t < lengths[i]."""
    prompt_ids = _encoded(tokenizer, prompts, thinking)
    sequences = [list(p) + list(c) for p, c in zip(prompt_ids, completions)]
    device = model.get_input_embeddings().weight.device
    for batch in tqdm(length_sorted_batches([len(s) for s in sequences], batch_size), desc="per-token kl", disable=not progress):
        lengths = [len(completions[i]) for i in batch]
        longest = max(lengths)
        inputs = left_padded_batch([sequences[i] for i in batch], tokenizer.pad_token_id)
        logits = model(**{k: v.to(device) for k, v in inputs.items()}, use_cache=False, logits_to_keep=longest + 1).logits
        logprobs = F.log_softmax(logits[:, :-1, :].float(), dim=-1).cpu()  # column j predicts the token after it
        out = torch.zeros((len(batch), longest, logprobs.shape[-1]))
        for row, length in enumerate(lengths):
            out[row, :length] = logprobs[row, longest - length:]
        yield batch, out, torch.tensor(lengths)


def reference_topk(model, tokenizer, prompts, completions, batch_size: int, thinking: str = "off",
                   progress: bool = True) -> dict[str, torch.Tensor]:
    """The original model's top-`TOP_K` log-probabilities at each position of its own completions."""
    width = max((len(c) for c in completions), default=0)
    values = indices = None
    lengths = torch.tensor([len(c) for c in completions], dtype=torch.int32)
    for batch, logprobs, _ in completion_logprobs(model, tokenizer, prompts, completions, batch_size, thinking, progress):
        k = min(TOP_K, logprobs.shape[-1])
        if values is None:
            values = torch.full((len(prompts), width, k), float("-inf"))
            indices = torch.zeros((len(prompts), width, k), dtype=torch.int32)
        top = logprobs.topk(k, dim=-1)
        values[batch, : logprobs.shape[1]] = top.values
        indices[batch, : logprobs.shape[1]] = top.indices.to(torch.int32)
    assert values is not None and indices is not None
    ids = torch.full((len(prompts), width), -1, dtype=torch.int64)
    for row, completion in enumerate(completions):
        ids[row, : len(completion)] = torch.tensor(list(completion), dtype=torch.int64)
    return {"values": values, "indices": indices, "lengths": lengths, "ids": ids}


def topk_kl(values: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(reference || edited) per position from the reference's top-k and the edited full log-probabilities,
    with the reference's remaining mass as one bucket: a lower bound of the full KL, equal to it when the
    top-k hold all the mass; 0 for identical models."""
    values, q_top = values.double(), logprobs.double().gather(-1, indices.long())
    p_top = values.exp()
    head = (p_top * (values - q_top)).nan_to_num(0.0).sum(-1)
    tail_p = (1 - p_top.sum(-1)).clamp(min=0.0)
    tail_q = (1 - q_top.exp().sum(-1)).clamp(min=1e-30)
    tail = torch.where(tail_p > 1e-12, tail_p * (tail_p.clamp(min=1e-30).log() - tail_q.log()), torch.zeros_like(tail_p))
    return head + tail


def per_token_kl(reference: dict[str, torch.Tensor], model, tokenizer, prompts, batch_size: int,
                 thinking: str = "off", progress: bool = True) -> float:
    """Mean over prompts of the mean per-position KL over the reference completions (teacher-forced)."""
    lengths = reference["lengths"].tolist()
    completions = [reference["ids"][row, :length].tolist() for row, length in enumerate(lengths)]
    per_prompt = torch.zeros(len(prompts), dtype=torch.float64)
    for batch, logprobs, batch_lengths in completion_logprobs(model, tokenizer, prompts, completions, batch_size, thinking, progress):
        width = logprobs.shape[1]
        kl = topk_kl(reference["values"][batch, :width], reference["indices"][batch, :width], logprobs)
        for row, index in enumerate(batch):
            length = int(batch_lengths[row])
            per_prompt[index] = kl[row, :length].mean() if length else 0.0
    return float(per_prompt.mean().clamp(min=0.0))
