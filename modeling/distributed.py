"""Collectives used by the losses. Every function is a no-op (identity) without an initialised process group,
so the same model code runs on one process, under DDP, and on CPU in tests."""
import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over all processes (no gradient). Returns `tensor` itself on one process."""
    if not is_distributed():
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor / dist.get_world_size()


def rank() -> int:
    """This process's rank; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


@torch.no_grad()
def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """`[world_size * B, ...]`: `tensor` of every process concatenated in rank order (no gradient; every process
    must pass the same shape). Returns `tensor` itself on one process."""
    if not is_distributed():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)


@torch.no_grad()
def batch_shuffle(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shuffle-BN (MoCo): this process's share of a random permutation of the global batch, and the index that
    undoes it (`batch_unshuffle`). BatchNorm statistics of the key encoder then mix images of every process, so a
    query cannot recognise its positive key by batch statistics. Identity (and None) on one process."""
    if not is_distributed():
        return tensor, None
    gathered = all_gather(tensor)
    permutation = torch.randperm(gathered.shape[0], device=tensor.device)
    dist.broadcast(permutation, src=0)
    mine = permutation.view(dist.get_world_size(), -1)[rank()]
    return gathered[mine], torch.argsort(permutation)


@torch.no_grad()
def batch_unshuffle(tensor: torch.Tensor, unshuffle: torch.Tensor | None) -> torch.Tensor:
    """The rows of this process's original batch, from the outputs of a `batch_shuffle`d batch."""
    if unshuffle is None:
        return tensor
    gathered = all_gather(tensor)
    return gathered[unshuffle.view(dist.get_world_size(), -1)[rank()]]
