"""Schedules as pure functions of the step (nanoGPT's `get_lr(step)` style): no state, no counters.

The training loop evaluates the generic ones (lr, weight decay, EMA momentum) at every optimizer step; a method
evaluates its own in `schedule_values(progress)` (DINO's teacher temperature). Both pass values, never counters.
"""
import math


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from `start` at step 0 to `end` at `total_steps` (and after)."""
    if total_steps <= 0 or step >= total_steps:
        return end
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * step / total_steps))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak: float, end: float) -> float:
    """Linear warmup from 0 to `peak` over `warmup_steps`, then half-cosine to `end` at `total_steps`."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak, end)


def linear_warmup_then_constant(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear from `start` to `end` over `warmup_steps`, then `end` (DINO's teacher temperature)."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps
