"""Per-epoch learning-rate schedules, selected by name (``optim.schedule``).

Both schedules change the lr once per epoch (the trainer steps its ``LambdaLR`` at each epoch
end), so the value for 0-based epoch ``e`` is the lr in force for every step of that epoch.

* ``step`` (AGW): linear warm-up ``lr * (e + 1) / warmup``, then ``gamma`` per milestone passed.
* ``cosine_refine`` (MIP's released ``cosine-refine``): cosine annealing with restarts every
  ``cycle_epochs``, each restart's peak and floor scaled by ``cycle_decay``, a linear warm-up from
  ``warmup_init_factor * lr`` over the first ``warmup_epochs`` (taken out of the first cycle, not
  prepended to it), and after ``cycle_limit`` cycles (0: never) the undecayed floor
  ``min_lr_factor * lr``. The released loop steps its scheduler at each epoch start with the
  epoch counted from 1, so our epoch ``e`` runs at the released ``t = e + 1``: epoch 0 is already
  one warm-up step above the warm-up start.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

SCHEDULES = ("step", "cosine_refine")


def step_factor(epoch: int, warmup_epochs: int, milestones: Sequence[int], gamma: float) -> float:
    """AGW's per-epoch factor: linear warm-up ``(e+1)/warmup``, then ``gamma`` per milestone."""
    if epoch < warmup_epochs:
        return (epoch + 1) / warmup_epochs
    return gamma ** sum(epoch >= m for m in milestones)


def cosine_refine_lr(
    epoch: int,
    base_lr: float,
    ref_lr: float,
    *,
    warmup_epochs: int = 5,
    warmup_init_factor: float = 0.01,
    cycle_epochs: int = 30,
    cycle_decay: float = 0.1,
    cycle_limit: int = 10,
    min_lr_factor: float = 0.002,
) -> float:
    """The lr of a parameter group whose undecayed lr is ``base_lr`` during 0-based ``epoch``.

    ``ref_lr`` is the recipe's base lr (``train.lr``): the warm-up start and the floor are
    ``warmup_init_factor * ref_lr`` and ``min_lr_factor * ref_lr`` for every group alike, as in
    the released code (absolute values, not scaled by a group's lr multiplier).
    """
    t = epoch + 1  # the released scheduler is stepped with the 1-based epoch number
    start, floor = warmup_init_factor * ref_lr, min_lr_factor * ref_lr
    if t < warmup_epochs:
        # same operation order as the released code, so the values agree to the last bit
        return start + t * ((base_lr - start) / warmup_epochs)
    cycle = t // cycle_epochs
    if cycle_limit and cycle >= cycle_limit:
        return floor
    t_cur = t - cycle_epochs * cycle
    decay = cycle_decay**cycle
    low, high = floor * decay, base_lr * decay
    return low + 0.5 * (high - low) * (1 + math.cos(math.pi * t_cur / cycle_epochs))


def _check(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule: must be one of {'|'.join(SCHEDULES)}, got {schedule!r}")


def epoch_lr(
    schedule: str,
    epoch: int,
    base_lr: float,
    ref_lr: float,
    *,
    warmup_epochs: int,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    **cosine: Any,
) -> float:
    """The lr of a group with undecayed lr ``base_lr`` during 0-based ``epoch`` (``ref_lr`` =
    ``train.lr``; ``cosine`` = the ``cosine_refine`` keywords of :func:`cosine_refine_lr`)."""
    _check(schedule)
    if schedule == "step":
        return base_lr * step_factor(epoch, warmup_epochs, milestones, gamma)
    return cosine_refine_lr(epoch, base_lr, ref_lr, warmup_epochs=warmup_epochs, **cosine)


def lr_lambdas(
    schedule: str, base_lrs: Sequence[float], ref_lr: float, **params: Any
) -> list[Callable[[int], float]]:
    """One ``LambdaLR`` factor per parameter group (``params`` as for :func:`epoch_lr`)."""
    _check(schedule)

    def factor(base: float) -> Callable[[int], float]:
        if base == 0:
            return lambda e: 0.0  # a frozen group stays at zero
        return lambda e: epoch_lr(schedule, e, base, ref_lr, **params) / base

    return [factor(base) for base in base_lrs]


def lr_schedule(schedule: str, epochs: int, lr: float, **params: Any) -> list[float]:
    """The lr of a group with multiplier 1 (``train.lr``) for each of ``epochs`` epochs."""
    return [epoch_lr(schedule, e, lr, lr, **params) for e in range(epochs)]
