"""torchrun support: process group from the environment, sharded extraction, gathers and broadcasts.

``torchrun --nproc_per_node=N -m udml train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK; everything here is a
no-op in a plain single process, so the training loop calls these functions unconditionally.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: torch.device) -> torch.device:
    """Join the process group that torchrun describes (NCCL for CUDA, gloo for the CPU) and return this
    process's device (cuda:LOCAL_RANK when ``device`` is CUDA)."""
    if env_world_size() <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def close(finished: bool = True) -> None:
    """Leave the process group. ``finished``: the command ended normally on this process, so every process first
    waits for the others (the main one may still be writing files): gloo aborts a process that tears its group
    down while a peer is still working in it. After an error there is no waiting (the peer may never come)."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if dist.is_initialized() else 1


def shard(n: int, r: int | None = None, w: int | None = None) -> range:
    """Rank r's contiguous share of range(n); shards differ in size by at most one."""
    r, w = rank() if r is None else r, world_size() if w is None else w
    return range(r * n // w, (r + 1) * n // w)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows in rank order (the rows of ``shard``); shards may differ by one row."""
    w = world_size()
    if w == 1:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(w)]
    dist.all_gather(sizes, torch.tensor([len(x)], device=x.device))
    sizes = [int(s) for s in sizes]
    padded = torch.zeros((max(sizes),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def gather_rows_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows in rank order, as gather_rows, with this rank's rows the tensor given, so that gradients
    flow back into them (the other ranks' rows are constants here). Every rank must give the same number of rows."""
    w = world_size()
    if w == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(w)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank()] = x
    return torch.cat(parts)


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable, small), in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(x: torch.Tensor | None, like: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s tensor on every rank; the other ranks pass None and ``like`` (shape, dtype, device)."""
    if world_size() == 1:
        return x
    buf = x.to(like.device).contiguous() if rank() == src else torch.empty_like(like)
    dist.broadcast(buf, src)
    return buf


def broadcast_object(obj, src: int = 0):
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def any_true(flag: bool | torch.Tensor, device) -> bool:
    """True on every rank when ``flag`` is true on at least one."""
    t = torch.as_tensor(flag, dtype=torch.long, device=device).reshape(1)
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)


def max_over_ranks(x: torch.Tensor) -> torch.Tensor:
    return _reduce(x, dist.ReduceOp.MAX) if world_size() > 1 else x


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    return _reduce(x, dist.ReduceOp.SUM) if world_size() > 1 else x


def _reduce(x: torch.Tensor, op) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x, op=op)
    return x
