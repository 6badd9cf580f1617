"""Why decoded N(0, I) draws are worse than the decoder: where they land among the codes.

    python experiments/code_geometry.py --checkpoint=out/ckpt.pt

Prints six measurements of one checkpoint (the README's "prior gap" section quotes them):
  1. local dimension: the Levina-Bickel maximum-likelihood estimate (k = 20 neighbours, median
     over 3,000 points) of the train codes, and of as many N(0, I) draws in the same space;
  2. for test codes, N(0, I) draws and ex-post prior draws: the distance to the nearest train
     code; how sure evaluate.py's classifier is of the decoded digit (mean top probability,
     share under 0.9); and whether the point lies inside one digit's cluster (its 10 nearest
     train codes all have one label, a "pure" neighbourhood) or between clusters, with the
     share under 0.9 in each. N(0, I) draws are also split by their distance to the codes and
     by the ex-post prior's density, and the unsure ones' two likeliest digits are counted;
  3. what the training loss can see: MMD^2 of `batch_size` train codes against as many prior
     draws, for each bandwidth on its own, over 100 batches, in units of the spread it has when
     both sides are N(0, I) (a signal-to-noise ratio; below ~1 a batch cannot tell them apart);
  4. N(0, I) draws pushed through the autoencoder again (z -> encode(decode(z))): FID and IS
     after each pass, the decoder's own pull back towards the codes it knows;
  5. what an MMD in pixel space can see (train.py's pixel_mmd): MMD^2 of `batch_size` decoded
     N(0, I) draws, and of as many reconstructions, against as many train images, per bandwidth
     (in squared pixel distance), in units of its spread between two batches of train images;
  6. the train codes' widest direction (the covariance's top eigenvector): its variance, and per
     digit the codes' mean and spread along it and the share beyond 3, where N(0, I) puts 0.27% of
     its draws. A digit whose codes lie out there is one the prior seldom draws.
"""
import os
import sys
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import prior  # noqa: E402
from cli import parse_overrides, run  # noqa: E402
from mmd import mmd  # noqa: E402

in_batches = evaluate.in_batches


def nearest(points, reference, k):
    """(distances, indices) of the k nearest rows of `reference` to each point, closest first."""
    found = [torch.cdist(points[i:i + 500], reference).topk(k, largest=False) for i in range(0, len(points),
            500)]
    return torch.cat([f.values for f in found]), torch.cat([f.indices for f in found])


def local_dimension(points, reference, k=20):
    """Median Levina-Bickel MLE of the intrinsic dimension at `points` (each also a row of `reference`)."""
    dist = nearest(points, reference, k + 1)[0][:, 1:]  # column 0 is the point itself
    return ((k - 1) / torch.log(dist[:, -1:] / dist[:, :-1]).sum(1)).median().item()


def neighbourhood_is_pure(neighbour_labels):
    """True where a point's nearest codes (their labels, one row per point) all carry one label:
    the point lies inside a digit's cluster."""
    return (neighbour_labels == neighbour_labels[:, :1]).all(1)


def main(argv):
    cfg, _ = parse_overrides({"checkpoint": "out/ckpt.pt", "num": 5000, "passes": 3, "seed": 0}, argv,
                             "experiments/code_geometry.py")
    model, ckpt = checkpoint.load_model(cfg["checkpoint"])
    config = ckpt["config"]
    splits = data.load(config["dataset"], config["data_dir"])
    classifier, _ = evaluate.load_classifier(config["dataset"], config["data_dir"], splits, "cpu")
    generator = torch.Generator().manual_seed(cfg["seed"])
    train_codes = prior.encode_all(model, splits["train"][0])
    dim, num = model.latent_dim, cfg["num"]
    normal = torch.randn(len(train_codes), dim, generator=generator)

    pick = torch.randperm(len(train_codes), generator=generator)[:3000]
    print(f"{cfg['checkpoint']}: latent_dim {dim}; local dimension of the train codes "
          f"{local_dimension(train_codes[pick], train_codes):.1f}, of N(0, I) draws "
          f"{local_dimension(normal[:3000], normal):.1f}")

    train_labels = splits["train"][1]
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(train_codes.T))
    along = train_codes @ eigenvectors[:, -1]
    along = along * along.mean().sign()  # the eigenvector's sign is arbitrary: the codes' mean side is +
    print(f"\nThe train codes' widest direction: variance {eigenvalues[-1]:.2f} (next {eigenvalues[-2]:.2f}; "
          f"N(0, I): 1). Each digit's codes along it:")
    print("| digit | mean | sd | share beyond 3 |")
    print("|---|---|---|---|")
    for digit in range(10):
        a = along[train_labels == digit]
        print(f"| {digit} | {a.mean():.2f} | {a.std():.2f} | {(a.abs() > 3).float().mean():.3f} |")
    print()

    sets = {"test codes": prior.encode_all(model, splits["test"][0][:num]), "N(0, I)": normal[:num]}
    if "prior" in ckpt:
        sets["ex-post prior"] = prior.sample_gmm(ckpt["prior"], num, generator)
    print("| points | nearest train code: 10% / 50% / 90% | classifier's top probability | share under 0.9 "
          "| pure neighbourhood | share under 0.9: pure / mixed |")
    print("|---|---|---|---|---|---|")

    def row(name, q, sure, pure):
        unsure = (sure < evaluate.SURE).float()  # the complement of evaluate.py's confident share
        print(f"| {name} | {q} | {sure.mean():.3f} | {unsure.mean():.3f} | {pure.float().mean():.3f} "
              f"| {unsure[pure].mean():.3f} / {unsure[~pure].mean():.3f} |")

    with torch.no_grad():
        for name, z in sets.items():
            dists, indices = nearest(z, train_codes, 10)  # one search serves the distance and the purity
            dist, pure = dists[:, 0].contiguous(), neighbourhood_is_pure(train_labels[indices])
            probs = in_batches(lambda c: torch.softmax(classifier(model.decode(c)), 1), z)
            sure = probs.max(1).values
            q = torch.quantile(dist, torch.tensor([0.1, 0.5, 0.9])).tolist()
            row(name, f"{q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f}", sure, pure)
            if name == "N(0, I)":
                splits_by = {"distance": dist}
                # how likely the ex-post prior finds each draw: low = between the codes' clusters
                if "prior" in ckpt:
                    splits_by["ex-post density (low first)"] = prior.log_density(ckpt["prior"], z)
                for by, values in splits_by.items():
                    edges = torch.quantile(values, torch.tensor([0.25, 0.5, 0.75], dtype=values.dtype))
                    quarter = torch.bucketize(values, edges)
                    for i in range(4):
                        row(f"N(0, I), quarter {i + 1} by {by}", "", sure[quarter == i], pure[quarter == i])
                unsure_probs = probs[sure < evaluate.SURE]

    pairs = Counter(tuple(p) for p in torch.sort(unsure_probs.topk(2, dim=1).indices, dim=1).values.tolist())
    counts = sorted(((n, p) for p, n in pairs.items()), reverse=True)
    print("\nThe unsure N(0, I) draws' two likeliest digits, commonest pairs first "
          f"({len(unsure_probs)} draws): "
          + ", ".join(f"{a}/{b} {n}" for n, (a, b) in counts[:8]))

    batch = config["batch_size"]
    print(f"\nMMD^2 of {batch} train codes vs {batch} N(0, I) draws, 100 batches, per bandwidth (multiple of "
          "2 x latent_dim):")
    print("| bandwidth | codes: mean | both N(0, I): mean +- sd | signal / noise |")
    print("|---|---|---|---|")
    for scale in (0.02, 0.05, 0.1, 0.2, 1.0, 5.0):
        codes_vs, null = [], []
        for _ in range(100):
            codes = train_codes[torch.randint(len(train_codes), (batch,), generator=generator)]
            codes_vs.append(mmd(codes, torch.randn(batch, dim, generator=generator), scales=[scale]).item())
            null.append(mmd(torch.randn(batch, dim, generator=generator), torch.randn(batch, dim,
                    generator=generator),
                            scales=[scale]).item())
        codes_vs, null = torch.tensor(codes_vs), torch.tensor(null)
        print(f"| {scale} | {codes_vs.mean():.2e} | {null.mean():.1e} +- {null.std():.1e} | "
              f"{(codes_vs.mean() - null.mean()) / null.std():.2f} |")

    # The draws evaluate.py --seed=SEED scores, so that pass 0 is its FID.
    z = torch.randn(10000, dim, generator=torch.Generator().manual_seed(cfg["seed"]))
    print(f"\nN(0, I) draws re-encoded: z -> encode(decode(z)), {len(z)} draws")
    test_features = in_batches(classifier.features, data.to_float(splits["test"][0]))
    with torch.no_grad():
        for passes in range(cfg["passes"] + 1):
            images = in_batches(model.decode, z)
            m = evaluate.sample_metrics(classifier, in_batches(classifier.features, images), test_features)
            print(f"  {passes} passes: FID {m['fid']:.2f}, IS {m['is']:.2f}, coverage {m['coverage']:.1f}")
            z = in_batches(model.encode, images)

    print(f"\nMMD^2 in pixel space against {batch} train images, 100 batches, per bandwidth (squared "
          "pixel distance):")
    print("| bandwidth | reconstructions: signal / noise | decoded N(0, I) draws: signal / noise |")
    print("|---|---|---|")
    train_x = splits["train"][0]
    batches = [[torch.randint(len(train_x), (batch,),
                              generator=generator) for _ in range(3)] for _ in range(100)]
    with torch.no_grad():
        flat = [(data.to_float(train_x[a]).flatten(1), data.to_float(train_x[b]).flatten(1),
                 model.decode(model.encode(data.to_float(train_x[c]))).flatten(1),
                 model.decode(torch.randn(batch, dim, generator=generator)).flatten(1))
                for a, b, c in batches]
    for bandwidth in (10.0, 30.0, 100.0, 300.0):
        def mean_sd(which):
            values = torch.tensor([mmd(f[which], f[0], bandwidth=bandwidth).item() for f in flat])
            return values.mean(), values.std()
        null_mean, null_sd = mean_sd(1)
        print(f"| {bandwidth:g} | {(mean_sd(2)[0] - null_mean) / null_sd:.2f} | "
              f"{(mean_sd(3)[0] - null_mean) / null_sd:.2f} |")


if __name__ == "__main__":
    run(main)
