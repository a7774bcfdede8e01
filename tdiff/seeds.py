"""Seeds and counter-based random numbers: every draw of a run is a pure function of integers.

`mix_seed(seed, step, purpose)` turns several integers into one 63-bit seed for a torch or numpy
generator. `counter_uniforms(key, counters, n)` gives n uniforms per counter (a stream position,
say) without any generator state: SplitMix64's output function applied to key + counter·n + j.
Vectorised over the counters, so a whole batch's draws cost a few numpy operations, and the
draws of counter p are the same whichever batch, process or worker asks for them.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment: 2^64 / golden ratio, odd
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several integers, stable across runs and platforms."""
    return int(np.random.SeedSequence([v & 0xFFFFFFFF for v in values]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele, Lea & Flood 2014): a bijection of uint64 that mixes well."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def counter_uniforms(key: int, counters: np.ndarray, n: int) -> np.ndarray:
    """(len(counters), n) float64 uniforms in [0, 1), a pure function of (key, counter, column).

    Column j of counter c is SplitMix64 at state key + (c·n + j + 1)·golden: the n-wide blocks of
    different counters never overlap, so no two (counter, column) pairs share a draw.
    """
    counters = np.asarray(counters, dtype=np.int64).astype(np.uint64)  # (B,)
    index = counters[:, None] * np.uint64(n) + np.arange(1, n + 1, dtype=np.uint64)  # (B, n)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2^64 by design
        bits = _splitmix64(np.uint64(key) + index * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53  # the top 53 bits
