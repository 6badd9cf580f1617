"""How many Gaussians the ex-post prior needs: fit each count to one checkpoint's train codes.

    python experiments/prior_components.py --checkpoint=out/ckpt.pt --components=1,10,20,40,80,160
    python experiments/prior_components.py --components=60 --stop_gains=1e-4,1e-3   # when EM may stop
    python experiments/prior_components.py --components=60 --scales=1,0.9,0.8       # narrower components
    python experiments/prior_components.py --components=0 --scales=1,1.1,1.2         # N(0, I) itself, wider

For each count (and each gain below which EM stops, prior.STOP_GAIN unless given, and each
factor on the components' standard deviations, 1 unless given: a "temperature" below 1 draws
nearer the components' means, where the codes are densest; 0 components is N(0, I) itself, unfitted,
and its scale the prior's "temperature"): the fit's time and iterations, the held-out log-likelihood of the test codes, and evaluate.py's
FID, IS, coverage and copy check of 10,000 decoded draws. More components fit the train
codes ever more closely; the copy check and the test log-likelihood say when that turns
into reproducing the training set.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import prior  # noqa: E402
from cli import parse_overrides, run  # noqa: E402
from train import parse_scales  # noqa: E402


def standard_normal(codes):
    """N(0, I) as a one-component mixture, so that it is sampled and scored as the fitted ones are."""
    dim = codes.shape[1]
    gmm = {"weights": torch.ones(1), "means": torch.zeros(1, dim), "scale_tril": torch.eye(dim)[None], "iterations": 0}
    return {**gmm, "log_likelihood": prior.log_likelihood(gmm, codes)}


def main(argv):
    cfg, _ = parse_overrides({"checkpoint": "out/ckpt.pt", "components": "1,10,20,40,80,160", "num_samples": 10000,
                              "stop_gains": str(prior.STOP_GAIN), "scales": "1"},
                             argv, "experiments/prior_components.py")
    gains = parse_scales(cfg["stop_gains"], "stop_gains")  # positive, finite, comma-separated
    scales = parse_scales(cfg["scales"], "scales")
    model, ckpt = checkpoint.load_model(cfg["checkpoint"])
    splits = data.load(ckpt["config"]["dataset"], ckpt["config"]["data_dir"])
    classifier, _ = evaluate.load_classifier(ckpt["config"]["dataset"], ckpt["config"]["data_dir"], splits, "cpu")
    test_x = data.to_float(splits["test"][0])
    test_features = evaluate.in_batches(classifier.features, test_x)
    train_codes = prior.encode_all(model, splits["train"][0])
    test_codes = prior.encode_all(model, splits["test"][0])
    train_flat = data.to_float(splits["train"][0]).flatten(1)
    copy_test = evaluate.nearest_train_distance(test_x, train_flat).median().item()
    recon = evaluate.in_batches(model.decode, test_codes)
    copy_recon = evaluate.nearest_train_distance(recon, train_flat).median().item()
    print(f"{cfg['checkpoint']}: median distance to the nearest training image of the test images {copy_test:.3f}, "
          f"of their reconstructions {copy_recon:.3f} (the copy check's reference)")
    print("| components | stop gain | scale | fit s | EM iterations | train LL | test LL | FID | IS | coverage | nearest train |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for k, gain in ((int(c), g) for c in cfg["components"].split(",") for g in gains):
        started = time.time()
        gmm = prior.fit_gmm(train_codes, k, seed=ckpt["config"]["seed"], tol=gain) if k else standard_normal(train_codes)
        seconds = time.time() - started
        for scale in scales:
            narrowed = {**gmm, "scale_tril": gmm["scale_tril"] * scale}
            with torch.no_grad():
                z = prior.sample_gmm(narrowed, cfg["num_samples"], torch.Generator().manual_seed(0))
                images = evaluate.in_batches(model.decode, z)
            m = evaluate.sample_metrics(classifier, evaluate.in_batches(classifier.features, images), test_features)
            copy = evaluate.nearest_train_distance(images, train_flat).median().item()
            print(f"| {k} | {gain:g} | {scale:g} | {seconds:.1f} | {gmm['iterations']} | {gmm['log_likelihood']:.3f} | "
                  f"{prior.log_likelihood(gmm, test_codes):.3f} | {m['fid']:.2f} | {m['is']:.2f} | {m['coverage']:.1f} | "
                  f"{copy:.3f} |", flush=True)


if __name__ == "__main__":
    run(main)
