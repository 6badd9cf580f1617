"""The evaluation metrics on inputs whose answer is known."""
import math
import os
import sys

import pytest
import torch

from conftest import REPO
from evaluate import (
    class_coverage,
    confident_share,
    frechet_distance,
    inception_score,
    knn_accuracy,
    nearest_train_distance,
    probe_accuracy,
)

sys.path.insert(0, os.path.join(REPO, "experiments"))
from code_geometry import local_dimension, nearest, neighbourhood_is_pure  # noqa: E402


def sqrtm_trace_reference(a, b, iterations=60):
    """tr((A B)^(1/2)) by Denman-Beavers iteration on the product itself: the brute-force check."""
    y, z = a @ b, torch.eye(len(a), dtype=a.dtype)
    for _ in range(iterations):
        y, z = 0.5 * (y + torch.linalg.inv(z)), 0.5 * (z + torch.linalg.inv(y))
    return y.trace().item()


def test_frechet_distance_matches_a_brute_force_matrix_square_root():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g,
            dtype=torch.float64)
    b = torch.randn(500, 6, generator=g, dtype=torch.float64) * 1.5 + 0.3
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    expected = ((a.mean(0) - b.mean(0)).pow(2).sum() + cov_a.trace() + cov_b.trace()
                - 2 * sqrtm_trace_reference(cov_a, cov_b)).item()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    x = torch.randn(2000, 16, generator=torch.Generator().manual_seed(1))
    assert abs(frechet_distance(x, x)) < 1e-6
    distances = [frechet_distance(x, x + shift) for shift in (0.1, 0.5, 1.0)]
    assert distances == sorted(distances)
    # A pure mean shift adds exactly ||shift||^2.
    assert distances[2] == pytest.approx(16 * 1.0, rel=1e-4)


def test_inception_score_of_confident_balanced_predictions_is_the_class_count():
    probs = torch.eye(10).repeat(50, 1)
    assert inception_score(probs) == pytest.approx(10.0, rel=1e-6)
    assert inception_score(torch.full((100, 10), 0.1)) == pytest.approx(1.0)   # uninformative
    assert inception_score(torch.eye(10)[[3] * 100]) == pytest.approx(1.0)     # one class only


def test_class_coverage():
    assert class_coverage(torch.eye(10).repeat(10, 1)) == 1.0
    assert class_coverage(torch.eye(10)[[0] * 90 + [1] * 10]) == pytest.approx(0.2)


def test_confident_share_counts_the_sure_predictions_not_the_blends():
    sure, blend = torch.eye(10)[:3], torch.tensor([[0.5, 0.5] + [0.0] * 8, [0.85, 0.15] + [0.0] * 8])
    assert confident_share(torch.cat([sure, blend])) == pytest.approx(0.6)
    assert confident_share(torch.tensor([[0.9, 0.1] + [0.0] * 8])) == 1.0  # the threshold is inclusive


def test_probe_and_knn_separate_separable_codes():
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 10, (2000,), generator=g)
    centres = torch.randn(10, 8, generator=g) * 10
    codes = centres[labels] + torch.randn(2000, 8, generator=g)
    assert probe_accuracy(codes[:1500], labels[:1500], codes[1500:], labels[1500:]) == 1.0
    assert knn_accuracy(codes[:1500], labels[:1500], codes[1500:], labels[1500:]) == 1.0
    noise = torch.randn(2000, 8, generator=g)
    assert probe_accuracy(noise[:1500], labels[:1500], noise[1500:], labels[1500:]) < 0.3
    assert not math.isnan(knn_accuracy(noise[:1500], labels[:1500], noise[1500:], labels[1500:]))


def test_the_copy_check_flags_copies_of_training_images():
    g = torch.Generator().manual_seed(3)
    train_images = torch.randint(0, 256, (300, 28, 28), generator=g, dtype=torch.uint8)
    copies = train_images[:50].unsqueeze(1).float() / 255 + 0.01 * torch.randn(50, 1, 28, 28, generator=g)
    fresh = torch.rand(50, 1, 28, 28, generator=g)
    train_flat = train_images.flatten(1).float() / 255
    # On one thread the matmul form alone put these exact copies 0.0078 away (float32 cancellation).
    assert nearest_train_distance(train_images[:5].unsqueeze(1).float() / 255, train_flat).abs().max() < 1e-3
    assert nearest_train_distance(copies, train_flat).max() < nearest_train_distance(fresh, train_flat).min()


def test_local_dimension_finds_the_dimension_of_a_sheet_inside_a_larger_space():
    # The prior gap's diagnosis (docs/prior_gap.md) rests on this estimate (experiments/code_geometry.py):
    # codes on a 4-dimensional sheet inside 16 dimensions must measure about 4, N(0, I_16) about 16.
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 16, generator=g))[0][:, :4]  # 4 orthonormal directions in 16-D
    sheet = torch.randn(6000, 4, generator=g) @ basis.T
    full = torch.randn(6000, 16, generator=g)
    assert 3.5 < local_dimension(sheet[:1000], sheet) < 4.5
    assert 13.0 < local_dimension(full[:1000], full) < 17.0


def test_neighbourhood_purity_tells_a_point_inside_a_cluster_from_one_between_clusters():
    # docs/prior_gap.md's split of unsure N(0, I) draws into "inside a digit's cluster" and "between
    # clusters".
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-3.0, 0.0], [3.0, 0.0]])
    labels = torch.arange(2).repeat_interleave(500)
    codes = centres[labels] + 0.5 * torch.randn(1000, 2, generator=g)
    # two cluster centres and the gap between them
    points = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 0.0]])
    assert neighbourhood_is_pure(labels[nearest(points, codes, 10)[1]]).tolist() == [True, True, False]


def test_the_real_image_floor_is_the_same_for_every_model():
    # The floor (10,000 real training images against the test set) is what every other FID is read
    # against; it once moved with the latent size, because the real images were picked with the
    # generator that had just drawn the N(0, I) codes.
    import evaluate
    from model import MMDVAE
    g = torch.Generator().manual_seed(0)
    splits = {split: (torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8),
                      torch.arange(n) % 10)
              for split, n in (("train", 600), ("test", 200))}
    torch.manual_seed(0)
    classifier = evaluate.Classifier().eval()
    floors = [evaluate.evaluate(MMDVAE(latent_dim=d, channels=4, hidden=16).eval(), splits, classifier,
                                num_samples=300,
                                copy_samples=20)["real_fid"] for d in (2, 16, 20)]
    assert floors[0] == floors[1] == floors[2]
