"""Turn experiments/compare.sh's runs into the README's table and figures.

    python experiments/report.py --runs=runs/compare

Writes images/compare_table.md (one row per run, every metric of evaluate.py),
images/compare_samples.png (the sample grids side by side) and
images/compare_latent2.png (test codes of each latent-2 model over the prior's contours).
"""
import json
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
import data  # noqa: E402
from cli import parse_overrides, run  # noqa: E402

NAMES = {"mmd": "MMD-VAE", "elbo": "ELBO-VAE", "info": "InfoVAE (ELBO + MMD)"}
COLUMNS = [("mse", "MSE", "{:.4f}"), ("bce", "BCE", "{:.1f}"), ("fid", "FID", "{:.1f}"), ("is", "IS", "{:.2f}"),
           ("coverage", "coverage", "{:.1f}"), ("probe", "probe acc", "{:.3f}"), ("knn", "5-NN acc", "{:.3f}"),
           ("mmd_prior", "MMD^2 to prior", "{:.1e}"), ("code_mean_norm", "mean norm", "{:.2f}"),
           ("cov_eig_max", "cov eig max", "{:.2f}"), ("cov_eig_min", "cov eig min", "{:.2f}")]


def runs_in(folder):
    for latent in (2, 16):
        for name in NAMES:
            path = os.path.join(folder, f"{name}_z{latent}")
            if os.path.exists(path + ".json"):
                yield name, latent, path


def table(folder):
    lines = ["| objective | z | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    real = None
    for name, latent, path in runs_in(folder):
        with open(path + ".json") as f:
            r = json.load(f)
        real = r
        lines.append(f"| {NAMES[name]} | {latent} | " + " | ".join(fmt.format(r[key]) for key, _, fmt in COLUMNS) + " |")
    if real:
        lines.append(f"| real train images | - | | | {real['real_fid']:.1f} | {real['real_is']:.2f} | "
                     f"{real['real_coverage']:.1f} | | | | | | |")
    return "\n".join(lines) + "\n"


def sample_grids(folder, path):
    found = list(runs_in(folder))
    fig, axes = plt.subplots(2, 3, figsize=(12, 8.4))
    for ax in axes.flat:
        ax.axis("off")
    for name, latent, run_path in found:
        ax = axes[0 if latent == 2 else 1][list(NAMES).index(name)]
        ax.imshow(plt.imread(os.path.join(run_path, "samples.png")), cmap="gray")
        ax.set_title(f"{NAMES[name]}, z={latent}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def latent_scatter(folder, path):
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    for ax, name in zip(axes, NAMES):
        run_path = os.path.join(folder, f"{name}_z2")
        if not os.path.exists(run_path):
            continue
        model, ckpt = checkpoint.load_model(os.path.join(run_path, "ckpt.pt"))
        images, labels = data.load(ckpt["config"]["dataset"], ckpt["config"]["data_dir"])["test"]
        with torch.no_grad():
            codes = model.encode(data.to_float(images))
        grid = torch.linspace(-4, 4, 200)
        gx, gy = torch.meshgrid(grid, grid, indexing="xy")
        ax.contour(gx, gy, torch.exp(-(gx ** 2 + gy ** 2) / 2), levels=[0.011, 0.135, 0.607], colors="k",
                   linewidths=0.8)  # the prior's 3, 2 and 1 sigma circles
        points = ax.scatter(codes[:, 0], codes[:, 1], c=labels, cmap="tab10", s=2, alpha=0.6)
        ax.set_title(f"{NAMES[name]}: test codes, z=2")
        ax.set_xlim(-4, 4)
        ax.set_ylim(-4, 4)
        ax.set_aspect("equal")
    fig.colorbar(points, ax=axes, ticks=range(10), label="digit")
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def main(argv):
    cfg, _ = parse_overrides({"runs": "runs/compare", "images": "images"}, argv, "experiments/report.py")
    os.makedirs(cfg["images"], exist_ok=True)
    markdown = table(cfg["runs"])
    with open(os.path.join(cfg["images"], "compare_table.md"), "w") as f:
        f.write(markdown)
    sample_grids(cfg["runs"], os.path.join(cfg["images"], "compare_samples.png"))
    latent_scatter(cfg["runs"], os.path.join(cfg["images"], "compare_latent2.png"))
    print(markdown)


if __name__ == "__main__":
    run(main)
