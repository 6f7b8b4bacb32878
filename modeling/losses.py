"""Losses shared by the methods, one function each, plus the EMA update.

Every loss takes tensors and plain values (temperatures come from schedules, computed by the caller).
The contrastive losses L2-normalise the embeddings they are given (a queue holds already normalised keys).
"""
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 if it is in half precision (mixed-precision training), otherwise as it is: float64 (a float64
    run, `dtype: float64`) is not rounded to float32."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def dino_loss(
    student_logits: Sequence[torch.Tensor],
    teacher_logits: Sequence[torch.Tensor],
    center: torch.Tensor,
    student_temperature: float,
    teacher_temperature: float,
) -> torch.Tensor:
    """DINO cross-entropy between the teacher's centred, sharpened softmax on the global crops and the
    student's log-softmax on every crop, skipping pairs where both see the same crop.

    Args:
        student_logits: one `[B, K]` tensor per crop (global crops first, in the teacher's order).
        teacher_logits: one `[B, K]` tensor per global crop.
        center: `[1, K]` running center of the teacher logits.
    Returns:
        The mean over the (teacher crop, student crop) pairs of the batch-mean cross-entropy.
    """
    teacher_probs = [F.softmax((t - center) / teacher_temperature, dim=-1).detach() for t in teacher_logits]
    student_log_probs = [F.log_softmax(s / student_temperature, dim=-1) for s in student_logits]
    total, n_terms = 0.0, 0
    for iq, q in enumerate(teacher_probs):
        for v, log_p in enumerate(student_log_probs):
            if v == iq:
                continue
            total = total + torch.sum(-q * log_p, dim=-1).mean()
            n_terms += 1
    return total / n_terms


def info_nce_loss(query: torch.Tensor, key: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v2 InfoNCE: each query is classified against its positive key (the same image, other view) and the
    `negatives` (the queue).

    Args:
        query: `[B, D]` query embeddings (L2-normalised here).
        key: `[B, D]` positive keys (L2-normalised here, no gradient flows into them).
        negatives: `[K, D]` L2-normalised negative keys.
    Returns:
        mean over the batch of -log(exp(q·k+/T) / (exp(q·k+/T) + Σ_n exp(q·n/T))).
    """
    query, key = F.normalize(query, dim=1), F.normalize(key.detach(), dim=1)
    positive = (query * key).sum(dim=1, keepdim=True)
    negative = query @ negatives.detach().to(query.dtype).T
    logits = torch.cat([positive, negative], dim=1) / temperature
    labels = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    return F.cross_entropy(at_least_float32(logits), labels)


def in_batch_info_nce_loss(query: torch.Tensor, keys: torch.Tensor, temperature: float,
                           label_offset: int = 0) -> torch.Tensor:
    """InfoNCE with the other samples of the batch as negatives (MoCo v3's `contrastive_loss`, without its 2T).

    Args:
        query: `[B, D]` embeddings of this process's images (L2-normalised here).
        keys: `[N, D]` keys of the global batch, every process's in rank order (L2-normalised here, no gradient).
        label_offset: the row of `keys` holding the positive of `query[0]` (rank × local batch size).
    Returns:
        mean over the batch of the cross-entropy of softmax(q·keys/T) against the positive key's index.
    """
    query, keys = F.normalize(query, dim=1), F.normalize(keys.detach(), dim=1)
    logits = query @ keys.T / temperature
    labels = torch.arange(query.shape[0], device=query.device) + label_offset
    return F.cross_entropy(at_least_float32(logits), labels)


def moco_v3_loss(query_1: torch.Tensor, query_2: torch.Tensor, keys_1: torch.Tensor, keys_2: torch.Tensor,
                 temperature: float, label_offset: int = 0) -> torch.Tensor:
    """MoCo v3's symmetric loss: 2T · (InfoNCE(q1, k2) + InfoNCE(q2, k1)), keys of the (gathered) batch as
    negatives (see `in_batch_info_nce_loss`). `query_v` is the predictor output of view v, `keys_v` the momentum
    encoder's embeddings of view v over the global batch."""
    return 2 * temperature * (in_batch_info_nce_loss(query_1, keys_2, temperature, label_offset)
                              + in_batch_info_nce_loss(query_2, keys_1, temperature, label_offset))


def relic_loss(anchor: torch.Tensor, targets: torch.Tensor, candidates: torch.Tensor,
               temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RELICv2's two terms for one (anchor view, positive view) pair: each anchor is compared with its candidates
    only (its positive and the negatives sampled for it), through two distributions over them: the online
    p = softmax(anchor · targets[candidates] / T) and the target's q = softmax(targets[positive] · targets[candidates]
    / T) (the target's own view of the positive; constant: no gradient reaches the targets).

    Args:
        anchor: `[B, D]` online embeddings of this process's images (L2-normalised here).
        targets: `[N, D]` target embeddings of the positive view, every process's in rank order (L2-normalised here).
        candidates: `[B, K]` rows of `targets` each anchor is compared with, its positive in column 0.
    Returns:
        (contrastive, invariance): batch means of -log p[positive] and of KL(q ‖ p) = Σ_k q_k (log q_k - log p_k).
    """
    anchor, targets = F.normalize(anchor, dim=1), F.normalize(targets.detach(), dim=1)
    # [B, N] similarities gathered at the candidates: B x N memory, not B x K x D
    online_logits = (anchor @ targets.T).gather(1, candidates) / temperature
    target_logits = (targets[candidates[:, 0]] @ targets.T).gather(1, candidates) / temperature
    log_p = F.log_softmax(at_least_float32(online_logits), dim=1)
    log_q = F.log_softmax(at_least_float32(target_logits), dim=1)
    contrastive = -log_p[:, 0].mean()
    invariance = (log_q.exp() * (log_q - log_p)).sum(dim=1).mean()
    return contrastive, invariance


def cpc_info_nce_loss(predictions: torch.Tensor, candidates: torch.Tensor, labels: torch.Tensor,
                      prediction_scale: float) -> torch.Tensor:
    """CPC's InfoNCE (Hénaff et al. 2020): each prediction picks its target patch out of every candidate patch, by
    unnormalised dot products; the targets are not detached (the patch encoder learns through both sides).

    Args:
        predictions: `[N, T]` predicted target vectors ẑ = W_k c of this process's patch positions.
        candidates: `[M, T]` target vectors of every patch position of every image of the global batch (gathered with
            gradient), the positive among them.
        labels: `[N]` the row of `candidates` holding each prediction's positive.
        prediction_scale: the logits are `prediction_scale * ẑ · t` (the paper's `emb_scale` 0.1, i.e. a temperature
            of 1 / 0.1 on unnormalised vectors).
    Returns:
        mean over the predictions of the cross-entropy of softmax(logits) against the positive's row.
    """
    logits = (prediction_scale * predictions) @ candidates.T
    return F.cross_entropy(at_least_float32(logits), labels)


def normalized_mse_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DisCo's distillation term: mean squared error between the L2-normalised `prediction` and the L2-normalised,
    constant `target`, averaged over batch and dimensions (`nn.MSELoss()` as in the official code); equals
    (2 - 2 cos) / D per sample."""
    prediction = F.normalize(at_least_float32(prediction), dim=1)
    target = F.normalize(at_least_float32(target.detach()), dim=1)
    return F.mse_loss(prediction, target)


@torch.no_grad()
def ema_update(target: Iterable[torch.Tensor], online: Iterable[torch.Tensor], momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, in place."""
    target, online = list(target), list(online)
    if len(target) != len(online):
        raise ValueError(f"EMA needs matching parameter lists, got {len(target)} and {len(online)}")
    torch._foreach_mul_(target, momentum)
    torch._foreach_add_(target, online, alpha=1.0 - momentum)


def koleo_loss(embeddings: torch.Tensor, eps: float = 1e-8, candidates: torch.Tensor | None = None,
               offset: int = 0) -> torch.Tensor:
    """KoLeo regulariser (Sablayrolles et al., 2019; used by DINOv2): the negative log of each L2-normalised
    embedding's distance to its nearest neighbour in the batch, averaged. Minimising it spreads the embeddings
    over the sphere, against the dimensional collapse of clustering objectives.

    Args:
        embeddings: `[B, D]` the queries (L2-normalised here).
        candidates: `[N, D]` the batch the nearest neighbours are searched in (L2-normalised here); default
            `embeddings`. Under DDP: the global batch gathered with gradient (`all_gather_with_grad`), so that the
            loss and its gradient are those of one process on the whole batch.
        offset: the row of `candidates` that is `embeddings[0]` (each query's own row is not its neighbour).
    Returns:
        -mean_i log(min_{j != offset + i} ||x_i - c_j|| + eps).
    """
    candidates = embeddings if candidates is None else candidates
    if candidates.shape[0] < 2:
        raise ValueError(f"koleo_loss needs at least 2 embeddings, got {candidates.shape[0]}")
    x = F.normalize(at_least_float32(embeddings), dim=1)
    c = x if candidates is embeddings else F.normalize(at_least_float32(candidates), dim=1)
    with torch.no_grad():  # the nearest neighbour is a choice, not a function to differentiate
        similarity = x @ c.T
        rows = torch.arange(x.shape[0], device=x.device)
        similarity[rows, rows + offset] = -2.0
        nearest = similarity.argmax(dim=1)
    distance = (x - c[nearest]).norm(dim=1)
    return -torch.log(distance + eps).mean()
