"""Block-sharing schedules as pure functions over integers (reference spec §2).

A shared stack has `depth` distinct blocks, each applied `substeps` times, so it runs
depth * substeps block applications. Each application knows its repeat index r: how many
times that same block has already run in this forward pass. The model multiplies the
conditioning by `repeat_multiplier(r)` = r + 1 for that application, which is the paper's only
signal of repetition.

    >>> order(block_schedule(2, 3, interleaved=True))
    '121212'
    >>> order(block_schedule(2, 3, interleaved=False))
    '111222'
"""

from __future__ import annotations

from typing import NamedTuple


class Application(NamedTuple):
    """One block application: which distinct block runs, and how often it has run before."""

    block: int  # index into the model's distinct blocks, 0-based
    repeat: int  # 0 for the block's first application, 1 for its second, ...


def block_schedule(depth: int, substeps: int, interleaved: bool) -> tuple[Application, ...]:
    """The ordered block applications of a shared stack.

    Interleaved (the paper's "I"): the whole stack of distinct blocks runs, then runs again,
    1212... Non-interleaved ("UI"): each block runs all its repeats before the next, 11...22...
    """
    if depth < 1 or substeps < 1:
        raise ValueError(f"depth and substeps must be >= 1, got {depth} and {substeps}")
    if interleaved:
        return tuple(Application(b, r) for r in range(substeps) for b in range(depth))
    return tuple(Application(b, r) for b in range(depth) for r in range(substeps))


def repeat_multiplier(repeat: int) -> float:
    """The factor the reference multiplies the conditioning by at repeat index `repeat`
    (`Application.repeat`): repeat + 1. The model's one source of it."""
    return float(repeat + 1)


def order(schedule: tuple[Application, ...]) -> str:
    """Human-readable application order, 1-based block numbers: '1212...', '1122...'.

    Blocks beyond 9 are written in brackets so the string stays unambiguous: '...9[10][11]'.
    """
    return "".join(str(a.block + 1) if a.block < 9 else f"[{a.block + 1}]" for a in schedule)


def table1_name(depth: int, substeps: int, interleaved: bool) -> str:
    """The paper's Table 1 label for a configuration: D16, D1S16, D2S8I, D2S8UI, ..."""
    if substeps == 1:
        return f"D{depth}"
    suffix = "" if depth == 1 else ("I" if interleaved else "UI")
    return f"D{depth}S{substeps}{suffix}"
