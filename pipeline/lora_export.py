"""The plan as a PEFT LoRA adapter (`export.format=lora`): base model + adapter = the ablated model.

For the orthogonal method every edited matrix W [hidden, in] (hidden = the output axis) changes by
ΔW = -s·r̂(r̂ᵀW), which is exactly rank 1: lora_B = -s·r̂ [hidden, 1], lora_A = r̂ᵀW [1, in], with
r = lora_alpha = 1 so PEFT's scaling is 1. A plan with `directions: k` removes a subspace with orthonormal
basis Q [k, hidden]: ΔW = -s·Qᵀ(QW) is exactly rank k, lora_B = -s·Qᵀ [hidden, k], lora_A = QW [k, in],
r = lora_alpha = k. Per-expert matrices that transformers fuses in memory into one
[E, hidden, inter] parameter (`mlp.experts.down_proj`) become one PEFT `target_parameters` entry whose
lora_A stacks the experts' factors expert by expert [E·k, inter] and lora_B rank by rank [hidden, k·E]
(the layouts PEFT's ParamWrapper reshapes to [E, k, inter] and [hidden, k, E]).

Refused, each with one line: norm_preserving (the per-column rescale after the removal makes ΔW full
rank in general: no rank below min(out, in) reproduces it), an edited bias, the embedding edit
(`ablate.embed`), tensors already fused on disk (gpt-oss's 3-D experts) and checkpoints whose on-disk
names differ from the in-memory ones (multimodal Gemma 3). The factors are float32 and computed from the
source tensors, so merging them gives the exported model's weights to the storage dtype's rounding.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open

from pipeline.architectures import residual_writers
from pipeline.artifacts import save_tensors
from pipeline.errors import PipelineError
from pipeline.models import read_model_config
from pipeline.plan import plan_directions
from pipeline.weight_edit import EMBED_HIT, orthonormal_rows, plan_editor

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PER_EXPERT = re.compile(r"(?P<stem>.+\.layers\.\d+\.)(?:mlp|block_sparse_moe)\.experts\.(?P<expert>\d+)\.(?:down_proj|w2)\.weight")
PREFIX = "base_model.model."


def check_exportable(plan: Mapping[str, Any], embed: bool) -> None:
    """Refuse, before any work, a plan whose edit is not a low-rank update."""
    if plan["method"] != "orthogonal":
        raise PipelineError(
            f"export.format=lora: method {plan['method']} rescales every column after removing the direction, which "
            "is not a low-rank change (no rank below the matrix size reproduces it); use select.method=orthogonal "
            "or export.format=safetensors"
        )
    if embed:
        raise PipelineError("export.format=lora does not cover the embedding edit; set ablate.embed.enabled=false "
                            "or export.format=safetensors")


def write_adapter(source_dir: Path, out_dir: Path, plan: Mapping[str, Any], directions: torch.Tensor,
                  base_model: str) -> dict[str, int]:
    """Write `out_dir/adapter_config.json` and `adapter_model.safetensors` for `plan` applied to the
    checkpoint in `source_dir`; returns {"modules": n, "experts": n} (what was written)."""
    check_exportable(plan, embed=False)
    config = read_model_config(source_dir)
    editor = plan_editor(config, plan, directions, False, "disk")
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    experts: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for shard in checkpoint_shards(source_dir):
        with safe_open(str(source_dir / shard), framework="pt") as handle:
            for name in handle.keys():
                target = editor.target(name)
                if target is None:
                    continue
                direction, scale, axis, hit = target
                if hit == EMBED_HIT or name.endswith(".bias"):
                    raise PipelineError(f"export.format=lora: the plan edits {name}, a bias, which a LoRA adapter "
                                        "cannot carry; use export.format=safetensors")
                weight = handle.get_tensor(name).to(torch.float32)
                if weight.dim() != 2 or axis != 0:
                    raise PipelineError(f"export.format=lora: {name} is a fused {weight.dim()}-D expert tensor "
                                        f"{tuple(weight.shape)}; LoRA export covers per-expert 2-D matrices only, "
                                        "use export.format=safetensors")
                factors = _factors(direction, weight, scale)
                expert = _PER_EXPERT.fullmatch(name)
                if expert is not None:
                    fused = f"{expert['stem']}mlp.experts.down_proj"
                    _check_memory_name(editor, fused, name)
                    experts.setdefault(fused, {})[int(expert["expert"])] = factors
                elif editor.arch.moe_keys and name.endswith("down_proj.weight"):
                    # peft remaps a `*.down_proj` target module of these families to their fused experts (its
                    # transformers v4 -> v5 conversion), so a dense or shared down_proj is targeted as a parameter
                    _check_memory_name(editor, name, name)
                    experts.setdefault(name, {})[0] = factors
                else:
                    module = name.removesuffix(".weight")
                    _check_memory_name(editor, f"{module}.weight", name)
                    modules[module] = factors
    tensors = {}
    for module, (lora_a, lora_b) in modules.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = lora_b.contiguous()
    for parameter, per_expert in experts.items():
        order = sorted(per_expert)
        if order != list(range(len(order))):
            raise PipelineError(f"export.format=lora: experts of {parameter} are not numbered 0..{len(order) - 1}")
        module = parameter.rpartition(".")[0]
        lora_b = torch.stack([per_expert[e][1] for e in order], dim=2)  # [hidden, k, E]: rank-major columns
        tensors[f"{PREFIX}{module}.lora_A.weight"] = torch.cat([per_expert[e][0] for e in order]).contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = lora_b.reshape(lora_b.shape[0], -1).contiguous()
    rank = plan_directions(plan)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    adapter = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "target_modules": sorted(modules), "target_parameters": sorted(experts) or None,
    }
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(adapter, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return {"modules": len(modules), "parameters": len(experts)}


def _factors(direction: torch.Tensor, weight: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A [k, in], lora_B [hidden, k]) with lora_B @ lora_A = the edit's change of `weight` [hidden, in]:
    -s·r̂(r̂ᵀW) for one unit direction, -s·Qᵀ(QW) for the orthonormal basis the edit itself uses."""
    if direction.dim() == 1:
        return (direction @ weight).unsqueeze(0), (-scale * direction).unsqueeze(1)
    basis = orthonormal_rows(direction)
    return basis @ weight, -scale * basis.T


def checkpoint_shards(source_dir: Path) -> list[str]:
    """The safetensors shard names of a checkpoint directory (the ablate stage has already vetted it)."""
    index = source_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted({Path(shard).name for shard in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
    return ["model.safetensors"]


def _check_memory_name(editor: Any, memory_name: str, disk_name: str) -> None:
    if residual_writers(editor.arch, memory_name, editor.num_layers, "memory") is None:
        raise PipelineError(f"export.format=lora: {disk_name} has no in-memory counterpart {memory_name} for "
                            f"{editor.arch.model_type}; use export.format=safetensors")
