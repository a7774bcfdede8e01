"""Block-sharing schedules (spec §2.3, §2.4): pure functions over integers, no model needed."""

import pytest

from tdiff.sharing import Application, block_schedule, order, repeat_multiplier, table1_name


def pairs(schedule):
    """(block, multiplier) per application, the form spec §2.4 writes: B0(×1), B1(×1), ..."""
    return [(a.block, repeat_multiplier(a.repeat)) for a in schedule]


def test_depth2_substeps3_interleaved_matches_spec_2_4():
    # B0(×1), B1(×1), B0(×2), B1(×2), B0(×3), B1(×3): the paper's I, "1212…".
    schedule = block_schedule(2, 3, interleaved=True)
    assert pairs(schedule) == [(0, 1.0), (1, 1.0), (0, 2.0), (1, 2.0), (0, 3.0), (1, 3.0)]
    assert order(schedule) == "121212"


def test_depth2_substeps3_non_interleaved_matches_spec_2_4():
    # B0(×1), B0(×2), B0(×3), B1(×1), B1(×2), B1(×3): the paper's UI, "11…22…".
    schedule = block_schedule(2, 3, interleaved=False)
    assert pairs(schedule) == [(0, 1.0), (0, 2.0), (0, 3.0), (1, 1.0), (1, 2.0), (1, 3.0)]
    assert order(schedule) == "111222"


@pytest.mark.parametrize("depth, substeps", [(2, 8), (2, 4), (4, 2), (3, 5)])
def test_orders_at_table1_sizes(depth, substeps):
    blocks = "".join(str(b + 1) for b in range(depth))
    assert order(block_schedule(depth, substeps, True)) == blocks * substeps
    assert order(block_schedule(depth, substeps, False)) == "".join(c * substeps for c in blocks)


@pytest.mark.parametrize(
    "depth, substeps, interleaved", [(2, 8, True), (2, 8, False), (3, 4, True), (1, 16, True), (16, 1, False)]
)
def test_repeat_index_counts_prior_applications_of_the_same_block(depth, substeps, interleaved):
    schedule = block_schedule(depth, substeps, interleaved)
    assert len(schedule) == depth * substeps
    seen = [0] * depth
    for application in schedule:
        assert application.repeat == seen[application.block]
        assert repeat_multiplier(application.repeat) == application.repeat + 1
        seen[application.block] += 1
    assert seen == [substeps] * depth


@pytest.mark.parametrize("interleaved", [True, False])
def test_depth_1_is_one_block_repeated(interleaved):
    schedule = block_schedule(1, 8, interleaved)
    assert schedule == tuple(Application(0, r) for r in range(8))
    assert order(schedule) == "1" * 8


@pytest.mark.parametrize("interleaved", [True, False])
def test_substeps_1_is_a_plain_stack_with_multiplier_one(interleaved):
    schedule = block_schedule(16, 1, interleaved)
    assert schedule == tuple(Application(b, 0) for b in range(16))
    assert {repeat_multiplier(a.repeat) for a in schedule} == {1.0}


def test_first_application_of_every_block_uses_multiplier_one():
    for interleaved in (True, False):
        first = {}
        for a in block_schedule(3, 4, interleaved):
            first.setdefault(a.block, repeat_multiplier(a.repeat))
        assert first == {0: 1.0, 1: 1.0, 2: 1.0}


def test_order_brackets_block_numbers_above_nine():
    assert order(block_schedule(11, 1, False)) == "123456789[10][11]"
    assert order(block_schedule(10, 2, True)) == "123456789[10]" * 2


@pytest.mark.parametrize(
    "depth, substeps, interleaved, name",
    [
        (16, 1, False, "D16"),
        (8, 1, False, "D8"),
        (16, 1, True, "D16"),
        (1, 16, True, "D1S16"),
        (1, 8, True, "D1S8"),
        (1, 8, False, "D1S8"),
        (2, 4, False, "D2S4UI"),
        (2, 4, True, "D2S4I"),
        (2, 8, False, "D2S8UI"),
        (2, 8, True, "D2S8I"),
    ],
)
def test_table1_name(depth, substeps, interleaved, name):
    assert table1_name(depth, substeps, interleaved) == name


@pytest.mark.parametrize("depth, substeps", [(0, 1), (1, 0), (-1, 2), (2, -3)])
def test_invalid_sizes_raise(depth, substeps):
    with pytest.raises(ValueError, match="depth and substeps"):
        block_schedule(depth, substeps, True)
