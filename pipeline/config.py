"""OmegaConf resolvers the config files use, registered once when `pipeline` is imported."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf


def _model_kind(arch: DictConfig | None) -> str:
    from pipeline.models import model_kind

    return model_kind(OmegaConf.to_container(arch, resolve=True) if arch is not None else None)


def compute_dtype(requested: str = "auto") -> str:
    """The dtype to compute in: `auto` picks bfloat16 only where it is fast.

    On a GPU, or a CPU with AVX512-BF16/AMX, bfloat16 halves memory and is about 2x faster; on a
    CPU without them (e.g. AVX2-only EPYC) PyTorch emulates it and a forward pass of the 0.5B
    default is about 6x slower than float32 (measured: 48 s vs 8 s for 16x40 tokens, one thread).
    Resolved when the config is composed, so the dtype actually used is part of every cache key.
    """
    if requested != "auto":
        return requested
    import torch

    if torch.cuda.is_available():
        return "bfloat16"
    try:
        flags = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        flags = ""
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


def register_resolvers() -> None:
    """`${model_kind:${model.arch}}` -> "moe" | "dense"; `${compute_dtype:auto}` -> a torch dtype name."""
    OmegaConf.register_new_resolver("model_kind", _model_kind, replace=True)
    OmegaConf.register_new_resolver("compute_dtype", compute_dtype, replace=True)
