"""End to end without network: random Inception weights in a temp file, ADM-format NPZ batches, the five metrics;
NPZ key round trips, ADM's centre crop, and the domain classifier's load/features/metrics path."""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from usp.evaluate import (
    DomainEvaluator,
    InceptionFeatures,
    compute_statistics,
    domain_metrics,
    evaluate_command,
    evaluate_npz,
    inception_score,
    inception_stats,
    iter_npz_batches,
    precision_recall,
    read_npz_labels,
    read_npz_stats,
    reference_batch_from_folder,
    resolve_weights,
    save_random_weights,
    train_domain_classifier,
    write_reference_npz,
    write_sample_npz,
)
from usp.evaluate.inception import SPATIAL_DIM, WEIGHTS_ENV, WEIGHTS_FILE, WEIGHTS_URL

N_IMAGES = 6  # per batch (P/R with k = 3 needs 4); the CPU forward of Inception at 299² dominates the runtime
FD = "eigh"  # ADM's sqrtm takes ~30 s per 2048-d FID on a small CPU; its equality with eigh is in test_metrics


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """This file is bound by BLAS/OpenMP work (Inception at 299², 2048-d eigendecompositions). On a shared
    two-core machine two threads per process spin against each other (measured 4-8x slower than one)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits

        blas = threadpool_limits(1)
    except ImportError:
        blas = contextlib.nullcontext()
    with blas:
        yield
    torch.set_num_threads(previous)


def _few_sample_fd(x1: np.ndarray, x2: np.ndarray) -> float:
    """FD of the Gaussian fits of two small sets, without any D x D square root: for centred X1 (n1, D) and
    X2 (n2, D), the non-zero eigenvalues of sigma1 sigma2 are those of (X1 X2ᵀ)(X1 X2ᵀ)ᵀ / ((n1-1)(n2-1)), so
    tr (sigma1 sigma2)^½ = nuclear norm of X1 X2ᵀ / sqrt((n1-1)(n2-1))."""
    x1, x2 = x1.astype(np.float64), x2.astype(np.float64)
    c1, c2 = x1 - x1.mean(0), x2 - x2.mean(0)
    n1, n2 = len(x1), len(x2)
    tr1, tr2 = (c1**2).sum() / (n1 - 1), (c2**2).sum() / (n2 - 1)
    tr_sqrt = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / math.sqrt((n1 - 1) * (n2 - 1))
    return float(((x1.mean(0) - x2.mean(0)) ** 2).sum() + tr1 + tr2 - 2 * tr_sqrt)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_random_weights(tmp_path_factory.mktemp("inception") / "random-inception.pth", seed=0)


@pytest.fixture(scope="module")
def extractor(weights):
    return InceptionFeatures.from_weights(weights)


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    """A reference and a sample batch of 64x64 images; the samples are brighter, with labels."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("npz")
    ref = rng.integers(0, 200, size=(N_IMAGES, 64, 64, 3), dtype=np.uint8)
    sample = rng.integers(40, 256, size=(N_IMAGES, 64, 64, 3), dtype=np.uint8)
    labels = np.arange(N_IMAGES) % 3
    return {
        "ref_path": write_reference_npz(folder / "ref.npz", ref),
        "sample_path": write_sample_npz(folder / "samples.npz", sample, labels),
        "ref": ref, "sample": sample, "labels": labels, "folder": folder,
    }


@pytest.fixture(scope="module")
def sample_features(extractor, batches):
    return extractor.extract(batches["sample"], batch_size=4)  # batches of 4 + 2


@pytest.fixture(scope="module")
def ref_features(extractor, batches):
    return extractor.extract(batches["ref"], batch_size=N_IMAGES)


def test_inception_features_shapes(extractor, sample_features, batches):
    assert sample_features.pool.shape == (N_IMAGES, 2048)
    assert sample_features.logits.shape == (N_IMAGES, 1008)
    assert sample_features.spatial.shape == (N_IMAGES, SPATIAL_DIM) == (N_IMAGES, 2023)
    for array in (sample_features.pool, sample_features.logits, sample_features.spatial):
        assert array.dtype == np.float32 and np.isfinite(array).all()
    with pytest.raises(ValueError, match="uint8"):
        extractor(batches["sample"].astype(np.float32))


def test_spatial_is_first_seven_channels_of_mixed_6d_branch1x1_channels_last(extractor, batches):
    caught = {}
    hook = extractor.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: caught.update(out=o.clone()))
    try:
        out = extractor(batches["ref"][:1])
    finally:
        hook.remove()
    full = caught["out"]  # (1, 192, 17, 17)
    assert full.shape == (1, 192, 17, 17)
    expected = full[:, :7].permute(0, 2, 3, 1).reshape(1, -1)  # NHWC flatten, as ADM's spatial[..., :7]
    torch.testing.assert_close(torch.from_numpy(out.spatial), expected)


def test_evaluate_command_gives_five_finite_metrics_matching_the_features(weights, batches, sample_features,
                                                                         ref_features, tmp_path):
    out_json = tmp_path / "metrics.json"
    # other batch sizes than the fixtures: batching must not matter
    metrics = evaluate_command(batches["ref_path"], batches["sample_path"], out=out_json, inception_weights=weights,
                               batch_size=5, fd_method=FD)
    assert set(metrics) == {"fid", "sfid", "inception_score", "precision", "recall"}
    assert all(math.isfinite(v) for v in metrics.values())
    # the same numbers computed independently from directly extracted features
    fid = _few_sample_fd(sample_features.pool, ref_features.pool)
    sfid = _few_sample_fd(sample_features.spatial, ref_features.spatial)
    assert metrics["fid"] == pytest.approx(fid, rel=1e-3) and metrics["fid"] > 0
    assert metrics["sfid"] == pytest.approx(sfid, rel=1e-3) and metrics["sfid"] > 0
    assert metrics["inception_score"] == pytest.approx(inception_score(sample_features.logits), rel=1e-4)
    assert (metrics["precision"], metrics["recall"]) == precision_recall(ref_features.pool, sample_features.pool)
    written = json.loads(out_json.read_text())
    assert written["samples"] == str(batches["sample_path"])
    assert written["fid"] == pytest.approx(metrics["fid"])


def test_precomputed_reference_statistics_are_used(extractor, batches, sample_features, tmp_path):
    """A reference with only ADM's statistics, equal to the samples' own: FID = sFID = 0, no P/R."""
    ref_path = write_reference_npz(tmp_path / "stats_only.npz", stats=inception_stats(sample_features))
    metrics = evaluate_npz(ref_path, batches["sample_path"], extractor, batch_size=N_IMAGES, fd_method=FD)
    assert abs(metrics["fid"]) < 1e-3 and abs(metrics["sfid"]) < 1e-3
    assert math.isnan(metrics["precision"]) and math.isnan(metrics["recall"])


def test_npz_round_trip_with_adm_keys(batches, tmp_path):
    rng = np.random.default_rng(1)
    stats = {"mu": rng.normal(size=4), "sigma": np.eye(4), "mu_s": rng.normal(size=3), "sigma_s": np.eye(3) * 2}
    path = write_reference_npz(tmp_path / "ref.npz", batches["ref"], stats)
    with np.load(path) as data:
        assert sorted(data.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
        np.testing.assert_array_equal(data["arr_0"], batches["ref"])
    loaded = read_npz_stats(path)
    for key, value in stats.items():
        np.testing.assert_array_equal(loaded[key], value)
    streamed = np.concatenate(list(iter_npz_batches(path, "arr_0", batch_size=3)))
    np.testing.assert_array_equal(streamed, batches["ref"])
    with np.load(batches["sample_path"]) as data:
        assert sorted(data.files) == ["arr_0", "arr_1"]
    np.testing.assert_array_equal(read_npz_labels(batches["sample_path"]), batches["labels"])
    assert read_npz_stats(batches["sample_path"]) is None and read_npz_labels(path) is None
    compressed = tmp_path / "compressed.npz"  # ADM's published batches may be deflated: still streamed
    np.savez_compressed(compressed, arr_0=batches["ref"])
    np.testing.assert_array_equal(np.concatenate(list(iter_npz_batches(compressed, batch_size=4))), batches["ref"])


def test_reference_from_folder_uses_adm_centre_crop(tmp_path):
    """A 300x100 image of three vertical bands (red | green | blue): short side 100 >= 2·32, so one BOX halving
    to 150x50, BICUBIC to 96x32, centre crop 32x32 = the green band, whatever the resampling does at its edges."""
    bands = np.zeros((100, 300, 3), np.uint8)
    bands[:, :100, 0] = bands[:, 100:200, 1] = bands[:, 200:, 2] = 255
    (tmp_path / "images" / "class_a").mkdir(parents=True)
    Image.fromarray(bands).save(tmp_path / "images" / "class_a" / "bands.png")
    Image.fromarray(bands[:, ::-1].copy()).save(tmp_path / "images" / "flipped.png")
    path = reference_batch_from_folder(tmp_path / "images", tmp_path / "ref.npz", image_size=32)
    with np.load(path) as data:
        images = data["arr_0"]
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    for image in images:
        np.testing.assert_array_equal(image[:, 2:-2], np.broadcast_to(np.array([0, 255, 0], np.uint8), (32, 28, 3)))


def test_missing_weights_error_names_file_url_and_option(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    with pytest.raises(FileNotFoundError) as err:
        resolve_weights(None, download=False)
    assert WEIGHTS_FILE in str(err.value) and WEIGHTS_URL in str(err.value) and WEIGHTS_ENV in str(err.value)
    with pytest.raises(FileNotFoundError, match="not found at"):
        resolve_weights(tmp_path / "nope.pth")


# ---------------------------------------------------------------- domain classifier
def test_domain_classifier_round_trip_and_metrics(tmp_path):
    from usp.data.fashion_mnist import load_fashion_mnist, to_rgb32

    path = tmp_path / "domain.safetensors"
    model, accuracy = train_domain_classifier(path, epochs=1, seed=0, limit=512)
    assert 0.0 <= accuracy <= 1.0
    evaluator = DomainEvaluator.load(path)
    assert evaluator.metadata["dataset"] == "fashion_mnist" and evaluator.metadata["train_images"] == "512"
    images, labels = load_fashion_mnist(split="test")
    real, fake = to_rgb32(images[:64]), to_rgb32(images[64:128])
    feats = evaluator.features(fake)
    assert feats.shape == (64, 128) and np.isfinite(feats).all()
    with torch.no_grad():
        np.testing.assert_allclose(feats, model.features(fake).numpy(), rtol=1e-5, atol=1e-6)
    as_uint8 = ((fake + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (N, 32, 32, 3)
    np.testing.assert_allclose(evaluator.features(as_uint8), feats, rtol=1e-4, atol=1e-4)
    assert evaluator.predict(fake).shape == (64,)
    metrics = domain_metrics(evaluator, fake, labels[64:128], real)
    assert set(metrics) == {"domain_fd", "domain_fd_se", "class_agreement", "samples"}
    assert math.isfinite(metrics["domain_fd"]) and 0.0 <= metrics["class_agreement"] <= 1.0
    # The bootstrap error of the FD is positive and shrinks with the sample count (roughly as 1/sqrt(N)).
    many = domain_metrics(evaluator, to_rgb32(images[128:1152]), None, real)
    assert metrics["samples"] == 64 and many["samples"] == 1024
    assert 0.0 < many["domain_fd_se"] < metrics["domain_fd_se"]
    same = domain_metrics(evaluator, real, None, real)
    mu, sigma = compute_statistics(evaluator.features(real))
    assert abs(same["domain_fd"]) < 1e-3 and math.isnan(same["class_agreement"])
    assert mu.shape == (128,) and sigma.shape == (128, 128)
    # Precomputed real statistics (what fine-tuning evaluation reuses) give the same figures as real images.
    assert domain_metrics(evaluator, fake, labels[64:128], (mu, sigma)) == pytest.approx(
        domain_metrics(evaluator, fake, labels[64:128], real))
