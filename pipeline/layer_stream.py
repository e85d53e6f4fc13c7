"""Layer streaming: one forward pass over many prompts through a model bigger than memory.

The in-memory collect runs each batch through every layer. Here the loop order is swapped: every
batch goes through decoder layer i, then layer i is freed and layer i+1 read, so each weight is read
from disk once and memory holds one decoder layer plus the prompts' hidden states.

1. The skeleton: the model built without weights (accelerate's `init_empty_weights`, buffers such as
   rotary frequencies real), then only the tensors outside the decoder layers (embeddings, final
   norm, and the head when asked for) loaded from the shards.
2. The calls: every decoder layer is replaced by a `_Recorder` that keeps the (args, kwargs) the
   model's own forward hands it and returns its input, and the skeleton's base model runs once per
   batch. So each layer later gets exactly what the model would give it: the attention mask of its
   layer type (sliding window included, left padding included), position ids, position embeddings
   (Gemma 3's local and global ones), cache flags. No family's forward is re-implemented.
3. The layers: for layer i, its tensors are read from the shards (`safe_open`, `READ_BACKEND`; the
   next layer is read in a thread while this one computes), converted as `from_pretrained` converts
   them (transformers' own weight conversions: per-expert tensors fused, renamed prefixes), run on
   every batch's hidden state and put back on the meta device.

Per-layer loading goes through `transformers.core_model_loading.convert_and_load_state_dict_in_model`,
the function `from_pretrained` itself calls, so the loaded parameters are the ones it would load.
Collect streams residuals (`residual_batches_of`); the forward-only scores stream logits through the head
(`pipeline.forward_scores`, `head=True`).
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.activations import ResidualBatch, left_padded_batch, length_order
from pipeline.architectures import decoder_layers, get_architecture
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

STREAM_BATCH_AUTO = 64
"""`collect.batch_size=auto` under streaming: a fixed size (a streamed run cannot halve a batch that ran
through earlier layers); memory per batch is activations of one layer, not of the model."""

READ_BACKEND = "pread"
"""How tensors leave the shards: `pread` copies each tensor's byte range into fresh memory. With `mmap` every page
ever read stays mapped (and counted in the RSS) until the shard is closed: on the packaged model that put the whole
checkpoint in the streamed collect's peak RSS (1508 MiB against 1421 MiB in memory; bench/RESULTS.md)."""

_LAYER_KEY = re.compile(r"^(?P<prefix>.+?)\.(?P<layer>\d+)\.")


class _Recorder(nn.Module):
    """Stands in for decoder layer `index` while the skeleton runs: keeps its call, returns its input."""

    def __init__(self, layer: nn.Module, calls: list):
        super().__init__()
        object.__setattr__(self, "_layer", layer)  # not a submodule: the skeleton's state dict is unchanged
        object.__setattr__(self, "_calls", calls)

    def __getattr__(self, name: str) -> Any:  # a forward that reads e.g. `layer.attention_type` still works
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        self._calls.append((rest, kwargs, hidden))
        return hidden


class LayerStream:
    """A checkpoint directory opened for layer-by-layer forward passes; stands where a loaded model would.

    `config`, `base_model`, `get_input_embeddings()` and the decoder layers (on the meta device) are
    the skeleton's, so `decoder_layers`, `num_layers_and_hidden` and the artifact metadata read it as
    they read a loaded model.
    """

    def __init__(self, model_dir: Path, dtype: str, device: str | torch.device = "cpu", head: bool = False,
                 trust_remote_code: bool = False):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.conversion_mapping import get_model_conversion_mapping

        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        config = AutoConfig.from_pretrained(self.model_dir, trust_remote_code=trust_remote_code)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype, trust_remote_code=trust_remote_code)
        self.skeleton = model.eval()
        self.config = model.config
        self._weight_mapping = get_model_conversion_mapping(model)
        self._dtype_plan = model._get_dtype_plan(self.dtype)
        self.layers = decoder_layers(model)
        self.num_layers = len(self.layers)
        self._handles: dict[str, Any] = {}
        self.layer_keys, other_keys = self._index_keys(head)
        self._load(other_keys)
        # a tied LM head is the embedding, tied as from_pretrained ties it
        unread = {name for name, tensor in model.state_dict().items() if tensor.is_meta and not _in_layers(name, model)}
        model.tie_weights(missing_keys=unread, recompute_mapping=False)
        for name, buffer in list(model.named_buffers()):
            if not name.startswith(_layers_path(model) + "."):
                _set_tensor(model, name, buffer.to(self.device))
        missing = [name for name, tensor in model.state_dict().items()
                   if tensor.is_meta and not _in_layers(name, model) and (head or not name.startswith("lm_head"))]
        if missing:
            raise PipelineError(f"{self.model_dir}: no tensor for {', '.join(missing[:3])} in the safetensors shards")

    # --- what the rest of the pipeline reads off a model ---------------------------------------------------

    def __getattr__(self, name: str) -> Any:  # config, base_model, get_input_embeddings, the layers' path...
        skeleton = self.__dict__.get("skeleton")
        if skeleton is None:
            raise AttributeError(name)
        return getattr(skeleton, name)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    # --- the checkpoint ---------------------------------------------------------------------------------

    def _shard(self, file: str):
        from safetensors import safe_open

        if file not in self._handles:
            handle = safe_open(self.model_dir / file, framework="pt", device="cpu", backend=READ_BACKEND)
            self._handles[file] = handle.__enter__()
        return self._handles[file]

    def _index_keys(self, head: bool) -> tuple[list[list[tuple[str, str]]], list[tuple[str, str]]]:
        """(file, key) of each decoder layer's tensors, and of the tensors outside the layers. Keys of layers
        the model does not run (GLM-4.5's MTP layer) and, unless `head`, of the LM head are never read."""
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        meta = self.skeleton.state_dict()
        renamings = [entry for entry in self._weight_mapping if isinstance(entry, WeightRenaming)]
        converters = [entry for entry in self._weight_mapping if isinstance(entry, WeightConverter)]
        prefix = _layers_path(self.skeleton)
        layers: list[list[tuple[str, str]]] = [[] for _ in range(self.num_layers)]
        others: list[tuple[str, str]] = []
        for file in sorted(path.name for path in self.model_dir.glob("*.safetensors")):
            for key in self._shard(file).keys():
                renamed, _ = rename_source_key(key, renamings, converters, self.skeleton.base_model_prefix, meta)
                found = _LAYER_KEY.match(renamed)
                if found is not None and found.group("prefix") == prefix:
                    layer = int(found.group("layer"))
                    if layer < self.num_layers:
                        layers[layer].append((file, key))
                elif renamed in meta and (head or not renamed.startswith("lm_head")):
                    others.append((file, key))
        if not any(layers):
            raise PipelineError(f"{self.model_dir}: no decoder-layer tensors under {prefix} in the safetensors shards")
        return layers, others

    def read(self, keys: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
        """The tensors, read from the shards into memory (`READ_BACKEND`)."""
        return {key: self._shard(file).get_tensor(key) for file, key in keys}

    def _load(self, keys_or_tensors: Sequence[tuple[str, str]] | Mapping[str, torch.Tensor]) -> None:
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        tensors = keys_or_tensors if isinstance(keys_or_tensors, Mapping) else self.read(keys_or_tensors)
        config = LoadStateDictConfig(
            device_map={"": self.device}, dtype=self.dtype, dtype_plan=self._dtype_plan, weight_mapping=self._weight_mapping
        )
        with _quiet_transformers():
            info, _ = convert_and_load_state_dict_in_model(self.skeleton, dict(tensors), config)
        if info.mismatched_keys or info.conversion_errors:
            problem = sorted(info.mismatched_keys)[:3] or list(info.conversion_errors)[:3]
            raise PipelineError(f"{self.model_dir}: tensors do not fit the model built from config.json: {problem}")

    @contextmanager
    def layer(self, index: int, tensors: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
        """Decoder layer `index` with its weights, for the duration of the block; back on meta after it."""
        module = self.layers[index]
        try:
            self._load(tensors)
            missing = [name for name, tensor in module.named_parameters() if tensor.is_meta]
            if missing:
                raise PipelineError(f"{self.model_dir}: decoder layer {index} has no tensor for {missing[0]} in the shards")
            for name, buffer in list(module.named_buffers()):  # a layer's own buffers stay between uses (small)
                if buffer.device != self.device:
                    _set_tensor(module, name, buffer.to(self.device))
            yield module
        finally:
            for sub in module.modules():  # parameters back to meta: the memory is freed
                for name, parameter in sub._parameters.items():
                    if parameter is not None:
                        sub._parameters[name] = nn.Parameter(parameter.to("meta"), requires_grad=False)

    def layer_bytes(self) -> list[int]:
        """Bytes of each decoder layer's tensors in the compute dtype (for memory estimates)."""
        return [sum(_numel(self._shard(file), key) for file, key in keys) * self.dtype.itemsize for keys in self.layer_keys]

    # --- forward passes ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def layer_calls(self, inputs: Mapping[str, torch.Tensor]) -> tuple[list[tuple], torch.Tensor, torch.Tensor]:
        """(per-layer (args, kwargs), hidden state entering layer 0, embedding output) of one batch."""
        calls: list = []
        embeds: list[torch.Tensor] = []
        originals = list(self.layers)
        for index, layer in enumerate(originals):
            self.layers[index] = _Recorder(layer, calls)
        handle = self.get_input_embeddings().register_forward_hook(lambda _m, _i, output: embeds.append(output))
        try:
            self.base_model(**{name: value.to(self.device) for name, value in inputs.items()}, use_cache=False)
        finally:
            handle.remove()
            for index, layer in enumerate(originals):
                self.layers[index] = layer
        if len(calls) != self.num_layers:
            raise PipelineError(f"the model's forward called {len(calls)} of its {self.num_layers} decoder layers")
        hidden = calls[0][2]
        return [(args, kwargs) for args, kwargs, _ in calls], hidden, embeds[0]

    def layer_weights(self, progress: bool = True, description: str = "stream") -> Iterator[tuple[int, nn.Module]]:
        """(index, materialized decoder layer) in order; the next layer's tensors are read while this one runs."""
        bar = tqdm(total=self.num_layers, desc=description, disable=not progress, unit="layer")
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-prefetch") as pool:
            pending = pool.submit(self.read, self.layer_keys[0])
            try:
                for index in range(self.num_layers):
                    tensors = pending.result()
                    if index + 1 < self.num_layers:
                        pending = pool.submit(self.read, self.layer_keys[index + 1])
                    with self.layer(index, tensors) as module:
                        del tensors
                        yield index, module
                    bar.update(1)
            finally:
                pending.cancel()
                bar.close()

    @torch.inference_mode()
    def residual_batches_of(
        self,
        groups: Sequence[Sequence[Sequence[int]]],
        pad_id: int,
        batch_size: int | str = 16,
        span: int = 1,
        progress: bool = True,
        description: str = "collect",
    ) -> list[list[ResidualBatch]]:
        """What `pipeline.activations.residual_batches` yields for each group of prompts (e.g. harmful,
        harmless), computed layer by layer, all groups in one pass over the weights. Each group is cut into
        the batches the in-memory path cuts (length order, `batch_size`)."""
        size = STREAM_BATCH_AUTO if batch_size == "auto" else int(batch_size)
        batches: list[tuple[int, list[int]]] = []
        for group, token_lists in enumerate(groups):
            order = length_order([len(tokens) for tokens in token_lists])
            batches += [(group, order[start:start + size]) for start in range(0, len(order), size)]
        calls, states, embeds = [], [], []
        for group, batch in batches:
            layer_calls, hidden, embed = self.layer_calls(left_padded_batch([groups[group][i] for i in batch], pad_id))
            calls.append(layer_calls)
            states.append(hidden)
            # the copy the in-memory hook makes (float32 on the module's device), then to the CPU
            embeds.append(embed[:, -span:, :].to(dtype=torch.float32, copy=True).cpu())
        place = self.state_device(states)
        states = [state.to(place) for state in states]
        captured: list[list[torch.Tensor]] = [[] for _ in batches]
        for index, module in self.layer_weights(progress, description):
            for number, state in enumerate(states):
                args, kwargs = calls[number][index]
                output = module(state.to(self.device), *args, **kwargs)
                hidden = output[0] if isinstance(output, tuple) else output
                captured[number].append(hidden[:, -span:, :].to(dtype=torch.float32, copy=True).cpu())
                states[number] = hidden.to(place)
        results: list[list[ResidualBatch]] = [[] for _ in groups]
        for (group, batch), embed, layers in zip(batches, embeds, captured):
            results[group].append(ResidualBatch(indices=batch, layers=torch.stack(layers, dim=1), embed=embed))
        return results

    def state_device(self, states: Sequence[torch.Tensor]) -> torch.device:
        """The compute device when every batch's hidden state fits beside the largest layer, else the CPU."""
        if self.device.type == "cpu":
            return self.device
        needed = sum(state.numel() * state.element_size() for state in states) + max(self.layer_bytes())
        free, _ = torch.cuda.mem_get_info(self.device) if self.device.type == "cuda" else (0, 0)
        place = self.device if needed * 1.25 < free else torch.device("cpu")
        log.info("layer streaming: hidden states on %s (%.2f GiB with the largest layer)", place, needed / 2**30)
        return place


def memory_budget(model_cfg: Mapping[str, Any]) -> int:
    """Bytes accelerate would place the model in: `model.max_memory` when set, else free memory (free GPU
    memory when `model.device_map` is not the CPU and a GPU is present, plus available RAM). Disk offload
    is not counted: it is the slow path streaming replaces."""
    from accelerate.utils import get_max_memory

    limits = get_max_memory(dict(model_cfg["max_memory"]) if model_cfg.get("max_memory") else None)
    if model_cfg.get("device_map") in (None, "cpu"):
        limits = {device: size for device, size in limits.items() if device == "cpu"}
    return int(sum(size for device, size in limits.items() if device != "disk"))


def choose(setting: str, model_cfg: Mapping[str, Any], model_dir: Path, dtype: str,
           key: str = "collect.streaming") -> tuple[str, str]:
    """(`off` or `layers`, why) for `key` (`collect.streaming`, `eval.streaming`); `auto` streams when the model
    exceeds `memory_budget`."""
    if setting in ("off", "layers"):
        return setting, f"{key}={setting}"
    if setting != "auto":
        raise PipelineError(f"{key}={setting!r} is not one of off, layers, auto")
    need, budget = checkpoint_bytes(model_dir, dtype), memory_budget(model_cfg)
    chosen = "layers" if need > budget else "off"
    return chosen, f"auto: model {need / 2**30:.2f} GiB in {dtype}, memory {budget / 2**30:.2f} GiB -> {chosen}"


def compute_device(device_map: Any) -> torch.device:
    """Where streamed layers run: the CPU when `model.device_map` says so, else the first GPU (when present)."""
    if isinstance(device_map, Mapping) and len(set(map(str, device_map.values()))) == 1:
        return torch.device(str(next(iter(device_map.values()))))
    if device_map in (None, "cpu") or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def open_stream(model_cfg: Mapping[str, Any], model_store: Path, dtype: str, progress: bool = True, head: bool = False):
    """(LayerStream, tokenizer, model_dir) for `model_cfg`: what `load_model` returns, without the weights in memory."""
    from pipeline.models import check_supported, load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir(model_cfg, model_store, progress)
    check_supported(model_dir, model_cfg)
    stream = LayerStream(model_dir, dtype, compute_device(model_cfg.get("device_map")), head,
                         model_cfg.get("trust_remote_code") is True)
    return stream, load_tokenizer(model_dir), model_dir


def checkpoint_bytes(model_dir: Path, dtype: str) -> int:
    """The model's size in `dtype`: every tensor's element count from the safetensors headers."""
    from safetensors import safe_open

    itemsize = getattr(torch, dtype).itemsize
    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(path, framework="pt", device="cpu") as handle:
            total += sum(_numel(handle, key) for key in handle.keys()) * itemsize
    return total


def _numel(handle, key: str) -> int:
    count = 1
    for size in handle.get_slice(key).get_shape():
        count *= size
    return count


def _layers_path(model: nn.Module) -> str:
    return get_architecture(model.config.model_type).layers_path


def _in_layers(name: str, model: nn.Module) -> bool:
    return name.startswith(_layers_path(model) + ".")


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    persistent = leaf not in module._non_persistent_buffers_set
    module.register_buffer(leaf, value, persistent=persistent)


@contextmanager
def _quiet_transformers():
    """transformers' per-call 'Loading weights' progress bar and load report, off for one layer's load."""
    from transformers.utils import logging as hf_logging

    with ExitStack() as stack:
        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            stack.callback(hf_logging.enable_progress_bar)
        yield
