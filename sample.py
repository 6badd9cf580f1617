"""Draw image grids from a trained MMD-VAE.

    python sample.py                                 # 8x8 grid of decoded N(0, I) noise -> images/samples.png
    python sample.py --prior=gmm                     # the same from the checkpoint's ex-post prior (prior.py)
    python sample.py --fit_prior                     # fit and save that prior where a checkpoint has none
    python sample.py --mode=traverse                 # sweep two latent axes over [-2, 2]
    python sample.py --mode=interpolate              # walk between encoded test digits
    python sample.py --mode=reconstruct              # test digits above their reconstructions
    python sample.py --checkpoint=PATH --num=100 --nrow=10 --tensor=samples.pt

The model is rebuilt from the checkpoint alone (its model_args and config), so
this script needs no knowledge of how it was trained.
"""
import contextlib
import os

import torch

import checkpoint
import data
import prior
from cli import RunLock, atomic_write, parse_overrides, pick_device, require, run, save_grid
from evaluate import in_batches

DEFAULTS = dict(
    out_dir="out",           # where train.py wrote ckpt.pt
    checkpoint="",           # a checkpoint file; empty = {out_dir}/ckpt.pt
    mode="sample",           # sample, traverse, interpolate or reconstruct
    # sample mode draws z from: normal (N(0, I), the MMD-VAE's claim) or gmm (the ex-post prior)
    prior="normal",
    fit_prior=False,         # fit the ex-post prior to the train codes and store it in the checkpoint first
    prior_components=0,      # Gaussian components of that fit; 0 = as many as the run's own (train.py's: 50)
    num=64,                  # images in the grid (sample mode; rows x nrow in the others)
    nrow=8,                  # images per row
    seed=0,                  # noise and choice of test digits
    out="images/samples.png",
    tensor="",               # also save the decoded images here as one float tensor (num, 1, 28, 28)
    axes="0,1",              # traverse mode: the two latent dimensions to sweep
    device="auto",
)
MODES = ("sample", "traverse", "interpolate", "reconstruct")
PRIORS = ("normal", "gmm")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# images decoded at once, so that memory is the output tensor plus one chunk, for any --num
DECODE_CHUNK = 2_000
# more digits than this in one PNG is unreadable (and gigabytes); --tensor keeps them all
MAX_GRID_TILES = 10_000


def decode(model, z):
    """model.decode(z) as float32 on the CPU, decoded DECODE_CHUNK codes at a time."""
    device = next(model.parameters()).device
    images = torch.empty(len(z), 1, 28, 28)
    for start in range(0, len(z), DECODE_CHUNK):
        chunk = slice(start, start + DECODE_CHUNK)
        images[chunk] = model.decode(z[chunk].to(device)).float().cpu()
    return images


def sample(model, num, generator, gmm=None):
    """Decode num draws of z ~ N(0, I), or of the ex-post prior `gmm` when given."""
    z = torch.randn(num, model.latent_dim, generator=generator) if gmm is None else prior.sample_gmm(gmm,
            num, generator)
    return decode(model, z)


def fit_prior(model, ckpt, path, components, device):
    """Fit the ex-post prior to the checkpoint's own training set and save it into the checkpoint."""
    images = data.load(ckpt["config"]["dataset"], ckpt["config"]["data_dir"], device)["train"][0]
    prior.check_components(components, len(images))
    ckpt["prior"] = prior.fit(model, images, components, ckpt["config"]["seed"])
    checkpoint.save(path, ckpt)
    print(f"fitted a {components}-component ex-post prior in {ckpt['prior']['seconds']:.1f}s and saved "
          f"it to {path}")


def traverse(model, nrow, axes):
    """nrow x nrow grid: axes[0] varies down the rows, axes[1] along them, the rest stay at 0."""
    values = torch.linspace(-2, 2, nrow)
    z = torch.zeros(nrow, nrow, model.latent_dim)
    z[:, :, axes[0]] = values[:, None]
    z[:, :, axes[1]] = values[None, :]
    return decode(model, z.view(-1, model.latent_dim))


def test_digits(ckpt_config, count, generator, device):
    images = data.load(ckpt_config["dataset"], ckpt_config["data_dir"], device)["test"][0]
    pick = torch.randperm(len(images), generator=generator)[:count].to(device)
    return data.to_float(images[pick])


def interpolate(model, x_start, x_end, nrow):
    """One row per pair: nrow codes evenly spaced on the line from encode(start) to encode(end)."""
    weights = torch.linspace(0, 1, nrow, device=x_start.device)[None, :, None]
    z0, z1 = (in_batches(model.encode, x, DECODE_CHUNK)[:, None] for x in (x_start, x_end))
    return decode(model, ((1 - weights) * z0 + weights * z1).reshape(-1, model.latent_dim))


def reconstruct(model, x, nrow):
    """Rows of nrow originals, each followed by a row of their reconstructions."""
    # decode() returns CPU images
    x_hat, x = decode(model, in_batches(model.encode, x, DECODE_CHUNK)), x.cpu()
    rows = [t for i in range(0, len(x), nrow) for t in (x[i:i + nrow], x_hat[i:i + nrow])]
    return torch.cat(rows)


def main(argv):
    cfg, _ = parse_overrides(DEFAULTS, argv, "sample.py")
    require(cfg["mode"] in MODES, f"unknown mode {cfg['mode']!r}; choose one of {', '.join(MODES)}")
    require(cfg["num"] > 0 and cfg["nrow"] > 0,
            f"--num={cfg['num']} and --nrow={cfg['nrow']} must be positive")
    require(cfg["prior"] in PRIORS, f"unknown prior {cfg['prior']!r}; choose one of {', '.join(PRIORS)}")
    require(cfg["prior_components"] >= 0,
            f"--prior_components={cfg['prior_components']} must be 0 (the run's own) "
            f"or between 1 and the number of training codes")
    require(os.path.splitext(cfg["out"])[1].lower() in IMAGE_EXTENSIONS,
            f"--out={cfg['out'][:80]} must name an image file ending in {', '.join(IMAGE_EXTENSIONS)}")
    require(cfg["prior"] == "normal" or cfg["mode"] == "sample",
            f"--prior={cfg['prior']} applies to --mode=sample, the only mode that draws from the prior")
    device = pick_device(cfg["device"])
    path = cfg["checkpoint"] or os.path.join(cfg["out_dir"], "ckpt.pt")
    checkpoint.require_file(path)
    # --fit_prior rewrites the checkpoint: it is then the run folder's one writer (cli.RunLock); sampling only
    # reads.
    with RunLock(os.path.dirname(os.path.abspath(path)),
                 "wait for it to end (sampling without --fit_prior works "
                 "meanwhile), or stop that process") if cfg["fit_prior"] else contextlib.nullcontext():
        model, ckpt = checkpoint.load_model(path, device, check_prior=not cfg["fit_prior"])
        if cfg["fit_prior"]:
            components = cfg["prior_components"] or ckpt["config"].get("prior_components", 0)
            require(isinstance(components, int) and components > 0, f"{path}'s run fitted no ex-post prior "
                    f"(prior_components=0): give the number of Gaussians, e.g. --prior_components=50")
            fit_prior(model, ckpt, path, components, device)
    require(cfg["prior"] == "normal" or "prior" in ckpt,
            f"{path} has no ex-post prior; fit one with `python sample.py --fit_prior --checkpoint={path}`")
    try:
        axes = [int(a) for a in cfg["axes"].split(",")]
    except ValueError:
        axes = []
    require(len(axes) == 2 and all(0 <= a < model.latent_dim for a in axes),
            f"--axes={cfg['axes']} must name two latent dimensions below {model.latent_dim}, e.g. --axes=0,1")
    generator = torch.Generator().manual_seed(cfg["seed"])
    nrow = cfg["nrow"]
    rows = max(1, cfg["num"] // nrow)

    with torch.no_grad():
        if cfg["mode"] == "sample":
            images = sample(model, cfg["num"], generator,
                            ckpt.get("prior") if cfg["prior"] == "gmm" else None)
        elif cfg["mode"] == "traverse":
            images = traverse(model, nrow, axes)
        elif cfg["mode"] == "interpolate":
            x = test_digits(ckpt["config"], 2 * rows, generator, device)
            pairs = len(x) // 2  # at most half the test set: each row needs two digits
            images = interpolate(model, x[:pairs], x[pairs:2 * pairs], nrow)
        else:
            images = reconstruct(model, test_digits(ckpt["config"], max(1, rows // 2) * nrow, generator,
                                                    device), nrow)
    images = images.float().cpu()

    shown = images[:MAX_GRID_TILES]
    save_grid(shown, cfg["out"], nrow=nrow, pad_value=0.5)
    source = f", from the {cfg['prior']} prior" if cfg["mode"] == "sample" else ""
    capped = f"; the grid shows the first {len(shown)} of {len(images)}" if len(shown) < len(images) else ""
    print(f"wrote {cfg['out']} ({len(images)} images, {cfg['mode']}{source}{capped}) from {path}")
    if cfg["tensor"]:
        with atomic_write(cfg["tensor"]) as tmp:
            torch.save(images, tmp)
        print(f"wrote {cfg['tensor']}: float tensor {tuple(images.shape)} in [0, 1]")


if __name__ == "__main__":
    run(main)
