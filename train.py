"""Train an MMD-VAE on MNIST.

    python train.py                                  # the MMD-VAE, with the defaults below
    python train.py --latent_dim=8 --epochs=30       # any default, overridden
    python train.py config/hybrid.py --epochs=20     # a preset file first, then the flags
    python train.py --resume=True                    # continue out/ckpt.pt
    torchrun --standalone --nproc_per_node=4 train.py    # 4 GPUs (or CPU processes)

Loss per image (Zhao, Song & Ermon, "InfoVAE", arXiv:1706.02262):
    reconstruction  -log p(x|z), summed over the 784 pixels
  + mmd_weight * MMD^2(q(z), p(z))        aggregate posterior vs prior N(0, I), Gaussian kernel
  + kl_weight  * KL(q(z|x) || p(z))       the ELBO's term, per image (0 here: the MMD-VAE)
Each epoch writes {out_dir}/ckpt.pt, log.csv and samples_epoch{N}.png; the run ends with the ex-post prior.
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
latent_dim = 16              # size of z; fewer draw better N(0, I) samples, more reconstruct better
channels = 32                # conv widths are channels and 2*channels (the authors' tutorial: 64)
hidden = 512                 # fully connected layer between convs and z (the tutorial: 1024)
stochastic_encoder = False   # Gaussian q(z|x) with reparameterisation; needed for kl_weight > 0
# loss
recon_loss = "bce"           # bce (Bernoulli likelihood on pixel intensities) or mse (summed squared error)
mmd_weight = 100.0           # weight of MMD^2(q(z), N(0, I)); MMD^2 is ~1e-3 when matched, recon ~70 nats
kl_weight = 0.0              # weight of the per-image KL; 0 = MMD-VAE, 1 (with mmd_weight=0) = ELBO-VAE
kernel = "gaussian"          # gaussian or imq (inverse multiquadric, as in the WAE paper)
kernel_scales = "0.2,1,5"    # bandwidths, as multiples of 2*latent_dim (E||z - z'||^2 under N(0, I))
mmd_estimator = "unbiased"   # unbiased (U-statistic) or biased (V-statistic)
prior_draws = 1000           # N(0, I) draws the MMD meets the codes with (0 = as many as the batch)
# ex-post prior (prior.py)
prior_components = 50        # Gaussians fitted to the train codes at the end, for --prior=gmm (0 = none)
# optimizer
epochs = 16                  # passes over the 60,000 training images (docs/defaults.md: the time budget)
max_steps = 0                # stop after this many steps in all (0 = no cap)
lr = 3e-3                    # Adam learning rate at the start
lr_decay = True              # cosine decay over the run, from lr to min_lr_ratio * lr
min_lr_ratio = 0.1           # where the decay ends, as a fraction of lr (nanoGPT's min_lr is lr/10)
ema_decay = 0.998            # sample from the weights' moving average over ~1/(1-ema_decay) steps; 0 = off
# system
device = "auto"              # auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps
precision = "auto"           # auto: bf16 on a CPU where a step measures 1.2x as fast, else fp32; bf16, fp32
cuda_graph = True            # on CUDA, replay each step as one CUDA graph (this small model is launch-bound)
deterministic = False        # deterministic GPU kernels only, so identical GPU runs give identical weights
seed = 1337                  # model init, prior draws and data order all follow from it
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if k[0] != "_" and isinstance(v, (bool, int, float, str))}

import copy
import functools
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import cli
import data
import distributed
import hybrid
import prior
import runlog
import speed
from cli import UserError, require, run
from mmd import ESTIMATORS, KERNELS, mmd
from model import MMDVAE

DEFAULTS.update(hybrid.OPTIONS)  # the hybrid preset's options (hybrid.py): every term off by default
TERMS = ("recon", "mmd", "kl", *hybrid.TERMS)  # the loss's terms, as compute_loss names them


@functools.lru_cache(maxsize=None)  # each run's scales are read once, not at every step
def parse_scales(text, name="kernel_scales"):
    try:
        scales = [float(s) for s in text.split(",")]
    except ValueError:
        scales = []
    require(scales and all(0 < s < math.inf for s in scales),  # inf: every kernel value 1, the MMD 0
            f"--{name}={text} must be finite positive numbers separated by commas, e.g. --{name}=0.5,1,2")
    return tuple(scales)


def validate(cfg):
    for name in ("batch_size", "epochs", "latent_dim", "channels", "hidden", "log_interval",
                 "lr", "critic_lr", "latent_critic_lr"):
        require(cfg[name] > 0, f"--{name}={cfg[name]} must be positive")
    for name in ("max_steps", "ckpt_interval", "critic_hidden", "critic_channels", "mmd_weight", "kl_weight",
                 *hybrid.WEIGHTS, "prior_components"):
        require(cfg[name] >= 0, f"--{name}={cfg[name]} must be zero or positive")
    require(cfg["prior_draws"] == 0 or cfg["prior_draws"] >= 2,
            f"--prior_draws={cfg['prior_draws']} must be 0 (as many as the batch) or at least 2")
    require(0 <= cfg["min_lr_ratio"] <= 1, f"--min_lr_ratio={cfg['min_lr_ratio']} must be between 0 and 1")
    require(0 <= cfg["ema_decay"] < 1, f"--ema_decay={cfg['ema_decay']} must be at least 0 and below 1")
    require(cfg["batch_size"] >= 2, "--batch_size must be at least 2: the MMD compares codes within a batch")
    for name, choices in (("dataset", data.DATASETS), ("kernel", KERNELS), ("recon_loss", ("bce", "mse")),
                          ("precision", ("auto", "bf16", "fp32")), ("mmd_estimator", ESTIMATORS)):
        require(cfg[name] in choices, f"unknown {name} {cfg[name]!r}; choose one of {', '.join(choices)}")
    require(cfg["kl_weight"] == 0 or cfg["stochastic_encoder"],
            "--kl_weight > 0 needs a Gaussian encoder: add --stochastic_encoder=True")
    parse_scales(cfg["kernel_scales"])
    parse_scales(cfg["pixel_kernel_scales"], "pixel_kernel_scales")


def compute_loss(model, x, cfg, critics=None, gather=None):
    """(total loss, {"recon", "mmd", "kl", *hybrid.TERMS, "logits"}) for a batch x in [0, 1], each term per
    image; "logits" are the reconstruction's pre-sigmoid pixels. critics: the hybrid preset's (make_model's).
    gather: under torchrun, distributed.gather_codes: the MMD is over the codes of the whole global batch."""
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
    terms = {"recon": recon, "mmd": mmd_term, "kl": kl, **dict.fromkeys(hybrid.TERMS, zero)}
    if hybrid.in_use(cfg):  # the hybrid preset's terms (hybrid.py), each with its weight
        terms.update(hybrid.terms(getattr(model, "module", model), critics, x, z, cfg,
                                  parse_scales(cfg["pixel_kernel_scales"], "pixel_kernel_scales"), gather))
        for weight in hybrid.WEIGHTS:
            loss = loss + cfg[weight] * terms[weight.removesuffix("_weight")]
    return loss, {**terms, "logits": logits}


@torch.no_grad()
def test_metrics(model, images, cfg, critics=None, batch_size=1000):
    """Mean loss terms and the reconstructions' per-pixel MSE on `images`, in the run's precision."""
    model.eval()
    totals = {}
    for start in range(0, len(images), batch_size):
        x = data.to_float(images[start:start + batch_size])
        with speed.autocast_to(images.device, speed.autocast_dtype(images.device, cfg["precision"])):
            loss, terms = compute_loss(model, x, {**cfg, "mmd_estimator": "unbiased"}, critics)
        x_hat = torch.sigmoid(terms.pop("logits")).float()
        for k, v in {"loss": loss, **terms, "mse": F.mse_loss(x_hat, x, reduction="sum") / x.numel()}.items():
            totals[k] = totals.get(k, 0.0) + v.item() * x.shape[0]
    model.train()
    return {k: v / len(images) for k, v in totals.items()}


def lr_at(step, total_steps, cfg):
    """With lr_decay, a cosine from lr at the start to min_lr_ratio * lr at the end; else lr throughout."""
    floor, progress = cfg["min_lr_ratio"], min(step / max(total_steps, 1), 1.0)
    cosine = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg["lr"] * (cosine if cfg["lr_decay"] else 1)


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
    """step(x, lr) -> tensor [loss, *TERMS]: one optimisation step on batch x; on CUDA (cuda_graph=True)
    replayed as one CUDA graph (speed.cuda_graph_step)."""
    amp_dtype = speed.autocast_dtype(device, cfg["precision"])
    use_graph = cfg["cuda_graph"] and device.type == "cuda"

    def eager(x):
        with speed.autocast_to(device, amp_dtype, cache_enabled=not use_graph):
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

    if use_graph:
        params = [*model.parameters(), *(critics.parameters() if critics else [])]
        return speed.cuda_graph_step(eager, params, optimizer, cfg["batch_size"], device) or eager_step
    return eager_step


def resolve_precision(cfg, device, world_size=1):
    """speed.resolve_precision, timing this run's own forward and backward pass where --precision=auto."""
    def make_pass():
        model, critics = make_model(cfg, device)
        x = torch.rand(cfg["batch_size"], 1, 28, 28, device=device)  # the global batch: a rank's can be 1

        def one_pass(dtype):
            with speed.autocast_to(device, dtype):
                loss, terms = compute_loss(model, x, cfg, critics)
            backward_target(loss, terms, critics).backward()
            for module in (model, critics):
                module.zero_grad(set_to_none=True)
        return one_pass
    return speed.resolve_precision(cfg["precision"], device, make_pass, world_size)


@torch.no_grad()
def update_average(averaged, model, decay, step):
    """`averaged` one step (from 0) further into `model`'s moving average, with Adam's bias correction."""
    share = (1 - decay) / (1 - decay ** (step + 1))
    torch._foreach_lerp_(list(averaged.parameters()), list(model.parameters()), share)  # one kernel for all


def read_config(argv):
    """(config, the names the command line set): argv's preset files first, then its --flags; "preset" names
    the files ("" for none), for the checkpoint."""
    preset_values, presets, flags = cli.read_presets(argv, DEFAULTS, "train.py")
    cfg, given = cli.parse_overrides({**DEFAULTS, **preset_values}, flags, "train.py")
    validate(cfg)
    return {**cfg, "preset": ",".join(presets)}, given | set(preset_values)


def main(argv):
    cfg, given = read_config(argv)
    rank, world_size, device = distributed.setup(cfg)
    master = rank == 0  # the one rank (process) that writes files and prints
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    if cfg["resume"]:
        checkpoint.require_file(ckpt_path)  # before the lock makes the folder
    # Rank 0 locks the run folder before anything in it is read or written.
    advice = "wait for it to end, train into another --out_dir, or stop that process"
    lock, refused = cli.RunLock.attempt(cfg["out_dir"], advice, "--out_dir=") if master else (None, "")
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    handlers = {s: signal.getsignal(s) for s in cli.StopRequest.SIGNALS}  # train's StopRequest replaces them
    try:
        refused = distributed.share_from_rank0(refused, world_size)  # every rank stops with rank 0's line
        require(not refused, refused)
        saved = checkpoint.load(ckpt_path) if cfg["resume"] else None
        if saved is not None:
            cfg = checkpoint.resume_config(saved["config"], cfg, given, DEFAULTS, verbose=master)
            validate(cfg)
        require(saved or cfg["overwrite"] or not os.path.exists(ckpt_path), f"{ckpt_path} already exists: "
                "continue it with --resume=True, start a new run with another --out_dir, or replace it with "
                "--overwrite=True")
        distributed.check_divides(cfg["batch_size"], world_size)  # the checkpoint's batch size, on resume
        speed.settings(device, cfg["deterministic"])
        if master:
            cli.check_writable(cfg["out_dir"])
            cli.remove_stale_temporaries(cfg["out_dir"])
            data.ensure_files(cfg["dataset"], cfg["data_dir"])
        if world_size > 1:
            dist.barrier()  # the other ranks load the data once rank 0 has it in place
        train(cfg, saved, rank, world_size, device)
    except RuntimeError as e:
        distributed.check_other_ranks(e, rank, world_size, ckpt_path)  # a failed collective: a one-line error
        raise
    finally:
        for s, handler in handlers.items():  # called from Python (a notebook, the tests), Ctrl-C works again
            signal.signal(s, handler)
        if world_size > 1:
            dist.destroy_process_group()
        if lock is not None:
            lock.release()


def train(cfg, saved, rank, world_size, device):
    master = rank == 0
    torch.manual_seed(cfg["seed"])  # the same on every rank: the same initial weights and prior draws
    splits = data.load(cfg["dataset"], cfg["data_dir"], device)
    train_images, test_images = splits["train"][0], splits["test"][0]
    steps_per_epoch = len(train_images) // cfg["batch_size"]
    require(steps_per_epoch > 0, f"--batch_size={cfg['batch_size']} is larger than the training set")
    if cfg["prior_components"]:
        prior.check_components(cfg["prior_components"], len(train_images))
    precision, speedup = resolve_precision(cfg, device, world_size)
    cfg = {**cfg, "precision": precision}  # resolved: the checkpoint records it for a resumed run
    total_steps = min(cfg["epochs"] * steps_per_epoch, cfg["max_steps"] or math.inf)
    model, critics = make_model(cfg, device)
    optimizer = make_optimizer(model, critics, cfg, device)
    # The weights that draw the samples: the last ones, or (ema_decay > 0) their exponential moving average
    # (Yazici et al., "The Unusual Effectiveness of Averaging in GAN Training", ICLR 2019).
    averaged = copy.deepcopy(model).requires_grad_(False) if cfg["ema_decay"] else model
    sums = 1 + len(TERMS)  # the epoch's running sums of [loss, *TERMS]
    r = checkpoint.TrainingState(cfg, model, averaged, critics, optimizer, sums, rank, world_size, device)
    log_path, log_rows = os.path.join(cfg["out_dir"], "log.csv"), []
    if saved is not None:
        r.restore(saved, steps_per_epoch)
        log_rows = [row for row in runlog.read(log_path) if int(row["step"]) <= r.step]  # the rest is redone
        was = saved.get("world_size", 1)
        if master:
            print(f"resumed from {r.path} at epoch {r.epoch + 1}, step {r.step}"
                  + (f" (saved by {was} ranks, now {world_size})" if was != world_size else ""))
    # DDP averages the gradients over ranks; `model` stays the plain module for evaluation and checkpoints.
    ddp_model = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None) if world_size > 1 else model
    loss_fn = functools.partial(compute_loss, gather=distributed.gather_codes if world_size > 1 else None)
    # Not under torchrun: DDP's all-reduce and the gather would need capturing, with NCCL settings unmeasured.
    use_graph = cfg["cuda_graph"] and device.type == "cuda" and world_size == 1
    train_step = make_train_step(ddp_model, optimizer, {**cfg, "cuda_graph": use_graph}, device, loss_fn,
                                 critics, world_size)
    if master:
        num_params = sum(p.numel() for module in (model, critics) for p in module.parameters())
        ranks = f", {world_size} ranks of {cfg['batch_size'] // world_size} images" if world_size > 1 else ""
        mode = speed.precision_name(device, precision, speedup) + (", CUDA graph" if use_graph else "")
        print(f"training on {device} ({mode}{ranks}): {num_params / 1e6:.2f}M parameters, {total_steps} "
              f"steps ({steps_per_epoch} per epoch), output in {cfg['out_dir']}/")
    fixed_noise = torch.randn(64, cfg["latent_dim"], generator=torch.Generator().manual_seed(cfg["seed"]))
    stop = cli.StopRequest()
    started, first_step = time.time(), r.step  # for the time left, from this process's own pace
    while r.step < total_steps:
        train_epoch(r, train_step, train_images, total_steps, steps_per_epoch, stop)
        means = sync(r, r.running / r.epoch_step, stop)
        # Every rank evaluates (the test MMD's prior draws keep all ranks' random streams in step). A run that
        # max_steps ends mid-epoch puts its random state back: resumed, it draws what an uncapped run draws.
        before_test = checkpoint.rng_states(device) if r.epoch_step < steps_per_epoch else None
        test = test_metrics(averaged, test_images, cfg, critics)
        if before_test is not None:
            checkpoint.set_rng_states(before_test, device)
        seconds = time.time() - started
        log_rows.append(runlog.row(r.epoch + r.epoch_step / steps_per_epoch, r.step, seconds,
                                   dict(zip(("loss", *TERMS), means)), test))
        if master:
            runlog.write(log_path, log_rows, TERMS)
            print(runlog.epoch_line(r.epoch + 1, shown_terms(means, cfg), test, seconds,
                                    seconds / max(r.step - first_step, 1) * (total_steps - r.step)))
            with torch.no_grad():
                cli.save_grid(averaged.eval().decode(fixed_noise.to(device)),
                          os.path.join(cfg["out_dir"], f"samples_epoch{r.epoch + 1}.png"))
            model.train()
        if r.epoch_step == steps_per_epoch:  # a whole epoch (a max_steps cap can end one early)
            r.epoch, r.epoch_step = r.epoch + 1, 0
            r.running.zero_()
        save(r)
    finish(r, train_images, log_rows, started)


def train_epoch(r, train_step, train_images, total_steps, steps_per_epoch, stop):
    """Steps until the epoch ends (or the run's last step), adding each step's [loss, *TERMS] to r.running."""
    cfg, rank_batch = r.cfg, r.cfg["batch_size"] // r.world_size
    my_slice = slice(r.rank * rank_batch, (r.rank + 1) * rank_batch)  # this rank's part of a batch
    batches = data.batch_order(len(train_images), cfg["batch_size"], cfg["seed"], r.epoch)[:, my_slice]
    batches = batches.to(r.device)
    last = min(steps_per_epoch, r.epoch_step + total_steps - r.step)
    with tqdm(desc=f"epoch {r.epoch + 1}/{cfg['epochs']}", initial=r.epoch_step, total=steps_per_epoch,
              leave=False, dynamic_ncols=True, mininterval=1.0, disable=not r.master) as bar:
        while r.epoch_step < last:
            x = data.to_float(train_images[batches[r.epoch_step]])
            losses = train_step(x, lr_at(r.step, total_steps, cfg))  # [loss, *TERMS]
            if r.averaged is not r.model:
                update_average(r.averaged, r.model, cfg["ema_decay"], r.step)
            r.running += losses  # summed on the device: reading a value back would stall the GPU every step
            r.step, r.epoch_step = r.step + 1, r.epoch_step + 1
            bar.update(1)
            if r.step % cfg["log_interval"] == 0:  # the loss and at most 3 terms: the bar fits 100 columns
                shown = list(shown_terms(sync(r, losses, stop), cfg).items())
                bar.set_postfix(dict(shown[:4]), refresh=False)
            if cfg["ckpt_interval"] and r.step % cfg["ckpt_interval"] == 0:
                save(r)


def check_finite(r, loss):
    if not math.isfinite(loss):
        weights = ", ".join(f"{w}={r.cfg[w]}" for w in dict.fromkeys(TERM_WEIGHTS.values()) if r.cfg[w])
        raise UserError(f"training diverged: the loss or the weights became {loss} by step {r.step}; "
                        f"{r.path} (if any) holds the last good checkpoint. Lower --lr (now {r.cfg['lr']}) "
                        f"or the loss weights ({weights})")


def save(r, **extra):
    """Every rank calls this at the same step; rank 0 writes. Never weights that a step turned to NaN (even
    when its own loss was finite)."""
    running = distributed.mean_over_ranks(r.running, r.world_size)
    if not r.weights_finite():
        check_finite(r, math.nan)
    r.save(running, **extra)


def sync(r, losses, stop):
    """[loss, *TERMS] averaged over ranks; stops every rank if any was asked to stop or diverged."""
    asked = losses.new_tensor([float(stop.signum is not None)])
    *means, asked = distributed.mean_over_ranks(torch.cat([losses, asked]), r.world_size).tolist()
    check_finite(r, means[0] if all(map(math.isfinite, means)) else math.nan)  # the critic's loss too
    if asked:
        signum = stop.signum or signal.SIGTERM  # torchrun forwards a signal to every rank; one is enough
        save(r)
        if r.master:
            print(f"\n{signal.Signals(signum).name}: stopped at step {r.step}, checkpoint saved to {r.path}; "
                  f"resume: python train.py --out_dir={r.cfg['out_dir']} --resume=True", file=sys.stderr)
        sys.exit(128 + signum)
    return means


def finish(r, train_images, log_rows, started):
    """The ex-post prior, fitted once by rank 0 to the weights that draw the samples; the loss plot."""
    cfg = r.cfg
    if components := cfg["prior_components"]:
        fitted = prior.fit(r.averaged, train_images, components, cfg["seed"]) if r.master else None
        save(r, prior=fitted)
        if r.master:
            print(f"ex-post prior: {components} Gaussians fitted to the train codes in "
                  f"{fitted['seconds']:.1f}s ({fitted['iterations']} EM iterations)")
    if r.master:
        if log_rows:
            runlog.plot(log_rows, os.path.join(cfg["out_dir"], "losses.png"))
        print(f"done in {time.time() - started:.0f}s: {r.path}; draw samples with "
              f"`python sample.py --out_dir={cfg['out_dir']}` (add --prior=gmm for the ex-post prior)")


# The weight that switches each term on; recon is always on.
TERM_WEIGHTS = {"mmd": "mmd_weight", "kl": "kl_weight", **hybrid.TERM_WEIGHTS}


def shown_terms(values, cfg):
    """{name: value as text} of the loss and the terms whose weights are above 0, from [loss, *TERMS]."""
    return {name: f"{value:.2e}" if "mmd" in name else f"{value:.2f}"  # the MMDs are ~1e-3
            for name, value in zip(("loss", *TERMS), values) if cfg.get(TERM_WEIGHTS.get(name), 1) > 0}


if __name__ == "__main__":
    run(main)
