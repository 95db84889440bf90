"""torch.distributed helpers that work unchanged in one process with no process group.

Every helper is the identity (or the obvious constant) when torch.distributed is not
initialised, so the losses call them unconditionally: a CPU run needs no `init_process_group`
(BLIP's unconditional all-gathers crash there: "Default process group has not been
initialized").

Gathers concatenate along dim 0 in rank order and accept a different first dimension on each
rank (a short last batch): sizes are exchanged first and the tensors padded to the largest, since
NCCL and gloo all-gather only equal shapes. Pass `sizes` from `gather_sizes` to skip that
exchange when several tensors of the same batch are gathered.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def is_dist() -> bool:
    """True when a default process group is initialised (torchrun or an explicit init)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def gather_sizes(n: int, device: torch.device | str = "cpu") -> list[int]:
    """First-dimension size on every rank, in rank order; `[n]` in one process.

    `device` must be one the backend can communicate on (CUDA for NCCL).
    """
    if not is_dist():
        return [n]
    mine = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.zeros_like(mine) for _ in range(get_world_size())]
    dist.all_gather(out, mine)
    return [int(t.item()) for t in out]


def rank_offset(sizes: list[int]) -> int:
    """Global index of this rank's first row in a gathered tensor (sum of lower ranks' sizes)."""
    return sum(sizes[: get_rank()])


def _gather(tensor: Tensor, sizes: list[int]) -> Tensor:
    """All-gather along dim 0, padding every rank's rows to max(sizes); no autograd."""
    is_bool = tensor.dtype == torch.bool  # not every backend reduces/gathers bool
    x = tensor.to(torch.uint8) if is_bool else tensor
    buf = x.new_zeros((max(sizes), *x.shape[1:]))
    buf[: x.shape[0]] = x
    out = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(out, buf)
    full = torch.cat([o[:s] for o, s in zip(out, sizes, strict=True)])
    return full.bool() if is_bool else full


def all_gather_no_grad(tensor: Tensor, sizes: list[int] | None = None) -> Tensor:
    """(n, ...) on each rank -> (sum n, ...) detached; `tensor.detach()` in one process."""
    if not is_dist():
        return tensor.detach()
    sizes = gather_sizes(tensor.shape[0], tensor.device) if sizes is None else sizes
    with torch.no_grad():
        return _gather(tensor.detach(), sizes)


class _AllGatherWithGrad(torch.autograd.Function):
    """Gather rows of all ranks; backward returns this rank's slice of the summed gradient.

    Each rank's loss reads every rank's rows, so the gradient of rank r's rows is the sum over
    ranks of d(loss_k)/d(rows_r): all-reduce (sum) the incoming gradient, keep our slice. With DDP
    averaging parameter gradients afterwards, the step follows the mean of the per-rank losses,
    which equals the one-process loss over the whole global batch.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, sizes: list[int]) -> Tensor:  # type: ignore[override]
        ctx.offset, ctx.n = rank_offset(sizes), tensor.shape[0]
        return _gather(tensor, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()  # all_reduce is in place; autograd owns `grad`
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.offset : ctx.offset + ctx.n], None


def all_gather_with_grad(tensor: Tensor, sizes: list[int] | None = None) -> Tensor:
    """(n, ...) on each rank -> (sum n, ...) that keeps the gradient for the local slice.

    In one process this returns `tensor` itself (identity, gradient untouched). Every rank must
    call it, and later run backward, in the same order.
    """
    if not is_dist():
        return tensor
    sizes = gather_sizes(tensor.shape[0], tensor.device) if sizes is None else sizes
    return _AllGatherWithGrad.apply(tensor, sizes)


def all_reduce_max(value: int, device: torch.device | str = "cpu") -> int:
    """Largest `value` over ranks (e.g. the longest padded text length); `value` in one process."""
    if not is_dist():
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _attempt_store(timeout) -> tuple[dist.Store, int, int]:
    """torchrun's env:// store, its keys prefixed by the restart attempt.

    After `torchrun --max-restarts` restarts the workers, they rendezvous again on the same
    store (c10d: the agent's; static: MASTER_PORT), where the previous attempt's keys are still
    there: the new process group could read the old workers' addresses and fail to connect, or
    hang (seen with gloo on torch 2.14, about one restart in two). A prefix per attempt
    (TORCHELASTIC_RESTART_COUNT) keeps each attempt's keys apart."""
    import os

    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"dlip/attempt_{attempt}/", store), rank, world


def setup_device(device: str = "auto") -> torch.device:
    """This process's device; the default process group too when WORLD_SIZE > 1 (torchrun).

    `device`: "auto" (CUDA when available), "cpu" or "cuda". Backend nccl on CUDA, else gloo.
    """
    import datetime
    import os

    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_dist():
        backend = "nccl" if want_cuda else "gloo"
        timeout = datetime.timedelta(minutes=30)
        store, rank, world = _attempt_store(timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def shard_range(n: int) -> range:
    """This rank's contiguous block of `range(n)` (blocks differ in size by at most 1)."""
    world, rank = get_world_size(), get_rank()
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def close_process_group() -> None:
    """Destroy the process group, if any (a command's last step under torchrun)."""
    if is_dist():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_dist():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (pickled; small objects only); `obj` in one process."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_lists(items: list[Any]) -> list[Any] | None:
    """Every rank's `items` concatenated in rank order on rank 0 (pickled), None on the other
    ranks; `items` itself in one process."""
    if not is_dist():
        return items
    parts: list[Any] | None = [None] * get_world_size() if get_rank() == 0 else None
    dist.gather_object(items, parts, dst=0)
    return None if parts is None else [x for part in parts for x in part]
