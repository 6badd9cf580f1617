"""What the MMD must do: zero for equal distributions, growing with any mismatch."""
import pytest
import torch

from mmd import kernel_matrix, mmd, squared_distances


def brute_force_mmd(x, y, kernel, scales, unbiased):
    """The definition, one pair at a time."""
    unit = 2.0 * x.shape[1]

    def k(a, b):
        d2 = float(((a - b) ** 2).sum())
        return sum((pow(2.718281828459045,
                        -d2 / (s * unit)) if kernel == "gaussian" else s * unit / (s * unit + d2))
                   for s in scales)

    def mean_k(a, b, skip_diagonal):
        pairs = [(i, j) for i in range(len(a)) for j in range(len(b)) if not (skip_diagonal and i == j)]
        return sum(k(a[i], b[j]) for i, j in pairs) / len(pairs)

    return mean_k(x, x, unbiased) + mean_k(y, y, unbiased) - 2 * mean_k(x, y, False)


@pytest.mark.parametrize("kernel", ["gaussian", "imq"])
@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
@pytest.mark.parametrize("scales", [(1.0,), (0.2, 1.0, 5.0)])
def test_matches_brute_force_double_loop(kernel, estimator, scales):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.randn(5, 3, generator=g, dtype=torch.float64) + 0.5
    expected = brute_force_mmd(x, y, kernel, scales, estimator == "unbiased")
    assert mmd(x, y, kernel, scales, estimator=estimator).item() == pytest.approx(expected, rel=1e-9,
            abs=1e-12)


def test_squared_distances_match_cdist():
    x, y = torch.randn(50, 16, dtype=torch.float64), torch.randn(30, 16, dtype=torch.float64)
    assert torch.allclose(squared_distances(x, y), torch.cdist(x, y) ** 2)
    assert (squared_distances(x, x) >= 0).all()


@pytest.mark.parametrize("kernel", ["gaussian", "imq"])
def test_biased_mmd_of_a_set_with_itself_is_zero(kernel):
    x = torch.randn(64, 8)
    assert mmd(x, x, kernel, estimator="biased").item() == pytest.approx(0.0, abs=1e-6)


def test_unbiased_mmd_is_zero_in_expectation_for_one_distribution():
    g = torch.Generator().manual_seed(1)
    values = torch.stack([mmd(torch.randn(100, 8, generator=g), torch.randn(100, 8,
            generator=g)) for _ in range(200)])
    # Individual estimates scatter around zero, both signs; their mean is zero within its standard error.
    assert (values < 0).any() and (values > 0).any()
    assert abs(values.mean()) < 3 * values.std() / 200 ** 0.5


def test_grows_with_a_mean_shift():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(500, 8, generator=g), torch.randn(500, 8, generator=g)
    values = [mmd(x, y + shift).item() for shift in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert values == sorted(values) and values[1] > 0.005


def test_grows_with_a_variance_mismatch():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(500, 8, generator=g), torch.randn(500, 8, generator=g)
    values = [mmd(x, y * scale).item() for scale in (1.0, 1.5, 2.0, 3.0)]
    assert values == sorted(values) and values[1] > 0.005
    # A collapsed code (variance too small) is a mismatch too.
    assert mmd(x, 0.1 * y).item() > 0.1


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_symmetric(estimator):
    x, y = torch.randn(40, 6), torch.randn(30, 6) * 2
    assert mmd(x, y, estimator=estimator).item() == pytest.approx(mmd(y, x, estimator=estimator).item(),
            rel=1e-5)


def test_different_set_sizes():
    value = mmd(torch.randn(128, 4), torch.randn(37, 4) + 3)
    assert value.shape == () and value.item() > 0.1


@pytest.mark.parametrize("kernel", ["gaussian", "imq"])
def test_gradients_are_finite_even_for_coincident_points(kernel):
    x = torch.randn(32, 8)
    x = torch.cat([x, x[:4]]).requires_grad_()   # duplicate rows: zero distances
    mmd(x, torch.randn(40, 8), kernel).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_default_bandwidth_stays_informative_in_high_dimension():
    # The seed's exp(-d^2 / D^2) is ~1 for every pair at D = 256, so it barely sees a shift.
    g = torch.Generator().manual_seed(4)
    d = 256
    x, y = torch.randn(300, d, generator=g), torch.randn(300, d, generator=g) + 0.3
    assert kernel_matrix(x, x, bandwidth=d ** 2).min() > 0.98
    assert mmd(x, y, bandwidth=d ** 2).item() < 0.01
    assert mmd(x, y).item() > 10 * mmd(x, y, bandwidth=d ** 2).item()


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kernel"):
        mmd(torch.randn(4, 2), torch.randn(4, 2), kernel="laplace")
    with pytest.raises(ValueError, match="estimator"):
        mmd(torch.randn(4, 2), torch.randn(4, 2), estimator="median")
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        mmd(torch.randn(4, 2), torch.randn(4, 3))


@pytest.mark.parametrize("kernel", ["gaussian", "imq"])
def test_gradients_match_the_expanded_formula(kernel):
    # The in-place distance matrix must give the same gradients as the textbook N x M x D form.
    x = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(9, 3, dtype=torch.float64) + 1

    def expanded(a, b):
        d2 = (a[:, None, :] - b[None, :, :]).pow(2).sum(-1)
        c = 2.0 * a.shape[1]
        return torch.exp(-d2 / c) if kernel == "gaussian" else c / (c + d2)

    kxx, kyy, kxy = expanded(x, x), expanded(y, y), expanded(x, y)
    reference = ((kxx.sum() - kxx.diagonal().sum()) / (12 * 11) + (kyy.sum() - kyy.diagonal().sum()) / (9 * 8)
                 - 2 * kxy.mean())
    (expected,) = torch.autograd.grad(reference, x)
    (got,) = torch.autograd.grad(mmd(x, y, kernel), x)
    assert torch.allclose(got, expected, atol=1e-10)
