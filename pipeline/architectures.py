"""Where each supported model family writes into the residual stream.

Abliteration edits exactly the tensors whose output is *added* to the residual
stream: the attention output projection and the MLP down projection (every
routed expert and every shared expert of an MoE block, plus their biases).
Their names differ between the checkpoint on disk and the loaded model in
memory, because transformers v5 fuses per-expert `nn.Linear`s into one 3D
parameter when it loads a checkpoint. So this module keeps ONE table with
both spellings and the axis that indexes the hidden dimension in each.

Names are matched with anchored regexes whose `layer` group is parsed as an
integer: asking about layer 4 can never touch layer 40, and tensors of layers
the model does not run (GLM-4.5's multi-token-prediction layer 46, stored in
the checkpoint past `num_hidden_layers`) are never edited.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from torch import nn

from pipeline.errors import PipelineError

Component = Literal["attn", "mlp"]
Where = Literal["disk", "memory"]


@dataclass(frozen=True)
class Writer:
    """One family of residual-writing tensors: a full-name regex with a `layer` group."""

    pattern: re.Pattern[str]
    hidden_axis: int
    """Axis of length hidden_size: Linear weight [hidden, in] -> 0, bias [hidden] -> 0,
    fused experts [E, hidden, inter] -> 1, gpt-oss experts [E, inter, hidden] -> 2, their bias [E, hidden] -> 1."""
    component: Component


@dataclass(frozen=True)
class Match:
    """What `residual_writers` found out about one tensor name."""

    layer: int
    hidden_axis: int
    component: Component


@dataclass(frozen=True)
class Architecture:
    model_type: str
    layers_path: str
    """Attribute path from the loaded `*ForCausalLM` to its decoder `nn.ModuleList`."""
    writers: Mapping[Where, tuple[Writer, ...]]
    embed_names: Mapping[Where, str]
    """The token embedding [vocab, hidden] (hidden axis 1), edited only when `ablate.embed.enabled`."""
    moe_keys: tuple[str, ...]
    """config.json fields holding the routed-expert count; a positive value means MoE."""
    text_config_key: str | None = None
    """Where the decoder's config nests inside config.json (multimodal families), or None when it is top-level."""
    exact: bool = True
    """False when a norm sits between the edited projection and the residual add, so the edit
    removes the direction from the projection's output but not from what reaches the residual."""
    note: str = ""


def _writers(prefix: str, specs: tuple[tuple[str, int, Component], ...]) -> tuple[Writer, ...]:
    """Compile (suffix regex, hidden axis, component) specs under a `prefix.<layer>.` stem."""
    return tuple(
        Writer(re.compile(rf"{re.escape(prefix)}\.(?P<layer>\d+)\.{suffix}"), axis, component)
        for suffix, axis, component in specs
    )


# Suffix regexes (after "<prefix>.<layer>."). Linear weights [hidden, in] and biases [hidden] both
# have the hidden dimension on axis 0; a pattern for a bias the family lacks simply never matches.
_O_PROJ = (r"self_attn\.o_proj\.(?:weight|bias)", 0, "attn")
_DENSE_DOWN = (r"mlp\.down_proj\.(?:weight|bias)", 0, "mlp")
_SHARED_DOWN = (r"mlp\.shared_experts\.down_proj\.weight", 0, "mlp")
_EXPERT_DOWN_DISK = (r"mlp\.experts\.\d+\.down_proj\.weight", 0, "mlp")  # one [hidden, inter] per expert
_EXPERT_DOWN_FUSED = (r"mlp\.experts\.down_proj", 1, "mlp")  # [E, hidden, inter]
_MIXTRAL_W2_DISK = (r"block_sparse_moe\.experts\.\d+\.w2\.weight", 0, "mlp")  # [hidden, inter]
_GPT_OSS_DOWN = (r"mlp\.experts\.down_proj", 2, "mlp")  # [E, inter, hidden] on disk and in memory
_GPT_OSS_DOWN_BIAS = (r"mlp\.experts\.down_proj_bias", 1, "mlp")  # [E, hidden]

_GEMMA3_NOTE = (
    "approximate: Gemma 3 applies post_attention_layernorm / post_feedforward_layernorm to the "
    "o_proj / MLP output before the residual add, and a norm's learned gain can re-introduce the "
    "direction; the edit removes it from the projections' outputs, not exactly from the residual"
)


def _dense(model_type: str) -> Architecture:
    writers = _writers("model.layers", (_O_PROJ, _DENSE_DOWN))
    return Architecture(
        model_type=model_type,
        layers_path="model.layers",
        writers={"disk": writers, "memory": writers},
        embed_names={"disk": "model.embed_tokens.weight", "memory": "model.embed_tokens.weight"},
        moe_keys=(),
    )


def _routed(model_type: str, moe_key: str, shared: bool) -> Architecture:
    """Families whose experts are per-expert `mlp.experts.J.down_proj` on disk and fused in memory.

    The dense `mlp.down_proj` stays in the table: DeepSeek-V3 / GLM-4.5 (first_k_dense_replace)
    and Qwen3-MoE (mlp_only_layers) keep dense MLPs in some layers.
    """
    common = (_O_PROJ, _DENSE_DOWN) + ((_SHARED_DOWN,) if shared else ())
    return Architecture(
        model_type=model_type,
        layers_path="model.layers",
        writers={
            "disk": _writers("model.layers", common + (_EXPERT_DOWN_DISK,)),
            "memory": _writers("model.layers", common + (_EXPERT_DOWN_FUSED,)),
        },
        embed_names={"disk": "model.embed_tokens.weight", "memory": "model.embed_tokens.weight"},
        moe_keys=(moe_key,),
    )


_GPT_OSS_WRITERS = _writers("model.layers", (_O_PROJ, _GPT_OSS_DOWN, _GPT_OSS_DOWN_BIAS))
_GEMMA3_DENSE = (_O_PROJ, _DENSE_DOWN)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _dense("llama"),
    "mistral": _dense("mistral"),
    "qwen2": _dense("qwen2"),
    "qwen3": _dense("qwen3"),
    "qwen3_moe": _routed("qwen3_moe", "num_experts", shared=False),
    "glm4_moe": _routed("glm4_moe", "n_routed_experts", shared=True),
    "deepseek_v3": _routed("deepseek_v3", "n_routed_experts", shared=True),
    "mixtral": Architecture(
        model_type="mixtral",
        layers_path="model.layers",
        writers={
            "disk": _writers("model.layers", (_O_PROJ, _MIXTRAL_W2_DISK)),
            "memory": _writers("model.layers", (_O_PROJ, _EXPERT_DOWN_FUSED)),
        },
        embed_names={"disk": "model.embed_tokens.weight", "memory": "model.embed_tokens.weight"},
        moe_keys=("num_local_experts",),
    ),
    "gpt_oss": Architecture(
        model_type="gpt_oss",
        layers_path="model.layers",
        writers={"disk": _GPT_OSS_WRITERS, "memory": _GPT_OSS_WRITERS},
        embed_names={"disk": "model.embed_tokens.weight", "memory": "model.embed_tokens.weight"},
        moe_keys=("num_local_experts",),
    ),
    "gemma3_text": Architecture(
        model_type="gemma3_text",
        layers_path="model.layers",
        writers={
            "disk": _writers("model.layers", _GEMMA3_DENSE),
            "memory": _writers("model.layers", _GEMMA3_DENSE),
        },
        embed_names={"disk": "model.embed_tokens.weight", "memory": "model.embed_tokens.weight"},
        moe_keys=(),
        exact=False,
        note=_GEMMA3_NOTE,
    ),
    # Multimodal Gemma 3 (google/gemma-3-*-it): AutoModelForCausalLM loads Gemma3ForConditionalGeneration;
    # only the language model is edited, the vision tower and projector are copied unchanged.
    "gemma3": Architecture(
        model_type="gemma3",
        layers_path="model.language_model.layers",
        writers={
            "disk": _writers("language_model.model.layers", _GEMMA3_DENSE),
            "memory": _writers("model.language_model.layers", _GEMMA3_DENSE),
        },
        embed_names={
            "disk": "language_model.model.embed_tokens.weight",
            "memory": "model.language_model.embed_tokens.weight",
        },
        moe_keys=(),
        text_config_key="text_config",
        exact=False,
        note=_GEMMA3_NOTE,
    ),
}

_ALL_MOE_KEYS = tuple(sorted({key for arch in ARCHITECTURES.values() for key in arch.moe_keys}))


def get_architecture(model_type: str) -> Architecture:
    """The table row for `model_type`, or a one-line PipelineError listing what is supported."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise PipelineError(
            f"model_type {model_type!r} is not supported; supported families: {supported} "
            "(add a row to pipeline/architectures.py for a new family)"
        ) from None


def text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The decoder's own config: nested under e.g. `text_config` for multimodal families.

    A flat mapping (a preset's `arch` block, which copies the nested facts up) is returned as is.
    """
    arch = ARCHITECTURES.get(str(config.get("model_type")))
    if arch is not None and arch.text_config_key is not None:
        return config.get(arch.text_config_key) or config
    return config


def num_decoder_layers(config: Mapping[str, Any]) -> int:
    """How many decoder layers the model runs (extra stored layers, e.g. MTP, excluded)."""
    value = text_config(config).get("num_hidden_layers")
    if not isinstance(value, int) or value <= 0:
        raise PipelineError(f"config has no positive num_hidden_layers (got {value!r}); is config.json complete?")
    return value


def is_moe(config: Mapping[str, Any]) -> bool:
    """True when the config declares routed experts (a positive expert count).

    Reads the family's expert-count field (or every known one for an unknown family);
    `num_experts: 0` or `null` means dense, as in dense Qwen configs that carry the key.
    """
    arch = ARCHITECTURES.get(str(config.get("model_type")))
    keys = arch.moe_keys if arch is not None else _ALL_MOE_KEYS
    fields = text_config(config)
    return any(isinstance(fields.get(key), int) and fields[key] > 0 for key in keys)


def residual_writers(arch: Architecture, tensor_name: str, num_layers: int, where: Where) -> Match | None:
    """(layer, hidden axis, component) when `tensor_name` writes into the residual stream of a
    decoder layer the model runs; None for every other tensor and for layers >= num_layers."""
    for writer in arch.writers[where]:
        found = writer.pattern.fullmatch(tensor_name)
        if found is not None:
            layer = int(found.group("layer"))
            if layer >= num_layers:
                return None
            return Match(layer=layer, hidden_axis=writer.hidden_axis, component=writer.component)
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The loaded model's decoder layers, in order (for forward hooks)."""
    arch = get_architecture(model.config.model_type)
    module: Any = model
    for attribute in arch.layers_path.split("."):
        module = getattr(module, attribute)
    if not isinstance(module, nn.ModuleList):
        raise PipelineError(
            f"{type(model).__name__}.{arch.layers_path} is not a ModuleList; "
            "the architecture table does not match this transformers version"
        )
    return module
