"""Losses shared by the methods, one function each, plus the EMA update.

Every loss takes tensors and plain values (temperatures come from schedules, computed by the caller).
"""
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F


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


@torch.no_grad()
def ema_update(target: Iterable[torch.Tensor], online: Iterable[torch.Tensor], momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, in place."""
    target, online = list(target), list(online)
    if len(target) != len(online):
        raise ValueError(f"EMA needs matching parameter lists, got {len(target)} and {len(online)}")
    torch._foreach_mul_(target, momentum)
    torch._foreach_add_(target, online, alpha=1.0 - momentum)
