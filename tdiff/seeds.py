"""Seeds and counter-based random numbers: every draw of a run is a pure function of integers.

`mix_seed(seed, step, purpose)` turns several integers into one 63-bit seed for a torch or numpy
generator. The counter-based draws have no generator state: column j of a stream with base b is
SplitMix64's output function applied to b + (j + 1)·golden, computed with torch's int64 arithmetic
(which wraps modulo 2^64) on whatever device the bases live, so a whole batch's draws are a few
vectorised operations and the draws of a stream are the same whichever batch, process, worker or
device asks for them.

- `counter_uniforms(key, counters, n)`: n uniforms per counter (a data-stream position, say), numpy.
- `image_normals(keys, draw, n)`: n standard normals per image for its draw number `draw` (0: the
  starting noise, then one per stochastic sampler step), on the keys' device: sampling noise that
  depends on (image seed, draw, element) only.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _signed(value: int) -> int:
    """An integer modulo 2^64 as the int64 with the same bits (torch has no uint64 arithmetic)."""
    value %= 1 << 64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)  # SplitMix64's increment: 2^64 / golden ratio, odd
_MIX1, _MIX2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)
_NOISE_STREAM = _signed(0xD1B54A32D192ED03)  # keys image noise apart from every other use of a seed


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several integers, stable across runs and platforms."""
    return int(np.random.SeedSequence([v & 0xFFFFFFFF for v in values]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 bit patterns; torch's >> is arithmetic."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function (Steele, Lea & Flood 2014) on int64 bit patterns: a bijection that mixes well."""
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def stream_uniforms(bases: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) float64 uniforms in [0, 1): column j of row b is SplitMix64 at state bases[b] + (j + 1)·golden."""
    steps = torch.arange(1, n + 1, dtype=torch.int64, device=bases.device) * _GOLDEN  # (n,)
    bits = splitmix64(bases[:, None] + steps)  # (B, n)
    return _shift_right(bits, 11).to(torch.float64) * 2.0**-53  # the top 53 bits, exact in float64


def counter_uniforms(key: int, counters: np.ndarray, n: int) -> np.ndarray:
    """(len(counters), n) float64 uniforms in [0, 1), a pure function of (key, counter, column).

    Counter c's stream starts at key + c·n·golden: the n-wide blocks of different counters never
    overlap, so no two (counter, column) pairs share a draw.
    """
    counters = torch.from_numpy(np.asarray(counters, dtype=np.int64))  # (B,)
    bases = _signed(key) + counters * _signed(n * _GOLDEN)
    return stream_uniforms(bases, n).numpy()


def image_keys(seeds, device=None) -> torch.Tensor:
    """(B,) int64: one well-mixed key per image seed, on `device`."""
    seeds = torch.as_tensor(seeds, dtype=torch.int64, device=device)
    return splitmix64(seeds * _GOLDEN + _NOISE_STREAM)


def image_normals(keys: torch.Tensor, draw: int, n: int) -> torch.Tensor:
    """(B, n) float64 standard normals: row b a function of (keys[b], draw, column) only, on keys' device.

    Box–Muller on a fresh stream per (image, draw): pair p of the ⌈n/2⌉ uniform pairs gives element p
    (r·cos θ) and element ⌈n/2⌉ + p (r·sin θ). In float64, so that rounding to float32 hides the
    last-bit differences between devices' log and cos.
    """
    pairs = math.ceil(n / 2)
    bases = splitmix64(keys + _signed((draw + 1) * _GOLDEN))  # (B,)
    u = stream_uniforms(bases, 2 * pairs)  # (B, 2·pairs)
    radius = torch.sqrt(-2.0 * torch.log1p(-u[:, :pairs]))  # 1 − u is in (0, 1]: the log is finite
    phase = (2.0 * math.pi) * u[:, pairs:]
    return torch.cat([radius * torch.cos(phase), radius * torch.sin(phase)], dim=1)[:, :n]
