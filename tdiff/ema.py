"""Exponential moving average of the weights with the "inverse" warm-up (reference spec §4.7).

The decay grows with the number of EMA updates k, so early averages forget the random
initialisation quickly and late ones average over ever longer windows, up to a cap.
"""

from __future__ import annotations

import torch
from torch import nn


def ema_decay(updates: int, inv_gamma: float = 1.0, power: float = 2 / 3, min_value: float = 0.0,
              max_value: float = 0.9999) -> float:
    """decay(k) = clamp(1 − (1 + k/inv_gamma)^(−power), min_value, max_value).

    decay(0) = 0, so the first update copies the weights; power 0.6667 gives 0.798 at k = 10,
    0.954 at 100, 0.990 at 1000 and reaches the 0.9999 cap near k = 10^6.
    """
    decay = 1 - (1 + updates / inv_gamma) ** -power
    return min(max(decay, min_value), max_value)


@torch.no_grad()
def ema_update_(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """In place: ema ← decay·ema + (1 − decay)·θ for every parameter; buffers are copied."""
    ema_params = dict(ema_model.named_parameters())
    for name, param in model.named_parameters():
        # mul_ then add_ (not lerp_) so decay 0 gives θ bit for bit.
        ema_params[name].mul_(decay).add_(param, alpha=1 - decay)
    ema_buffers = dict(ema_model.named_buffers())
    for name, buffer in model.named_buffers():
        ema_buffers[name].copy_(buffer)
