"""Exponential moving average of the weights with the "inverse" warm-up (reference spec §4.7).

The decay grows with the number of EMA updates k, so early averages forget the random
initialisation quickly and late ones average over ever longer windows, up to a cap.
"""

from __future__ import annotations

import torch
from torch import nn


def ema_decay(
    updates: int, inv_gamma: float = 1.0, power: float = 2 / 3, min_value: float = 0.0, max_value: float = 0.9999
) -> float:
    """decay(k) = clamp(1 − (1 + k/inv_gamma)^(−power), min_value, max_value).

    decay(0) = 0, so the first update copies the weights; power 0.6667 gives 0.798 at k = 10,
    0.954 at 100, 0.990 at 1000 and reaches the 0.9999 cap near k = 10^6.
    """
    decay = 1 - (1 + updates / inv_gamma) ** -power
    return min(max(decay, min_value), max_value)


@torch.no_grad()
def ema_update_(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """In place: ema ← decay·ema + (1 − decay)·θ for every parameter, one multi-tensor lerp; buffers copied.

    lerp with weight 1 returns θ exactly (torch computes end − (end − start)·(1 − w) for w ≥ ½), so the
    first update, at decay 0, copies the weights bit for bit.
    """
    ema_params, params = list(ema_model.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    ema_buffers, buffers = list(ema_model.buffers()), list(model.buffers())
    if buffers:
        torch._foreach_copy_(ema_buffers, buffers)
