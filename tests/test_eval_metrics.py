"""The ADM metrics against independent references: closed forms for Gaussians, torchmetrics' FID and Inception
Score on the same features, scipy's matrix square root (the ADM evaluator's own route), brute-force float64
k-NN manifolds; and the FID Inception network's pieces (TF1 resize, weight files)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from dig.eval.metrics import GaussianStats, frechet_distance, inception_score, manifold_radii, precision_recall


def random_spd(d: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    a = rng.normal(size=(d, d)) * scale
    return a @ a.T + 0.1 * np.eye(d)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s
    assert frechet_distance(GaussianStats(np.array([1.0]), np.array([[4.0]])),
                            GaussianStats(np.array([-2.0]), np.array([[9.0]]))) == pytest.approx(9 + 1)
    # diagonal covariances commute: |dmu|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    mu_a, mu_b = rng.normal(size=16), rng.normal(size=16)
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(GaussianStats(mu_a, np.diag(a)), GaussianStats(mu_b, np.diag(b))) == pytest.approx(
        expected, rel=1e-10)
    # identity vs a rotated (non-diagonal) covariance R diag(l) R^T: sum (1 - sqrt(l_i))^2
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    lam = rng.uniform(0.05, 4, 16)
    got = frechet_distance(GaussianStats(np.zeros(16), np.eye(16)), GaussianStats(np.zeros(16), q @ np.diag(lam) @ q.T))
    assert got == pytest.approx(((1 - np.sqrt(lam)) ** 2).sum(), rel=1e-9)


def test_fid_equals_torchmetrics_and_scipy_on_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    rng = np.random.default_rng(1)
    d = 64
    real = rng.multivariate_normal(rng.normal(size=d), random_spd(d, rng, 0.3), size=300)
    fake = rng.multivariate_normal(rng.normal(size=d), random_spd(d, rng, 0.2), size=250)
    ours = frechet_distance(GaussianStats.of(fake), GaussianStats.of(real))

    class Features(torch.nn.Module):  # the "network" is the identity: both compute FID on these features
        def forward(self, x):
            return x.double()

    metric = FrechetInceptionDistance(feature=Features(), input_img_size=(d,))
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    assert ours == pytest.approx(float(metric.compute()), rel=1e-6)

    # the ADM evaluator's own formula: scipy's sqrtm of sigma1 . sigma2
    s1, s2 = np.cov(fake, rowvar=False), np.cov(real, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    diff = fake.mean(0) - real.mean(0)
    assert ours == pytest.approx(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean), rel=1e-8)


def test_fid_of_a_set_with_itself_is_zero_even_when_singular():
    rng = np.random.default_rng(2)
    few = rng.normal(size=(20, 128)).astype(np.float32)  # 20 points in 128-D: a rank-19 covariance
    stats = GaussianStats.of(few)
    assert abs(frechet_distance(stats, stats)) < 1e-6 * np.trace(stats.sigma)


def test_inception_score_equals_torchmetrics_and_the_split_formula():
    from torchmetrics.image.inception import InceptionScore

    rng = np.random.default_rng(3)
    logits = rng.normal(size=(600, 1008)) * 3

    class Logits(torch.nn.Module):
        def forward(self, x):
            return x.double()

    metric = InceptionScore(feature=Logits(), splits=1)
    metric.update(torch.from_numpy(logits))
    assert inception_score(logits) == pytest.approx(float(metric.compute()[0]), rel=1e-9)

    # ADM: consecutive splits of split_size, the improved-GAN formula per split, mean over splits
    def reference(split):
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        scores = []
        for i in range(0, len(p), split):
            part = p[i:i + split]
            kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
            scores.append(np.exp(kl.sum(1).mean()))
        return np.mean(scores)

    assert inception_score(logits, split_size=250) == pytest.approx(reference(250), rel=1e-9)  # 250, 250, 100
    # confident and evenly spread over 10 classes: IS = 10
    sharp = np.full((50, 1008), -1e4)
    sharp[np.arange(50), np.arange(50) % 10] = 0
    assert inception_score(sharp) == pytest.approx(10.0, rel=1e-6)


def brute_force_pr(ref: np.ndarray, samples: np.ndarray, k: int = 3) -> tuple[float, float]:
    from scipy.spatial.distance import cdist

    def radii(x):
        return np.sort(cdist(x, x, "sqeuclidean"), axis=1)[:, k]

    d = cdist(ref.astype(np.float64), samples.astype(np.float64), "sqeuclidean")
    precision = np.mean([(d[:, j] <= radii(ref)).any() for j in range(len(samples))])
    recall = np.mean([(d[i, :] <= radii(samples)).any() for i in range(len(ref))])
    return precision, recall


def test_precision_recall_equal_brute_force_knn_and_identical_sets_give_one():
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(120, 32)).astype(np.float32)
    samples = (rng.normal(size=(90, 32)) * 1.3 + 0.4).astype(np.float32)
    # small blocks: the blocked loops must give what one big block gives
    got = precision_recall(ref, samples, block=37)
    assert got == pytest.approx(brute_force_pr(ref, samples))
    assert 0 < got[0] < 1 and 0 < got[1] < 1
    assert precision_recall(ref, ref, block=50) == (1.0, 1.0)
    far = ref + 1000.0
    assert precision_recall(ref, far) == (0.0, 0.0)
    # the radius is the 3rd neighbour other than the point itself
    line = torch.arange(6, dtype=torch.float32)[:, None]
    assert manifold_radii(line).tolist() == [9.0, 4.0, 4.0, 4.0, 4.0, 9.0]


def test_tf1_resize_equals_the_formula_and_is_identity_at_299():
    from dig.eval.inception import resize_bilinear_tf1

    rng = np.random.default_rng(5)
    x = rng.uniform(0, 255, size=(1, 2, 5, 7))
    out = resize_bilinear_tf1(torch.from_numpy(x), 8, 11).numpy()
    ref = np.zeros((1, 2, 8, 11))
    for i in range(8):
        for j in range(11):
            sy, sx = i * 5 / 8, j * 7 / 11  # TF1: no half-pixel offset, no corner alignment
            y0, x0 = int(np.floor(sy)), int(np.floor(sx))
            y1, x1 = min(y0 + 1, 4), min(x0 + 1, 6)
            fy, fx = sy - y0, sx - x0
            top = x[..., y0, x0] * (1 - fx) + x[..., y0, x1] * fx
            bottom = x[..., y1, x0] * (1 - fx) + x[..., y1, x1] * fx
            ref[..., i, j] = top * (1 - fy) + bottom * fy
    np.testing.assert_allclose(out, ref, rtol=1e-12)
    same = torch.rand(1, 3, 299, 299)
    assert resize_bilinear_tf1(same, 299, 299) is same


def test_inception_weight_files_load_strictly(tmp_path):
    from dig.eval.inception import InceptionV3Features, load_inception

    torch.manual_seed(0)
    src = InceptionV3Features().eval()
    path = str(tmp_path / "inception.pth")
    torch.save(src.state_dict(), path)  # torchvision-layout keys, num_batches_tracked included
    net = load_inception(path)
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        got, want = net(x), src(x)
    for k in ("pool", "spatial", "logits"):
        torch.testing.assert_close(got[k], want[k])
    assert got["pool"].shape == (2, 2048) and got["spatial"].shape == (2, 17 * 17 * 7)
    assert got["logits"].shape == (2, 1008)
    torch.testing.assert_close(got["logits"], got["pool"] @ src.fc.weight.T)  # no bias, as ADM
    state = src.state_dict()
    state.pop("fc.weight")
    torch.save(state, path)
    with pytest.raises(ValueError, match="missing .*fc.weight"):
        load_inception(path)
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        load_inception(str(tmp_path / "absent.pth"))


def test_npz_reader_streams_batches_and_rejects_other_layouts(tmp_path):
    from dig.eval.evaluator import NpzError, open_image_batch

    images = np.random.default_rng(6).integers(0, 256, size=(7, 5, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "ok.npz", images)
    with open_image_batch(str(tmp_path / "ok.npz")) as (count, batches):
        parts = list(batches(3))
    assert count == 7 and [len(p) for p in parts] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(parts), images)
    np.savez(tmp_path / "float.npz", images.astype(np.float32))
    with pytest.raises(NpzError, match="expected uint8"):
        with open_image_batch(str(tmp_path / "float.npz")):
            pass
    np.savez(tmp_path / "named.npz", images=images)
    with pytest.raises(NpzError, match="no arr_0"):
        with open_image_batch(str(tmp_path / "named.npz")):
            pass


def test_reference_statistics_stored_in_the_batch_are_used_like_adm(tmp_path):
    from dig.eval.evaluator import compute_metrics, stored_stats

    rng = np.random.default_rng(7)
    feats = {"pool": rng.normal(size=(40, 16)), "spatial": rng.normal(size=(40, 8)), "logits": rng.normal(size=(40, 5))}
    ref = {"pool": rng.normal(size=(50, 16)) + 0.5, "spatial": rng.normal(size=(50, 8))}
    np.savez(tmp_path / "plain.npz", np.zeros((1, 2, 2, 3), np.uint8))
    assert stored_stats(str(tmp_path / "plain.npz")) is None
    mu, sigma = np.full(16, 3.0), np.eye(16)
    mu_s, sigma_s = np.zeros(8), 2 * np.eye(8)
    np.savez(tmp_path / "adm.npz", np.zeros((1, 2, 2, 3), np.uint8), mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    stats = stored_stats(str(tmp_path / "adm.npz"))
    with_stored = compute_metrics(feats, ref, stats)
    computed = compute_metrics(feats, ref)
    assert with_stored["fid"] == pytest.approx(frechet_distance(GaussianStats.of(feats["pool"]), GaussianStats(mu, sigma)))
    assert with_stored["sfid"] == pytest.approx(
        frechet_distance(GaussianStats.of(feats["spatial"]), GaussianStats(mu_s, sigma_s)))
    assert computed["fid"] == pytest.approx(frechet_distance(GaussianStats.of(feats["pool"]), GaussianStats.of(ref["pool"])))
    # precision/recall always come from the reference's features
    assert (with_stored["precision"], with_stored["recall"]) == (computed["precision"], computed["recall"])
