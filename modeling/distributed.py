"""Collectives used by the models and losses. Every function is a no-op (identity) without an initialised process
group (or with one process), so the same model code runs on one process, under DDP, and on CPU in tests.

Gradients under DDP. DDP averages the gradients of the W processes, i.e. it optimises the mean of the per-process
losses. A loss that couples samples across the global batch (KoLeo's nearest neighbours, BatchNorm statistics)
must therefore let gradients flow into the other processes' samples: `all_gather_with_grad` and `SyncBatchNorm`
sum the incoming gradients of every process in their backward pass (an all-reduce SUM), so that each process gets
d(sum_r loss_r)/d(its own rows); DDP's division by W then gives d(mean_r loss_r) = the gradient of the one-process
loss on the whole global batch (tests/test_distributed.py checks both against a one-process reference).

Processes may hold different numbers of rows (e.g. after skipping bad images): the gathers pad to the largest
and trim, and report this process's row offset in the gathered tensor.
"""
import torch
import torch.distributed as dist
from torch import nn

from .losses import at_least_float32


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """The number of processes; 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over all processes (no gradient). Returns `tensor` itself on one process."""
    if not is_distributed():
        return tensor
    tensor = tensor.detach().clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor / dist.get_world_size()


@torch.no_grad()
def gather_sizes(n: int, device: torch.device | str = "cpu") -> list[int]:
    """The first-dimension sizes of every process's tensor, in rank order (`[n]` on one process)."""
    if not is_distributed():
        return [n]
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=device))
    return [int(s.item()) for s in sizes]


def _gather_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """All processes' rows concatenated in rank order (no autograd), and every process's number of rows."""
    sizes = gather_sizes(tensor.shape[0], tensor.device)
    largest = max(sizes)
    padded = tensor.contiguous()
    if tensor.shape[0] < largest:
        padded = torch.cat([padded, padded.new_zeros(largest - tensor.shape[0], *tensor.shape[1:])])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]), sizes


@torch.no_grad()
def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """`[sum of B_r, ...]`: `tensor` of every process concatenated in rank order, without gradient (MoCo's keys for
    the queue and as in-batch negatives). Returns `tensor` itself on one process."""
    return all_gather_with_offset(tensor)[0]


@torch.no_grad()
def all_gather_with_offset(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(`all_gather(tensor)`, the row of the gathered tensor where this process's rows start), without gradient.
    The offset is the label offset of in-batch contrastive losses (MoCo v3, RELIC): this process's i-th query has
    its positive key at row offset + i. `(tensor, 0)` on one process."""
    if not is_distributed():
        return tensor, 0
    gathered, sizes = _gather_rows(tensor)
    return gathered, sum(sizes[:rank()])


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gathered tensor's gradient over the processes and returns this process's
    slice: each process receives the gradient that every process's loss sends to its rows."""

    @staticmethod
    def forward(ctx, tensor):
        gathered, sizes = _gather_rows(tensor.detach())
        ctx.start = sum(sizes[:rank()])
        ctx.stop = ctx.start + tensor.shape[0]
        return gathered

    @staticmethod
    def backward(ctx, grad_output):
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start:ctx.stop]


def all_gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(`[sum of B_r, ...]` every process's `tensor` in rank order, this process's row offset in it), WITH gradient:
    a loss computed by each process on its own rows against the gathered ones, averaged over processes by DDP, has the
    gradient of the same loss computed by one process on the whole batch. `(tensor, 0)` on one process."""
    if not is_distributed():
        return tensor, 0
    gathered = _GatherWithGrad.apply(tensor)
    return gathered, sum(gather_sizes(tensor.shape[0], tensor.device)[:rank()])


class _AllReduceSumWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.detach().clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    @staticmethod
    def backward(ctx, grad_output):
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over all processes, with gradient (the backward sums the gradients likewise). Identity on one
    process."""
    if not is_distributed():
        return tensor
    return _AllReduceSumWithGrad.apply(tensor)


@torch.no_grad()
def batch_shuffle(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shuffle-BN (MoCo): this process's share of a random permutation of the global batch, and the index that
    undoes it (`batch_unshuffle`). BatchNorm statistics of the key encoder then mix images of every process, so a
    query cannot recognise its positive key by batch statistics. Identity (and None) on one process. Needs the same
    number of rows on every process."""
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


# ---------------------------------------------------------------------------------------------- SyncBatchNorm


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with statistics over every process's batch, for devices where `torch.nn.SyncBatchNorm` does not work
    (CPU with gloo: torch's refuses non-GPU inputs, and DDP refuses torch's SyncBatchNorm in CPU modules).

    In training mode with a process group, the per-channel count, sum and sum of squared deviations are all-reduced
    with gradient (`all_reduce_sum_with_grad`), so the output and its gradient equal those of BatchNorm over the
    concatenated batch. Half-precision inputs are normalised in float32, float32 and float64 in their own precision
    (as BatchNorm does). Without a process group, or in eval mode, it is plain BatchNorm (same arithmetic, same
    state dict). On CUDA the training loop uses torch's fused `nn.SyncBatchNorm` instead.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0] + list(range(2, input.dim()))
        x = at_least_float32(input)  # half precision in float32; float64 stays
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        total = all_reduce_sum_with_grad(torch.cat([count, x.sum(dims)]))
        n, mean = total[0], total[1:] / total[0]
        shape = [1, -1] + [1] * (input.dim() - 2)
        centred = x - mean.view(shape)
        var = all_reduce_sum_with_grad((centred * centred).sum(dims)) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var.detach() * n / max(float(n) - 1, 1.0)
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return out.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every `BatchNorm1d/2d/3d` of `module` (in place; the module is returned) by `SyncBatchNorm`, keeping
    parameters, buffers, requires_grad and train/eval mode. Modules kept outside the module tree (DisCo's frozen
    teacher, always in eval mode) are left alone."""
    converted = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, (SyncBatchNorm,
                                                                                        nn.SyncBatchNorm)):
        converted = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                converted.weight = module.weight
                converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child)
        if new is not child:
            converted.add_module(name, new)
    return converted


def has_sync_batchnorm(module: nn.Module) -> bool:
    """Whether `module` normalises with batch statistics of every process (torch's or this module's SyncBatchNorm)."""
    return any(isinstance(m, (nn.SyncBatchNorm, SyncBatchNorm)) for m in module.modules())
