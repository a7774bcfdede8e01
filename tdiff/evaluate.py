"""FID and KID of generated images against reference images, from Inception features.

The pipeline: images (N, H, W, C) -> a feature extractor -> (N, D) float32 features ->
`feature_statistics` (mean, unbiased covariance, float64) -> `frechet_distance`, and the features
themselves -> `kernel_inception_distance`. `score` runs it for a set of fakes against a `Reference`,
which `reference_features` computes once and caches as .npz in tdiff's cache folder (`cache_dir`).
An `EvalProtocol` says how: the `clean` protocol feeds uint8 images and reports float64 numbers; the
`paper` protocol repeats k-diffusion's training-time evaluation, which fed the sampler's float output
to the extractor and computed FID and KID in float32 (`frechet_distance_float32`,
`kernel_inception_distance_float32`), and reports the float64 values beside them.
The real extractor is clean-fid's TorchScript Inception, loaded from a local file (`load_inception`);
tests inject any callable with a `key`. Progress is reported through a `progress(done, total)`
callback; drawing is the CLI's job. See docs/evaluation.md for the protocols these numbers follow.
"""

import hashlib
import json
import os
import platform
import shutil
import urllib.request
import warnings
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from tdiff.data import ImageData
from tdiff.errors import UserError
from tdiff.files import atomic_write, file_sha256
from tdiff.sample import SamplingPlan, generate, make_plan, random_labels, sample_batch, save_npz

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
INCEPTION_URL = f"https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/{INCEPTION_FILE}"
INCEPTION_ENV = "TDIFF_INCEPTION"
CACHE_ENV = "TDIFF_CACHE_DIR"  # tdiff's cache folder (weights, reference statistics); see `cache_dir`
# clean-fid downloads to a hard-coded folder (cleanfid/features.py: "./" on Windows, "/tmp" elsewhere),
# where tdiff looked before it had a cache folder: a genuine copy found there is copied into it.
CLEANFID_CACHE_DIR = Path("./" if platform.system() == "Windows" else "/tmp")
INCEPTION_SIZE = (299, 299)
KID_PARTITION_SIZE = 5000  # k-diffusion's max_size: larger sets are split into contiguous partitions
KDIFFUSION_FID_EPS = 1e-8  # k-diffusion's fid(): eps·I added to both covariances
CACHE_VERSION = 1  # bump when the .npz layout or the statistics change meaning
# what np.load raises on a missing, cut or foreign file
NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile)

Progress = Callable[[int, int], None]  # (images done, images in total)


class FeatureExtractor(Protocol):
    """Images (N, H, W, 3) -> (N, D) float32 features for one batch.

    The images are numpy uint8 in 0..255 (files, training images, the clean protocol's fakes) or,
    under the paper protocol, float32 in [-1, 1]: the sampler's output, neither rounded nor clamped,
    so it can lie slightly outside.
    """

    key: str  # names the network and its preprocessing; part of the reference-cache key

    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray: ...


# ---------------------------------------------------------------------------------------------------
# Statistics and distances (float64 numpy; no torch, no extractor)


def feature_statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and unbiased covariance (D, D), both float64."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise UserError(f"feature statistics need at least 2 images, got features of shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False, ddof=1)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _psd_factor(sigma: np.ndarray) -> np.ndarray:
    """L with L Lᵀ = sigma, by symmetric eigendecomposition; rounding's tiny negative eigenvalues -> 0."""
    eigenvalues, eigenvectors = np.linalg.eigh(sigma)
    return eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), the Fréchet distance of two Gaussians, in float64.

    Tr (Σ1 Σ2)^½ is computed as the nuclear norm of L1ᵀ L2 (Σi = Li Liᵀ): Σ1 Σ2 is similar to
    (L1ᵀ L2)(L1ᵀ L2)ᵀ, so the square roots of its eigenvalues are the singular values of L1ᵀ L2.
    Unlike scipy.linalg.sqrtm on the non-symmetric Σ1 Σ2 (clean-fid), nothing turns complex or fails on
    singular covariances, and unlike eigenvalues of √Σ1 Σ2 √Σ1 (k-diffusion) small singular values are not
    squared and rooted again, so rank-deficient covariances (fewer images than dimensions, as with 2,000
    images of 2048-d features) stay exact to rounding instead of ~1e-4 off in float64, or ~0.1 FID off in
    float32 as k-diffusion ran it (`frechet_distance_float32`; docs/evaluation.md, "FID").
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched statistics: {mu1.shape}, {sigma1.shape} vs {mu2.shape}, {sigma2.shape}")
    trace_sqrt = np.linalg.svd(_psd_factor(sigma1).T @ _psd_factor(sigma2), compute_uv=False).sum()
    mean_term = np.sum((mu1 - mu2) ** 2)
    return float(mean_term + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def _kernel_sum(x: np.ndarray, y: np.ndarray, rows: int = 1000) -> float:
    """Σ_ij (xᵢᵀyⱼ/d + 1)³, a block of rows at a time so a 5000² kernel never sits in memory."""
    d = x.shape[1]
    return float(sum(((x[i : i + rows] @ y.T / d + 1) ** 3).sum() for i in range(0, len(x), rows)))


def squared_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² of two feature sets under the cubic polynomial kernel k(a, b) = (aᵀb/d + 1)³."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)  # cubes of dot products: float32 is short
    m, n, d = len(x), len(y), x.shape[1]
    # the unbiased estimator drops k(xᵢ, xᵢ) from the within-set sums
    kxx = _kernel_sum(x, x) - (((x * x).sum(axis=1) / d + 1) ** 3).sum()
    kyy = _kernel_sum(y, y) - (((y * y).sum(axis=1) / d + 1) ** 3).sum()
    return kxx / (m * (m - 1)) + kyy / (n * (n - 1)) - 2 * _kernel_sum(x, y) / (m * n)


def kernel_inception_distance(
    feats1: np.ndarray, feats2: np.ndarray, *, partition_size: int = KID_PARTITION_SIZE
) -> float:
    """KID, raw (the paper's tables show it ×1e4): unbiased MMD², k-diffusion's subset scheme.

    Sets up to `partition_size` are compared whole. Larger ones are cut into P = ⌈max(n1, n2)/size⌉
    contiguous partitions (bounds round(i·n/P)) and the P values averaged: deterministic, no seed, and
    k-diffusion's scheme, hence the paper's (k-diffusion computes in float32, this in float64;
    `kernel_inception_distance_float32` is its float32 computation).
    Contiguous cuts assume the features are in no particular order (shuffled reals, random labels).
    """
    parts = -(-max(len(feats1), len(feats2)) // partition_size)
    # each partition of each set needs 2 images for the within-set terms
    if min(len(feats1), len(feats2)) < 2 * parts:
        raise UserError(f"KID needs at least {2 * parts} images per set, got {len(feats1)} and {len(feats2)}")
    bounds1 = [round(i * len(feats1) / parts) for i in range(parts + 1)]
    bounds2 = [round(i * len(feats2) / parts) for i in range(parts + 1)]
    mmds = [squared_mmd(feats1[bounds1[i] : bounds1[i + 1]], feats2[bounds2[i] : bounds2[i + 1]]) for i in range(parts)]
    return float(np.mean(mmds))


# ---------------------------------------------------------------------------------------------------
# k-diffusion's arithmetic: the paper protocol's numbers, torch float32 on the CPU, op for op as
# k_diffusion/evaluation.py (0.1.1) computes them during training (with TF32 off). Rank-deficient
# covariances (2,000 images, 2048 dimensions) make these differ from the float64 values above by more
# than rounding (docs/evaluation.md, "FID"); the paper's Table 1 reports these.


def _float32(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.detach().to("cpu", torch.float32)
    return torch.from_numpy(np.asarray(array, dtype=np.float32))


def feature_statistics_float32(feats: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) features -> mean and unbiased covariance as k-diffusion takes them: torch float32
    `mean(dim=0)` and `torch.cov`."""
    x = _float32(feats)
    return x.mean(dim=0), torch.cov(x.T)


def _sqrtm_eig(a: torch.Tensor) -> torch.Tensor:
    """k-diffusion's `sqrtm_eig`: V |Λ|^½ Vᵀ from `torch.linalg.eigh`."""
    values, vectors = torch.linalg.eigh(a)
    return vectors @ values.abs().sqrt().diag_embed() @ vectors.transpose(-2, -1)


def frechet_distance_float32(mu1, sigma1, mu2, sigma2, *, eps: float = KDIFFUSION_FID_EPS) -> float:
    """k-diffusion's `fid` from the statistics, in float32: ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 sqrtm(√Σ1 Σ2 √Σ1))
    with eps·I added to both Σ, square roots by symmetric eigendecomposition. Not symmetric in rounding:
    k-diffusion passes the fakes first (fid(fakes, reals)), so does `distances`."""
    mu1, sigma1, mu2, sigma2 = map(_float32, (mu1, sigma1, mu2, sigma2))
    mean_term = (mu1 - mu2).pow(2).sum()
    eps_eye = torch.eye(sigma1.shape[0], dtype=torch.float32) * eps
    sigma1, sigma2 = sigma1 + eps_eye, sigma2 + eps_eye
    sqrt1 = _sqrtm_eig(sigma1)
    return float(mean_term + torch.trace(sigma1 + sigma2 - 2 * _sqrtm_eig(sqrt1 @ sigma2 @ sqrt1)))


def _squared_mmd_float32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k-diffusion's `squared_mmd` with its cubic `polynomial_kernel`: whole kernel matrices, float32."""
    kernel = lambda a, b: (a @ b.T / a.shape[-1] + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    kxx_sum = kxx.sum() - kxx.diagonal().sum()
    kyy_sum = kyy.sum() - kyy.diagonal().sum()
    return kxx_sum / m / (m - 1) + kyy_sum / n / (n - 1) - kxy.sum() * 2 / m / n


def kernel_inception_distance_float32(feats1, feats2, *, partition_size: int = KID_PARTITION_SIZE) -> float:
    """k-diffusion's `kid` in float32: the partitions of `kernel_inception_distance`, MMD² summed in float32."""
    x, y = _float32(feats1), _float32(feats2)
    parts = -(-max(len(x), len(y)) // partition_size)
    if min(len(x), len(y)) < 2 * parts:
        raise UserError(f"KID needs at least {2 * parts} images per set, got {len(x)} and {len(y)}")
    total = x.new_zeros([])
    for i in range(parts):
        total = total + _squared_mmd_float32(
            x[round(i * len(x) / parts) : round((i + 1) * len(x) / parts)],
            y[round(i * len(y) / parts) : round((i + 1) * len(y) / parts)],
        )
    return float(total / parts)


# ---------------------------------------------------------------------------------------------------
# Images and features


def as_images(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """(N, H, W, C) or (N, H, W), numpy or torch, uint8 in 0..255 or floating in [-1, 1] -> numpy
    (N, H, W, 3), uint8 or float32; grey repeated to RGB."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu()
        images = (images.float() if images.is_floating_point() else images).numpy()
    images = np.asarray(images)
    if np.issubdtype(images.dtype, np.floating):
        images = images.astype(np.float32, copy=False)
    elif images.dtype != np.uint8:
        raise UserError(f"images must be uint8 in 0..255 (or floats in [-1, 1]), got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise UserError(f"images must be (N, H, W, C) with C = 1 or 3, got shape {images.shape}")
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def as_uint8_images(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """`as_images`, uint8 only (what files hold): floats are an error."""
    images = as_images(images)
    if images.dtype != np.uint8:
        raise UserError(f"images must be uint8 in 0..255, got {images.dtype}")
    return images


def quantised(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """`as_images` as uint8: floats in [-1, 1] clamped and rounded to the nearest level, as `tdiff sample`
    saves them (sample.to_uint8)."""
    images = as_images(images)
    if images.dtype == np.uint8:
        return images
    return np.round((np.clip(images, -1, 1) + 1) * np.float32(127.5)).astype(np.uint8)


def extract_features(
    images: np.ndarray | torch.Tensor,
    extractor: FeatureExtractor,
    *,
    batch_size: int = 200,
    progress: Progress | None = None,
) -> np.ndarray:
    """Images (N, H, W, C), uint8 or float in [-1, 1] (`as_images`) -> (N, D) float32 features,
    `batch_size` images per extractor call.

    float32 as networks give them: 50,000 × 2048 features are 400 MB, twice that in float64; the
    float64 statistics and kernels are computed from them.
    """
    images = as_images(images)
    if len(images) == 0:
        raise UserError("no images to extract features from")
    batches = []
    for start in range(0, len(images), batch_size):
        batches.append(np.asarray(extractor(images[start : start + batch_size]), dtype=np.float32))
        if progress is not None:
            progress(min(start + batch_size, len(images)), len(images))
    return np.concatenate(batches)


def load_images(path: str | Path) -> np.ndarray:
    """A folder of PNG/JPG files (sorted by name) or an .npz with an `images` array -> uint8 (N, H, W, C)."""
    path = Path(path)
    if path.is_dir():
        return _load_folder(path)
    if path.is_file() and path.suffix.lower() == ".npz":
        return _load_npz(path)
    if path.exists():
        raise UserError(f"{path}: expected a folder of PNG/JPG images or an .npz file with an 'images' array")
    raise UserError(f"{path}: no such file or folder")


def _load_folder(folder: Path) -> np.ndarray:
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise UserError(f"{folder}: no .png/.jpg images in this folder")
    # RGB for every file: the extractor repeats grey to 3 channels anyway, and a mixed folder stacks
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                images.append(np.asarray(image.convert("RGB")))
        except OSError as error:
            raise UserError(f"{file}: not a readable image ({error})") from None
        if images[-1].shape != images[0].shape:
            raise UserError(
                f"{file}: size {images[-1].shape[:2]} differs from {files[0].name}'s "
                f"{images[0].shape[:2]}; all images must have one size"
            )
    return np.stack(images)


def _load_npz(path: Path) -> np.ndarray:
    try:
        # allow_pickle=False: an .npz from elsewhere must not run code when read
        with np.load(path, allow_pickle=False) as npz:
            if "images" not in npz.files:
                raise UserError(
                    f"{path} has no 'images' array (found: {', '.join(npz.files) or 'nothing'}); "
                    "expected uint8 images (N, H, W, C) as `tdiff sample` writes them"
                )
            images = npz["images"]
    except NPZ_ERRORS as error:
        raise UserError(f"cannot read {path} as .npz ({_one_line(error)})") from None
    return as_uint8_images(images)


# ---------------------------------------------------------------------------------------------------
# tdiff's cache folder: the Inception weights and reference statistics


def cache_dir() -> Path:
    """$TDIFF_CACHE_DIR, else $XDG_CACHE_HOME/tdiff (when set to an absolute path, as the XDG spec asks),
    else ~/.cache/tdiff: kept across reboots and private to the user, unlike clean-fid's /tmp.
    Read at each call, so setting the variable takes effect at once. Not created here."""
    named = os.environ.get(CACHE_ENV)
    if named:
        return Path(named).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache") / "tdiff"


def reference_cache_dir() -> Path:
    return cache_dir() / "references"


# ---------------------------------------------------------------------------------------------------
# The Inception network: clean-fid's TorchScript port of TF's 2015-12-05 graph, from a local file


def _checked(path: Path) -> Path:
    """`path` if it holds the expected weights, else UserError naming the fix."""
    if path.is_dir():
        path = path / INCEPTION_FILE
    if not path.is_file():
        raise UserError(
            f"Inception weights {path} not found; fetch {INCEPTION_FILE} "
            f"(SHA-256 {INCEPTION_SHA256}) from {INCEPTION_URL}"
        )
    actual = file_sha256(path)
    if actual != INCEPTION_SHA256:
        raise UserError(
            f"{path} has SHA-256 {actual}, expected {INCEPTION_SHA256} ({INCEPTION_FILE}); "
            f"replace it with a fresh copy from {INCEPTION_URL}"
        )
    return path


def _download(url: str, dest: Path) -> None:
    """Fetch `url` to `dest` through a temp file in the same folder, so a cut download leaves nothing."""
    dest.parent.mkdir(parents=True, exist_ok=True)

    def fetch(file) -> None:
        # a timeout, which clean-fid's own downloader lacks: a firewalled host must fail, not hang
        with urllib.request.urlopen(url, timeout=60) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                file.write(block)

    atomic_write(dest, fetch)


def _genuine(path: Path) -> bool:
    try:
        return path.is_file() and file_sha256(path) == INCEPTION_SHA256
    except OSError:
        return False


def _copy(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)

    def write(file) -> None:
        with open(source, "rb") as original:
            shutil.copyfileobj(original, file, 1 << 20)

    atomic_write(dest, write)


def locate_inception(path: str | Path | None = None) -> Path:
    """The verified weights file: `path` (--inception), else $TDIFF_INCEPTION, else tdiff's cache
    (`cache_dir()`). A file missing there is copied from clean-fid's old location (/tmp) when a genuine
    one lies there, else downloaded. A path that was named explicitly is never silently skipped."""
    named = path if path is not None else os.environ.get(INCEPTION_ENV) or None
    if named is not None:
        return _checked(Path(named))
    cached = cache_dir() / INCEPTION_FILE
    if cached.exists():
        return _checked(cached)
    legacy = CLEANFID_CACHE_DIR / INCEPTION_FILE
    if _genuine(legacy):
        # copied, not used in place: /tmp is emptied on reboot and shared between users
        try:
            _copy(legacy, cached)
        except OSError:
            return legacy  # the cache folder is not writable: the verified copy where it is will do
        return _checked(cached)
    try:
        _download(INCEPTION_URL, cached)
    except Exception as error:  # any failure offline (DNS, proxy, timeout, disk) means the same fix
        raise UserError(
            f"Inception weights {INCEPTION_FILE} (SHA-256 {INCEPTION_SHA256}) not found and "
            f"the download failed ({_one_line(error)}); fetch it from {INCEPTION_URL} and put it "
            f"at {cached}, set {INCEPTION_ENV}=PATH, or pass --inception PATH"
        ) from None
    return _checked(cached)


def _resize_clean(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """clean-fid's "clean" mode: each channel of each uint8 image PIL-bicubic-resized to 299² in float32,
    the images spread over the CPU's cores (PIL releases the GIL while it resamples)."""
    if images.dtype != np.uint8:
        raise ValueError("the clean resize takes uint8 images (see `quantised`)")
    from cleanfid.resize import make_resizer  # imported here: only the real extractor needs clean-fid

    resize = make_resizer("PIL", False, "bicubic", INCEPTION_SIZE)
    with ThreadPoolExecutor(min(len(images), os.cpu_count() or 1, 32) or 1) as pool:
        resized = np.stack(list(pool.map(resize, images)))  # (N, 299, 299, 3) float32 in [0, 255]
    return torch.from_numpy(resized).permute(0, 3, 1, 2).to(device)


def _resize_kdiffusion(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """k-diffusion's InceptionV3FeatureExtractor (the paper's protocol): images in [-1, 1] (uint8 k becomes
    k/127.5 − 1; floats are taken as they are, unclamped), torch bicubic + antialias to 299², then
    x·127.5 + 127.5 clamped to [0, 255]: floats stay floats, never rounded. On the device."""
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2)
    x = x.float() / 127.5 - 1 if images.dtype == np.uint8 else x.float()
    x = F.interpolate(x, INCEPTION_SIZE, mode="bicubic", align_corners=False, antialias=True)
    return (x * 127.5 + 127.5).clamp(0, 255)


RESIZERS = {"clean": _resize_clean, "kdiffusion": _resize_kdiffusion}


class InceptionExtractor:
    """2048-d pool features of an Inception-v3 for images of any size, one batch per call: uint8, or with
    the kdiffusion resize also float in [-1, 1]. `network` maps (N, 3, 299, 299) in [-1, 1] to (N, 2048[, 1,
    1]); `load_inception` gives clean-fid's, `bench/sampling.py` a random-weight stand-in for timing."""

    def __init__(
        self,
        network: Callable[[torch.Tensor], torch.Tensor],
        device: str | torch.device = "cpu",
        resize: str = "clean",
        key: str = "",
    ):
        if resize not in RESIZERS:
            raise UserError(f"resize {resize!r}: must be one of {', '.join(RESIZERS)}")
        self.network, self.device, self.resize = network, torch.device(device), resize
        self.key = f"{key}:{resize}-299"

    @torch.inference_mode()
    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        x = RESIZERS[self.resize](as_images(images), self.device)  # (N, 3, 299, 299) in [0, 255]
        feats = self.network((x - 128) / 128)  # (N, 2048, 1, 1)
        return feats.reshape(len(x), -1).float().cpu().numpy()


def clean_fid_inception(weights: Path, device: str | torch.device = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """clean-fid's Inception from its TorchScript file, as a function of images in [-1, 1]: the graph's
    `.layers`, which skip its built-in bilinear resize (clean-fid's InceptionV3W with resize_inside=False
    does the same). TorchScript, never pickle: loading runs no Python code from the file. Recent torch
    marks jit.load deprecated, but these weights exist only as TorchScript."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*", category=FutureWarning)
        return torch.jit.load(str(weights), map_location=device).eval().layers


def load_inception(
    path: str | Path | None = None, *, device: str | torch.device = "cpu", resize: str = "clean"
) -> InceptionExtractor:
    """The real extractor; `path` is --inception (see `locate_inception` for the search order)."""
    network = clean_fid_inception(locate_inception(path), device)
    return InceptionExtractor(network, device, resize, key=f"inception-2015-12-05:{INCEPTION_SHA256[:16]}")


# ---------------------------------------------------------------------------------------------------
# Reference statistics, cached


@dataclass(frozen=True, eq=False)  # eq=False: the fields are arrays, and `==` on them is not a bool
class Reference:
    """The real side of FID/KID: mean, covariance, and the features themselves when KID is wanted."""

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64, unbiased
    feats: np.ndarray | None  # (N, D) float32; None for mu/sigma-only statistics (FID, not KID)
    n: int | None  # images behind the statistics; None when a foreign file does not say


def reference_from_features(feats: np.ndarray) -> Reference:
    mu, sigma = feature_statistics(feats)
    return Reference(mu, sigma, feats, len(feats))


def load_reference(path: str | Path) -> Reference:
    """An .npz with `mu` and `sigma` (+ `feats` for KID): tdiff's cache or clean-fid's statistics files."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = {"mu", "sigma"} - set(npz.files)
            if missing:
                raise UserError(
                    f"{path} lacks {', '.join(sorted(missing))}; expected an .npz with mu, sigma (and feats for KID)"
                )
            feats = npz["feats"] if "feats" in npz.files else None
            n = len(feats) if feats is not None else int(npz["n"]) if "n" in npz.files else None
            return Reference(npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64), feats, n)
    except NPZ_ERRORS as error:
        raise UserError(f"cannot read reference statistics {path} ({_one_line(error)})") from None


def _cache_key(extractor: FeatureExtractor, n: int, source: str) -> str:
    key = {"version": CACHE_VERSION, "extractor": extractor.key, "n": n, "source": source}
    return json.dumps(key, sort_keys=True)


def _read_cache(path: Path, key: str) -> Reference | None:
    """The cached Reference if `path` holds one made with `key`; None if absent, stale or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "key" not in npz.files or str(npz["key"]) != key:
                return None
        return load_reference(path)
    except (*NPZ_ERRORS, UserError):
        return None  # a cut or foreign file is recomputed and overwritten, like a stale one


def _write_cache(path: Path, reference: Reference, key: str) -> None:
    """Atomic (temp file, then rename): readers see the old cache or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_npz(
        path, mu=reference.mu, sigma=reference.sigma, feats=reference.feats, n=np.int64(reference.n), key=np.array(key)
    )


def reference_features(
    images: np.ndarray | torch.Tensor | Callable[[], np.ndarray],
    extractor: FeatureExtractor,
    cache_path: str | Path,
    *,
    n: int | None = None,
    source: str = "",
    batch_size: int = 200,
    progress: Progress | None = None,
) -> Reference:
    """Reference statistics of the first `n` images, read from `cache_path` or computed and cached there.

    `images` is a uint8 array or a zero-argument loader, called only on a cache miss (with a loader,
    `n` is required, since the key must be known before loading). The cache holds a key naming the
    extractor, `n` and `source` (say which data, e.g. "cifar10 train unaugmented seed 0"); a file with
    another key is recomputed and overwritten.
    """
    if callable(images) and n is None:
        raise ValueError("reference_features: pass n with a loader, so the cache key is known before loading")
    n = len(images) if n is None else n
    key, cache_path = _cache_key(extractor, n, source), Path(cache_path)
    cached = _read_cache(cache_path, key)
    if cached is not None:
        return cached
    images = images() if callable(images) else images
    if len(images) < n:
        raise UserError(f"reference {source or 'images'}: {n} images requested, only {len(images)} available")
    reference = reference_from_features(
        extract_features(images[:n], extractor, batch_size=batch_size, progress=progress)
    )
    _write_cache(cache_path, reference, key)
    return reference


# ---------------------------------------------------------------------------------------------------
# Protocols: how fakes and reals are made and how the numbers are computed


@dataclass(frozen=True)
class EvalProtocol:
    """How fakes and reals are made. Numbers are comparable only under one protocol (docs/evaluation.md)."""

    name: str
    n: int  # generated images unless -n says otherwise
    resize: str  # the extractor's resize to 299x299 (a RESIZERS key)
    reference: str  # "all": the whole training set in order; "shuffled": n images from a seed-0 shuffle
    fixed_sampler: bool  # True: the paper's sampler whatever the checkpoint says; False: its [sample]
    float_fakes: bool  # True: the sampler's float output goes to the extractor; False: uint8, as saved
    float32: bool  # True: `fid`/`kid` by k-diffusion's float32 arithmetic, float64 beside as fid_float64/kid_float64


PROTOCOLS = {
    # FID-50K with clean-fid's resize, the literature's protocol: uint8 fakes vs the whole training set
    "clean": EvalProtocol("clean", 50_000, "clean", "all", fixed_sampler=False, float_fakes=False, float32=False),
    # k-diffusion's in-training evaluation, hence the paper's Table 1 (reference spec §5-§6)
    "paper": EvalProtocol("paper", 2_000, "kdiffusion", "shuffled", fixed_sampler=True, float_fakes=True, float32=True),
}
REFERENCE_SHUFFLE_SEED = 0  # the paper protocol's reals: the same images for every run and checkpoint


def get_protocol(name: str) -> EvalProtocol:
    if name not in PROTOCOLS:
        raise UserError(f"protocol {name!r}: must be one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


# ---------------------------------------------------------------------------------------------------
# Scoring


def distances(
    fake_feats: np.ndarray, ref: Reference, protocol: EvalProtocol | None = None, *, fid: bool = True, kid: bool = True
) -> dict:
    """FID and/or KID of fake features against `ref`, by the protocol's arithmetic (default: clean).

    float64 protocols: {"fid", "kid", "kid_x1e4"}. float32 protocols (paper): `fid` and `kid` are
    k-diffusion's float32 values, fakes first as it calls them, and `fid_float64`, `kid_float64` the
    accurate ones. `kid_x1e4` is `kid` × 1e4, the unit of the paper's Table 1.
    """
    protocol = protocol or PROTOCOLS["clean"]
    result: dict = {}
    if fid:
        accurate = frechet_distance(*feature_statistics(fake_feats), ref.mu, ref.sigma)
        if protocol.float32:
            # the reals' statistics from their features, as k-diffusion computes them; a mu/sigma file rounded
            ref_stats = feature_statistics_float32(ref.feats) if ref.feats is not None else (ref.mu, ref.sigma)
            result["fid"] = frechet_distance_float32(*feature_statistics_float32(fake_feats), *ref_stats)
            result["fid_float64"] = accurate
        else:
            result["fid"] = accurate
    if kid:
        accurate = kernel_inception_distance(fake_feats, ref.feats)
        if protocol.float32:
            result["kid"] = kernel_inception_distance_float32(fake_feats, ref.feats)
            result["kid_float64"] = accurate
        else:
            result["kid"] = accurate
        result["kid_x1e4"] = result["kid"] * 1e4
    return result


def score(
    fake_images: np.ndarray | torch.Tensor,
    ref: Reference,
    extractor: FeatureExtractor,
    *,
    protocol: EvalProtocol | None = None,
    fid: bool = True,
    kid: bool = True,
    batch_size: int = 200,
    progress: Progress | None = None,
) -> dict:
    """FID and/or KID of fakes (N, H, W, C) against `ref`, features from `extractor`, by `protocol`
    (default: clean). uint8 fakes go to the extractor as they are; float fakes in [-1, 1] too under a
    float_fakes protocol (paper), else rounded to uint8 first.

    Returns `distances`' keys (the metrics asked for) plus "n_fake" and "n_ref".
    """
    protocol = protocol or PROTOCOLS["clean"]
    if not (fid or kid):
        raise UserError("nothing to compute: ask for --fid and/or --kid")
    if kid and ref.feats is None:
        raise UserError(
            "KID needs the reference features, and these statistics hold only mu and sigma; "
            "compute the reference from images, or ask for --fid only"
        )
    images = as_images(fake_images) if protocol.float_fakes else quantised(fake_images)
    feats = extract_features(images, extractor, batch_size=batch_size, progress=progress)
    if feats.shape[1:] != ref.mu.shape:
        raise UserError(
            f"features of {feats.shape[1]} dimensions against a {ref.mu.shape[0]}-d reference: "
            "the reference was made with another feature extractor"
        )
    return {"n_fake": len(feats), "n_ref": ref.n, **distances(feats, ref, protocol, fid=fid, kid=kid)}


# ---------------------------------------------------------------------------------------------------
# From a checkpoint (or images) to numbers that say how they were made


def protocol_plan(protocol: EvalProtocol, config, **changes) -> SamplingPlan:
    """The sampling plan of a protocol: the paper's fixed one, or the checkpoint's [sample] with `changes`."""
    given = {k: v for k, v in changes.items() if v is not None}
    if not protocol.fixed_sampler:
        return make_plan(config, **given)
    if given:
        raise UserError(
            f"--protocol {protocol.name} fixes the sampler (DPM++(2M) SDE, eta 0, heun, 50 Karras "
            f"steps, no guidance); leave out --{next(iter(given)).replace('_', '-')}"
        )
    d = config.diffusion
    return SamplingPlan("dpmpp_2m_sde", 50, d.sigma_min, d.sigma_max, 7.0, 1.0, {"eta": 0.0, "solver_type": "heun"})


def _training_images(data: ImageData, indices: np.ndarray) -> np.ndarray:
    """Un-augmented training images as uint8 (N, H, W, C), in the order of `indices`."""
    stored = getattr(data.dataset, "images", None)
    if isinstance(stored, np.ndarray) and stored.dtype == np.uint8:  # ArrayDataset: (N, C, H, W) already
        return stored[indices].transpose(0, 2, 3, 1)
    items = [data.dataset[int(i)][0] for i in indices]  # (C, H, W) in [-1, 1], exactly k/127.5 - 1
    return ((torch.stack(items) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _digest(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, (bytes, memoryview)) else str(part).encode())
    return digest.hexdigest()[:16]


def _training_identity(data: ImageData, indices: np.ndarray) -> str:
    """What the reference images are, for the cache key: the SHA-256 of their pixels when the data is an
    array in memory (.npz, CIFAR-10, ArtBench-10, digits); for files decoded on demand (a folder), their
    paths, sizes and modification times. Either changes when the data does, wherever it lies."""
    stored = getattr(data.dataset, "images", None)
    if isinstance(stored, np.ndarray) and stored.dtype == np.uint8:
        return f"pixels {_digest(memoryview(np.ascontiguousarray(stored[indices])))}"
    samples = getattr(data.dataset, "samples", None)
    if samples is not None:
        files = [Path(samples[int(i)][0]).resolve() for i in indices]
        return f"files {_digest(*(f'{f}|{f.stat().st_size}|{f.stat().st_mtime_ns};' for f in files))}"
    return f"data {data.name}"  # another Dataset: its name, as given


def _cache_file(label: str, key: str, kind: str = "") -> Path:
    """reference_cache_dir()/<label>.fid-ref-<kind>-<hash of the key>.npz."""
    name = Path(label).stem or "data"
    return reference_cache_dir() / f"{name}.fid-ref-{kind + '-' if kind else ''}{_digest(key)}.npz"


def _cached_reference(images, extractor: FeatureExtractor, cache: Path, **kwargs) -> Reference:
    """`reference_features` with the cache folder's write errors as one line that names the fix."""
    try:
        return reference_features(images, extractor, cache, **kwargs)
    except OSError as e:
        raise UserError(
            f"cannot write the reference cache {cache} ({e.strerror or e}); set {CACHE_ENV} to a "
            "writable folder, or pass --ref with precomputed statistics"
        ) from None


def training_reference(
    data: ImageData,
    extractor: FeatureExtractor,
    protocol: EvalProtocol,
    n: int | None = None,
    *,
    batch_size: int = 200,
    progress: Progress | None = None,
) -> Reference:
    """The real side from the training set, computed once and cached in `reference_cache_dir()`.

    "all": every training image in order (n is ignored). "shuffled": the first n of a seed-0
    permutation: un-augmented, the same images whatever the run or checkpoint. The cache key names the
    extractor, n, the selection and the images' identity (`_training_identity`), so a moved file is
    found again and changed data is never scored against stale statistics.
    """
    total = len(data.dataset)
    if protocol.reference == "all":
        n, indices = total, np.arange(total)
        how = "all"
    else:
        n = n or protocol.n
        if n > total:
            raise UserError(
                f"the {protocol.name} protocol compares {n} samples with {n} training images, but "
                f"{data.name} holds {total}; pass -n {total} or fewer (or set train.eval_n)"
            )
        order = torch.randperm(total, generator=torch.Generator().manual_seed(REFERENCE_SHUFFLE_SEED))
        indices = order[:n].numpy()
        how = f"shuffled seed {REFERENCE_SHUFFLE_SEED} of {total}"
    source = f"{Path(data.name).name} train unaugmented {data.image_size}px {how}, {_training_identity(data, indices)}"
    key = _cache_key(extractor, n, source)
    cache = _cache_file(data.name, key, f"{protocol.name}-{n}")
    return _cached_reference(
        lambda: _training_images(data, indices),
        extractor,
        cache,
        n=n,
        source=source,
        batch_size=batch_size,
        progress=progress,
    )


def reference_from_path(
    path: str | Path, extractor: FeatureExtractor, *, batch_size: int = 200, progress: Progress | None = None
) -> Reference:
    """--ref: statistics (.npz with mu, sigma[, feats]) as they are, or images (a folder or an .npz with
    `images`), all of them, whose features are cached in `reference_cache_dir()` under their pixels' hash."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                is_statistics = {"mu", "sigma"} <= set(npz.files)
        except NPZ_ERRORS as error:
            raise UserError(f"cannot read {path} as .npz ({_one_line(error)})") from None
        if is_statistics:
            return load_reference(path)
    images = load_images(path)
    source = f"{path.name} reference images, pixels {_digest(memoryview(np.ascontiguousarray(images)))}"
    cache = _cache_file(path.name, _cache_key(extractor, len(images), source))
    return _cached_reference(images, extractor, cache, source=source, batch_size=batch_size, progress=progress)


def float_samples(denoiser: Callable, config, plan: SamplingPlan, n: int, **kwargs) -> np.ndarray:
    """`sample.generate`'s images as the sampler returns them: float32 (n, H, W, C) in [-1, 1], neither
    rounded nor clamped (k-diffusion hands these to its extractor, which clamps after resizing).

    The same calls as `generate` (`sample_batch`, image k from seed + k and labels[k]); the unclamped
    output is the last step's denoised image, which the sampler returns as it is (DPM++(2M) SDE and
    every sampler whose last step lands on σ = 0 by `x = denoised`) and which `sample_batch` then clamps.
    """
    return generate(denoiser, config, plan, n, make_range=float_range, **kwargs)


def float_range(
    denoiser: Callable,
    config,
    plan: SamplingPlan,
    start: int,
    stop: int,
    *,
    seed: int,
    labels: torch.Tensor | None,
    device: str | torch.device,
    **net_kwargs,
) -> np.ndarray:
    """Images start..stop-1 unrounded and unclamped, float32 (stop - start, H, W, C); `sample_range`'s twin."""
    m = config.model
    last: dict = {}
    clamped = sample_batch(
        denoiser,
        plan,
        list(range(seed + start, seed + stop)),
        labels,
        (m.channels, m.image_size, m.image_size),
        m.num_classes,
        torch.device(device),
        callback=last.update,
        **net_kwargs,
    )
    x = last["denoised"]
    if not torch.equal(x.clamp(-1, 1), clamped):
        raise ValueError(
            f"sampler {plan.sampler} does not return its last denoised image; float samples need one that does"
        )
    return x.float().permute(0, 2, 3, 1).cpu().numpy()


def evaluate_checkpoint(
    denoiser: Callable,
    config,
    reference: Reference,
    extractor: FeatureExtractor,
    *,
    protocol: EvalProtocol,
    plan: SamplingPlan | None = None,
    n: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    fid: bool = True,
    kid: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
    **net_kwargs,
) -> dict:
    """FID/KID of n samples from `denoiser` (uniform random labels from `seed`) against `reference`, by
    `protocol`: its sampler unless `plan` is given (default `protocol_plan`), n default `protocol.n`,
    float or uint8 fakes and float32 or float64 numbers as it says.

    `extractor` is any FeatureExtractor (the real one: `load_inception`); progress(stage, done, total)
    with stage "sample" then "features". Returns `score`'s dict plus n, seed and the sampler used.
    """
    plan = plan or protocol_plan(protocol, config)
    n = n or protocol.n
    m = config.model
    labels = random_labels(n, m.num_classes, seed) if m.num_classes else None
    stage = (lambda name: lambda done, total: progress(name, done, total)) if progress else (lambda name: None)
    make = float_samples if protocol.float_fakes else generate
    images = make(
        denoiser,
        config,
        plan,
        n,
        seed=seed,
        labels=labels,
        batch_size=batch_size,
        device=device,
        progress=stage("sample"),
        **net_kwargs,
    )
    result = score(images, reference, extractor, protocol=protocol, fid=fid, kid=kid, progress=stage("features"))
    return {**result, "n": n, "seed": seed, "sampler": plan.sampler, "steps": plan.steps, "cfg_scale": plan.cfg_scale}


def eval_record(step: int | None, result: dict, protocol: str) -> dict:
    """The metrics.jsonl line of one evaluation (`tdiff compare` reads these): `fid`/`kid` are the
    protocol's numbers; `fid_float64`/`kid_float64` the accurate ones where the protocol's are float32."""
    keep = (
        "fid",
        "fid_float64",
        "kid",
        "kid_float64",
        "kid_x1e4",
        "n",
        "n_ref",
        "seed",
        "sampler",
        "steps",
        "cfg_scale",
        "cache",
        "precision",
        "compile",
    )
    record = {k: result[k] for k in keep if result.get(k) is not None}
    return {"kind": "eval", "step": step, "protocol": protocol, **record}
