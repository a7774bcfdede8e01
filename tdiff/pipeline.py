"""The training input pipeline: stream positions in, augmented micro-batches on the training device out.

The data order is an endless stream of per-epoch permutations addressed by position: position p is
item perm_e[p mod N] of epoch e = p // N. A step's micro-batch is a list of positions
(`group_positions`); its images are gathered by index and augmented as one batch on the device, with
per-item augmentation parameters drawn from (seed, position). So an item is the same whichever
process, micro-batch or worker meets it, and a resumed run sees the same stream.

Two storages, one result:
- in memory (CIFAR-10, ArtBench-10, `.npz`): the uint8 images live on the training device (150 MB for
  CIFAR-10) and a batch is a device-side gather; no DataLoader, no worker processes;
- on disk (a folder of image files): DataLoader workers decode the files of each micro-batch to uint8,
  the batch is copied to the device (pinned, asynchronous on CUDA) and augmented there.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tdiff.augment import augment_batch
from tdiff.data import ArrayDataset, ImageData, to_signed
from tdiff.hardware import retain_freed_memory, to_device
from tdiff.seeds import mix_seed

# The signals that ask a training run to save and stop (tdiff.train.StopSignal catches them in the main process).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

# An in-memory data set goes to a CUDA device when it takes at most this share of the GPU's memory.
DEVICE_DATA_SHARE = 0.25


@lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng(mix_seed(seed, epoch, 1)).permutation(n)


def stream_indices(seed: int, positions: np.ndarray, n: int) -> np.ndarray:
    """Data-set indices of stream positions: item perm_e[p mod n] of epoch e = p // n."""
    epochs, offsets = np.divmod(np.asarray(positions, dtype=np.int64), n)
    indices = np.empty_like(offsets)
    for epoch in np.unique(epochs):  # one or two epochs per batch
        where = epochs == epoch
        indices[where] = epoch_permutation(seed, int(epoch), n)[offsets[where]]
    return indices


def group_positions(step: int, group: int, batch_size: int, n_groups: int) -> np.ndarray:
    """Stream positions of one micro-batch: global positions g + i·G of this step's global batch."""
    return step * batch_size * n_groups + group + n_groups * np.arange(batch_size, dtype=np.int64)


class StepBatches:
    """Batch sampler: for each step from `start`, this process's micro-batches of positions in order."""

    def __init__(self, start: int, end: int, batch_size: int, rank: int, world: int, accum: int):
        self.start, self.end = start, end
        self.batch_size, self.rank, self.world, self.accum = batch_size, rank, world, accum

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.end):
            for micro in range(self.accum):
                group = self.rank * self.accum + micro
                yield group_positions(step, group, self.batch_size, self.world * self.accum).tolist()

    def __len__(self) -> int:
        return (self.end - self.start) * self.accum


class ResidentImages:
    """An in-memory data set as uint8 tensors on one device; a batch is a gather by index there."""

    def __init__(self, dataset: ArrayDataset, device: torch.device):
        storage = device if _fits(dataset.images.nbytes, device) else torch.device("cpu")
        self.device = device
        self.images = torch.from_numpy(dataset.images).to(storage)  # (N, C, H, W) uint8
        self.labels = torch.from_numpy(np.asarray(dataset.labels, dtype=np.int64)).to(storage)  # (N,)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 (B, C, H, W), labels (B,)) on the training device."""
        index = to_device(indices, self.images.device)  # (B,) the gather runs where the images are
        images, labels = self.images.index_select(0, index), self.labels.index_select(0, index)
        return to_device(images, self.device), to_device(labels, self.device)


def _fits(nbytes: int, device: torch.device) -> bool:
    if device.type != "cuda":
        return True  # the CPU (or MPS, unified memory) already holds it
    return nbytes <= DEVICE_DATA_SHARE * torch.cuda.get_device_properties(device).total_memory


class DecodedItems(Dataset):
    """Position -> (uint8 (C, H, W), label) of a data set read from files; runs in DataLoader workers."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.n = dataset, seed, len(dataset)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        return self.dataset.raw(int(stream_indices(self.seed, np.array([position]), self.n)[0]))


class TrainingBatches:
    """This process's augmented micro-batches for steps start..end−1, on the training device."""

    def __init__(
        self,
        data: ImageData,
        seed: int,
        augment_prob: float,
        device: torch.device,
        batch_size: int,
        rank: int,
        world: int,
        accum: int,
        start: int,
        end: int,
        num_workers: int = 2,
    ):
        self.seed, self.augment_prob, self.device = seed, augment_prob, device
        self.batch_size, self.rank, self.accum, self.n_groups = batch_size, rank, accum, world * accum
        self.n = len(data.dataset)
        if device.type == "cpu":
            retain_freed_memory()
        if isinstance(data.dataset, ArrayDataset):
            self.resident, self._decoded = ResidentImages(data.dataset, device), None
        else:
            sampler = StepBatches(start, end, batch_size, rank, world, accum)
            loader = DataLoader(
                DecodedItems(data.dataset, seed),
                batch_sampler=sampler,
                num_workers=num_workers,
                pin_memory=device.type == "cuda",
                worker_init_fn=_ignore_stop_signals,
                persistent_workers=False,
            )
            self.resident, self._decoded = None, iter(loader)

    def positions(self, step: int, micro: int) -> np.ndarray:
        return group_positions(step, self.rank * self.accum + micro, self.batch_size, self.n_groups)

    def micro_batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images (B, C, H, W) float32 in [-1, 1], augmented; aug_cond (B, 9); labels (B,)) on the device.

        Micro-batches must be asked for in order (step by step, micro-step by micro-step): file-backed
        data sets are read ahead by the DataLoader in that order."""
        positions = self.positions(step, micro)
        if self.resident is not None:
            images, labels = self.resident.batch(stream_indices(self.seed, positions, self.n))
        else:
            images, labels = next(self._decoded)
            images, labels = to_device(images, self.device), to_device(labels, self.device)
        images, aug_cond = augment_batch(to_signed(images), self.seed, positions, self.augment_prob)
        return images, aug_cond, labels

    def step(self, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The micro-batches of optimiser step `step`, in order."""
        return (self.micro_batch(step, micro) for micro in range(self.accum))


def _ignore_stop_signals(worker_id: int) -> None:
    """Ctrl-C, `kill -TERM -<pgid>` (Slurm's scancel) and a closed terminal reach the whole process group.
    Only the main process acts on them: it finishes the step, saves, and shuts the workers down itself;
    a worker that died of the signal first would take the run down before it could save."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
