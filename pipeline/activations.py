"""Reading the residual stream: chat-templated, length-sorted, left-padded batches through the base model.

Hidden-state indices are named explicitly because peers get them off by one:
`decoder_outputs[:, i]` is the residual stream at the OUTPUT of decoder layer i
(0-based); the embedding output is kept apart as `embed`. We hook the decoder
layers instead of asking for `output_hidden_states`, because the last entry of
Hugging Face's hidden states already has the final norm applied, and we call
the base model so the lm_head (about 1.4x of the cost on the 0.5B default) and
the KV cache are never computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from pipeline.architectures import decoder_layers


@dataclass(frozen=True)
class Residuals:
    decoder_outputs: torch.Tensor  # [n_prompts, num_layers, hidden], float32, original prompt order
    embed: torch.Tensor  # [n_prompts, hidden], float32


def render_prompts(tokenizer, prompts: Sequence[str]) -> list[str]:
    """The exact text the model sees: a single user turn and the assistant header."""
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        for prompt in prompts
    ]


def post_instruction_length(tokenizer) -> int:
    """How many template tokens follow the user's message (e.g. `<|im_end|>\\n<|im_start|>assistant\\n`)."""
    marker = "\u2063MARKER\u2063"
    rendered = render_prompts(tokenizer, [marker])[0]
    suffix = rendered[rendered.index(marker) + len(marker):]
    return max(1, len(tokenizer(suffix, add_special_tokens=False)["input_ids"]))


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
    order = sorted(range(len(lengths)), key=lambda index: (lengths[index], index))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


@torch.inference_mode()
def collect_residuals(
    model,
    tokenizer,
    prompts: Sequence[str],
    batch_size: int | str = 16,
    positions: str = "last",
    progress: bool = True,
    description: str = "collect",
) -> Residuals:
    """Residual stream at the chosen positions for every decoder layer.

    `positions`: "last" (the last prompt token, i.e. the end of the assistant header),
    or "post_instruction_mean" (mean over the template tokens after the user message).
    `batch_size="auto"` starts large and halves on out-of-memory instead of crashing.
    """
    rendered = render_prompts(tokenizer, prompts)
    tokens = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]
    span = 1 if positions == "last" else post_instruction_length(tokenizer)
    layers = decoder_layers(model)
    captured: list[torch.Tensor] = []

    def capture(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        captured.append(hidden[:, -span:, :].float().mean(dim=1).cpu())

    size = 64 if batch_size == "auto" else int(batch_size)
    outputs = torch.empty((len(prompts), len(layers), model.config.get_text_config().hidden_size))
    embeds = torch.empty((len(prompts), outputs.shape[-1]))
    handles = [layer.register_forward_hook(capture) for layer in layers]
    handles.append(model.get_input_embeddings().register_forward_hook(capture))
    device = model.get_input_embeddings().weight.device
    base = model.base_model
    try:
        pending = length_sorted_batches([len(t) for t in tokens], size)
        bar = tqdm(total=len(prompts), desc=description, disable=not progress, unit="prompt")
        while pending:
            batch = pending.pop(0)
            captured.clear()
            inputs = {k: v.to(device) for k, v in left_padded_batch([tokens[i] for i in batch], tokenizer.pad_token_id).items()}
            try:
                base(**inputs, use_cache=False)
            except (RuntimeError, torch.OutOfMemoryError) as error:
                if batch_size != "auto" or len(batch) == 1 or not is_out_of_memory(error):
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                half = len(batch) // 2
                pending[:0] = [batch[:half], batch[half:]]
                continue
            embeds[batch] = captured[0]  # the embedding hook fires first
            outputs[batch] = torch.stack(captured[1:], dim=1)
            bar.update(len(batch))
        bar.close()
    finally:
        for handle in handles:
            handle.remove()
    return Residuals(decoder_outputs=outputs, embed=embeds)
