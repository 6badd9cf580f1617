"""Train an MMD-VAE on MNIST.

    python train.py                                  # the MMD-VAE, with the defaults below
    python train.py --latent_dim=8 --epochs=30       # any default, overridden
    python train.py config/hybrid.py --epochs=20     # a preset file first, then the flags
    python train.py --resume=True                    # continue out/ckpt.pt
    torchrun --standalone --nproc_per_node=4 train.py                        # 4 GPUs (or CPU processes)

Loss per image (Zhao, Song & Ermon, "InfoVAE", arXiv:1706.02262):
    reconstruction  -log p(x|z), summed over the 784 pixels
  + mmd_weight * MMD^2(q(z), p(z))        aggregate posterior vs prior N(0, I), Gaussian kernel
  + kl_weight  * KL(q(z|x) || p(z))       the ELBO's term, per image (0 here: the MMD-VAE)
The presets in config/ name what they change: config/elbo.py is the ELBO-VAE, config/hybrid.py adds
the pixel MMD and two critics of hybrid.py, config/tutorial.py and config/seed_notebook.py are the
InfoVAE authors' tutorial and the notebook this repo grew from.

Each epoch writes {out_dir}/ckpt.pt, a row of {out_dir}/log.csv and a grid of
samples {out_dir}/samples_epoch{N}.png. The run ends by fitting the ex-post prior
(a Gaussian mixture over the train codes, prior.py) into the checkpoint, and
writing {out_dir}/losses.png. One process writes a run folder at a time (a lock in it).

Under torchrun, each of the N processes (ranks) takes its slice of every global batch,
the MMD compares the codes of the whole batch (gathered from all ranks) with the same
prior draws, and DDP averages the gradients: the run computes what one process would.
Only rank 0 writes files and prints.
"""
# -----------------------------------------------------------------------------
# Every hyperparameter, with its default. Override any of them as --name=value.
# I/O
out_dir = "out"              # checkpoint, log, sample grids and loss plot go here
data_dir = "data"            # MNIST is fetched here once (torchvision layout)
resume = False               # continue from {out_dir}/ckpt.pt
overwrite = False            # start afresh even if {out_dir} already holds a checkpoint
ckpt_interval = 0            # also checkpoint every this many steps (0 = only at the end of each epoch)
log_interval = 25            # steps between progress-bar updates (each one waits for the device)
# data
dataset = "mnist"            # mnist or fashion (Fashion-MNIST)
batch_size = 100             # images per step (over all ranks under torchrun)
# model
latent_dim = 16              # size of z; 2 to plot the latent space; fewer draw better N(0, I) samples, more reconstruct better
channels = 32                # conv widths are channels and 2*channels (the authors' tutorial: 64)
hidden = 512                 # fully connected layer between convs and z (the tutorial: 1024)
stochastic_encoder = False   # Gaussian q(z|x) with reparameterisation; needed for kl_weight > 0
# loss
recon_loss = "bce"           # bce (Bernoulli likelihood on pixel intensities) or mse (summed squared error)
mmd_weight = 300.0           # weight of MMD^2(q(z), N(0, I)); MMD^2 is ~1e-3 when matched, recon ~70 nats
kl_weight = 0.0              # weight of the per-image KL; 0 = MMD-VAE, 1 (with mmd_weight=0) = ELBO-VAE
kernel = "gaussian"          # gaussian or imq (inverse multiquadric, as in the WAE paper)
kernel_scales = "0.2,1,5"    # comma-separated bandwidth multipliers of 2*latent_dim (E||z - z'||^2 under N(0, I))
mmd_estimator = "unbiased"   # unbiased (U-statistic) or biased (V-statistic)
prior_draws = 0              # N(0, I) draws the MMD compares the batch's codes with (0 = as many as the batch)
# hybrid preset (hybrid.py, config/hybrid.py): terms beyond the MMD-VAE, all off here
pixel_mmd_weight = 0.0       # weight of MMD^2(decoded N(0, I) draws, the batch's images) in pixel space
pixel_kernel_scales = "3,10,30"  # its Gaussian bandwidths in squared pixel distance (two MNIST digits lie ~100 apart)
adv_weight = 0.0             # weight of a critic's non-saturating GAN loss on decoded N(0, I) draws
critic_hidden = 128          # a fully connected layer of this many units before the critic's logit; 0 = none
critic_channels = 0          # the critic's conv widths are critic_channels and twice that; 0 = channels
critic_lr = 5e-4             # the critic's Adam learning rate at the start (betas 0.5, 0.999, as in DCGAN)
latent_adv_weight = 0.0      # weight of a latent critic's GAN loss on the codes (InfoVAE's adversarial divergence)
latent_critic_lr = 5e-4      # the latent critic's Adam learning rate at the start (betas 0.5, 0.999)
# ex-post prior (prior.py)
prior_components = 50        # Gaussians fitted to the train codes after training, for sample.py --prior=gmm (0 = none)
# optimizer
epochs = 12                  # passes over the 60,000 training images (docs/defaults.md: the time budget)
max_steps = 0                # stop after this many steps in all (0 = no cap)
lr = 3e-3                    # Adam learning rate at the start
lr_decay = True              # cosine decay over the run, from lr to min_lr_ratio * lr
min_lr_ratio = 0.1           # where the decay ends, as a fraction of lr (nanoGPT's min_lr is lr/10)
ema_decay = 0.998            # sample with an exponential moving average of the weights over ~1/(1-ema_decay) steps (0 = off)
# system
device = "auto"              # auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps
precision = "auto"           # auto = bf16 autocast on a CPU where a step measures 1.2x as fast as fp32, else fp32
cuda_graph = True            # on CUDA, replay each whole step as one CUDA graph (this small model is launch-bound)
deterministic = False        # deterministic kernels only, so identical GPU runs give identical weights (CPU runs already do)
seed = 1337                  # model init, prior draws and data order all follow from it
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))}
# Options a resumed run may change; the rest define the model and its loss.
SAFE_ON_RESUME = {"out_dir", "data_dir", "resume", "overwrite", "ckpt_interval", "log_interval",
                  "epochs", "max_steps", "device", "precision", "cuda_graph", "deterministic", "prior_components"}
# What a checkpoint saved before an option existed was trained with. Listed even where that is today's
# default, so that a later default cannot change how an old checkpoint resumes. Checkpoints from before the
# MMD-VAE became the default (December 2026) hold every option of the hybrid.
BEFORE_OPTIONS = {"pixel_mmd_weight": 0.0, "adv_weight": 0.0, "latent_adv_weight": 0.0, "critic_hidden": 0,
                  "ema_decay": 0.0, "critic_channels": 0, "prior_draws": 0}
RECON_LOSSES = ("bce", "mse")
PRECISIONS = ("auto", "bf16", "fp32")

import copy
import csv
import functools
import math
import os
import signal
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import hybrid
import data
import prior
from cli import (RunLock, UserError, atomic_write, first_line, parse_overrides, pick_device, read_presets,
                 remove_stale_temporaries, require, run)
from mmd import ESTIMATORS, KERNELS, mmd
from model import MMDVAE


@functools.lru_cache(maxsize=None)  # each run's scales are read once, not at every step
def parse_scales(text, name="kernel_scales"):
    try:
        scales = [float(s) for s in text.split(",")]
    except ValueError:
        scales = []
    require(scales and all(0 < s < math.inf for s in scales),  # inf would make every kernel value 1 and the MMD 0
            f"--{name}={text} must be finite positive numbers separated by commas, e.g. --{name}=0.5,1,2")
    return tuple(scales)


def validate(cfg):
    for name in ("batch_size", "epochs", "latent_dim", "channels", "hidden", "log_interval"):
        require(cfg[name] > 0, f"--{name}={cfg[name]} must be positive")
    for name in ("max_steps", "ckpt_interval", "critic_hidden", "critic_channels", "mmd_weight", "kl_weight",
                 *hybrid.WEIGHTS, "prior_components"):
        require(cfg[name] >= 0, f"--{name}={cfg[name]} must be zero or positive")
    require(cfg["prior_draws"] == 0 or cfg["prior_draws"] >= 2,
            f"--prior_draws={cfg['prior_draws']} must be 0 (as many as the batch) or at least 2")
    for name in ("lr", "critic_lr", "latent_critic_lr"):
        require(cfg[name] > 0, f"--{name}={cfg[name]} must be positive")
    require(0 <= cfg["min_lr_ratio"] <= 1, f"--min_lr_ratio={cfg['min_lr_ratio']} must be between 0 and 1")
    require(0 <= cfg["ema_decay"] < 1, f"--ema_decay={cfg['ema_decay']} must be at least 0 and below 1, e.g. 0.999")
    require(cfg["batch_size"] >= 2, "--batch_size must be at least 2: the MMD compares samples within a batch")
    require(cfg["dataset"] in data.DATASETS, f"unknown dataset {cfg['dataset']!r}; choose one of {', '.join(data.DATASETS)}")
    require(cfg["kernel"] in KERNELS, f"unknown kernel {cfg['kernel']!r}; choose one of {', '.join(KERNELS)}")
    require(cfg["recon_loss"] in RECON_LOSSES, f"unknown recon_loss {cfg['recon_loss']!r}; choose one of {', '.join(RECON_LOSSES)}")
    require(cfg["precision"] in PRECISIONS, f"unknown precision {cfg['precision']!r}; choose one of {', '.join(PRECISIONS)}")
    require(cfg["mmd_estimator"] in ESTIMATORS, f"unknown mmd_estimator {cfg['mmd_estimator']!r}; choose one of {', '.join(ESTIMATORS)}")
    require(cfg["kl_weight"] == 0 or cfg["stochastic_encoder"],
            "--kl_weight > 0 needs a Gaussian encoder: add --stochastic_encoder=True")
    parse_scales(cfg["kernel_scales"])
    parse_scales(cfg["pixel_kernel_scales"], "pixel_kernel_scales")


def compute_loss(model, x, cfg, critics=None, gather=None):
    """(total loss, {"recon", "mmd", "kl", *hybrid.TERMS, "logits"}) for a batch x in [0, 1]; every term is
    per image. "logits" is no loss term: the reconstruction's pre-sigmoid pixels (from the code mean in eval
    mode), from which test_metrics takes the MSE without a second pass.

    critics: the hybrid preset's critics (make_model's), for a run whose hybrid.WEIGHTS are above 0; their
    terms are 0 otherwise. The total is the encoder's and decoder's loss; "critic" and "latent_critic"
    are the critics' own losses, which reach only the critics (make_train_step adds them for one backward pass).
    gather: under torchrun, gather_codes, so that the MMD is over the codes of the whole global batch."""
    logits, z, mu, logvar = model(x)
    n = x.shape[0]
    if cfg["recon_loss"] == "bce":
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / n
    else:
        recon = F.mse_loss(torch.sigmoid(logits), x, reduction="sum") / n
    zero = recon.new_zeros(())
    # MMD between the batch's codes and draws from the prior (InfoVAE, eq. 8), in float32:
    # bf16 distances are too coarse for a statistic that is ~1e-3 when the fit is good.
    z = z.float() if gather is None else gather(z.float())
    with torch.autocast(z.device.type, enabled=False):
        mmd_term = zero if cfg["mmd_weight"] == 0 else mmd(
            z, torch.randn(cfg["prior_draws"] or len(z), z.shape[1], device=z.device), cfg["kernel"],
            parse_scales(cfg["kernel_scales"]), estimator=cfg["mmd_estimator"])
    # KL(N(mu, sigma^2) || N(0, 1)) in closed form (Kingma & Welling, 2014, appendix B).
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).float().sum() / n if cfg["kl_weight"] > 0 else zero
    loss = recon + cfg["mmd_weight"] * mmd_term + cfg["kl_weight"] * kl
    terms = {"recon": recon, "mmd": mmd_term, "kl": kl}
    if not hybrid.in_use(cfg):
        terms.update(dict.fromkeys(hybrid.TERMS, zero))
    else:
        terms.update(hybrid.terms(model_of(model), critics, x, z, cfg,
                                  parse_scales(cfg["pixel_kernel_scales"], "pixel_kernel_scales"), gather))
        for weight in hybrid.WEIGHTS:
            loss = loss + cfg[weight] * terms[weight.removesuffix("_weight")]
    return loss, {**terms, "logits": logits}


def model_of(model):
    """The MMDVAE inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


# PyTorch 2.14 marks this gather deprecated in favour of a private module; the public one is documented
# across PyTorch 2.x (the GPU machines run 2.11) and computes the same thing.
warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather is deprecated", FutureWarning)


def gather_codes(z):
    """Every rank's codes, concatenated in rank order: the global batch's codes, as one process has them.

    The MMD is not a mean over images: MMD^2 of the whole batch is not the mean of per-rank
    MMD^2s of its slices (those are a different, noisier estimator: fewer pairs, and a kernel
    mean over n/N codes). The gather carries gradients: each rank gets back the sum over ranks of
    d(MMD)/d(its codes), which DDP's averaging turns into exactly the one-process gradient."""
    return torch.cat(dist_fn.all_gather(z))


@torch.no_grad()
def test_metrics(model, images, cfg, critics=None, batch_size=1000):
    """Mean loss terms and per-pixel MSE of the reconstruction from the code mean (compute_loss's), on `images`.

    In the run's precision, as training: bf16 halved this pass's time on a CPU where it pays (4.4 s against
    9.3 s for the 10,000 test images, a twelfth of an epoch, when the MSE took a pass of its own) and moved the
    test MSE by 2e-6; evaluate.py's figures are float32."""
    model.eval()
    totals = {}
    amp_dtype = autocast_dtype(images.device, cfg["precision"])
    for start in range(0, len(images), batch_size):
        x = data.to_float(images[start:start + batch_size])
        with autocast_to(images.device, amp_dtype):
            loss, terms = compute_loss(model, x, {**cfg, "mmd_estimator": "unbiased"}, critics)
        x_hat = torch.sigmoid(terms.pop("logits")).float()
        for k, v in {"loss": loss, **terms, "mse": F.mse_loss(x_hat, x, reduction="sum") / x.numel()}.items():
            totals[k] = totals.get(k, 0.0) + v.item() * x.shape[0]
    model.train()
    return {k: v / len(images) for k, v in totals.items()}


def lr_at(step, total_steps, cfg):
    if not cfg["lr_decay"]:
        return cfg["lr"]
    progress = min(step / max(total_steps, 1), 1.0)
    floor = cfg["min_lr_ratio"]
    return cfg["lr"] * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def resume_config(saved, cfg, given, verbose=True):
    """The checkpoint's config, with only the safe command-line changes applied."""
    for k, v in saved.items():
        if k not in DEFAULTS:  # "preset", or an option this version no longer has
            continue
        require(type(v) is type(DEFAULTS[k]),
                f"the checkpoint's config has {k}={v!r}, not a {type(DEFAULTS[k]).__name__}: it is damaged; "
                f"start afresh with --overwrite=True, or restore it from a backup")
    require(isinstance(saved.get("preset", ""), str), "the checkpoint's config has a preset that is not text: it is "
            "damaged; start afresh with --overwrite=True, or restore it from a backup")
    merged = {**DEFAULTS, **BEFORE_OPTIONS, **{k: v for k, v in saved.items() if k in DEFAULTS},
              "preset": saved.get("preset", "")}
    # Where the run is and what this machine computes on are the command's, not the checkpoint's.
    merged["out_dir"], merged["device"] = cfg["out_dir"], cfg["device"]
    for name in sorted(given):
        if cfg[name] == merged[name]:
            continue
        require(name in SAFE_ON_RESUME,
                f"--{name}={cfg[name]} differs from the checkpoint's {name}={merged[name]!r}; a resumed run keeps "
                f"its model and loss: drop --{name}, or start a new run with another --out_dir")
        if verbose:
            print(f"resume: {name} changed from {merged[name]!r} to {cfg[name]!r}")
        merged[name] = cfg[name]
    return merged


def check_writable(folder):
    """Fail before training, not after the first epoch, if checkpoints cannot be written."""
    try:
        os.makedirs(folder, exist_ok=True)
        with atomic_write(os.path.join(folder, ".write_test")) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"\0" * 65536)
        os.remove(os.path.join(folder, ".write_test"))
    except OSError as e:
        raise UserError(f"cannot write to --out_dir={folder} ({e.strerror}); choose a writable folder with free space") from None


TERMS = ("recon", "mmd", "kl", *hybrid.TERMS)  # the loss's terms, as compute_loss names them
# The weight that switches each term on (a critic's own loss goes with its maker's); recon is always on.
TERM_WEIGHTS = {"mmd": "mmd_weight", "kl": "kl_weight", "pixel_mmd": "pixel_mmd_weight", "adv": "adv_weight",
                "critic": "adv_weight", "latent_adv": "latent_adv_weight", "latent_critic": "latent_adv_weight"}
LOG_FIELDS = ["epoch", "step", "seconds", *(f"{split}_{k}" for split in ("train", "test") for k in ("loss", *TERMS)),
              "test_mse"]


def shown_terms(values, cfg):
    """{name: value as text} of the loss and the terms whose weights are above 0 ([loss, *TERMS]), for each
    epoch's line; the progress bar shows the first four, so that it fits 100 columns."""
    return {name: f"{value:.2e}" if "mmd" in name else f"{value:.2f}"  # the MMDs are ~1e-3
            for name, value in zip(("loss", *TERMS), values) if cfg.get(TERM_WEIGHTS.get(name), 1) > 0}


def time_left(seconds):
    """', about N min left' for the epoch line (tqdm's bar shows only the epoch's own); '' at the end."""
    if seconds <= 0:
        return ""
    return f", about {seconds:.0f}s left" if seconds < 90 else f", about {seconds / 60:.0f} min left"


def write_log(path, rows):
    with atomic_write(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, LOG_FIELDS)
            writer.writeheader()
            writer.writerows(rows)


def read_log(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def save_grid(images, path, nrow=8, padding=2, pad_value=0.0):
    """Write (N, C, H, W) images in [0, 1] to a PNG, `nrow` to a row: torchvision.utils.save_image's layout
    and bytes, without importing torchvision, which takes 1.5 s, as long as the rest of `python sample.py`."""
    from PIL import Image  # torchvision's and matplotlib's image library
    images = images.detach().float().cpu()
    images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    count, channels, height, width = images.shape
    padding = 0 if count == 1 else padding  # torchvision writes a lone image unpadded
    columns = min(nrow, count)
    rows = math.ceil(count / columns)
    grid = torch.full((channels, rows * (height + padding) + padding, columns * (width + padding) + padding),
                      float(pad_value))
    for k, image in enumerate(images):
        top, left = (k // columns) * (height + padding) + padding, (k % columns) * (width + padding) + padding
        grid[:, top:top + height, left:left + width] = image
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)


def plot_losses(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [float(r["epoch"]) for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, term, title in zip(axes, ("recon", "mmd", "mse"), ("reconstruction (nats / image)", "MMD^2(q(z), p(z))", "test MSE per pixel")):
        for split in ("train", "test"):
            key = f"{split}_{term}"
            if key in rows[0] and rows[0][key] != "":
                ax.plot(epochs, [float(r[key]) for r in rows], marker="o", label=split)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend()
    axes[1].set_yscale("symlog", linthresh=1e-4)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


BF16_MARGIN = 1.2  # --precision=auto takes bf16 only this much faster: a near tie, which could go either way, stays in fp32


def bf16_kernels():
    """Whether oneDNN has bf16 kernels for this CPU: x86 from AVX512-BW, VL and DQ on, Arm with BF16."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def bf16_speedup(cfg, device, repeats=3):
    """fp32 time / bf16-autocast time of this run's forward and backward pass on `device` (above 1: bf16 is faster).

    Whether bf16 pays depends on the CPU, not on whether it has bf16 instructions: bench.py's step took 1.6x
    less time in bf16 on 2 cores of an AMD EPYC with AVX512-BF16, and 1.4x more on 2 cores of an Intel Xeon with
    AVX512-BF16 but no AMX; on AVX-512 CPUs without AVX512-BF16 PyTorch emulates it. So it is timed: the best of
    `repeats` passes each, after a warm-up, the two taking turns, on a model of its own (the run's RNG untouched).
    Where oneDNN has no bf16 kernels at all (x86 before AVX-512), it is 0 without timing: on 2 AMD EPYC cores with
    AVX2 a bf16 pass took 2.7 to 2.9 s against 0.13 to 0.22 s in fp32, and timing it cost 11 s of every start."""
    if not bf16_kernels():
        return 0.0
    with torch.random.fork_rng(devices=[]):
        model, critics = make_model(cfg, device)
        # The global batch: a rank's share can be a single image, too few for the MMD.
        x = torch.rand(cfg["batch_size"], 1, 28, 28, device=device)
        best = {}
        for attempt in range(repeats + 1):
            for dtype in (torch.bfloat16, None):
                started = time.perf_counter()
                with autocast_to(device, dtype):
                    loss, terms = compute_loss(model, x, cfg, critics)
                backward_target(loss, terms, critics).backward()
                for module in (model, critics):
                    module.zero_grad(set_to_none=True)
                if attempt:
                    best[dtype] = min(best.get(dtype, math.inf), time.perf_counter() - started)
    return best[None] / best[torch.bfloat16]


def resolve_precision(cfg, device, world_size=1):
    """(precision, speedup): "bf16" or "fp32" for this run, and bf16_speedup where --precision=auto measured it.

    The checkpoint's config records the answer, so a resumed run computes as it started."""
    if cfg["precision"] != "auto":
        return cfg["precision"], None
    if device.type != "cpu":  # on an H200 this model is too small for bf16 to pay (eager 5.75 vs 4.94 ms per step)
        return "fp32", None
    speedup = bf16_speedup(cfg, device)
    use_bf16 = torch.tensor([float(speedup >= BF16_MARGIN)])
    if world_size > 1:  # every rank computes alike: bf16 only where it pays on all of them
        dist.all_reduce(use_bf16, op=dist.ReduceOp.MIN)
    return ("bf16" if use_bf16.item() else "fp32"), speedup


def autocast_dtype(device, precision):
    """torch.bfloat16 for a run in bf16 autocast (on a CPU or CUDA), else None: fp32. `precision` is resolved
    (resolve_precision): "bf16" or "fp32"."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision {precision!r}: resolve 'auto' with resolve_precision first")
    return torch.bfloat16 if precision == "bf16" and device.type in ("cpu", "cuda") else None


def autocast_to(device, dtype, **kwargs):
    """The context a run computes in: autocast to `dtype` (autocast_dtype's answer), or plain fp32 for None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None, **kwargs)


def precision_name(device, precision, speedup=None):
    """How a run computes, for its first line; with what --precision=auto measured, where it did (0: not timed,
    no bf16 kernels)."""
    name = "bf16 autocast" if autocast_dtype(device, precision) else "fp32"
    if speedup is None:
        return name
    return f"{name}: " + (f"bf16 measured {speedup:.2f}x as fast as fp32 here" if speedup else "no bf16 kernels for this CPU")


def make_model(cfg, device):
    """(the MMDVAE, the hybrid's critics): the critics are an empty ModuleDict for the MMD-VAE."""
    model = MMDVAE(cfg["latent_dim"], cfg["channels"], cfg["hidden"], cfg["stochastic_encoder"]).to(device)
    return model, hybrid.make_critics(cfg, device)


def make_optimizer(model, critics, cfg, device):
    """Adam over the encoder and decoder and, in a group each, the critics (lr_scale: their share of `lr`)."""
    groups = [{"params": list(model.parameters())}]
    for name, critic in critics.items():
        groups.append({"params": critic.parameters(), "betas": (0.5, 0.999),
                       "lr_scale": cfg[hybrid.CRITICS[name][1]] / cfg["lr"]})
    # Fused Adam: one kernel for all parameters instead of several per tensor (bench.py: 1.1x on CPU).
    return torch.optim.Adam(groups, lr=cfg["lr"], fused=device.type in ("cpu", "cuda") or None)


def backward_target(loss, terms, critics):
    """What one backward pass takes: the model's loss, plus the critics' own losses, which reach only them."""
    return loss + terms["critic"] + terms["latent_critic"] if critics else loss


def make_train_step(model, optimizer, cfg, device, loss_fn=compute_loss, critics=None, world_size=1):
    """step(x, lr) -> tensor [loss, *TERMS]: one optimisation step on batch x.

    On CUDA (cuda_graph=True) forward, backward and Adam are captured once as a CUDA graph
    and replayed: one launch per step instead of hundreds (PyTorch docs, "CUDA Graphs",
    whole-network capture). The optimizer then keeps its learning rate in a device tensor."""
    amp_dtype = autocast_dtype(device, cfg["precision"])
    use_graph = cfg["cuda_graph"] and device.type == "cuda"

    def eager(x):
        with autocast_to(device, amp_dtype, cache_enabled=not use_graph):
            loss, terms = loss_fn(model, x, cfg, critics)
        optimizer.zero_grad(set_to_none=True)
        backward_target(loss, terms, critics).backward()
        if critics and world_size > 1:
            hybrid.average_gradients(critics, world_size)
        optimizer.step()
        return torch.stack([loss.detach(), *(terms[k].detach() for k in TERMS)])

    def eager_step(x, lr):
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return eager(x)

    if not use_graph:
        return eager_step
    for group in optimizer.param_groups:
        group["capturable"] = True
        group["lr"] = torch.tensor(float(group["lr"]), device=device)
    # Warm-up (required before capture) runs real steps: keep the weights and Adam state to put back.
    params = [*model.parameters(), *(critics.parameters() if critics else [])]
    saved_params = [p.detach().clone() for p in params]
    saved_state = [t.clone() for t in optimizer_tensors(optimizer)]  # empty for a fresh optimizer
    static_x = torch.zeros(cfg["batch_size"], 1, 28, 28, device=device)
    graph = torch.cuda.CUDAGraph()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                eager(static_x)
        torch.cuda.current_stream().wait_stream(side)
        optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            static_out = eager(static_x)
    except RuntimeError as e:  # a GPU or build that cannot capture this step still trains, eagerly
        print(f"CUDA graph capture failed ({first_line(e)}); training without it")
        graph = None
    with torch.no_grad():
        for p, value in zip(params, saved_params):
            p.copy_(value)
        for i, t in enumerate(optimizer_tensors(optimizer)):
            t.copy_(saved_state[i]) if saved_state else t.zero_()  # a fresh Adam's state is all zeros
    if graph is None:
        return eager_step

    def graph_step(x, lr):
        static_x.copy_(x)
        for group in optimizer.param_groups:
            group["lr"].fill_(lr * group.get("lr_scale", 1.0))
        graph.replay()
        return static_out.clone()
    return graph_step


@torch.no_grad()
def update_average(averaged, model, decay, step):
    """Move `averaged`'s weights towards `model`'s after step `step` (counted from 0): their exponential moving
    average, with Adam's bias correction, so that it averages the steps taken and not the initial weights
    (whose share would be decay^steps: 90% after 100 steps at 0.999)."""
    share = (1 - decay) / (1 - decay ** (step + 1))
    torch._foreach_lerp_(list(averaged.parameters()), list(model.parameters()), share)  # one kernel for all tensors


def optimizer_tensors(optimizer):
    return [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]


def speed_settings(device, deterministic=False):
    if deterministic:
        # cuBLAS needs a fixed workspace, set before its first call, to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if device.type == "cpu":
        # Tiny gradients late in training turn into denormal floats, which x86 cores handle slowly
        # (bench.py: about 8% per step). Flushing them to zero changes nothing a VAE can notice.
        torch.set_flush_denormal(True)
    if device.type == "cuda":
        # Input shapes never change: let cuDNN time its kernels once (unless the run must be deterministic:
        # the fastest kernel it picks can differ between runs). TF32 for the fully connected layers.
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cuda.matmul.allow_tf32 = True


class StopRequest:
    """Ctrl-C or SIGTERM: remembered here, acted on at the next log step or epoch end (by all ranks at once)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        for s in self.SIGNALS:
            signal.signal(s, self.handle)

    def handle(self, signum, frame):
        self.signum = signum


def check_divides(batch_size, world_size):
    require(batch_size % world_size == 0,
            f"--batch_size={batch_size} does not divide into {world_size} ranks; batch_size is the global batch: "
            f"make it a multiple of {world_size}, or change --nproc_per_node")


def distributed_setup(cfg):
    """(rank, world_size, device). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; plain python is rank 0 of 1."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    check_divides(cfg["batch_size"], world_size)  # before any rank waits for another: every rank exits at once
    device = pick_device(cfg["device"])
    if world_size > 1:
        require(device.type in ("cpu", "cuda"), f"torchrun needs --device=cpu or cuda, not {device.type}")
        if device.type == "cuda":  # one GPU per rank
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    return rank, world_size, device


def read_config(argv):
    """(config, the names the command line set): the preset files in argv applied first, then its --flags.
    config["preset"] names the presets ("" for none), for the checkpoint."""
    preset_values, presets, flags = read_presets(argv, DEFAULTS, "train.py")
    cfg, given = parse_overrides({**DEFAULTS, **preset_values}, flags, "train.py")
    validate(cfg)
    return {**cfg, "preset": ",".join(presets)}, given | set(preset_values)


def share_from_rank0(text, world_size):
    """Rank 0's `text` on every rank (one broadcast under torchrun)."""
    if world_size == 1:
        return text
    shared = [text]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def main(argv):
    cfg, given = read_config(argv)
    rank, world_size, device = distributed_setup(cfg)
    master = rank == 0  # the one rank (process) that writes files and prints
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    if cfg["resume"]:
        checkpoint.require_file(ckpt_path)  # before the lock makes the folder
    lock, refused = None, ""
    if master:  # before anything in the run folder is read or written
        try:
            lock = RunLock(cfg["out_dir"], "wait for it to end, train into another --out_dir, or stop that process",
                           option="--out_dir=")
        except UserError as e:
            refused = str(e)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    handlers = {s: signal.getsignal(s) for s in StopRequest.SIGNALS}  # train's StopRequest replaces them
    try:
        refused = share_from_rank0(refused, world_size)  # every rank stops with rank 0's line
        require(not refused, refused)
        saved = None
        if cfg["resume"]:
            saved = checkpoint.load(ckpt_path)
            cfg = resume_config(saved["config"], cfg, given, verbose=master)
            validate(cfg)
        else:
            require(cfg["overwrite"] or not os.path.exists(ckpt_path),
                    f"{ckpt_path} already exists: continue it with --resume=True, start a new run with another "
                    f"--out_dir, or replace it with --overwrite=True")
        check_divides(cfg["batch_size"], world_size)  # the checkpoint's batch size, on resume
        speed_settings(device, cfg["deterministic"])
        if master:
            check_writable(cfg["out_dir"])
            remove_stale_temporaries(cfg["out_dir"])
            data.ensure_files(cfg["dataset"], cfg["data_dir"])
        if world_size > 1:
            dist.barrier()  # the other ranks load the data once rank 0 has it in place
        train(cfg, saved, rank, world_size, device)
    except RuntimeError as e:
        # A collective that fails means another rank died (torchrun is stopping this one too).
        if world_size == 1 or not (isinstance(e, dist.DistError) or "gloo" in str(e) or "NCCL" in str(e)):
            raise
        reason = first_line(e, 1000).split("] ", 1)[-1].split(". ")[0][:100]  # past gloo's "[file:line] "
        raise UserError(f"rank {rank}: another rank stopped ({reason}); {ckpt_path} holds the "
                        f"last checkpoint: continue with --resume=True", every_rank=True) from None
    finally:
        for s, handler in handlers.items():  # called from Python (a notebook, the tests), Ctrl-C works again afterwards
            signal.signal(s, handler)
        if world_size > 1:
            dist.destroy_process_group()
        if lock is not None:
            lock.release()


def train(cfg, saved, rank, world_size, device):
    master = rank == 0
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    torch.manual_seed(cfg["seed"])  # the same on every rank: the same initial weights and prior draws

    splits = data.load(cfg["dataset"], cfg["data_dir"], device)
    train_images, test_images = splits["train"][0], splits["test"][0]
    steps_per_epoch = len(train_images) // cfg["batch_size"]
    require(steps_per_epoch > 0, f"--batch_size={cfg['batch_size']} is larger than the training set")
    if cfg["prior_components"]:
        prior.check_components(cfg["prior_components"], len(train_images))
    precision, speedup = resolve_precision(cfg, device, world_size)
    cfg = {**cfg, "precision": precision}  # auto, resolved: the checkpoint records it, so a resumed run computes alike
    total_steps = cfg["epochs"] * steps_per_epoch
    if cfg["max_steps"]:
        total_steps = min(total_steps, cfg["max_steps"])
    rank_batch = cfg["batch_size"] // world_size
    my_slice = slice(rank * rank_batch, (rank + 1) * rank_batch)  # this rank's part of every global batch

    model, critics = make_model(cfg, device)
    optimizer = make_optimizer(model, critics, cfg, device)
    # The weights that draw the samples: the last ones, or (ema_decay > 0) their exponential moving average
    # (Yazici et al., "The Unusual Effectiveness of Averaging in GAN Training", ICLR 2019), which evens out
    # step-to-step swings. The checkpoint's "model" holds these, "train_model" the last ones.
    averaged = copy.deepcopy(model).requires_grad_(False) if cfg["ema_decay"] else model
    step, epoch, epoch_step = 0, 0, 0
    running = torch.zeros(1 + len(TERMS), device=device)  # sums of the loss and its terms over this epoch's steps
    log_path = os.path.join(cfg["out_dir"], "log.csv")
    log_rows = []
    if saved is not None:
        try:
            model.load_state_dict(saved["train_model"] if averaged is not model else saved["model"])
            averaged.load_state_dict(saved["model"])
            if critics:
                critics.load_state_dict(saved["critics"])
            optimizer.load_state_dict(saved["optimizer"])
            step, epoch, epoch_step = (int(saved[k]) for k in ("step", "epoch", "epoch_step"))
            running = saved["running"].to(device).reshape(-1)
            # Saved before the later terms existed (4 sums before the pixel MMD, 5 before the critic, 7 before the
            # latent critic): theirs are 0.
            require(len(running) in (4, 5, 7, 1 + len(TERMS)), f"{len(running)} running sums")
            running = torch.cat([running, running.new_zeros(1 + len(TERMS) - len(running))]).reshape(1 + len(TERMS))
            checkpoint.set_rng_states(saved["rng"], device)
            require(0 <= epoch_step <= steps_per_epoch and step >= 0 and running.isfinite().all(), "counters out of range")
        except Exception as e:  # a checkpoint from elsewhere, or damaged: the weights load but the rest does not
            raise UserError(f"cannot resume from {ckpt_path}: its training state is damaged ({first_line(e)}); start "
                            f"afresh with --overwrite=True, or restore it from a backup") from None
        # Rows after the checkpoint belong to work that is about to be redone.
        log_rows = [r for r in read_log(log_path) if int(r["step"]) <= step]
        if master:
            was = saved.get("world_size", 1)
            print(f"resumed from {ckpt_path} at epoch {epoch + 1}, step {step}"
                  + (f" (saved by {was} ranks, now {world_size})" if was != world_size else ""))
    num_params = sum(p.numel() for module in (model, critics) for p in module.parameters())
    use_graph = cfg["cuda_graph"] and device.type == "cuda"
    if use_graph and world_size > 1:
        # DDP's gradient all-reduce and the code gather would have to be captured inside the graph,
        # which needs NCCL settings this repo has not measured on a GPU; eager steps are correct.
        use_graph = False
        if master:
            print("CUDA graphs are off under torchrun: the step's collectives are not captured; training eagerly")
    mode = precision_name(device, precision, speedup) + (", CUDA graph" if use_graph else "")
    if master:
        ranks = f", {world_size} ranks of {rank_batch} images" if world_size > 1 else ""
        print(f"training on {device} ({mode}{ranks}): {num_params / 1e6:.2f}M parameters, {total_steps} steps "
              f"({steps_per_epoch} per epoch), output in {cfg['out_dir']}/")

    # DDP averages the gradients over ranks; `model` stays the plain module for evaluation and checkpoints.
    ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if world_size > 1 else model
    loss_fn = functools.partial(compute_loss, gather=gather_codes) if world_size > 1 else compute_loss
    train_step = make_train_step(ddp_model, optimizer, {**cfg, "cuda_graph": use_graph}, device, loss_fn, critics,
                                 world_size)
    fixed_noise = torch.randn(64, cfg["latent_dim"], generator=torch.Generator().manual_seed(cfg["seed"])).to(device)
    stop = StopRequest()
    started, first_step = time.time(), step  # for the time left, from this process's own pace

    def mean_over_ranks(values):
        """`values` (loss sums, and a stop flag) averaged over ranks: one all-reduce, so every rank acts alike."""
        if world_size == 1:
            return values
        values = values.clone()
        dist.all_reduce(values)
        return values / world_size

    def save_checkpoint(**extra):
        # Every rank calls this at the same step (the running sums are averaged over ranks); rank 0 writes.
        summed = mean_over_ranks(running)
        # A step can turn the weights to NaN even when its own loss was finite: never save those.
        if not torch.stack([p.isfinite().all() for m in (model, critics) for p in m.parameters()]).all():
            check_finite(float("nan"))
        if master:
            checkpoint.save(ckpt_path, {
                "model": averaged.state_dict(), **({"train_model": model.state_dict()} if averaged is not model else {}),
                **({"critics": critics.state_dict()} if critics else {}),
                "model_args": model.model_args, "config": cfg,
                "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch, "epoch_step": epoch_step,
                "running": summed, "rng": checkpoint.rng_states(device), "world_size": world_size, **extra,
            })

    def check_finite(loss):
        if not math.isfinite(loss):
            weights = ", ".join(f"{w}={cfg[w]}" for w in ("mmd_weight", "kl_weight", *hybrid.WEIGHTS) if cfg[w] > 0)
            raise UserError(f"training diverged: the loss or the weights became {loss} by step {step}; "
                            f"{ckpt_path} (if any) holds the last good checkpoint. Lower --lr (now {cfg['lr']}) "
                            f"or the loss weights ({weights})")

    def sync(losses):
        """[loss, *TERMS] averaged over ranks; stops every rank if any was asked to stop or diverged."""
        asked = losses.new_tensor([float(stop.signum is not None)])
        *means, asked = mean_over_ranks(torch.cat([losses, asked])).tolist()
        check_finite(means[0] if all(map(math.isfinite, means)) else math.nan)  # the critic's loss too
        if asked:
            signum = stop.signum or signal.SIGTERM  # torchrun forwards a signal to every rank; one is enough
            save_checkpoint()
            if master:
                print(f"\n{signal.Signals(signum).name}: stopped at step {step}; checkpoint saved to {ckpt_path}. "
                      f"Continue with: python train.py --out_dir={cfg['out_dir']} --resume=True", file=sys.stderr)
            sys.exit(128 + signum)
        return means

    while step < total_steps:
        batches = data.batch_order(len(train_images), cfg["batch_size"], cfg["seed"], epoch)[:, my_slice].to(device)
        last = min(steps_per_epoch, epoch_step + total_steps - step)
        with tqdm(desc=f"epoch {epoch + 1}/{cfg['epochs']}", initial=epoch_step, total=steps_per_epoch,
                  leave=False, dynamic_ncols=True, mininterval=1.0, disable=not master) as bar:
            while epoch_step < last:
                x = data.to_float(train_images[batches[epoch_step]])
                losses = train_step(x, lr_at(step, total_steps, cfg))  # [loss, *TERMS]
                if averaged is not model:
                    update_average(averaged, model, cfg["ema_decay"], step)
                # Summed on the device: reading a value back would stall the GPU every step.
                running += losses
                step, epoch_step = step + 1, epoch_step + 1
                bar.update(1)
                if step % cfg["log_interval"] == 0:
                    bar.set_postfix(shown_terms(sync(losses), cfg), refresh=False)
                if cfg["ckpt_interval"] and step % cfg["ckpt_interval"] == 0:
                    save_checkpoint()

        means = sync(running / epoch_step)
        # Every rank evaluates (the test MMD's prior draws keep all ranks' random streams in step). A run that
        # max_steps ends mid-epoch then puts its random state back: resumed, it draws what an uncapped run draws.
        before_test = checkpoint.rng_states(device) if epoch_step < steps_per_epoch else None
        test = test_metrics(averaged, test_images, cfg, critics)
        if before_test is not None:
            checkpoint.set_rng_states(before_test, device)
        seconds = time.time() - started
        log_rows.append({"epoch": f"{epoch + epoch_step / steps_per_epoch:.4g}", "step": step, "seconds": f"{seconds:.1f}",
                         **{f"train_{k}": f"{v:.6g}" for k, v in zip(("loss", *TERMS), means)},
                         **{f"test_{k}": f"{v:.6g}" for k, v in test.items()}})
        if master:
            write_log(log_path, log_rows)
            shown = shown_terms(means, cfg)
            print(f"epoch {epoch + 1}: train loss {shown.pop('loss')} ({', '.join(f'{k} {v}' for k, v in shown.items())})"
                  f" | test recon {test['recon']:.2f}, mmd {test['mmd']:.2e}, mse {test['mse']:.5f} | {seconds:.0f}s"
                  + time_left(seconds / max(step - first_step, 1) * (total_steps - step)))
            with torch.no_grad(), atomic_write(os.path.join(cfg["out_dir"], f"samples_epoch{epoch + 1}.png")) as tmp:
                save_grid(averaged.eval().decode(fixed_noise), tmp, nrow=8)
            model.train()
        if epoch_step == steps_per_epoch:  # a whole epoch (a max_steps cap can end one early)
            epoch, epoch_step = epoch + 1, 0
            running.zero_()
        save_checkpoint()

    if cfg["prior_components"]:
        # The ex-post prior belongs to the weights that draw the samples (with ema_decay, their average at the
        # end): fitted once, after the last step, by rank 0.
        fitted = prior.fit(averaged, train_images, cfg["prior_components"], cfg["seed"]) if master else None
        save_checkpoint(prior=fitted)
        if master:
            print(f"ex-post prior: {cfg['prior_components']} Gaussians fitted to the train codes in {fitted['seconds']:.1f}s "
                  f"({fitted['iterations']} EM iterations)")
    if master:
        if log_rows:
            plot_losses(log_rows, os.path.join(cfg["out_dir"], "losses.png"))
        print(f"done in {time.time() - started:.0f}s: {ckpt_path}; draw samples with "
              f"`python sample.py --out_dir={cfg['out_dir']}` (add --prior=gmm for the ex-post prior)")


if __name__ == "__main__":
    run(main)
