"""tdiff.evaluate without the Inception weights: closed-form Fréchet distances, unbiased KID, the
scoring path with a tiny injected extractor, the reference cache, and the offline errors.
No network, a few seconds."""

import json
import urllib.error

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from tdiff import evaluate
from tdiff.errors import UserError
from tdiff.evaluate import (Reference, extract_features, feature_statistics, frechet_distance,
                            kernel_inception_distance, load_images, load_inception, load_reference,
                            locate_inception, reference_features, score, squared_mmd)


@pytest.fixture(autouse=True)
def no_inception_anywhere(monkeypatch, tmp_path):
    """No weights in the env or clean-fid's cache, and every download fails at once, as offline."""
    downloads = []

    def refuse(url, dest):
        downloads.append(url)
        raise urllib.error.URLError("no network in tests")
    monkeypatch.delenv(evaluate.INCEPTION_ENV, raising=False)
    monkeypatch.setattr(evaluate, "CLEANFID_CACHE_DIR", tmp_path / "cleanfid-cache")
    monkeypatch.setattr(evaluate, "_download", refuse)
    return downloads


class TinyExtractor:
    """A fixed random projection of 4x4-average-pooled pixels: cheap, deterministic, sensitive to content."""

    def __init__(self, dim: int = 16, seed: int = 0, key: str = "tiny"):
        self.projection = np.random.default_rng(seed).standard_normal((8 * 8 * 3, dim)) / 8
        self.key = f"{key}-{dim}-{seed}"
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        assert isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.shape[-1] == 3
        pooled = images.reshape(len(images), 8, 4, 8, 4, 3).mean(axis=(2, 4)) / 255  # (N, 8, 8, 3)
        return pooled.reshape(len(images), -1) @ self.projection


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
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * kxy.mean())


def test_kid_matches_brute_force_and_partitions():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((250, 16)), rng.standard_normal((120, 16)) + 0.3
    assert squared_mmd(x, y) == pytest.approx(brute_force_mmd(x, y), rel=1e-10)
    assert kernel_inception_distance(x, y) == pytest.approx(brute_force_mmd(x, y), rel=1e-10)
    # 250 > 100 -> 3 contiguous partitions, bounds round(i·n/3): x [0, 83, 167, 250], y [0, 40, 80, 120]
    expected = np.mean([brute_force_mmd(x[0:83], y[0:40]), brute_force_mmd(x[83:167], y[40:80]),
                        brute_force_mmd(x[167:250], y[80:120])])
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


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing", "no such file"),
    (lambda d: (d / "x.txt").write_text("hi") and d / "x.txt", "expected a folder"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "no .png"),
    (lambda d: np.savez(d / "a.npz", pictures=np.zeros(3)) or d / "a.npz", "no 'images' array"),
    (lambda d: np.savez(d / "f.npz", images=np.zeros((2, 8, 8, 3))) or d / "f.npz", "uint8"),
    (lambda d: (d / "bad.npz").write_bytes(b"not a zip") and d / "bad.npz", "cannot read"),
])
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


def test_score_refuses_mismatched_reference():
    extractor = TinyExtractor(dim=16)
    feats = np.random.default_rng(0).standard_normal((10, 8))
    with pytest.raises(UserError, match="another feature extractor"):
        score(random_images(4, seed=0), Reference(*feature_statistics(feats), feats, 10), extractor)
    with pytest.raises(UserError, match="KID needs the reference features"):
        score(random_images(4, seed=0), Reference(*feature_statistics(feats), None, None), extractor)
    with pytest.raises(UserError, match="nothing to compute"):
        score(random_images(4, seed=0), Reference(*feature_statistics(feats), feats, 10), extractor,
              fid=False, kid=False)


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

def test_offline_without_weights_is_one_line_user_error(no_inception_anywhere):
    with pytest.raises(UserError) as caught:
        load_inception()
    message = str(caught.value)
    assert "\n" not in message and no_inception_anywhere == [evaluate.INCEPTION_URL]
    for part in (evaluate.INCEPTION_FILE, evaluate.INCEPTION_SHA256, evaluate.INCEPTION_ENV, "--inception",
                 evaluate.INCEPTION_URL, str(evaluate.CLEANFID_CACHE_DIR / evaluate.INCEPTION_FILE)):
        assert part in message


def test_wrong_hash_is_user_error_wherever_the_file_is(tmp_path, monkeypatch, no_inception_anywhere):
    junk = tmp_path / evaluate.INCEPTION_FILE
    junk.write_bytes(b"not the network")
    for where in ("explicit", "env", "cache"):
        if where == "env":
            monkeypatch.setenv(evaluate.INCEPTION_ENV, str(junk))
        if where == "cache":
            monkeypatch.delenv(evaluate.INCEPTION_ENV)
            monkeypatch.setattr(evaluate, "CLEANFID_CACHE_DIR", tmp_path)
        with pytest.raises(UserError, match=evaluate.INCEPTION_SHA256) as caught:
            locate_inception(junk if where == "explicit" else None)
        assert "\n" not in str(caught.value)
    assert no_inception_anywhere == []  # a file in the cache is never downloaded over


def test_named_path_missing_does_not_fall_back(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "CLEANFID_CACHE_DIR", tmp_path)
    (tmp_path / evaluate.INCEPTION_FILE).write_bytes(b"would be found in the cache")
    with pytest.raises(UserError, match="not found"):
        locate_inception(tmp_path / "elsewhere.pt")


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
    monkeypatch.setattr(evaluate, "INCEPTION_SHA256", evaluate._sha256(weights))
    monkeypatch.setenv(evaluate.INCEPTION_ENV, str(weights))
    extractor = load_inception(resize=resize)
    assert resize in extractor.key

    # mid-grey 128 is 0 after the graph's (x - 128) / 128, so the features are the conv bias alone
    grey = np.full((2, 32, 32, 1), 128, np.uint8)
    bias = network.layers.project.bias.detach().numpy()
    np.testing.assert_allclose(extractor(grey), np.broadcast_to(bias, (2, 2048)), atol=1e-5)
    feats = extract_features(torch.from_numpy(random_images(3, seed=0)), extractor, batch_size=2)
    assert feats.shape == (3, 2048) and feats.dtype == np.float32
