"""Draw image grids from a trained MMD-VAE.

    python sample.py                                 # 8x8 grid of decoded N(0, I) noise -> images/samples.png
    python sample.py --mode=traverse                 # sweep two latent axes over [-2, 2]
    python sample.py --mode=interpolate              # walk between encoded test digits
    python sample.py --mode=reconstruct              # test digits above their reconstructions
    python sample.py --checkpoint=PATH --num=100 --nrow=10 --tensor=samples.pt

The model is rebuilt from the checkpoint alone (its model_args and config), so
this script needs no knowledge of how it was trained.
"""
import os

import torch
from torchvision.utils import save_image

import checkpoint
import data
from cli import atomic_write, parse_overrides, pick_device, require, run

DEFAULTS = dict(
    out_dir="out",           # where train.py wrote ckpt.pt
    checkpoint="",           # a checkpoint file; empty = {out_dir}/ckpt.pt
    mode="sample",           # sample, traverse, interpolate or reconstruct
    num=64,                  # images in the grid (sample mode; rows x nrow in the others)
    nrow=8,                  # images per row
    seed=0,                  # noise and choice of test digits
    out="images/samples.png",
    tensor="",               # also save the decoded images here as one float tensor (num, 1, 28, 28)
    axes="0,1",              # traverse mode: the two latent dimensions to sweep
    device="auto",
)
MODES = ("sample", "traverse", "interpolate", "reconstruct")


def sample(model, num, generator):
    """Decode num draws of z ~ N(0, I)."""
    z = torch.randn(num, model.latent_dim, generator=generator)
    return model.decode(z.to(next(model.parameters()).device))


def traverse(model, nrow, axes):
    """nrow x nrow grid: axes[0] varies down the rows, axes[1] along them, the rest stay at 0."""
    values = torch.linspace(-2, 2, nrow)
    z = torch.zeros(nrow, nrow, model.latent_dim)
    z[:, :, axes[0]] = values[:, None]
    z[:, :, axes[1]] = values[None, :]
    return model.decode(z.view(-1, model.latent_dim).to(next(model.parameters()).device))


def test_digits(ckpt_config, count, generator, device):
    images = data.load(ckpt_config["dataset"], ckpt_config["data_dir"], device)["test"][0]
    pick = torch.randperm(len(images), generator=generator)[:count].to(device)
    return data.to_float(images[pick])


def interpolate(model, x_start, x_end, nrow):
    """One row per pair: nrow codes evenly spaced on the line from encode(start) to encode(end)."""
    weights = torch.linspace(0, 1, nrow, device=x_start.device)[None, :, None]
    z0, z1 = model.encode(x_start)[:, None], model.encode(x_end)[:, None]
    return model.decode(((1 - weights) * z0 + weights * z1).reshape(-1, model.latent_dim))


def reconstruct(model, x, nrow):
    """Rows of nrow originals, each followed by a row of their reconstructions."""
    x_hat = model.decode(model.encode(x))
    rows = [t for i in range(0, len(x), nrow) for t in (x[i:i + nrow], x_hat[i:i + nrow])]
    return torch.cat(rows)


def main(argv):
    cfg, _ = parse_overrides(DEFAULTS, argv, "sample.py")
    require(cfg["mode"] in MODES, f"unknown mode {cfg['mode']!r}; choose one of {', '.join(MODES)}")
    require(cfg["num"] > 0 and cfg["nrow"] > 0, f"--num={cfg['num']} and --nrow={cfg['nrow']} must be positive")
    device = pick_device(cfg["device"])
    path = cfg["checkpoint"] or os.path.join(cfg["out_dir"], "ckpt.pt")
    model, ckpt = checkpoint.load_model(path, device)
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
            images = sample(model, cfg["num"], generator)
        elif cfg["mode"] == "traverse":
            images = traverse(model, nrow, axes)
        elif cfg["mode"] == "interpolate":
            x = test_digits(ckpt["config"], 2 * rows, generator, device)
            images = interpolate(model, x[:rows], x[rows:], nrow)
        else:
            images = reconstruct(model, test_digits(ckpt["config"], max(1, rows // 2) * nrow, generator, device), nrow)
    images = images.float().cpu()

    with atomic_write(cfg["out"]) as tmp:
        save_image(images, tmp, nrow=nrow, padding=2, pad_value=0.5)
    print(f"wrote {cfg['out']} ({len(images)} images, {cfg['mode']}) from {path}")
    if cfg["tensor"]:
        with atomic_write(cfg["tensor"]) as tmp:
            torch.save(images, tmp)
        print(f"wrote {cfg['tensor']}: float tensor {tuple(images.shape)} in [0, 1]")


if __name__ == "__main__":
    run(main)
