"""tdiff.evaluate without the Inception weights: closed-form Fréchet distances, unbiased KID, the paper
protocol's float32 arithmetic against k-diffusion's formulas, the scoring path with a tiny injected
extractor, the cache folder and the reference cache, and the offline errors. No network, a few seconds."""

import functools
import json
import math

import nets
import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from tdiff import evaluate
from tdiff.errors import UserError
from tdiff.evaluate import (
    PROTOCOLS,
    Reference,
    distances,
    extract_features,
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
    kernel_inception_distance_float32,
    load_images,
    load_inception,
    load_reference,
    locate_inception,
    reference_features,
    reference_from_features,
    score,
    squared_mmd,
)
from tdiff.files import file_sha256

pytestmark = pytest.mark.usefixtures("no_inception")  # offline, no weights anywhere, a fresh cache folder

# nets.TinyExtractor as this file uses it: 32x32 uint8 images pooled to 8x8, projected to `dim` (16) / 8
TinyExtractor = functools.partial(nets.TinyExtractor, grid=8, dim=16, scale=1 / 8, accepts=(np.uint8,))


def random_images(n: int, seed: int, brightness: int = 0, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.integers(0, 200, (n, 32, 32, channels)) + brightness, 0, 255).astype(np.uint8)


def random_covariance(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ---------------------------------------------------------------------------------------------------
# Fréchet distance


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    a, b = rng.uniform(0.1, 5, 6), rng.uniform(0.1, 5, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_non_commuting_2x2_closed_form():
    # for 2x2 A with eigenvalues λ1, λ2 ≥ 0: Tr √A = √λ1 + √λ2 = sqrt(Tr A + 2 sqrt(det A))
    s1, s2 = np.array([[2.0, 0.9], [0.9, 1.0]]), np.array([[1.0, -0.4], [-0.4, 3.0]])
    product = s1 @ s2
    trace_sqrt = np.sqrt(np.trace(product) + 2 * np.sqrt(np.linalg.det(product)))
    expected = 1.0 + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert frechet_distance(np.zeros(2), s1, np.array([1.0, 0.0]), s2) == pytest.approx(expected, rel=1e-12)


def test_frechet_non_commuting_matches_scipy_sqrtm():
    rng = np.random.default_rng(1)
    s1, s2 = random_covariance(20, rng), random_covariance(20, rng)
    mu1, mu2 = rng.standard_normal(20), rng.standard_normal(20)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-10)


def test_frechet_rank_deficient_covariances_exact():
    # fewer samples than dimensions, as with 2,000 images of 2048-d features: Σ is singular
    rng = np.random.default_rng(2)
    mu, sigma = feature_statistics(rng.standard_normal((20, 64)) * rng.uniform(0.1, 10, 64))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-10 * np.trace(sigma)
    # Σ2 = 4 Σ1 commutes with Σ1, so Tr(Σ1 + 4Σ1 − 2·2Σ1) = Tr Σ1
    assert frechet_distance(mu, sigma, mu, 4 * sigma) == pytest.approx(np.trace(sigma), rel=1e-10)


def test_fid_of_gaussian_samples_near_analytic():
    rng = np.random.default_rng(3)
    a, b = rng.uniform(0.5, 2, 8), rng.uniform(0.5, 2, 8)
    feats1 = rng.standard_normal((20000, 8)) * np.sqrt(a)
    feats2 = rng.standard_normal((20000, 8)) * np.sqrt(b) + 1.0
    analytic = 8.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    fid = frechet_distance(*feature_statistics(feats1), *feature_statistics(feats2))
    assert fid == pytest.approx(analytic, rel=0.03)


def test_feature_statistics_unbiased():
    feats = np.random.default_rng(4).standard_normal((5, 3))
    mu, sigma = feature_statistics(feats)
    centred = feats - feats.mean(axis=0)
    np.testing.assert_allclose(mu, feats.mean(axis=0))
    np.testing.assert_allclose(sigma, centred.T @ centred / 4)
    with pytest.raises(UserError, match="at least 2"):
        feature_statistics(feats[:1])


# ---------------------------------------------------------------------------------------------------
# KID


def brute_force_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD² written out with full kernel matrices, to check the blocked implementation."""
    kernel = lambda p, q: (p @ q.T / x.shape[1] + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    m, n = len(x), len(y)
    return (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean()


def test_kid_matches_brute_force_and_partitions():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((250, 16)), rng.standard_normal((120, 16)) + 0.3
    assert squared_mmd(x, y) == pytest.approx(brute_force_mmd(x, y), rel=1e-10)
    assert kernel_inception_distance(x, y) == pytest.approx(brute_force_mmd(x, y), rel=1e-10)
    # 250 > 100 -> 3 contiguous partitions, bounds round(i·n/3): x [0, 83, 167, 250], y [0, 40, 80, 120]
    expected = np.mean(
        [
            brute_force_mmd(x[0:83], y[0:40]),
            brute_force_mmd(x[83:167], y[40:80]),
            brute_force_mmd(x[167:250], y[80:120]),
        ]
    )
    assert kernel_inception_distance(x, y, partition_size=100) == pytest.approx(expected, rel=1e-10)


def test_kid_unbiased_for_one_distribution_and_positive_for_shifted():
    same, shifted = [], []
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        x, y = rng.standard_normal((200, 16)), rng.standard_normal((200, 16))
        same.append(kernel_inception_distance(x, y))
        shifted.append(kernel_inception_distance(x, y + 0.5))
    standard_error = np.std(same, ddof=1) / np.sqrt(len(same))
    assert abs(np.mean(same)) < 4 * standard_error
    assert min(shifted) > 0 and np.mean(shifted) > 20 * standard_error


def test_kid_too_few_images():
    with pytest.raises(UserError, match="at least 2 images"):
        kernel_inception_distance(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(UserError, match="at least 2 images"):
        kernel_inception_distance_float32(np.zeros((1, 4)), np.zeros((5, 4)))


# ---------------------------------------------------------------------------------------------------
# The paper protocol's numbers: k-diffusion's float32 arithmetic, float64 beside


def kdiffusion_fid(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> float:
    """k-diffusion 0.1.1's `fid(x, y)` (x the fakes), written out from its definition: unbiased covariances
    by torch.cov, eps·I added, matrix square roots V |Λ|^½ Vᵀ by torch.linalg.eigh, all in x's dtype."""

    def sqrtm(a):
        values, vectors = torch.linalg.eigh(a)
        return vectors @ torch.diag(values.abs().sqrt()) @ vectors.T

    eye = torch.eye(x.shape[1], dtype=x.dtype) * eps
    cx, cy = torch.cov(x.T) + eye, torch.cov(y.T) + eye
    root = sqrtm(cx)
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + torch.trace(cx + cy - 2 * sqrtm(root @ cy @ root)))


def kdiffusion_kid(x: torch.Tensor, y: torch.Tensor, max_size: int = 5000) -> float:
    """k-diffusion 0.1.1's `kid(x, y)`: unbiased MMD², kernel (xᵀy/d + 1)³, ⌈n/max_size⌉ contiguous
    partitions averaged, in x's dtype."""

    def mmd(a, b):
        kaa, kbb, kab = [(p @ q.T / a.shape[1] + 1) ** 3 for p, q in ((a, a), (b, b), (a, b))]
        m, n = len(a), len(b)
        return (
            (kaa.sum() - kaa.diagonal().sum()) / m / (m - 1)
            + (kbb.sum() - kbb.diagonal().sum()) / n / (n - 1)
            - kab.sum() * 2 / m / n
        )

    parts = math.ceil(max(len(x) / max_size, len(y) / max_size))
    total = sum(
        mmd(
            x[round(i * len(x) / parts) : round((i + 1) * len(x) / parts)],
            y[round(i * len(y) / parts) : round((i + 1) * len(y) / parts)],
        )
        for i in range(parts)
    )
    return float(total / parts)


def inception_like_features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """float32 features with a power-law covariance spectrum (λ_k ∝ k^-1.5) in a random basis and positive
    means, like pooled ReLU activations; n < d makes the covariance singular, as 2,000 x 2048 does."""
    rng = np.random.default_rng(1234)  # one distribution for every seed: basis, spectrum, mean
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    spectrum = 20 * np.arange(1, d + 1) ** -1.5
    mean = rng.gamma(2.0, 0.2, d) + shift
    z = np.random.default_rng(seed).standard_normal((n, d)) * np.sqrt(spectrum)
    return (mean + z @ basis.T).astype(np.float32)


def test_paper_fid_is_kdiffusions_float32_value_with_float64_beside():
    fakes, reals = inception_like_features(200, 256, seed=1, shift=0.05), inception_like_features(200, 256, seed=2)
    result = distances(fakes, reference_from_features(reals), PROTOCOLS["paper"])
    expected32 = kdiffusion_fid(torch.from_numpy(fakes), torch.from_numpy(reals))
    accurate = frechet_distance(*feature_statistics(fakes), *feature_statistics(reals))
    # float32 round-off of a sum of ~256 eigenvalue square roots of size ~1-10
    assert result["fid"] == pytest.approx(expected32, abs=2e-4)
    assert result["fid_float64"] == accurate
    # the same formula in float64 agrees with the accurate value (to ~1e-5: it squares and roots again the
    # small eigenvalues of singular covariances), float32 does not (here by ~0.14): the gap is arithmetic
    assert kdiffusion_fid(torch.from_numpy(fakes).double(), torch.from_numpy(reals).double()) == pytest.approx(
        accurate, abs=1e-4
    )
    assert abs(result["fid"] - accurate) > 100 * 2e-4
    # the clean protocol reports float64 only
    assert distances(fakes, reference_from_features(reals), PROTOCOLS["clean"], kid=False) == {"fid": accurate}


def test_paper_fid_of_mu_sigma_statistics_uses_them_in_float32():
    # a statistics file without features (clean-fid's layout): k-diffusion's formula on the float32 cast
    fakes, reals = inception_like_features(200, 64, seed=3, shift=0.1), inception_like_features(300, 64, seed=4)
    mu, sigma = feature_statistics(reals)
    result = distances(fakes, Reference(mu, sigma, None, None), PROTOCOLS["paper"], kid=False)
    x = torch.from_numpy(fakes)
    expected = evaluate.frechet_distance_float32(
        x.mean(0), torch.cov(x.T), mu.astype(np.float32), sigma.astype(np.float32)
    )
    assert result["fid"] == expected
    assert result["fid_float64"] == pytest.approx(frechet_distance(*feature_statistics(fakes), mu, sigma))


def test_paper_kid_is_kdiffusions_float32_value_with_float64_beside():
    fakes, reals = inception_like_features(300, 64, seed=5, shift=0.2), inception_like_features(250, 64, seed=6)
    result = distances(fakes, reference_from_features(reals), PROTOCOLS["paper"], fid=False)
    expected = kdiffusion_kid(torch.from_numpy(fakes), torch.from_numpy(reals))
    assert result["kid"] == pytest.approx(expected, rel=1e-6)
    assert result["kid_float64"] == kernel_inception_distance(fakes, reals)
    assert result["kid_x1e4"] == result["kid"] * 1e4  # Table 1's unit, of the protocol's number
    assert result["kid"] != result["kid_float64"] and result["kid"] == pytest.approx(result["kid_float64"], rel=1e-3)
    # k-diffusion's partitions: 300 and 250 features cut in ⌈300/100⌉ = 3
    assert kernel_inception_distance_float32(fakes, reals, partition_size=100) == pytest.approx(
        kdiffusion_kid(torch.from_numpy(fakes), torch.from_numpy(reals), max_size=100), rel=1e-6
    )


# ---------------------------------------------------------------------------------------------------
# Images, the scoring path and the reference cache


def write_folder(folder, images):
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    return folder


def test_load_images_npz_and_folder_agree(tmp_path):
    images = random_images(12, seed=0)
    np.savez(tmp_path / "samples.npz", images=images, labels=np.arange(12))
    np.testing.assert_array_equal(load_images(tmp_path / "samples.npz"), images)
    np.testing.assert_array_equal(load_images(write_folder(tmp_path / "pngs", images)), images)


def test_load_images_grey_becomes_rgb(tmp_path):
    grey = random_images(4, seed=1, channels=1)
    np.savez(tmp_path / "grey.npz", images=grey)
    loaded = load_images(tmp_path / "grey.npz")
    assert loaded.shape == (4, 32, 32, 3) and (loaded == grey).all()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing", "no such file"),
        (lambda d: (d / "x.txt").write_text("hi") and d / "x.txt", "expected a folder"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "no .png"),
        (lambda d: np.savez(d / "a.npz", pictures=np.zeros(3)) or d / "a.npz", "no 'images' array"),
        (lambda d: np.savez(d / "f.npz", images=np.zeros((2, 8, 8, 3))) or d / "f.npz", "uint8"),
        (lambda d: (d / "bad.npz").write_bytes(b"not a zip") and d / "bad.npz", "cannot read"),
    ],
)
def test_load_images_bad_input(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        load_images(make(tmp_path))


def test_score_path(tmp_path):
    extractor = TinyExtractor()
    ref = reference_features(random_images(64, seed=1), extractor, tmp_path / "ref.npz")
    fakes = load_images(write_folder(tmp_path / "fakes", random_images(48, seed=2, brightness=40)))
    seen = []
    result = score(fakes, ref, extractor, batch_size=20, progress=lambda *done_total: seen.append(done_total))
    assert seen == [(20, 48), (40, 48), (48, 48)]
    assert set(result) == {"fid", "kid", "kid_x1e4", "n_fake", "n_ref"}
    assert (result["n_fake"], result["n_ref"]) == (48, 64)
    assert result["fid"] > 0 and result["kid"] > 0
    assert result["kid_x1e4"] == pytest.approx(result["kid"] * 1e4)
    # torch input, the same images as the reference: FID ~ 0, KID ~ 0 (unbiased, so it may dip below)
    same = score(torch.from_numpy(random_images(64, seed=1)), ref, extractor, kid=False)
    assert set(same) == {"fid", "n_fake", "n_ref"} and abs(same["fid"]) < 1e-9


# ...that also takes float images in [-1, 1] (the paper protocol's fakes) and keeps what it is given in `seen`
RecordingExtractor = functools.partial(TinyExtractor, accepts=(np.uint8, np.float32), keep=True)


def test_float_fakes_reach_the_extractor_only_under_the_paper_protocol():
    ref = reference_from_features(np.random.default_rng(0).standard_normal((10, 16)))
    floats = np.random.default_rng(1).uniform(-1.1, 1.1, (4, 32, 32, 1)).astype(np.float64)
    extractor = RecordingExtractor()
    score(floats, ref, extractor, protocol=PROTOCOLS["paper"], kid=False)
    sent = extractor.seen[-1]  # as they are: float32, grey repeated to RGB, neither clamped nor rounded
    assert sent.dtype == np.float32 and sent.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(sent, np.repeat(floats.astype(np.float32), 3, axis=-1))
    # the clean protocol (the default) scores what a saved image holds: rounded to uint8 as sample.to_uint8 does
    score(torch.from_numpy(floats), ref, extractor, kid=False)
    from tdiff.sample import to_uint8

    expected = to_uint8(torch.from_numpy(floats).permute(0, 3, 1, 2))
    np.testing.assert_array_equal(extractor.seen[-1], np.repeat(expected, 3, axis=-1))
    # uint8 fakes (files) go as they are under either protocol
    images = random_images(3, seed=0)
    score(images, ref, extractor, protocol=PROTOCOLS["paper"], kid=False)
    np.testing.assert_array_equal(extractor.seen[-1], images)


def test_score_refuses_mismatched_reference():
    extractor = TinyExtractor(dim=16)
    feats = np.random.default_rng(0).standard_normal((10, 8))
    with pytest.raises(UserError, match="another feature extractor"):
        score(random_images(4, seed=0), Reference(*feature_statistics(feats), feats, 10), extractor)
    with pytest.raises(UserError, match="KID needs the reference features"):
        score(random_images(4, seed=0), Reference(*feature_statistics(feats), None, None), extractor)
    with pytest.raises(UserError, match="nothing to compute"):
        score(
            random_images(4, seed=0), Reference(*feature_statistics(feats), feats, 10), extractor, fid=False, kid=False
        )


def test_reference_cache_written_once_reused_and_invalidated(tmp_path):
    cache = tmp_path / "stats" / "ref.npz"
    images = random_images(40, seed=3)
    loads = []

    def loader():
        loads.append(1)
        return images

    extractor = TinyExtractor()
    first = reference_features(loader, extractor, cache, n=30, source="test set")
    assert len(loads) == 1 and extractor.calls > 0 and first.feats.shape == (30, 16)
    assert [p.name for p in cache.parent.iterdir()] == ["ref.npz"]  # no temp file left behind
    with np.load(cache, allow_pickle=False) as npz:
        assert json.loads(str(npz["key"]))["extractor"] == extractor.key

    # the same key: read back, neither loader nor extractor runs
    calls = extractor.calls
    again = reference_features(loader, extractor, cache, n=30, source="test set")
    assert len(loads) == 1 and extractor.calls == calls
    np.testing.assert_array_equal(again.feats, first.feats)
    np.testing.assert_array_equal(again.sigma, first.sigma)

    # another n, source or extractor: recomputed and overwritten
    assert reference_features(loader, extractor, cache, n=20, source="test set").n == 20
    reference_features(loader, extractor, cache, n=20, source="train set")
    other = reference_features(loader, TinyExtractor(seed=1), cache, n=20, source="train set")
    assert len(loads) == 4
    assert not np.allclose(other.mu, first.mu[:16])
    np.testing.assert_array_equal(load_reference(cache).feats, other.feats)


@pytest.mark.parametrize("cut", [0, 9, 300, -20])
def test_reference_cache_recovers_from_a_corrupt_file(tmp_path, cut):
    cache = tmp_path / "ref.npz"
    np.savez(cache, mu=np.zeros(16), sigma=np.eye(16), feats=np.zeros((8, 16)), key=np.array("x"))
    cache.write_bytes(cache.read_bytes()[:cut])  # a file cut short, as by a crash during a plain write
    ref = reference_features(random_images(8, seed=4), TinyExtractor(), cache)
    assert ref.n == 8 and load_reference(cache).n == 8


def test_reference_needs_enough_images(tmp_path):
    with pytest.raises(UserError, match="10 images requested, only 8"):
        reference_features(lambda: random_images(8, seed=0), TinyExtractor(), tmp_path / "r.npz", n=10)


def test_training_reference_is_cached_in_the_cache_folder_by_content(tmp_path):
    from tdiff.data import open_dataset

    paper, extractor = PROTOCOLS["paper"], TinyExtractor()
    data = tmp_path / "train.npz"
    np.savez(data, images=random_images(30, seed=7))
    first = evaluate.training_reference(open_dataset(str(data), tmp_path, 32), extractor, paper, 12)
    caches = lambda: sorted(evaluate.reference_cache_dir().glob("train.fid-ref-paper-12-*.npz"))  # noqa: E731
    assert len(caches()) == 1 and first.n == 12
    assert not list(tmp_path.glob("*fid-ref*"))  # nothing beside the data
    calls = extractor.calls

    # the same file moved: its pixels are the same, so the cache is found again
    moved = tmp_path / "moved"
    moved.mkdir()
    data = data.rename(moved / "train.npz")
    again = evaluate.training_reference(open_dataset(str(data), tmp_path, 32), extractor, paper, 12)
    assert extractor.calls == calls
    np.testing.assert_array_equal(again.feats, first.feats)

    # other pixels under the same name and path: recomputed, never the stale statistics
    np.savez(data, images=random_images(30, seed=8))
    other = evaluate.training_reference(open_dataset(str(data), tmp_path, 32), extractor, paper, 12)
    assert extractor.calls > calls and len(caches()) == 2
    assert not np.allclose(other.mu, first.mu)


def test_folder_reference_changes_with_its_files(tmp_path):
    from tdiff.data import open_dataset

    clean, extractor = PROTOCOLS["clean"], TinyExtractor()
    folder = write_folder(tmp_path / "imgs", random_images(6, seed=9))
    first = evaluate.training_reference(open_dataset(str(folder), tmp_path, 32), extractor, clean)
    calls = extractor.calls
    evaluate.training_reference(open_dataset(str(folder), tmp_path, 32), extractor, clean)
    assert extractor.calls == calls and len(list(evaluate.reference_cache_dir().glob("imgs.fid-ref-clean-6-*"))) == 1
    Image.fromarray(random_images(1, seed=10)[0]).save(folder / "00002.png")  # one file replaced
    other = evaluate.training_reference(open_dataset(str(folder), tmp_path, 32), extractor, clean)
    assert extractor.calls > calls and not np.allclose(other.mu, first.mu)


def test_ref_images_are_cached_in_the_cache_folder(tmp_path):
    np.savez(tmp_path / "ref.npz", images=random_images(8, seed=11))
    extractor = TinyExtractor()
    first = evaluate.reference_from_path(tmp_path / "ref.npz", extractor)
    assert [p.name.split(".fid-ref-")[0] for p in evaluate.reference_cache_dir().iterdir()] == ["ref"]
    calls = extractor.calls
    np.testing.assert_array_equal(evaluate.reference_from_path(tmp_path / "ref.npz", extractor).feats, first.feats)
    assert extractor.calls == calls


def test_unwritable_cache_folder_is_one_line_naming_the_variable(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv(evaluate.CACHE_ENV, str(tmp_path / "a-file" / "cache"))
    np.savez(tmp_path / "ref.npz", images=random_images(4, seed=0))
    with pytest.raises(UserError, match=evaluate.CACHE_ENV) as caught:
        evaluate.reference_from_path(tmp_path / "ref.npz", TinyExtractor())
    assert "\n" not in str(caught.value)


def test_load_reference_mu_sigma_only(tmp_path):
    # the layout of clean-fid's statistics files: FID works, KID cannot
    np.savez(tmp_path / "cleanfid.npz", mu=np.zeros(4, np.float32), sigma=np.eye(4, dtype=np.float32))
    ref = load_reference(tmp_path / "cleanfid.npz")
    assert ref.feats is None and ref.n is None and ref.sigma.dtype == np.float64
    with pytest.raises(UserError, match="lacks mu"):
        np.savez(tmp_path / "bad.npz", sigma=np.eye(4))
        load_reference(tmp_path / "bad.npz")


# ---------------------------------------------------------------------------------------------------
# The Inception weights: found, verified, or one line saying how to get them


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv(evaluate.CACHE_ENV, "~/my-cache")
    assert evaluate.cache_dir() == tmp_path / "home" / "my-cache"
    monkeypatch.delenv(evaluate.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert evaluate.cache_dir() == tmp_path / "xdg" / "tdiff"
    assert evaluate.reference_cache_dir() == tmp_path / "xdg" / "tdiff" / "references"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/xdg")  # the XDG spec says: ignore a relative path
    assert evaluate.cache_dir() == tmp_path / "home" / ".cache" / "tdiff"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert evaluate.cache_dir() == tmp_path / "home" / ".cache" / "tdiff"


def test_offline_without_weights_is_one_line_user_error(no_inception):
    with pytest.raises(UserError) as caught:
        load_inception()
    message = str(caught.value)
    assert "\n" not in message and no_inception == [evaluate.INCEPTION_URL]
    for part in (
        evaluate.INCEPTION_FILE,
        evaluate.INCEPTION_SHA256,
        evaluate.INCEPTION_ENV,
        "--inception",
        evaluate.INCEPTION_URL,
        str(evaluate.cache_dir() / evaluate.INCEPTION_FILE),
    ):
        assert part in message


def test_wrong_hash_is_user_error_wherever_the_file_is(tmp_path, monkeypatch, no_inception):
    junk = tmp_path / evaluate.INCEPTION_FILE
    junk.write_bytes(b"not the network")
    for where in ("explicit", "env", "cache"):
        if where == "env":
            monkeypatch.setenv(evaluate.INCEPTION_ENV, str(junk))
        if where == "cache":
            monkeypatch.delenv(evaluate.INCEPTION_ENV)
            monkeypatch.setenv(evaluate.CACHE_ENV, str(tmp_path))
        with pytest.raises(UserError, match=evaluate.INCEPTION_SHA256) as caught:
            locate_inception(junk if where == "explicit" else None)
        assert "\n" not in str(caught.value)
    assert no_inception == []  # a file in the cache is never downloaded over


def test_named_path_missing_does_not_fall_back(tmp_path, monkeypatch):
    monkeypatch.setenv(evaluate.CACHE_ENV, str(tmp_path))
    (tmp_path / evaluate.INCEPTION_FILE).write_bytes(b"would be found in the cache")
    with pytest.raises(UserError, match="not found"):
        locate_inception(tmp_path / "elsewhere.pt")


def test_weights_in_clean_fids_old_folder_are_copied_into_the_cache(tmp_path, monkeypatch, no_inception):
    legacy = evaluate.CLEANFID_CACHE_DIR / evaluate.INCEPTION_FILE
    legacy.parent.mkdir()
    legacy.write_bytes(b"stand-in weights" * 1000)
    monkeypatch.setattr(evaluate, "INCEPTION_SHA256", file_sha256(legacy))
    found = locate_inception()
    assert found == evaluate.cache_dir() / evaluate.INCEPTION_FILE  # the copy, not /tmp's file
    assert found.read_bytes() == legacy.read_bytes() and no_inception == []
    legacy.unlink()  # /tmp emptied by a reboot: the cache still has it
    assert locate_inception() == found


def test_junk_in_clean_fids_old_folder_is_ignored(tmp_path, no_inception):
    legacy = evaluate.CLEANFID_CACHE_DIR / evaluate.INCEPTION_FILE
    legacy.parent.mkdir()
    legacy.write_bytes(b"another user's file")  # /tmp is shared: not ours unless its SHA-256 is right
    with pytest.raises(UserError, match="download failed") as caught:
        locate_inception()
    assert str(evaluate.cache_dir() / evaluate.INCEPTION_FILE) in str(caught.value)
    assert no_inception == [evaluate.INCEPTION_URL]
    assert not (evaluate.cache_dir() / evaluate.INCEPTION_FILE).exists()


class FakeInceptionLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.project = torch.nn.Conv2d(3, 2048, 1)

    def forward(self, x):
        assert x.shape[2] == 299 and x.shape[3] == 299
        return self.project(self.pool(x))  # (N, 2048, 1, 1), the shape of Inception's pool layer


class FakeInception(torch.nn.Module):
    """The TorchScript file's layout (a `layers` submodule), with 3 -> 2048 channels instead of Inception."""

    def __init__(self):
        super().__init__()
        self.layers = FakeInceptionLayers()

    def forward(self, x):
        return self.layers(x)


@pytest.mark.filterwarnings("ignore:`torch.jit.(script|save)` is deprecated:FutureWarning")
@pytest.mark.parametrize("resize", ["clean", "kdiffusion"])
def test_inception_extractor_plumbing_with_a_fake_network(tmp_path, monkeypatch, resize):
    torch.manual_seed(0)
    network = FakeInception()
    weights = tmp_path / "fake-inception.pt"
    torch.jit.save(torch.jit.script(network), str(weights))
    monkeypatch.setattr(evaluate, "INCEPTION_SHA256", file_sha256(weights))
    monkeypatch.setenv(evaluate.INCEPTION_ENV, str(weights))
    extractor = load_inception(resize=resize)
    assert resize in extractor.key

    # mid-grey 128 is 0 after the graph's (x - 128) / 128, so the features are the conv bias alone
    grey = np.full((2, 32, 32, 1), 128, np.uint8)
    bias = network.layers.project.bias.detach().numpy()
    np.testing.assert_allclose(extractor(grey), np.broadcast_to(bias, (2, 2048)), atol=1e-5)
    feats = extract_features(torch.from_numpy(random_images(3, seed=0)), extractor, batch_size=2)
    assert feats.shape == (3, 2048) and feats.dtype == np.float32
    if resize == "kdiffusion":
        # floats in [-1, 1] (the paper's fakes): k/127.5 - 1 is the uint8 image k; beyond ±1 the clamp comes
        # after the resize, so a flat 1.2 image is a flat 255 one, and values between levels are not rounded
        images = random_images(2, seed=5)
        floats = images.astype(np.float32) / 127.5 - 1
        np.testing.assert_array_equal(extractor(floats), extractor(images))
        np.testing.assert_array_equal(
            extractor(np.full((1, 32, 32, 3), 1.2, np.float32)), extractor(np.full((1, 32, 32, 3), 255, np.uint8))
        )
        assert not np.array_equal(extractor(floats + 0.4 / 127.5), extractor(images))
