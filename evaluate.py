"""Evaluate a trained MMD-VAE: reconstruction, sample quality, latent quality, q(z) vs p(z).

    python evaluate.py                           # out/ckpt.pt, printed as a table
    python evaluate.py --checkpoint=PATH --json  # one JSON object

Sample quality is measured in the feature space of a small classifier that this
file trains on the checkpoint's dataset (Inception networks are not meaningful for
28x28 digits, and nothing is downloaded). It is trained once, cached at
{data_dir}/classifier_{dataset}.pt, and retrained if the cache is missing or bad.

  FID        Frechet distance between Gaussian fits of classifier features of
             10,000 images and of the test images (lower is better), for
             (a) reconstructions of the test images: the decoder's ceiling,
             (b) decoded N(0, I) draws: the MMD-VAE's own claim,
             (c) decoded draws from the checkpoint's ex-post prior (prior.py), if it has one,
             (d) reconstructions of 10,000 real training images: what a prior that draws exactly
                 the codes of real digits would score. (a) is paired image for image with the
                 test set that FID compares against, and scores below real images; (d), like
                 every draw, is not, and is the ceiling for any prior,
             and the ratios (b)/(a), (c)/(a), (b)/(d) and (c)/(d): how far sampling falls short
  IS         inception score exp(E KL(p(y|x) || p(y))) of the samples; 10 is the ceiling
  coverage   share of the 10 classes that get at least 5% of the samples
  confident  share of the samples whose likeliest class gets at least 0.9: what holds the
             IS of balanced samples down is the unsure ones (blends of two digits)
  nearest train  the copy check: median pixel distance from 10,000 images of each set (the
             whole test set; fewer with --num_samples) to their nearest training image.
             Samples that copy the training set sit closer than real test images, and closer
             than (a): decoded images are smooth, so reconstructions of unseen digits are the
             like-for-like reference
  probe      linear (logistic regression) accuracy on encoder means, fit on train, scored on test
  knn        5-nearest-neighbour accuracy of test codes among train codes
  q(z) vs p(z)  MMD^2 of test codes against N(0, I) draws (Gaussian kernel, bandwidth 2D),
             norm of the code mean, eigenvalues of the code covariance (1 for the prior)
The same sample metrics for 10,000 real training images give the floor (real vs real).
"""
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import checkpoint
import data
import prior
from cli import atomic_write, parse_overrides, pick_device, print_results, require, run
from mmd import mmd, squared_distances

DEFAULTS = dict(
    checkpoint="out/ckpt.pt",  # the checkpoint to evaluate
    dataset="",                # expected dataset; empty = the checkpoint's own
    data_dir="",               # where the data and the classifier cache live; empty = the checkpoint's
    # images in each set (reconstructions, N(0, I) and ex-post prior draws) for FID, IS, coverage
    num_samples=10000,
    json=False,                # print one JSON object instead of a table
    device="auto",
    seed=0,
)
CLASSIFIER_FORMAT = "mmd-vae-classifier-v1"


class Classifier(nn.Module):
    """A small CNN (about 99.2% on MNIST); its 128-d penultimate layer is the FID feature space."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
        )
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.features(x))


@torch.no_grad()
def in_batches(fn, x, batch_size=2000):
    return torch.cat([fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def classifier_accuracy(classifier, images, labels):
    logits = in_batches(classifier, data.to_float(images))
    return (logits.argmax(1) == labels).float().mean().item()


def train_classifier(splits, device, epochs=3, seed=0):
    torch.manual_seed(seed)
    classifier = Classifier().to(device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=2e-3)
    images, labels = splits["train"]
    steps = epochs * (len(images) // 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    for epoch in range(epochs):
        for idx in data.batch_order(len(images), 128, seed, epoch).to(device):
            loss = F.cross_entropy(classifier(data.to_float(images[idx])), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return classifier.eval()


def load_classifier(dataset, data_dir, splits, device):
    """The cached classifier for `dataset`, trained first if the cache is missing or unreadable."""
    path = os.path.join(data_dir, f"classifier_{dataset}.pt")
    classifier = Classifier().to(device)
    try:
        cache = torch.load(path, map_location=device, weights_only=True)
        assert cache["format"] == CLASSIFIER_FORMAT
        classifier.load_state_dict(cache["model"])
        return classifier.eval(), cache["test_accuracy"]
    except Exception as e:  # missing, truncated, from another version: retrain
        if os.path.exists(path):
            print(f"classifier cache {path} did not load ({type(e).__name__}); retraining", file=sys.stderr)
    print(f"training the evaluation classifier on {dataset} (once; cached at {path})", file=sys.stderr)
    started = time.time()
    classifier = train_classifier(splits, device)
    accuracy = classifier_accuracy(classifier, *splits["test"])
    print(f"classifier: test accuracy {accuracy:.4f} after {time.time() - started:.0f}s", file=sys.stderr)
    with atomic_write(path) as tmp:
        torch.save({"format": CLASSIFIER_FORMAT, "model": classifier.state_dict(),
                    "test_accuracy": accuracy}, tmp)
    return classifier, accuracy


def frechet_distance(a, b):
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussian fits of features a and b.

    tr((S_a S_b)^(1/2)) is the sum of square roots of the eigenvalues of S_a S_b, which
    equal those of the symmetric PSD matrix S_a^(1/2) S_b S_a^(1/2): no scipy needed.
    """
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    eigvals, eigvecs = torch.linalg.eigh(cov_a)
    sqrt_a = eigvecs @ torch.diag(eigvals.clamp_min(0).sqrt()) @ eigvecs.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp_min(0).sqrt().sum()
    return ((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def inception_score(probs):
    """exp(E_x KL(p(y|x) || p(y))) for class probabilities of shape (N, classes)."""
    probs = probs.double().clamp_min(1e-12)
    marginal = probs.mean(0, keepdim=True)
    return math.exp((probs * (probs.log() - marginal.log())).sum(1).mean().item())


def class_coverage(probs, threshold=0.05):
    """Share of classes that receive at least `threshold` of the argmax predictions."""
    counts = torch.bincount(probs.argmax(1), minlength=probs.shape[1]).double()
    return (counts / len(probs) >= threshold).double().mean().item()


SURE = 0.9  # a decoded image is a confident digit when its likeliest class gets at least this


def confident_share(probs, threshold=SURE):
    """Share of the images whose likeliest class gets at least `threshold`."""
    return (probs.max(1).values >= threshold).double().mean().item()


def sample_metrics(classifier, features, test_features):
    """FID against the test features, IS, coverage and confident share, from a set of images' features."""
    probs = F.softmax(classifier.head(features), dim=1)
    return {"fid": frechet_distance(features, test_features), "is": inception_score(probs),
            "coverage": class_coverage(probs), "confident": confident_share(probs)}


def probe_accuracy(train_codes, train_labels, test_codes, test_labels, steps=300):
    """Multinomial logistic regression (L-BFGS, light L2) on standardised codes; test accuracy."""
    mean, std = train_codes.mean(0), train_codes.std(0).clamp_min(1e-6)
    xtr, xte = (train_codes - mean) / std, (test_codes - mean) / std
    num_classes = int(train_labels.max()) + 1
    weight = torch.zeros(xtr.shape[1], num_classes, device=xtr.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=xtr.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(xtr @ weight + bias, train_labels) + 1e-4 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return ((xte @ weight + bias).argmax(1) == test_labels).float().mean().item()


@torch.no_grad()
def knn_accuracy(train_codes, train_labels, test_codes, test_labels, k=5):
    predictions = []
    for chunk in test_codes.split(1000):
        nearest = torch.cdist(chunk, train_codes).topk(k, largest=False).indices
        predictions.append(train_labels[nearest].mode(1).values)
    return (torch.cat(predictions) == test_labels).float().mean().item()


@torch.no_grad()
def prior_match(codes, generator, num=5000):
    """How far the aggregate posterior q(z) (the test codes) is from N(0, I)."""
    z = codes[:num].double()
    prior = torch.randn(z.shape, generator=generator, dtype=torch.float64).to(z.device)
    eigvals = torch.linalg.eigvalsh(torch.cov(z.T)).flip(0)
    return {"mmd_prior": mmd(z, prior).item(), "code_mean_norm": z.mean(0).norm().item(),
            "cov_eig_max": eigvals[0].item(), "cov_eig_min": eigvals[-1].item(),
            "cov_eigenvalues": [round(v, 4) for v in eigvals.tolist()]}


@torch.no_grad()
def nearest_train_distance(images, train_flat, batch_size=500):
    """L2 distance from each image (N, 1, 28, 28) to its nearest row of train_flat, the training
    images as floats in [0, 1], flattened to (M, 784) once by the caller. Codes (N, D) against
    train codes (M, D) work the same way.

    The matmul form finds the nearest row; the distance to it is then taken directly, because the
    form's float32 cancellation (|a|^2 of a digit is ~100) would put an exact copy ~0.01 away."""
    distances = []
    for i in range(0, len(images), batch_size):
        flat = images[i:i + batch_size].flatten(1)
        nearest = squared_distances(flat, train_flat).argmin(1)
        distances.append((flat - train_flat[nearest]).norm(dim=1))
    return torch.cat(distances)


@torch.no_grad()
def evaluate(model, splits, classifier, num_samples=10000, seed=0, gmm=None, copy_samples=None):
    """All metrics as one flat dict (the module docstring's). gmm: the checkpoint's ex-post prior, if any."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    timings, results = {}, {}

    started = time.time()
    test_x = data.to_float(splits["test"][0])
    test_codes, train_codes = (prior.encode_all(model, splits[split][0]) for split in ("test", "train"))
    x_hat = in_batches(model.decode, test_codes)
    results["mse"] = F.mse_loss(x_hat, test_x).item()
    results["bce"] = F.binary_cross_entropy(x_hat.clamp(1e-6, 1 - 1e-6), test_x,
                                            reduction="sum").item() / len(test_x)
    timings["codes_and_reconstruction"] = time.time() - started

    # The decomposition: (a) reconstructions, the decoder's ceiling; (b) N(0, I) draws, the
    # MMD-VAE's claim; (c) draws from the ex-post prior; (d) reconstructions of the real training
    # images below. The ratios to (a) and (d) say how much of the gap is the prior's, not the decoder's.
    started = time.time()
    test_features = in_batches(classifier.features, test_x)
    draws = {"normal": torch.randn(num_samples, model.latent_dim, generator=generator)}
    if gmm is not None:  # its own generator, seeded as `python sample.py --prior=gmm --seed=SEED` seeds it
        draws["gmm"] = prior.sample_gmm(gmm, num_samples, torch.Generator().manual_seed(seed))
    # The real images have their own generator: the floor must not move with the model's latent size.
    pick = torch.randperm(len(splits["train"][0]),
                          generator=torch.Generator().manual_seed(seed))[:num_samples].to(device)
    # Decoded a batch at a time and kept only as classifier features (128 numbers an image, not 784),
    # so that memory stays small for any --num_samples.
    features = {"recon": in_batches(classifier.features, x_hat[:num_samples]),
                **{name: in_batches(lambda z: classifier.features(model.decode(z.to(device))), z)
                   for name, z in draws.items()},
                "real": in_batches(lambda x: classifier.features(data.to_float(x)), splits["train"][0][pick]),
                # (d): the floor's real images, encoded and decoded. Their codes are what a prior that
                # matched q(z) exactly would draw, and like the draws they are not the test images.
                "train_recon": in_batches(lambda z: classifier.features(model.decode(z)), train_codes[pick])}
    for name, set_features in features.items():
        for metric, value in sample_metrics(classifier, set_features, test_features).items():
            results[metric if name == "normal" else f"{name}_{metric}"] = value
    if gmm is None:
        results.update({"gmm_fid": None, "gmm_is": None, "gmm_coverage": None, "gmm_confident": None})
    for ceiling in ("recon", "train_recon"):
        results[f"fid_over_{ceiling}"] = results["fid"] / results[f"{ceiling}_fid"]
        results[f"gmm_fid_over_{ceiling}"] = None if gmm is None else \
            results["gmm_fid"] / results[f"{ceiling}_fid"]
    timings["samples"] = time.time() - started

    # The copy check: a prior that reproduces training images shows up as samples closer to
    # the training set than real test images are. Median distance to the nearest training image,
    # over the whole test set by default. Its first 2,000 digits sit further from the training set
    # than all 10,000 (4.40 against 4.34; their reconstructions 4.15 against 4.06), and the median
    # of 2,000 draws moved by 0.7% (one standard deviation over 12 seeds; 0.4% for 10,000), as
    # much as the margins it judged (README: the prior gap).
    started = time.time()
    copy_samples = min(num_samples, len(test_x)) if copy_samples is None else copy_samples
    sets = {"test": test_x, "recon": x_hat,
            **{name: in_batches(lambda z: model.decode(z.to(device)), z[:copy_samples])
               for name, z in draws.items()}}
    train_flat = data.to_float(splits["train"][0]).flatten(1)
    for name in ("test", "recon", "normal", "gmm"):
        results[f"nearest_train_{name}"] = (nearest_train_distance(sets[name][:copy_samples],
                train_flat).median().item()
                                            if name in sets else None)
    timings["copy_check"] = time.time() - started

    started = time.time()
    train_labels, test_labels = splits["train"][1], splits["test"][1]
    results["probe"] = probe_accuracy(train_codes, train_labels, test_codes, test_labels)
    results["knn"] = knn_accuracy(train_codes, train_labels, test_codes, test_labels)
    timings["latent"] = time.time() - started

    started = time.time()
    results.update(prior_match(test_codes, generator))
    timings["prior_match"] = time.time() - started
    results["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    return results


def print_table(results):
    def number(key, fmt):
        return "n/a" if results.get(key) is None else fmt.format(results[key])

    print(f"{'samples (10k each)':<34}{'FID':>9}{'IS':>8}{'coverage':>10}{'confident':>11}"
          f"{'FID / (a)':>11}{'FID / (d)':>11}"
          f"{'nearest train':>15}")
    for label, prefix in (("(a) test reconstructions", "recon_"), ("(b) N(0, I) draws", ""),
                          ("(c) ex-post prior draws", "gmm_"),
                          ("(d) train reconstructions", "train_recon_"), ("real train images", "real_")):
        ratio = prefix in ("", "gmm_")  # against (a) and (d): the draws' FIDs only
        ratios = "".join(f"{number(prefix + 'fid_over_' + ceiling, '{:.1f}x') if ratio else '':>11}"
                         for ceiling in ("recon", "train_recon"))
        copy = {"recon_": "recon", "": "normal", "gmm_": "gmm"}.get(prefix)
        print(f"{label:<34}{number(prefix + 'fid', '{:.2f}'):>9}{number(prefix + 'is', '{:.2f}'):>8}"
              f"{number(prefix + 'coverage', '{:.2f}'):>10}{number(prefix + 'confident', '{:.3f}'):>11}"
              f"{ratios}"
              f"{number('nearest_train_' + copy, '{:.3f}') if copy else '':>15}")
    print(f"{'real test images':<34}{'':>60}{number('nearest_train_test', '{:.3f}'):>15}")
    if results.get("gmm_fid") is None:
        print("(c) needs a fitted prior: python sample.py --fit_prior "
              f"--checkpoint={results.get('checkpoint', 'PATH')}")
    print()
    rows = [
        ("reconstruction", "MSE per pixel", f"{results['mse']:.5f}"),
        ("", "BCE per image (nats)", f"{results['bce']:.2f}"),
        ("latent", "linear probe accuracy", f"{results['probe']:.4f}"),
        ("", "5-NN accuracy", f"{results['knn']:.4f}"),
        ("q(z) vs N(0, I)", "MMD^2", f"{results['mmd_prior']:.2e}"),
        ("", "norm of code mean", f"{results['code_mean_norm']:.3f}"),
        ("", "cov eigenvalues max / min", f"{results['cov_eig_max']:.3f} / {results['cov_eig_min']:.3f}"),
        ("classifier", "test accuracy", f"{results['classifier_accuracy']:.4f}"),
    ]
    for group, name, value in rows:
        print(f"{group:<16}{name:<28}{value}")
    print("seconds: " + ", ".join(f"{k} {v}" for k, v in results["seconds"].items()))


def main(argv):
    cfg, _ = parse_overrides(DEFAULTS, argv, "evaluate.py")
    require(cfg["num_samples"] >= 100, f"--num_samples={cfg['num_samples']} must be at least 100")
    device = pick_device(cfg["device"])
    model, ckpt = checkpoint.load_model(cfg["checkpoint"], device)
    dataset = ckpt["config"]["dataset"]
    require(not cfg["dataset"] or cfg["dataset"] == dataset,
            f"{cfg['checkpoint']} was trained on {dataset}, not {cfg['dataset']}; drop --dataset or pass "
            f"a checkpoint trained on {cfg['dataset']}")
    data_dir = cfg["data_dir"] or ckpt["config"]["data_dir"]
    splits = data.load(dataset, data_dir, device)
    classifier, accuracy = load_classifier(dataset, data_dir, splits, device)
    results = {"checkpoint": cfg["checkpoint"], "dataset": dataset, "classifier_accuracy": accuracy,
               **evaluate(model, splits, classifier, cfg["num_samples"], cfg["seed"], ckpt.get("prior"))}
    print_results(results, cfg["json"], print_table)


if __name__ == "__main__":
    run(main)
