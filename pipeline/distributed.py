"""Data-parallel runs under `accelerate launch` or `torchrun`: who this process is, its shard, collectives.

Every process of a launch runs `python -m pipeline` with the same config. The cache must keep a single
writer, so the runner asks `is_main_process()` before creating, locking or renaming anything, and the
collect stage splits its prompts into contiguous shards (`shard_bounds`) and puts the results back in
prompt order (`gather_rows`, `sum_across`). Outside a launch (no WORLD_SIZE in the environment) every
helper reduces to the single-process case and torch.distributed is never initialized.

The process group is whatever accelerate sets up (gloo on CPU, nccl on GPUs): no home-made
distribution. Collectives move our own tensors only; nothing is pickled.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def world_size() -> int:
    """Number of processes in this launch (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_index() -> int:
    """This process's global rank (0 when not launched)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """The one process that may write the cache, manifests and run summaries."""
    return process_index() == 0


def shard_bounds(total: int, world: int | None = None, index: int | None = None) -> tuple[int, int]:
    """[start, stop) of this process's contiguous share of `total` items; the first `total % world` get one more.

    Contiguous shards concatenated in rank order are the items in their original order, which is what
    lets `gather_rows` restore prompt order without sending indices.
    """
    world = world_size() if world is None else world
    index = process_index() if index is None else index
    base, extra = divmod(total, world)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def local_device_map(device_map: Any) -> Any:
    """`device_map=auto` means "this process's device" in a data-parallel launch.

    Each process holds a whole replica, so letting accelerate spread every replica over all GPUs
    would stack the replicas on the same cards. Explicit maps are the user's choice and pass through.
    """
    if world_size() == 1 or device_map not in ("auto", None):
        return device_map
    return {"": str(_state().device)}


def barrier() -> None:
    if world_size() > 1:
        _state().wait_for_everyone()


def broadcast_text(text: str | None) -> str:
    """The main process's `text` on every process (others pass None): a length, then UTF-8 bytes."""
    if world_size() == 1:
        assert text is not None
        return text
    import torch.distributed as dist

    device = _collective_device()
    data = torch.tensor(list(text.encode("utf-8")) if is_main_process() else [], dtype=torch.uint8, device=device)
    length = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    dist.broadcast(length, src=0)
    if not is_main_process():
        data = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
    dist.broadcast(data, src=0)
    return bytes(data.cpu().tolist()).decode("utf-8")


def gather_rows(local: torch.Tensor, total: int) -> torch.Tensor:
    """Every process's rows of a [shard, ...] tensor, concatenated in rank order: [total, ...] on CPU.

    Shards differ by at most one row; each is padded to the largest so one all_gather moves them all.
    """
    if world_size() == 1:
        return local
    import torch.distributed as dist

    sizes = [stop - start for start, stop in (shard_bounds(total, index=rank) for rank in range(world_size()))]
    if local.shape[0] != sizes[process_index()]:
        raise AssertionError(f"shard has {local.shape[0]} rows, expected {sizes[process_index()]}")
    device = _collective_device()
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size].cpu() for part, size in zip(parts, sizes)])


def sum_across(local: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of `local` over all processes, on CPU."""
    if world_size() == 1:
        return local
    import torch.distributed as dist

    total = local.to(_collective_device()).clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.cpu()


def _state():
    """accelerate's process state; constructing it initializes the process group once per process."""
    from accelerate import PartialState

    return PartialState()


def _collective_device() -> torch.device:
    """gloo moves CPU tensors; nccl (and other accelerator backends) only device tensors."""
    state = _state()
    return torch.device("cpu") if state.backend == "gloo" else state.device
