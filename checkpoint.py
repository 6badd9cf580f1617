"""Checkpoints: one dict, written atomically, read without running any pickled code.

A checkpoint holds: model (state_dict), model_args (to rebuild MMDVAE), config
(every hyperparameter of the run), optimizer, epoch and step, and the RNG states
that make a resumed run continue exactly where it stopped.

Writing goes to a temporary file in the same folder, fsync, then os.replace: a kill
at any moment leaves the previous checkpoint intact. Reading uses
torch.load(weights_only=True), which refuses pickles that would call arbitrary code.
"""
import os
import pickle
import random
import warnings
import zipfile

import numpy as np
import torch

from cli import UserError, atomic_write
from model import MMDVAE

FORMAT = "mmd-vae-checkpoint-v1"
REQUIRED = ("format", "model", "model_args", "config")


def save(path, checkpoint):
    with atomic_write(path) as tmp:
        torch.save({"format": FORMAT, **checkpoint}, tmp)


def load(path, device="cpu"):
    """The checkpoint dict at `path`, or a UserError saying what is wrong with the file."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; train one first with `python train.py`, or point to another file")
    try:
        with warnings.catch_warnings():  # a foreign pickle protocol warns before it fails; the error says it all
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # weights_only met a function or class to import: this file would run code
            raise UserError(f"{path} was refused: loading it would import and run code, which a checkpoint from "
                            f"train.py never does. Use only checkpoints you made or trust") from None
        raise UserError(f"{path} is not a readable checkpoint (truncated or corrupt); retrain, or restore it "
                        f"from a backup") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable checkpoint (truncated or corrupt: {str(e).splitlines()[0][:80]}); "
                        f"retrain, or restore it from a backup") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT or not all(k in checkpoint for k in REQUIRED):
        raise UserError(f"{path} is not an MMD-VAE checkpoint from train.py; pass a ckpt.pt written by train.py")
    return checkpoint


def load_model(path, device="cpu"):
    """(model in eval mode on `device`, checkpoint dict)."""
    checkpoint = load(path, device)
    try:
        model = MMDVAE(**checkpoint["model_args"])
        model.load_state_dict(checkpoint["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} does not match this version of model.py ({str(e).splitlines()[0][:100]}); "
                        f"retrain with `python train.py`") from None
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
