"""Reading the residual stream: chat-templated, length-sorted, left-padded batches through the base model.

Hidden-state indices are named explicitly because peers get them off by one:
`layers[:, i]` is the residual stream at the OUTPUT of decoder layer i (0-based);
the embedding output is kept apart as `embed`. We hook the decoder layers
instead of asking for `output_hidden_states`, because the last entry of
Hugging Face's hidden states already has the final norm applied, and we call
the base model so the lm_head (about 1.4x of the cost on the 0.5B default) and
the KV cache are never computed. The final norm still runs: it is one
elementwise op per forward, and skipping it would mean re-implementing each
architecture's forward.

Left padding puts every prompt's last tokens in the same columns, so "the
last k tokens" is one slice of the whole batch; explicit position ids start at
0 on each prompt's first real token, so a prompt's activations do not depend
on how much padding its batch needed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from pipeline.architectures import decoder_layers
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

POSITIONS = ("last", "post_instruction", "post_instruction_mean")
"""`last`: the last prompt token (the end of the assistant header). `post_instruction`: each of the
template tokens after the user message, kept apart. `post_instruction_mean`: their mean."""

AUTO_BATCH_START = 64
"""`batch_size=auto` tries this many prompts per forward first and halves on out-of-memory. A power of
two, so every smaller size it falls back to divides the prompts already done: the batches are then
exactly those of a fixed-size run at the final size."""


@dataclass(frozen=True)
class ResidualBatch:
    """One forward pass's residuals at the captured positions, on CPU, float32."""

    indices: list[int]
    """Which prompts (indices into the caller's list) the rows belong to."""
    layers: torch.Tensor
    """[batch, num_layers, span, hidden]: output of decoder layer i at each of the last `span` tokens."""
    embed: torch.Tensor
    """[batch, span, hidden]: the token embeddings at the same tokens."""


THINKING = ("off", "on", "template")
"""`collect.thinking` / `eval.thinking`: `off` and `on` pass `enable_thinking=False/True` to a chat template
that reads that variable (Qwen3, DeepSeek-R1 distills' newer templates, SmolLM3...); `template` passes
nothing. A template that does not mention `enable_thinking` is rendered unchanged by all three."""


def thinking_kwargs(tokenizer, thinking: str = "off") -> dict[str, bool]:
    """The extra template variable for `thinking`; transformers hands unknown keyword arguments of
    `apply_chat_template` to the Jinja template as variables."""
    if thinking not in THINKING:
        raise PipelineError(f"thinking={thinking!r} is not one of {', '.join(THINKING)}")
    template = tokenizer.chat_template
    text = " ".join(template.values()) if isinstance(template, dict) else str(template or "")
    if thinking == "template" or "enable_thinking" not in text:
        return {}
    return {"enable_thinking": thinking == "on"}


def render_prompts(tokenizer, prompts: Sequence[str], thinking: str = "off") -> list[str]:
    """The exact text the model sees: a single user turn and the assistant header."""
    extra = thinking_kwargs(tokenizer, thinking)
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False, **extra
        )
        for prompt in prompts
    ]


def prompt_tokens(tokenizer, prompts: Sequence[str], thinking: str = "off") -> list[list[int]]:
    """Token ids of each rendered prompt (the template supplies every special token)."""
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in render_prompts(tokenizer, prompts, thinking)]


def post_instruction_ids(tokenizer, thinking: str = "off") -> list[int]:
    """Token ids of the template text after the user's message (e.g. `<|im_end|>\\n<|im_start|>assistant\\n`)."""
    marker = "\u2063MARKER\u2063"
    rendered = render_prompts(tokenizer, [marker], thinking)[0]
    suffix = rendered[rendered.index(marker) + len(marker):]
    ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    if not ids:
        raise PipelineError("the chat template adds nothing after the user message; use collect.positions=last")
    return ids


def position_span(tokenizer, token_lists: Sequence[Sequence[int]], positions: str, thinking: str = "off") -> int:
    """How many trailing tokens of every prompt `positions` reads.

    For the post-instruction positions, every prompt must end with exactly the template's suffix
    tokens: a tokenizer that merged the message's end into the suffix would shift the positions.
    """
    if positions not in POSITIONS:
        raise PipelineError(f"collect.positions={positions!r} is not one of {', '.join(POSITIONS)}")
    if positions == "last":
        return 1
    suffix = post_instruction_ids(tokenizer, thinking)
    for index, tokens in enumerate(token_lists):
        if list(tokens[-len(suffix):]) != suffix or len(tokens) == len(suffix):
            raise PipelineError(
                f"prompt {index} does not end with the template's {len(suffix)} post-instruction tokens "
                f"{suffix}; the tokenizer merges across the message boundary, use collect.positions=last"
            )
    return len(suffix)


def left_padded_batch(token_lists: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded ids, mask and position ids that start at 0 on each prompt's first real token."""
    width = max(len(tokens) for tokens in token_lists)
    input_ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        input_ids[row, width - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
        attention_mask[row, width - len(tokens):] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped so each batch holds prompts of similar length: padding is minimal."""
    order = length_order(lengths)
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def length_order(lengths: Sequence[int]) -> list[int]:
    """Indices by (length, index): the order batches are cut from."""
    return sorted(range(len(lengths)), key=lambda index: (lengths[index], index))


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA/XPU/MPS raise OutOfMemoryError; CPU allocators raise RuntimeError with their own wording."""
    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def input_device(model) -> torch.device:
    """Where the token ids must go: the embedding's execution device.

    With accelerate offload the embedding weight may sit on the `meta` device between calls; its
    dispatch hook then names the device it runs on.
    """
    embeddings = model.get_input_embeddings()
    hook_device = getattr(getattr(embeddings, "_hf_hook", None), "execution_device", None)
    if hook_device is not None:
        return torch.device(hook_device)
    device = embeddings.weight.device
    return torch.device("cpu") if device.type == "meta" else device


def num_layers_and_hidden(model) -> tuple[int, int]:
    return len(decoder_layers(model)), int(model.config.get_text_config().hidden_size)


@torch.inference_mode()
def residual_batches(
    model,
    token_lists: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int | str = 16,
    span: int = 1,
    progress: bool = True,
    description: str = "collect",
) -> Iterator[ResidualBatch]:
    """Residuals of every decoder layer at each prompt's last `span` tokens, one batch at a time.

    Batches come in length order; `ResidualBatch.indices` says where each row belongs.
    `batch_size="auto"` starts at `AUTO_BATCH_START` and halves on out-of-memory instead of crashing.
    """
    layers = decoder_layers(model)
    captured: list[torch.Tensor] = []

    def capture(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        # A copy on the layer's own device: a view would keep the whole [batch, seq, hidden] state alive,
        # and moving to CPU here would make an accelerator wait for the host after every layer.
        captured.append(hidden[:, -span:, :].to(dtype=torch.float32, copy=True))

    handles = [model.get_input_embeddings().register_forward_hook(capture)]
    handles += [layer.register_forward_hook(capture) for layer in layers]
    device = input_device(model)
    base = model.base_model
    order = length_order([len(tokens) for tokens in token_lists])
    size = AUTO_BATCH_START if batch_size == "auto" else int(batch_size)
    done = 0
    bar = tqdm(total=len(order), desc=description, disable=not progress, unit="prompt")
    try:
        while done < len(order):
            batch = order[done:done + size]
            captured.clear()
            inputs = left_padded_batch([token_lists[i] for i in batch], pad_id)
            try:
                base(**{name: value.to(device) for name, value in inputs.items()}, use_cache=False)
            except (RuntimeError, torch.OutOfMemoryError) as error:
                if batch_size != "auto" or len(batch) == 1 or not is_out_of_memory(error):
                    raise
                captured.clear()
                _release_cached_memory()
                while size >= len(batch):  # stays a power of two, below the batch that failed
                    size //= 2
                log.warning("%s: out of memory at %d prompts per batch; retrying with %d", description, len(batch), size)
                continue
            embed, *outputs = (tensor.cpu() for tensor in captured)  # the embedding hook fires first
            yield ResidualBatch(indices=batch, layers=torch.stack(outputs, dim=1), embed=embed)
            done += len(batch)
            bar.update(len(batch))
    finally:
        bar.close()
        for handle in handles:
            handle.remove()


def _release_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
