"""tdiff.data on data the tests write themselves (and scikit-learn's bundled digits): no network, a few
tiny files, a few seconds."""

import hashlib
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tdiff.cli import main
from tdiff.config import PRESET_DIR, load_preset, loads
from tdiff.data import KNOWN_SOURCES, ArtBench10, ImageData, check_compatible, open_dataset
from tdiff.errors import UserError

pytestmark = pytest.mark.usefixtures("no_dataset_download")  # a test that needs the network is a bug


def write_npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def random_uint8(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def assert_one_line_user_error(excinfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


# ---------------------------------------------------------------------------------------------------
# npz


def test_npz_items_are_signed_float_chw_with_labels(tmp_path):
    images = random_uint8(6, 8, 8, 3)
    images[0] = 0
    images[1] = 255  # the two ends of the range map to exactly -1 and 1
    source = write_npz(tmp_path / "d.npz", images=images, labels=np.array([0, 1, 2, 0, 1, 2]))
    data = open_dataset(source, tmp_path, image_size=8)
    assert (len(data.dataset), data.channels, data.num_classes) == (6, 3, 3)
    assert data.class_names == ("0", "1", "2")
    image, label = data.dataset[4]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and label == 1
    assert torch.allclose(image, torch.from_numpy(images[4]).permute(2, 0, 1).float() / 127.5 - 1)
    assert data.dataset[0][0].min() == -1 and data.dataset[1][0].max() == 1
    assert data.labels.tolist() == [0, 1, 2, 0, 1, 2]


def test_npz_grey_without_channel_axis(tmp_path):
    source = write_npz(tmp_path / "grey.npz", images=random_uint8(3, 4, 4), labels=np.array([1, 0, 1]))
    data = open_dataset(source, tmp_path, image_size=4)
    assert data.channels == 1 and data.dataset[0][0].shape == (1, 4, 4)


def test_npz_without_labels_is_unconditional(tmp_path):
    source = write_npz(tmp_path / "u.npz", images=random_uint8(3, 4, 4, 3))
    data = open_dataset(source, tmp_path, image_size=4)
    assert (data.num_classes, data.class_names) == (0, ())
    assert [data.dataset[i][1] for i in range(3)] == [0, 0, 0]


def test_npz_of_another_size_is_resized_and_cropped(tmp_path):
    images = np.full((2, 12, 8, 3), 200, dtype=np.uint8)  # flat colour survives bicubic resizing
    data = open_dataset(write_npz(tmp_path / "big.npz", images=images), tmp_path, image_size=4)
    image = data.dataset[1][0]
    assert image.shape == (3, 4, 4)
    assert torch.allclose(image, torch.full_like(image, 200 / 127.5 - 1), atol=1 / 127.5)


# ---------------------------------------------------------------------------------------------------
# Folders


def test_folder_classes_come_from_sorted_folder_names(tmp_path):
    for name, count in [("dogs", 2), ("cats", 3), ("birds", 1)]:
        for i in range(count):
            write_png(tmp_path / "pets" / name / f"{i}.png", random_uint8(4, 4, 3, seed=i))
    (tmp_path / "pets" / "cats" / "notes.txt").write_text("not an image")
    data = open_dataset(str(tmp_path / "pets"), tmp_path, image_size=4)
    assert data.class_names == ("birds", "cats", "dogs") and data.num_classes == 3
    assert data.labels.tolist() == [0, 1, 1, 1, 2, 2]
    image, label = data.dataset[5]
    assert image.shape == (3, 4, 4) and image.dtype == torch.float32 and label == 2
    assert -1 <= image.min() and image.max() <= 1


def test_folder_non_square_image_keeps_its_centre(tmp_path):
    # 64 wide x 16 high: red quarter, green half, blue quarter. The shorter side goes 16 -> 8 (width 32),
    # then the centre 8 columns are cropped, all well inside the green band.
    pixels = np.zeros((16, 64, 3), dtype=np.uint8)
    pixels[:, :16, 0] = pixels[:, 16:48, 1] = pixels[:, 48:, 2] = 255
    write_png(tmp_path / "wide" / "only" / "a.png", pixels)
    data = open_dataset(str(tmp_path / "wide"), tmp_path, image_size=8)
    image = data.dataset[0][0]
    assert image.shape == (3, 8, 8)
    assert torch.allclose(image, torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 8, 8), atol=0.02)


def test_folder_of_grey_images_has_one_channel_and_one_class_is_unconditional(tmp_path):
    write_png(tmp_path / "g" / "digits" / "a.png", random_uint8(6, 6))
    write_png(tmp_path / "g" / "digits" / "b.png", random_uint8(6, 6, seed=1))
    data = open_dataset(str(tmp_path / "g"), tmp_path, image_size=6)
    assert (data.channels, data.num_classes, data.class_names) == (1, 0, ())
    assert data.dataset[1][0].shape == (1, 6, 6)


def test_flat_folder_with_a_colour_image_is_unconditional_rgb(tmp_path):
    write_png(tmp_path / "flat" / "a.png", random_uint8(5, 5))
    write_png(tmp_path / "flat" / "b.png", random_uint8(5, 5, 3))
    data = open_dataset(str(tmp_path / "flat"), tmp_path, image_size=5)
    assert (len(data.dataset), data.channels, data.num_classes) == (2, 3, 0)
    assert data.dataset[0][0].shape == (3, 5, 5)  # the grey image is converted to match


# ---------------------------------------------------------------------------------------------------
# CIFAR-format releases


def write_cifar_format(folder: Path, label_key: str, class_names: list[str]) -> dict[str, str]:
    """A tiny release in CIFAR's pickle layout (two images per batch); returns file name -> md5."""
    folder.mkdir(parents=True)
    md5 = {}
    batches = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(batches):
        # Rows are flattened (3, 32, 32) images, as in the real files.
        entry = {"data": random_uint8(2, 3 * 32 * 32, seed=i), "labels": [i % 10, (i + 1) % 10]}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "meta").write_bytes(pickle.dumps({label_key: class_names}))
    for path in folder.iterdir():
        md5[path.name] = hashlib.md5(path.read_bytes()).hexdigest()
    return md5


def test_artbench_format_is_read_from_data_dir_without_network(tmp_path, monkeypatch):
    styles = [f"style{i}" for i in range(10)]
    md5 = write_cifar_format(tmp_path / "artbench-10-batches-py", "styles", styles)
    # The real checksums cannot match fake files; the layout and the loading code are what is tested.
    train_list = [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)]
    monkeypatch.setattr(ArtBench10, "train_list", train_list)
    monkeypatch.setattr(ArtBench10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(ArtBench10, "meta", {"filename": "meta", "key": "styles", "md5": md5["meta"]})
    data = open_dataset("artbench10", tmp_path, image_size=16)
    assert (len(data.dataset), data.channels, data.num_classes) == (10, 3, 10)
    assert data.class_names == tuple(styles) and data.labels[:4].tolist() == [0, 1, 1, 2]
    assert data.dataset[0][0].shape == (3, 16, 16)


@pytest.mark.parametrize("download", [True, False])
def test_cifar10_offline_is_one_line_user_error(tmp_path, download):
    with pytest.raises(UserError) as excinfo:
        open_dataset("cifar10", tmp_path / "data", image_size=32, download=download)
    assert_one_line_user_error(
        excinfo, "CIFAR-10 not found", "cifar-10-python.tar.gz", "cifar-10-batches-py/", "--data PATH"
    )
    if download:
        assert "no network in tests" in str(excinfo.value)


# ---------------------------------------------------------------------------------------------------
# scikit-learn's digits: bundled with the package, nothing downloaded

# Images per digit 0..9 in sklearn.datasets.load_digits (1,797 in all).
DIGIT_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_digits_are_1797_grey_8x8_uint8_images_of_ten_classes(tmp_path):
    data = open_dataset("digits", tmp_path / "data", image_size=8)
    assert not (tmp_path / "data").exists()  # nothing downloaded, nothing written
    assert (data.name, len(data.dataset), data.channels, data.image_size, data.num_classes) == (
        "digits",
        1797,
        1,
        8,
        10,
    )
    assert data.class_names == tuple("0123456789")
    stored = data.dataset.images  # what tdiff.pipeline moves to the device
    assert stored.shape == (1797, 1, 8, 8) and stored.dtype == np.uint8
    assert (stored.min(), stored.max()) == (0, 255)  # ink levels 0..16 -> 0..255
    assert set(np.unique(stored)) == {round(level * 255 / 16) for level in range(17)}
    assert data.labels.dtype == np.int64 and np.bincount(data.labels).tolist() == DIGIT_COUNTS
    image, label = data.dataset[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32 and label == data.labels[0] == 0
    assert image.min() == -1 and image.max() <= 1


def test_digits_are_resized_like_every_source(tmp_path):
    data = open_dataset("digits", tmp_path, image_size=16)
    assert data.dataset.images.shape == (1797, 1, 16, 16) and data.dataset[5][0].shape == (1, 16, 16)
    assert data.labels[:10].tolist() == list(range(10))


def test_digits_without_scikit_learn_is_one_line_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # `import` raises ImportError
    with pytest.raises(UserError) as excinfo:
        open_dataset("digits", tmp_path, image_size=8)
    assert_one_line_user_error(excinfo, "--data digits", "pip install scikit-learn")


def test_digits_is_a_known_source_name():
    assert "digits" in KNOWN_SOURCES  # run.json records it as is; tdiff eval RUN and --resume find it


def test_digits_preset_is_complete_and_fits_the_digits(tmp_path):
    text = (PRESET_DIR / "digits.toml").read_text()
    config = loads(text, where="digits.toml", complete=True)  # every key of every section is written out
    assert config == load_preset("digits")
    m = config.model
    assert (m.channels, m.num_classes) == (1, 10) and config.routing.rates == ()
    check_compatible(open_dataset("digits", tmp_path, m.image_size), m.channels, m.num_classes)


def test_digits_preset_trains_samples_and_evaluates_offline(tmp_path, monkeypatch, capsys, fake_inception):
    monkeypatch.chdir(tmp_path)  # the run records data_dir ./data; eval caches its reference there
    # Batch 4: tensors below PyTorch's parallel grain, so a busy machine's thread contention cannot stall it.
    assert (
        main(
            [
                "train",
                "--preset",
                "digits",
                "--data",
                "digits",
                "--steps",
                "2",
                "--batch-size",
                "4",
                "--cpu",
                "--out",
                "run",
                "--set",
                "train.demo_every=0",
            ]
        )
        == 0
    )
    assert json.loads(Path("run/run.json").read_text())["data"] == "digits"
    assert main(["sample", "run", "-n", "3", "--steps", "2", "--device", "cpu", "--out", "samples"]) == 0
    size = load_preset("digits").model.image_size
    with np.load("samples/samples.npz") as npz:
        assert npz["images"].shape == (3, size, size, 1) and npz["labels"].tolist() == [0, 1, 2]
    # `tdiff eval RUN` finds the training data from run.json's "digits", with no --data
    capsys.readouterr()
    assert main(["eval", "run", "-n", "4", "--steps", "2", "--device", "cpu", "--fid", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_fake"] == 4


# ---------------------------------------------------------------------------------------------------
# Bad input


def make_empty_folder(tmp_path: Path) -> str:
    (tmp_path / "empty").mkdir()
    return str(tmp_path / "empty")


def make_text_file_named_npz(tmp_path: Path) -> str:
    (tmp_path / "x.npz").write_text("hello")
    return str(tmp_path / "x.npz")


BAD_SOURCES = {
    "unknown name": (lambda tmp: "cifar100", ["unknown data source", "cifar10, artbench10, digits"]),
    "npz without images": (
        lambda tmp: write_npz(tmp / "x.npz", pixels=random_uint8(2, 4, 4, 3)),
        ["no 'images' array", "pixels", "np.savez"],
    ),
    "float images": (
        lambda tmp: write_npz(tmp / "f.npz", images=np.zeros((2, 4, 4, 3), np.float32)),
        ["float32", "uint8"],
    ),
    "four channels": (
        lambda tmp: write_npz(tmp / "c.npz", images=random_uint8(2, 4, 4, 4)),
        ["(2, 4, 4, 4)", "(N, H, W, 3)"],
    ),
    "labels per pixel": (
        lambda tmp: write_npz(tmp / "l.npz", images=random_uint8(2, 4, 4, 3), labels=np.zeros((2, 4))),
        ["labels must be 2 non-negative ints"],
    ),
    "empty folder": (make_empty_folder, ["holds no images", "one sub-folder per class"]),
    "not an npz": (make_text_file_named_npz, ["cannot read", "np.savez"]),
}


@pytest.mark.parametrize("case", BAD_SOURCES)
def test_bad_source_is_one_line_user_error(tmp_path, case):
    make_source, fragments = BAD_SOURCES[case]
    with pytest.raises(UserError) as excinfo:
        open_dataset(make_source(tmp_path), tmp_path, image_size=4)
    assert_one_line_user_error(excinfo, *fragments)


def fake_data(channels: int, num_classes: int) -> ImageData:
    return ImageData(
        dataset=[],
        name="cifar10",
        channels=channels,
        image_size=32,
        num_classes=num_classes,
        class_names=(),
        labels=np.zeros(0, dtype=np.int64),
    )


def test_check_compatible_names_the_set_that_fixes_it():
    with pytest.raises(UserError) as excinfo:
        check_compatible(fake_data(3, 10), channels=1, num_classes=10)
    assert_one_line_user_error(
        excinfo, "cifar10 has 3 channels and 10 classes", "model.channels=1", "add --set model.channels=3"
    )
    with pytest.raises(UserError) as excinfo:
        check_compatible(fake_data(1, 0), channels=3, num_classes=10)
    assert_one_line_user_error(excinfo, "--set model.channels=1 --set model.num_classes=0")


def test_check_compatible_accepts_a_match_and_unconditional_training_on_labelled_data():
    check_compatible(fake_data(3, 10), channels=3, num_classes=10)
    check_compatible(fake_data(3, 10), channels=3, num_classes=0)
