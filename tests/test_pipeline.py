"""The training input pipeline: positions -> gathered, augmented micro-batches on the device.

An item is a function of (seed, stream position) only: the same whether the data set is held in
memory or decoded from files by DataLoader workers, and whichever process, micro-batch or worker
meets it. (Resume bit-identity and 2 processes = 1 process are proven end to end in test_train.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tdiff.data import ArrayDataset, open_dataset
from tdiff.pipeline import TrainingBatches, group_positions, stream_indices

N, SIZE = 10, 8


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def sources(pixels, tmp_path_factory):
    """The same ten images as an .npz (held in memory) and as PNG files (decoded per item)."""
    root = tmp_path_factory.mktemp("data")
    np.savez(root / "images.npz", images=pixels)
    folder = root / "folder"
    folder.mkdir()
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return open_dataset(str(root / "images.npz"), root, SIZE), open_dataset(str(folder), root, SIZE)


def items_by_position(
    data, steps: int, batch_size: int, world: int = 1, accum: int = 1, workers: int = 0, prob: float = 0.5
) -> dict:
    """position -> (image, aug_cond, label) for every item of `steps` steps, over all ranks."""
    found = {}
    for rank in range(world):
        stream = TrainingBatches(
            data,
            seed=3,
            augment_prob=prob,
            device=torch.device("cpu"),
            batch_size=batch_size,
            rank=rank,
            world=world,
            accum=accum,
            start=0,
            end=steps,
            num_workers=workers,
        )
        for step in range(steps):
            for micro, (images, aug_cond, labels) in enumerate(stream.step(step)):
                positions = group_positions(step, rank * accum + micro, batch_size, world * accum)
                for k, p in enumerate(positions.tolist()):
                    found[p] = (images[k], aug_cond[k], int(labels[k]))
    return found


def assert_same_items(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for p in a:
        assert torch.equal(a[p][0], b[p][0]) and torch.equal(a[p][1], b[p][1]) and a[p][2] == b[p][2], p


def test_in_memory_and_file_backed_data_give_the_same_items(sources):
    in_memory, on_disk = sources
    assert isinstance(in_memory.dataset, ArrayDataset) and not isinstance(on_disk.dataset, ArrayDataset)
    reference = items_by_position(in_memory, steps=4, batch_size=5)
    assert_same_items(reference, items_by_position(on_disk, steps=4, batch_size=5, workers=0))
    assert_same_items(reference, items_by_position(on_disk, steps=4, batch_size=5, workers=2))


def test_an_item_is_the_same_for_any_world_size_or_accumulation(sources):
    data = sources[0]
    one = items_by_position(data, steps=3, batch_size=6)
    assert_same_items(one, items_by_position(data, steps=3, batch_size=3, world=2))
    assert_same_items(one, items_by_position(data, steps=3, batch_size=3, accum=2))
    assert_same_items(one, items_by_position(data, steps=3, batch_size=1, world=2, accum=3))


def test_items_are_augmented_and_each_epoch_is_a_fresh_permutation(sources, pixels):
    items = items_by_position(sources[0], steps=4, batch_size=5, prob=0.2)  # two epochs of ten
    indices = stream_indices(3, np.arange(2 * N), N)
    assert sorted(indices[:N]) == list(range(N)) and sorted(indices[N:]) == list(range(N))
    assert not np.array_equal(indices[:N], indices[N:])
    signed = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    flipped_at_most = [p for p, (image, cond, _) in items.items() if not cond[1:].any()]
    warped = [p for p, (image, cond, _) in items.items() if cond[2:].any()]
    assert flipped_at_most and warped  # some items only x-flipped (or not at all), some warped
    for p in flipped_at_most:
        expected = signed[indices[p]].flip(-1) if items[p][1][0] else signed[indices[p]]
        assert torch.equal(items[p][0], expected)


def test_in_memory_images_stay_uint8(sources):
    stream = TrainingBatches(sources[0], 0, 0.0, torch.device("cpu"), 4, 0, 1, 1, 0, 1)
    assert stream.resident.images.dtype == torch.uint8 and stream.resident.images.shape == (N, 3, SIZE, SIZE)
    images, aug_cond, labels = stream.micro_batch(0, 0)
    assert images.dtype == torch.float32 and images.shape == (4, 3, SIZE, SIZE) and not aug_cond.any()
