"""The ex-post prior: a full-covariance Gaussian mixture fitted to the training codes.

An MMD-VAE pulls its aggregate posterior q(z) towards N(0, I), but never all the way:
the codes keep a finer cluster structure, and N(0, I) draws that land between the
clusters decode to blends of digits. Fitting a density to the codes after training
and sampling from it instead is "ex-post density estimation" (Ghosh et al., "From
Variational to Deterministic Autoencoders", ICLR 2020).

    gmm = fit_gmm(train_codes, components=50, seed=0)     # EM, k-means++ start
    z = sample_gmm(gmm, 64, torch.Generator().manual_seed(0))
    model.decode(z)
    ckpt["prior"] = fit(model, train_images, components=50)   # what train.py stores

The fit is plain EM in torch, in float64. Memory is O(N*K) for N codes and K
components (plus the codes' D(D+1)/2 distinct products, once): every quadratic form
is a matmul with the K precision matrices, never an N x K x D x D tensor. A floor
under each covariance's eigenvalues keeps every component invertible, even one that
EM leaves with few codes. The result is a dict of plain tensors, so a checkpoint that
holds it still loads with torch.load(weights_only=True).
"""
import math
import time

import torch

import data
from cli import UserError, require

COV_FLOOR = 1e-4   # least variance of a component in any direction; codes are on the prior's unit scale
# EM stops when the mean log-likelihood per code gains less than this in an iteration. On two
# default runs' codes (60 components), 1e-3 stopped after 44 and 46 iterations instead of 162
# and 105 at 1e-4, 3.9x and 2.1x faster, within 0.07 nats of the log-likelihood and at the same
# sample FID (5.66 and 5.55 against 6.08 and 5.36; README: the prior gap, sixth round).
STOP_GAIN = 1e-3


def _outer(codes):
    """The distinct products x_i x_j (i <= j) of each code: (N, D (D + 1) / 2), computed once per fit.

    Every quadratic form x^T A x of every code and component is then one matmul with
    an (N, K) result: memory stays O(N*K), never N x K x D x D."""
    i, j = torch.triu_indices(codes.shape[1], codes.shape[1], device=codes.device)
    return codes[:, i] * codes[:, j]


def _log_densities(codes, outer, means, scale_tril, log_weights=None):
    """log N(codes | means[k], L_k L_k^T) (+ log_weights[k]) for every code and component: (N, K).

    (x - m)^T P (x - m) = x^T P x - 2 (P m)^T x + m^T P m, with P the precision matrix."""
    d = codes.shape[1]
    precision = torch.cholesky_inverse(scale_tril)
    i, j = torch.triu_indices(d, d, device=codes.device)
    quadratic = precision[:, i, j] * (2.0 - (i == j).to(codes.dtype))  # off-diagonal terms appear twice
    linear = (precision @ means[:, :, None]).squeeze(2)                 # P_k m_k: (K, D)
    constant = (-0.5 * (linear * means).sum(1) - scale_tril.diagonal(dim1=1, dim2=2).log().sum(1)
                - 0.5 * d * math.log(2 * math.pi))
    if log_weights is not None:
        constant = constant + log_weights
    # Two fused multiply-adds over the (N, K) result: this is the E-step's whole cost.
    return torch.addmm(constant, outer, quadratic.T, alpha=-0.5).addmm_(codes, linear.T)


def _kmeans_plus_plus(codes, components, generator):
    """Initial means spread out over the codes: each next one drawn with probability ~ distance^2."""
    n = len(codes)
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    nearest = (codes - codes[chosen[0]]).pow(2).sum(1)
    for _ in range(components - 1):
        if nearest.sum() <= 0:  # fewer distinct codes than components: any code will do
            index = int(torch.randint(n, (1,), generator=generator))
        else:
            index = int(torch.multinomial(nearest, 1, generator=generator))
        chosen.append(index)
        nearest = torch.minimum(nearest, (codes - codes[index]).pow(2).sum(1))
    return codes[chosen].clone()


def _maximize(codes, outer, resp, cov_floor):
    """M-step: mixture weights, means and Cholesky factors of the covariances.

    The weighted second moments of all components are one product of the
    responsibilities with the codes' outer products. Each covariance's eigenvalues
    are then raised to at least cov_floor: that is the exact maximiser under the
    constraint "no variance below the floor", so EM still never lowers the
    log-likelihood, and a component left with few codes stays invertible."""
    d = codes.shape[1]
    counts = resp.sum(0) + 1e-10  # a component that lost all its codes keeps a tiny, finite weight
    means = (resp.T @ codes) / counts[:, None]
    i, j = torch.triu_indices(d, d, device=codes.device)
    upper = resp.T @ outer
    moments = codes.new_empty(len(counts), d, d)
    moments[:, i, j] = upper
    moments[:, j, i] = upper
    covs = moments / counts[:, None, None] - means[:, :, None] * means[:, None, :]
    eigvals, eigvecs = torch.linalg.eigh(covs)
    covs = eigvecs @ torch.diag_embed(eigvals.clamp_min(cov_floor)) @ eigvecs.transpose(1, 2)
    scale_tril, info = torch.linalg.cholesky_ex(covs)
    if info.any():
        raise ValueError(f"a component's covariance is not positive definite even with the floor {cov_floor}")
    return counts / len(codes), means, scale_tril


def fit_gmm(codes, components, seed=0, max_iters=300, tol=STOP_GAIN, cov_floor=COV_FLOOR):
    """Fit a K-component full-covariance Gaussian mixture to codes (N, D) by EM.

    Starts from k-means++ means (seeded) with hard assignments to the nearest mean, and
    stops when the mean log-likelihood per code gains less than `tol` in an iteration.
    Returns {"weights" (K,), "means" (K, D), "scale_tril" (K, D, D), "log_likelihood"
    (mean per code at the end), "history" (the mean log-likelihood after each M-step),
    "iterations"}; the tensors are float32 on the codes' device.
    Raises ValueError for non-finite codes, a bad component count, or a failed fit.
    """
    if codes.dim() != 2 or len(codes) < 2:
        raise ValueError(f"need codes of shape (N >= 2, D), got {tuple(codes.shape)}")
    if not 1 <= components <= len(codes):
        raise ValueError("the number of components must be between 1 and the number of codes "
                         f"({len(codes)}), "
                         f"got {components}")
    if not torch.isfinite(codes).all():
        raise ValueError("the codes contain NaN or inf: the encoder's weights or inputs are not finite")
    generator = torch.Generator().manual_seed(seed)
    x = codes.detach().double()
    means = _kmeans_plus_plus(x.cpu(), components, generator).to(x.device)
    resp = torch.zeros(len(x), components, dtype=x.dtype, device=x.device)
    resp[torch.arange(len(x)), torch.cdist(x, means).argmin(1)] = 1.0
    outer = _outer(x)
    history = []
    for iteration in range(1, max_iters + 1):
        weights, means, scale_tril = _maximize(x, outer, resp, cov_floor)
        # log p(x, k), turned in place into p(k | x)
        resp = _log_densities(x, outer, means, scale_tril, weights.log())
        peak = resp.max(1, keepdim=True).values
        total = resp.sub_(peak).exp_().sum(1, keepdim=True)
        resp.div_(total)
        history.append((total.log() + peak).mean().item())
        if not math.isfinite(history[-1]):
            raise ValueError("the log-likelihood became non-finite")
        if len(history) > 1 and history[-1] - history[-2] < tol:
            break
    return {"weights": weights.float(), "means": means.float(), "scale_tril": scale_tril.float(),
            "log_likelihood": history[-1], "history": history, "iterations": iteration}


def sample_gmm(gmm, num, generator):
    """num draws (num, D) from a fitted mixture; the same generator seed gives the same draws."""
    weights, means, scale_tril = (gmm[k].float().cpu() for k in ("weights", "means", "scale_tril"))
    component = torch.multinomial(weights, num, replacement=True, generator=generator)
    z = torch.randn(num, means.shape[1], generator=generator)
    for k in component.unique().tolist():  # one component at a time: O(num * D) memory, never num x D x D
        rows = component == k
        z[rows] = means[k] + z[rows] @ scale_tril[k].T
    return z


def log_density(gmm, codes):
    """The log-density of each of codes (N, D) under a fitted mixture: (N,) float64."""
    x = codes.double()
    joint = _log_densities(x, _outer(x), gmm["means"].to(x), gmm["scale_tril"].to(x),
                           gmm["weights"].to(x).log())
    return torch.logsumexp(joint, dim=1)


def log_likelihood(gmm, codes):
    """Mean log-density of codes (N, D) under a fitted mixture."""
    return log_density(gmm, codes).mean().item()


def check_components(components, num_codes):
    """A UserError unless a mixture of `components` Gaussians can be fitted to num_codes codes."""
    require(1 <= components <= num_codes, f"--prior_components={components} must be between 1 and the "
                                          f"{num_codes} training codes")


@torch.no_grad()
def encode_all(model, images, batch_size=500):
    """float32 codes (N, latent_dim) of uint8 images (N, 28, 28), in eval mode.

    Batches of 500 keep the activations in cache: 60,000 images took 5 s on a 2-core AVX2
    CPU, against 9 s in batches of 2,000."""
    was_training = model.training
    model.eval()
    codes = torch.cat([model.encode(data.to_float(images[i:i + batch_size])).float()
                       for i in range(0, len(images), batch_size)])
    model.train(was_training)
    return codes


def fit(model, train_images, components, seed=0):
    """The ex-post prior a checkpoint stores under "prior": a mixture fitted to the model's train codes.

    Plain tensors and numbers only, so the checkpoint still loads with weights_only=True.
    A fit that fails is a UserError; nothing has been written by then."""
    started = time.time()
    try:
        gmm = fit_gmm(encode_all(model, train_images), components, seed)
    except ValueError as e:
        raise UserError(f"could not fit the ex-post prior: {e}; the checkpoint was left as it was") from None
    return {"kind": "gmm", "components": components, "seed": seed,
            **{k: gmm[k].cpu() for k in ("weights", "means", "scale_tril")},
            "log_likelihood": gmm["log_likelihood"], "iterations": gmm["iterations"],
            "seconds": round(time.time() - started, 2)}
