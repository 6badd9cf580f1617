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
    """All pairwise ||x_i - y_j||^2 as an (N, M) matrix, built in place: one N x M buffer."""
    d2 = (x @ y.T).mul_(-2.0)
    d2.add_(x.pow(2).sum(1, keepdim=True)).add_(y.pow(2).sum(1))
    # ||x||^2 + ||y||^2 - 2<x, y> can dip just below 0 from rounding.
    return d2.clamp_min_(0.0)


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
    k = None
    for s in scales:
        c = s * unit
        term = d2.mul(-1.0 / c).exp_() if kernel == "gaussian" else torch.div(c, d2 + c)
        k = term if k is None else k + term
    return k


def mean_kernel(x, y, kernel, scales, bandwidth, skip_diagonal):
    """Mean of k over all pairs (or all off-diagonal pairs); the matrix is freed on return."""
    k = kernel_matrix(x, y, kernel, scales, bandwidth)
    if skip_diagonal:
        n = k.shape[0]
        return (k.sum() - k.diagonal().sum()) / (n * (n - 1))
    return k.mean()


def mmd(x, y, kernel="gaussian", scales=(1.0,), bandwidth=None, estimator="unbiased"):
    """Differentiable MMD^2 between samples x (N, D) and y (M, D); N and M may differ.

    estimator="unbiased" drops the k(x_i, x_i) terms (a U-statistic: zero in
    expectation when both sets come from one distribution, can be slightly
    negative); "biased" keeps them (a V-statistic: >= 0, exactly 0 for x == y).
    Only one N x M kernel matrix is alive at a time (two buffers at the peak).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd needs (N, D) and (M, D) samples, got {tuple(x.shape)} and {tuple(y.shape)}")
    unbiased = estimator == "unbiased"
    if unbiased and (x.shape[0] < 2 or y.shape[0] < 2):
        raise ValueError("the unbiased MMD needs at least 2 samples in each set")
    args = (kernel, scales, bandwidth)
    return (mean_kernel(x, x, *args, skip_diagonal=unbiased) + mean_kernel(y, y, *args,
            skip_diagonal=unbiased)
            - 2.0 * mean_kernel(x, y, *args, skip_diagonal=False))
