"""Maximum Mean Discrepancy (MMD) between two sets of samples.

MMD^2(P, Q) = E k(x, x') + E k(y, y') - 2 E k(x, y),  x, x' ~ P,  y, y' ~ Q.
With a characteristic kernel it is zero exactly when P = Q, so the MMD-VAE
(Zhao, Song & Ermon, "InfoVAE", arXiv:1706.02262) uses it to pull the aggregate
posterior q(z) of the encoder towards the prior p(z) = N(0, I).

    from mmd import mmd
    loss = mmd(z, torch.randn_like(z))            # Gaussian kernel, unbiased
    loss = mmd(z, prior, kernel="imq", scales=[0.1, 1, 10])

Memory is O(N*M): distances come from norms and one matrix product, never an
N x M x D difference tensor.
"""
import torch

KERNELS = ("gaussian", "imq")
ESTIMATORS = ("unbiased", "biased")


def squared_distances(x, y):
    """All pairwise ||x_i - y_j||^2 as an (N, M) matrix."""
    x_norms = x.pow(2).sum(1, keepdim=True)
    y_norms = y.pow(2).sum(1)
    # ||x||^2 + ||y||^2 - 2<x, y> can dip just below 0 from rounding.
    return (x_norms + y_norms - 2.0 * x @ y.T).clamp_min(0.0)


def kernel_matrix(x, y, kernel="gaussian", scales=(1.0,), bandwidth=None):
    """k(x_i, y_j) for all pairs, summed over the bandwidth multipliers in `scales`.

    bandwidth: the squared-distance unit. The default 2*D is E||x - y||^2 for two
    draws of N(0, I_D), so the kernel stays informative as D grows. (The seed
    notebook divided by D^2, which makes k ~ 1 everywhere in high D: pass
    bandwidth=D**2 to reproduce it.)
      gaussian: exp(-d^2 / (s * bandwidth))
      imq:      C / (C + d^2), C = s * bandwidth   (Tolstikhin et al., WAE, 2018)
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    d2 = squared_distances(x, y)
    unit = 2.0 * x.shape[1] if bandwidth is None else float(bandwidth)
    k = torch.zeros_like(d2)
    for s in scales:
        c = s * unit
        k = k + (torch.exp(-d2 / c) if kernel == "gaussian" else c / (c + d2))
    return k


def mmd(x, y, kernel="gaussian", scales=(1.0,), bandwidth=None, estimator="unbiased"):
    """Differentiable MMD^2 between samples x (N, D) and y (M, D); N and M may differ.

    estimator="unbiased" drops the k(x_i, x_i) terms (a U-statistic: zero in
    expectation when both sets come from one distribution, can be slightly
    negative); "biased" keeps them (a V-statistic: >= 0, exactly 0 for x == y).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd needs (N, D) and (M, D) samples, got {tuple(x.shape)} and {tuple(y.shape)}")
    n, m = x.shape[0], y.shape[0]
    k_xx = kernel_matrix(x, x, kernel, scales, bandwidth)
    k_yy = kernel_matrix(y, y, kernel, scales, bandwidth)
    k_xy = kernel_matrix(x, y, kernel, scales, bandwidth)
    if estimator == "biased":
        return k_xx.mean() + k_yy.mean() - 2.0 * k_xy.mean()
    if n < 2 or m < 2:
        raise ValueError("the unbiased MMD needs at least 2 samples in each set")
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within_x + within_y - 2.0 * k_xy.mean()
