"""The inverse EMA warm-up and the in-place weight average."""

import copy

import pytest
import torch
from torch import nn

from tdiff.ema import ema_decay, ema_update_


def test_decay_values():
    # Reference spec §4.7, power 0.6667.
    expected = {0: 0.0, 1: 0.370, 10: 0.798, 100: 0.954, 1000: 0.9900, 10_000: 0.99785}
    for k, value in expected.items():
        assert ema_decay(k, power=0.6667) == pytest.approx(value, abs=5e-4)
    assert ema_decay(10**7, power=0.6667) == 0.9999  # capped
    assert ema_decay(0, min_value=0.5) == 0.5


def make_model():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model(torch.randn(8, 3))  # moves the BatchNorm running statistics off their defaults
    return model


def test_first_update_copies_then_averages():
    torch.manual_seed(0)
    model, ema = make_model(), make_model()
    ema_update_(ema, model, ema_decay(0))
    for a, b in zip(ema.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    before = copy.deepcopy(ema)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema_update_(ema, model, 0.75)
    for (name, p_ema), p_old, p in zip(ema.named_parameters(), before.parameters(), model.parameters()):
        torch.testing.assert_close(p_ema, 0.75 * p_old + 0.25 * p, msg=name)
    # Buffers (running statistics, counters) are copied, not averaged.
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        assert torch.equal(b_ema, b)
