"""Training images as [-1, 1] tensors: CIFAR-10, ArtBench-10, scikit-learn's digits, a folder of images,
or an .npz file.

`open_dataset(source, data_dir, image_size)` returns an `ImageData`: a torch Dataset of
`(image (C, H, W) float32 in [-1, 1], label int)` plus what the model must agree with (channels,
classes). Every source gets the same geometry as k-diffusion's pipeline: the shorter side is resized to
`image_size` (bicubic) and the centre cropped, which is the identity for 32x32 data at 32.
Bad input raises `UserError` with one line naming the fix; see docs/data.md for the formats.
"""

import os
import tarfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension, make_dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from tdiff.errors import UserError

# PIL modes that hold one grey channel; a folder made only of these trains with channels = 1.
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


class ArtBench10(CIFAR10):
    """ArtBench-10's 32x32 CIFAR-format pickle release (Liao et al. 2022), read by torchvision's CIFAR10.

    URL and checksums as in spaghettiSystems/tiny_diffusion train.py and liaopeiyuan/artbench.
    """

    base_folder = "artbench-10-batches-py"
    url = "https://artbench.eecs.berkeley.edu/files/artbench-10-python.tar.gz"
    filename = "artbench-10-python.tar.gz"
    tgz_md5 = "9df1e998ee026aae36ec60ca7b44960e"
    train_list = [
        ["data_batch_1", "c2e02a78dcea81fe6fead5f1540e542f"],
        ["data_batch_2", "1102a4dcf41d4dd63e20c10691193448"],
        ["data_batch_3", "177fc43579af15ecc80eb506953ec26f"],
        ["data_batch_4", "566b2a02ccfbafa026fbb2bcec856ff6"],
        ["data_batch_5", "faa6a572469542010a1c8a2a9a7bf436"],
    ]
    test_list = [["test_batch", "fa44530c8b8158467e00899609c19e52"]]
    meta = {"filename": "meta", "key": "styles", "md5": "5bdcafa7398aa6b75d569baaec5cd4aa"}


# --data name -> (name for people, torchvision class that knows its files, URL and checksums).
DOWNLOADED_SOURCES: dict[str, tuple[str, type[CIFAR10]]] = {
    "cifar10": ("CIFAR-10", CIFAR10),
    "artbench10": ("ArtBench-10", ArtBench10),
}
# Every named --data source -> name for people; a name wins over a path of the same name, and run.json
# records it as is. "digits" ships inside the scikit-learn package, so nothing is downloaded.
KNOWN_SOURCES: dict[str, str] = {
    **{name: title for name, (title, _) in DOWNLOADED_SOURCES.items()},
    "digits": "scikit-learn's 8x8 digits",
}

# scikit-learn's digits: 8x8 pixels of 17 ink levels, 0 (background) .. 16.
DIGITS_LEVELS = 16


@dataclass(frozen=True, eq=False)  # eq=False: `labels` is an array, and `==` on it is not a bool
class ImageData:
    """An opened --data source: its Dataset and what a model must match to train on it."""

    dataset: Dataset  # items: (image (C, H, W) float32 in [-1, 1], label int; 0 when unconditional)
    name: str  # the --data value, for messages
    channels: int  # 3 RGB, 1 grey
    image_size: int  # side of the square images, pixels
    num_classes: int  # 0 = unconditional
    class_names: tuple[str, ...]  # index -> name; empty when unconditional
    labels: np.ndarray  # (N,) int64, every item's label without decoding any image


# ---------------------------------------------------------------------------------------------------
# Pixels


def to_signed(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., C, H, W) in 0..255 -> float32 in [-1, 1]: x / 127.5 − 1, on a new tensor, in place there."""
    return images.to(torch.float32, copy=True).div_(127.5).sub_(1)


def resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side -> size (bicubic), then the centre size x size: Resize + CenterCrop of the reference."""
    if image.size == (size, size):
        return image
    image = TF.resize(image, size, interpolation=InterpolationMode.BICUBIC)
    return TF.center_crop(image, size)


def fit_array(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, size, size, C) uint8 by `resize_and_crop`, image by image."""
    if images.shape[1:3] == (size, size):
        return images
    # PIL wants (H, W) for grey, so the channel axis goes away and comes back.
    grey = images.shape[3] == 1
    fitted = [np.asarray(resize_and_crop(Image.fromarray(image[..., 0] if grey else image), size)) for image in images]
    return np.stack(fitted).reshape(len(images), size, size, images.shape[3])


def _one_line(error: BaseException) -> str:
    """An exception's message on one line, for embedding in a UserError."""
    return " ".join(str(error).split()) or type(error).__name__


# ---------------------------------------------------------------------------------------------------
# Datasets


class ArrayDataset(Dataset):
    """Images held as one uint8 array, converted per item: no file I/O per item, one object to pickle."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        # Stored (N, C, H, W) so an item is a contiguous slice, converted without a permute.
        self.images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def raw(self, index: int) -> tuple[torch.Tensor, int]:
        """Item `index` as uint8 (C, H, W) and its label, as stored."""
        return torch.from_numpy(self.images[index]), int(self.labels[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.raw(index)
        return to_signed(image), label


def _load_image(path: str, mode: str, size: int) -> torch.Tensor:
    """One file -> uint8 (C, size, size) in the folder's common mode."""
    with Image.open(path) as image:
        # Convert before resizing: bicubic on palette indices would mix unrelated colours.
        return TF.pil_to_tensor(resize_and_crop(image.convert(mode), size))


class FolderDataset(Dataset):
    """Image files decoded per item (in the DataLoader workers), all in one PIL mode."""

    def __init__(self, samples: list[tuple[str, int]], mode: str, image_size: int):
        self.samples = samples  # (path, label) in ImageFolder order
        self.load = partial(_load_image, mode=mode, size=image_size)

    def __len__(self) -> int:
        return len(self.samples)

    def raw(self, index: int) -> tuple[torch.Tensor, int]:
        """Item `index` decoded to uint8 (C, H, W), and its label."""
        path, label = self.samples[index]
        return self.load(path), label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.raw(index)
        return to_signed(image), label


# ---------------------------------------------------------------------------------------------------
# Sources


def _open_downloaded(source: str, data_dir: Path, image_size: int, download: bool) -> ImageData:
    """CIFAR-10 or ArtBench-10 train split, fetched into data_dir by torchvision unless already there."""
    title, loader = DOWNLOADED_SOURCES[source]
    try:
        raw = loader(str(data_dir), train=True, download=download)
    # Network, checksum (RuntimeError) and archive failures all have the same fix: local files.
    except (OSError, RuntimeError, tarfile.TarError) as error:
        why = f"the download failed ({_one_line(error)})" if download else "downloading is off"
        # One line: the CLI prints it after "error: " and exits 2.
        raise UserError(
            f"{title} not found (or corrupted) under {data_dir}/ and {why}; "
            f"put {loader.filename} or the extracted {loader.base_folder}/ there, "
            "or pass --data PATH"
        ) from None
    labels = np.asarray(raw.targets, dtype=np.int64)
    images = fit_array(raw.data, image_size)  # (N, 32, 32, 3) uint8 as torchvision leaves it
    return ImageData(ArrayDataset(images, labels), source, 3, image_size, len(raw.classes), tuple(raw.classes), labels)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits at their native 8x8: uint8 (N, 8, 8, 1) in 0..255, labels (N,).

    The 17 ink levels 0..16 map to round(v * 255 / 16), so 0 -> 0 and 16 -> 255. The data ships inside
    the scikit-learn package (sklearn.datasets.load_digits): no download, no data_dir."""
    try:
        from sklearn.datasets import load_digits  # imported here: only this source needs scikit-learn
    except ImportError:
        raise UserError("--data digits needs scikit-learn, which is not installed; pip install scikit-learn") from None
    raw = load_digits()
    images = np.rint(raw.images * (255 / DIGITS_LEVELS)).astype(np.uint8)[..., None]
    return images, np.asarray(raw.target, dtype=np.int64)


def _open_digits(image_size: int) -> ImageData:
    """The digits (one grey channel, classes "0".."9"), resized like every source: bicubic to image_size."""
    images, labels = digits_arrays()
    return ImageData(
        ArrayDataset(fit_array(images, image_size), labels),
        "digits",
        1,
        image_size,
        10,
        tuple(str(digit) for digit in range(10)),
        labels,
    )


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The raw `images` and optional `labels` arrays, or a UserError if the file cannot be read."""
    try:
        npz = np.load(path)
        if not isinstance(npz, np.lib.npyio.NpzFile):  # a renamed .npy: one array, no names
            raise UserError(
                f"{path} holds a single array, not named arrays; "
                "save with np.savez(path, images=uint8 (N, H, W, C), labels=ints (N,))"
            )
        with npz:
            if "images" not in npz.files:
                raise UserError(
                    f"{path} has no 'images' array (found: {', '.join(npz.files) or 'nothing'}); "
                    "save with np.savez(path, images=uint8 (N, H, W, C), labels=ints (N,))"
                )
            return npz["images"], npz["labels"] if "labels" in npz.files else None
    # A corrupt zip, a text file, or pickled objects (refused: loading them would run code).
    except (OSError, ValueError, EOFError) as error:
        raise UserError(f"cannot read {path} as .npz ({_one_line(error)}); write it with np.savez") from None


def _check_npz_images(path: Path, images: np.ndarray) -> np.ndarray:
    """Validated images as (N, H, W, C) uint8, C 1 or 3."""
    if images.dtype != np.uint8:
        raise UserError(
            f"{path}: images are {images.dtype}, expected uint8 in 0..255; "
            "scale them to 0..255 and save images.astype(np.uint8)"
        )
    if images.ndim == 3:  # (N, H, W): grey without a channel axis
        images = images[..., None]
    if images.ndim != 4 or images.shape[3] not in (1, 3):
        raise UserError(
            f"{path}: images have shape {images.shape}, expected (N, H, W, 3) for colour "
            "or (N, H, W) / (N, H, W, 1) for grey"
        )
    if len(images) == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise UserError(f"{path}: images have shape {images.shape}, which holds no pixels; save at least one image")
    return images


def _check_npz_labels(path: Path, labels: np.ndarray, n: int) -> np.ndarray:
    """Validated labels as (N,) int64, each in 0..num_classes-1."""
    if labels.shape != (n,) or labels.dtype.kind not in "iu" or labels.min() < 0:
        raise UserError(
            f"{path}: labels must be {n} non-negative ints, one per image (got shape "
            f"{labels.shape}, dtype {labels.dtype}); or leave them out for unconditional"
        )
    return labels.astype(np.int64)


def _open_npz(path: Path, image_size: int) -> ImageData:
    """An .npz of `images` and optional `labels`; other sizes are resized and centre-cropped."""
    images, labels = _read_npz(path)
    images = _check_npz_images(path, images)
    if labels is None:
        labels, num_classes = np.zeros(len(images), dtype=np.int64), 0
    else:
        labels = _check_npz_labels(path, labels, len(images))
        num_classes = int(labels.max()) + 1
    class_names = tuple(str(index) for index in range(num_classes))
    dataset = ArrayDataset(fit_array(images, image_size), labels)
    return ImageData(dataset, str(path), images.shape[3], image_size, num_classes, class_names, labels)


def _folder_samples(folder: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) pairs and class names: ImageFolder's convention, or loose images if no sub-folders."""
    class_names = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not class_names:
        paths = sorted(str(p) for p in folder.iterdir() if p.is_file())
        return [(path, 0) for path in paths if has_file_allowed_extension(path, IMG_EXTENSIONS)], []
    class_index = {name: index for index, name in enumerate(class_names)}
    samples = make_dataset(str(folder), class_index, extensions=IMG_EXTENSIONS, allow_empty=True)
    # An empty class folder would still take a class index: the model's label table would not match.
    empty = sorted(set(class_names) - {class_names[label] for _, label in samples})
    if samples and empty:
        raise UserError(
            f"{folder}: class folder(s) {', '.join(empty)} hold no images; add images or remove those folders"
        )
    return samples, class_names


def _common_mode(paths: list[str]) -> str:
    """'L' if every image is grey, else 'RGB': one channel count for the whole folder."""
    modes = set()
    for path in paths:
        try:
            with Image.open(path) as image:  # reads the header only
                modes.add(image.mode)
        except (OSError, ValueError) as error:
            raise UserError(f"cannot read image {path} ({_one_line(error)}); remove or replace it") from None
    return "L" if modes <= GREY_MODES else "RGB"


def _open_folder(folder: Path, image_size: int) -> ImageData:
    """One sub-folder per class (names sorted -> labels); one sub-folder or none means unconditional."""
    samples, class_names = _folder_samples(folder)
    if not samples:
        raise UserError(
            f"{folder} holds no images ({', '.join(IMG_EXTENSIONS)}); put them in one sub-folder "
            "per class, or directly in the folder for unconditional training"
        )
    # A single class carries no information, so it trains (and samples) unconditionally.
    if len(class_names) == 1:
        class_names = []
    mode = _common_mode([path for path, _ in samples])
    labels = np.array([label for _, label in samples], dtype=np.int64)
    return ImageData(
        FolderDataset(samples, mode, image_size),
        str(folder),
        1 if mode == "L" else 3,
        image_size,
        len(class_names),
        tuple(class_names),
        labels,
    )


def open_dataset(source: str, data_dir: Path, image_size: int, download: bool = True) -> ImageData:
    """The training images named by `--data`: a known name (fetched into data_dir, or bundled with a
    package), a folder, or an .npz."""
    if source in DOWNLOADED_SOURCES:
        return _open_downloaded(source, Path(data_dir), image_size, download)
    if source == "digits":
        return _open_digits(image_size)
    path = Path(source).expanduser()
    if path.is_dir():
        return _open_folder(path, image_size)
    if path.is_file() and path.suffix.lower() == ".npz":
        return _open_npz(path, image_size)
    if path.is_file():
        raise UserError(
            f"--data {source}: unsupported file type '{path.suffix}'; "
            "pass an .npz file, a folder of images, or one of: " + ", ".join(KNOWN_SOURCES)
        )
    raise UserError(
        f"--data {source}: unknown data source and no such file or folder; "
        "pass one of: " + ", ".join(KNOWN_SOURCES) + ", a folder of images, or an .npz file"
    )


def _count(n: int, one: str, many: str = "") -> str:
    """'1 channel', '3 channels': the messages read as sentences."""
    return f"{n} {one if n == 1 else many or one + 's'}"


def check_compatible(data: ImageData, channels: int, num_classes: int) -> None:
    """Raise a UserError naming the `--set` that makes the model fit the data.

    num_classes = 0 with labelled data is allowed: that is unconditional training, the labels unused.
    """
    wrong = []
    if channels != data.channels:
        wrong.append(("model.channels", channels, data.channels))
    if num_classes not in (0, data.num_classes):
        wrong.append(("model.num_classes", num_classes, data.num_classes))
    if not wrong:
        return
    says = ", ".join(f"{key}={have}" for key, have, _ in wrong)
    fix = " ".join(f"--set {key}={need}" for key, _, need in wrong)
    has = f"{_count(data.channels, 'channel')} and {_count(data.num_classes, 'class', 'classes')}"
    raise UserError(f"{data.name} has {has} but the preset says {says}; add {fix}")
