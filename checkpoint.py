"""Checkpoints: one dict, written atomically, read without running any pickled code.

A checkpoint holds: model (the state_dict to sample from; with ema_decay, the moving average,
and train_model the last weights), model_args (to rebuild MMDVAE), config
(every hyperparameter of the run), optimizer, epoch and step, and the RNG states
that make a resumed run continue exactly where it stopped; a hybrid run's also holds
critics (hybrid.py). Checkpoints from before the critics had a module of their own
read as if written today (split_legacy_critics).

Writing goes to a temporary file in the same folder, fsync, then os.replace: a kill
at any moment leaves the previous checkpoint intact. Reading uses
torch.load(weights_only=True), which refuses pickles that would call arbitrary code.
"""
import os
import pickle
import random
import warnings

import numpy as np
import torch

from cli import UserError, atomic_write, first_line
from model import MMDVAE

FORMAT = "mmd-vae-checkpoint-v1"


def save(path, checkpoint):
    with atomic_write(path) as tmp:
        torch.save({"format": FORMAT, **checkpoint}, tmp)


def require_file(path):
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; train one first with `python train.py`, or point to "
                        "another file")


def load(path, device="cpu"):
    """The checkpoint dict at `path`, or a UserError saying what is wrong with the file.

    Whatever the file holds (text, random bytes, a truncated or foreign zip, a tensor, a
    dict with keys missing or of the wrong type), the answer is one line."""
    require_file(path)
    try:
        # a foreign pickle protocol warns before it fails; the error says it all
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # weights_only met a function or class to import: this file would run code
            raise UserError(f"{path} was refused: loading it would import and run code, which a checkpoint "
                            "from train.py never does. Use only checkpoints you made or trust") from None
        raise UserError(f"{path} is not a readable checkpoint (truncated or corrupt); retrain, or restore it "
                        f"from a backup") from None
    except Exception:
        # the unpickler and the zip reader fail in many ways, none of them telling, on such bytes
        raise UserError(f"{path} is not a readable checkpoint (truncated or corrupt, or not written by "
                        "torch.save); "
                        f"retrain, or restore it from a backup") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise UserError(f"{path} is not an MMD-VAE checkpoint from train.py; pass a ckpt.pt "
                        "written by train.py")
    problem = malformed(checkpoint)
    if problem:
        raise UserError(f"{path} is a damaged checkpoint ({problem}); retrain, or restore it from a backup")
    return split_legacy_critics(checkpoint)


# Until December 2026 the hybrid's critics lived inside MMDVAE: model_args said which there were, and their
# weights sat under these names in model and train_model.
LEGACY_CRITIC_ARGS = ("critic", "latent_critic", "critic_hidden", "critic_channels")
CRITIC_NAMES = ("critic", "latent_critic")


def split_legacy_critics(checkpoint):
    """An old hybrid checkpoint in today's layout: the MMDVAE's weights alone in model and train_model, the
    critics' under "critics" (their last weights: the moving average of a critic was never used)."""
    if not any(k in checkpoint["model_args"] for k in LEGACY_CRITIC_ARGS):
        return checkpoint
    checkpoint["model_args"] = {k: v for k, v in checkpoint["model_args"].items()
                                if k not in LEGACY_CRITIC_ARGS}
    kept = [key for key in ("model", "train_model") if isinstance(checkpoint.get(key), dict)]
    critics = {k: v for k, v in checkpoint[kept[-1]].items() if k.split(".")[0] in CRITIC_NAMES}
    for key in kept:
        checkpoint[key] = {k: v for k, v in checkpoint[key].items() if k.split(".")[0] not in CRITIC_NAMES}
    if critics:
        checkpoint["critics"] = critics
    return checkpoint


# What the readers of a checkpoint rely on, and the type each must have.
FIELDS = {"model": dict, "model_args": dict, "config": dict}
CONFIG_FIELDS = {"dataset": str, "data_dir": str, "seed": int}
PRIOR_FIELDS = ("weights", "means", "scale_tril")


def malformed(checkpoint):
    """What is wrong with a loaded checkpoint dict, or "" when sample.py and evaluate.py can use it."""
    for key, kind in FIELDS.items():
        if not isinstance(checkpoint.get(key), kind):
            found = type(checkpoint.get(key)).__name__ if key in checkpoint else "missing"
            return f"{key} is {found}, not a {kind.__name__}"
    for key, kind in CONFIG_FIELDS.items():
        if type(checkpoint["config"].get(key)) is not kind:
            return f"config[{key!r}] is missing or not a {kind.__name__}"
    for name, tensor in checkpoint["model"].items():
        if not torch.is_tensor(tensor):
            return f"weight {name!r} is a {type(tensor).__name__}, not a tensor"
        if tensor.is_floating_point() and not tensor.isfinite().all():
            return f"weight {name!r} holds NaN or inf, so every image it draws would be blank"
    return ""


def prior_problem(gmm, latent_dim):
    """What is wrong with a checkpoint's ex-post prior (prior.py), or "" if it can be sampled."""
    tensors = [gmm.get(k) if isinstance(gmm, dict) else None for k in PRIOR_FIELDS]
    if not all(torch.is_tensor(t) and t.is_floating_point() and t.isfinite().all() for t in tensors):
        return "is not finite tensors"
    weights, means, scale_tril = tensors
    k = len(means) if means.dim() == 2 else 0
    if k == 0 or weights.shape != (k,) or scale_tril.shape != (k, latent_dim, latent_dim) \
            or means.shape[1] != latent_dim or (weights < 0).any() or weights.sum() <= 0:
        return f"does not fit {latent_dim}-dimensional codes"
    return ""


def load_model(path, device="cpu", check_prior=True):
    """(model in eval mode on `device`, checkpoint dict). check_prior=False: the prior will be refitted."""
    checkpoint = load(path, device)
    try:
        model = MMDVAE(**checkpoint["model_args"])
        model.load_state_dict(checkpoint["model"])
    except Exception as e:  # unknown or mistyped arguments, missing or misshapen weights
        raise UserError(f"{path} does not match this version of model.py ({first_line(e)}); "
                        f"retrain with `python train.py`") from None
    checked = check_prior and "prior" in checkpoint
    problem = prior_problem(checkpoint["prior"], model.latent_dim) if checked else ""
    if problem:
        raise UserError(f"{path}: its ex-post prior {problem}; refit it with "
                        f"`python sample.py --fit_prior --checkpoint={path}`")
    return model.to(device).eval(), checkpoint


def rng_states(device=torch.device("cpu")):
    """Every random number generator a training run on `device` draws from, in a weights_only-safe form.

    On CUDA that is the generator of the run's own GPU (under torchrun, each rank's), stored
    first, so that any rank of a resumed run (on any GPU) continues from it."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def set_rng_states(states, device=torch.device("cpu")):
    torch.set_rng_state(states["torch"])
    if states["cuda"] and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"][0], device)
    keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


# What a checkpoint saved before an option existed was trained with. Listed even where that is today's
# default, so that a later default cannot change how an old checkpoint resumes. Checkpoints from before the
# MMD-VAE became the default (December 2026) hold every option of the hybrid.
BEFORE_OPTIONS = {"pixel_mmd_weight": 0.0, "adv_weight": 0.0, "latent_adv_weight": 0.0, "critic_hidden": 0,
                  "ema_decay": 0.0, "critic_channels": 0, "prior_draws": 0}
DAMAGED = "start afresh with --overwrite=True, or restore it from a backup"


# Options a resumed run may change; the rest define the model and its loss.
SAFE_ON_RESUME = {"out_dir", "data_dir", "resume", "overwrite", "ckpt_interval", "log_interval", "epochs",
                  "max_steps", "device", "precision", "cuda_graph", "deterministic", "prior_components"}


def resume_config(saved, cfg, given, defaults, verbose=True):
    """The checkpoint's config `saved`, with only the command's changes (`given`) that are safe applied."""
    for k, v in saved.items():
        if k in defaults:  # not "preset", or an option this version no longer has
            if type(v) is not type(defaults[k]):
                raise UserError(f"the checkpoint's config has {k}={v!r}, not a {type(defaults[k]).__name__}: "
                                f"it is damaged; {DAMAGED}")
    if not isinstance(saved.get("preset", ""), str):
        raise UserError(f"the checkpoint's config has a preset that is not text: it is damaged; {DAMAGED}")
    merged = {**defaults, **BEFORE_OPTIONS, **{k: v for k, v in saved.items() if k in defaults},
              "preset": saved.get("preset", "")}
    # Where the run is and what this machine computes on are the command's, not the checkpoint's.
    merged["out_dir"], merged["device"] = cfg["out_dir"], cfg["device"]
    for name in sorted(given):
        if cfg[name] == merged[name]:
            continue
        if name not in SAFE_ON_RESUME:
            raise UserError(f"--{name}={cfg[name]} differs from the checkpoint's {name}={merged[name]!r}; a "
                            f"resumed run keeps its model and loss: drop --{name}, or start a new run with "
                            f"another --out_dir")
        if verbose:
            print(f"resume: {name} changed from {merged[name]!r} to {cfg[name]!r}")
        merged[name] = cfg[name]
    return merged


class TrainingState:
    """What train.py's loop advances and a checkpoint saves: the modules, Adam, the counters and the epoch's
    running sums of [loss, *terms]. `averaged` draws the samples: the last weights (`model` itself) or
    their moving average; the checkpoint's "model" holds it, "train_model" the last weights."""

    def __init__(self, cfg, model, averaged, critics, optimizer, sums, rank, world_size, device):
        self.cfg, self.model, self.averaged, self.critics = cfg, model, averaged, critics
        self.optimizer = optimizer
        self.rank, self.master, self.world_size, self.device = rank, rank == 0, world_size, device
        self.path = os.path.join(cfg["out_dir"], "ckpt.pt")
        self.step, self.epoch, self.epoch_step = 0, 0, 0
        self.running = torch.zeros(sums, device=device)

    def weights_finite(self):
        modules = (self.model, self.critics)
        return bool(torch.stack([p.isfinite().all() for m in modules for p in m.parameters()]).all())

    def save(self, running, **extra):
        """Rank 0 writes; `running` is the sums averaged over ranks."""
        if self.master:
            save(self.path, {
                "model": self.averaged.state_dict(),
                **({"train_model": self.model.state_dict()} if self.averaged is not self.model else {}),
                **({"critics": self.critics.state_dict()} if self.critics else {}),
                "model_args": self.model.model_args, "config": self.cfg,
                "optimizer": self.optimizer.state_dict(),
                "step": self.step, "epoch": self.epoch, "epoch_step": self.epoch_step, "running": running,
                "rng": rng_states(self.device), "world_size": self.world_size, **extra})

    def restore(self, saved, steps_per_epoch):
        """Back where `saved` left off: weights, Adam, counters, running sums and random states."""
        try:
            self.model.load_state_dict(saved["model" if self.averaged is self.model else "train_model"])
            self.averaged.load_state_dict(saved["model"])
            if self.critics:
                self.critics.load_state_dict(saved["critics"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.step, self.epoch, self.epoch_step = (int(saved[k]) for k in ("step", "epoch", "epoch_step"))
            running, size = saved["running"].to(self.device).reshape(-1), len(self.running)
            # Saved before the later terms existed (4 sums before the pixel MMD, 5 before the critic, 7 before
            # the latent critic): theirs are 0.
            if len(running) not in (4, 5, 7, size):
                raise ValueError(f"{len(running)} running sums")
            self.running = torch.cat([running, running.new_zeros(size - len(running))])
            set_rng_states(saved["rng"], self.device)
            if not (0 <= self.epoch_step <= steps_per_epoch and self.step >= 0
                    and self.running.isfinite().all()):
                raise ValueError("counters out of range")
        except Exception as e:
            # a checkpoint from elsewhere, or damaged: the weights load but the rest does not
            raise UserError(f"cannot resume from {self.path}: its training state is damaged "
                            f"({first_line(e)}); {DAMAGED}") from None
