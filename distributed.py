"""What train.py needs under torchrun: each rank's device, the global batch's codes, one rank's answer
shared with all, and a failed collective told apart from a bug. Plain `python train.py` is rank 0 of 1.
"""
import os
import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from cli import UserError, first_line, pick_device, require

# PyTorch 2.14 marks this gather deprecated in favour of a private module; the public one is documented
# across PyTorch 2.x (the GPU machines run 2.11) and computes the same thing.
warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather is deprecated", FutureWarning)


def check_divides(batch_size, world_size):
    require(batch_size % world_size == 0,
            f"--batch_size={batch_size} does not divide into {world_size} ranks; batch_size is the "
            "global batch: "
            f"make it a multiple of {world_size}, or change --nproc_per_node")


def setup(cfg):
    """(rank, world_size, device). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    # before any rank waits for another: every rank exits at once
    check_divides(cfg["batch_size"], world_size)
    device = pick_device(cfg["device"])
    if world_size > 1:
        require(device.type in ("cpu", "cuda"), f"torchrun needs --device=cpu or cuda, not {device.type}")
        if device.type == "cuda":  # one GPU per rank
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    return rank, world_size, device


def gather_codes(z):
    """Every rank's codes, in rank order: the global batch's codes, as one process has them.

    MMD^2 of the whole batch is not the mean of per-rank MMD^2s (those are a noisier estimator: fewer
    pairs). The gather carries gradients: each rank gets the sum over ranks of d(MMD)/d(its codes),
    which DDP's averaging turns into exactly the one-process gradient."""
    return torch.cat(dist_fn.all_gather(z))


def mean_over_ranks(values, world_size):
    """`values` averaged over ranks: one all-reduce, so that every rank acts alike."""
    if world_size == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / world_size


def share_from_rank0(text, world_size):
    """Rank 0's `text` on every rank (one broadcast under torchrun)."""
    if world_size == 1:
        return text
    shared = [text]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def check_other_ranks(error, rank, world_size, ckpt_path):
    """A UserError where `error` is a collective that failed because another rank died (torchrun is
    stopping this one too); nothing for any other error, which is a bug and keeps its traceback."""
    if world_size == 1 or not (isinstance(error,
                                          dist.DistError) or "gloo" in str(error) or "NCCL" in str(error)):
        return
    reason = first_line(error, 1000).split("] ", 1)[-1].split(". ")[0][:100]  # past gloo's "[file:line] "
    raise UserError(f"rank {rank}: another rank stopped ({reason}); {ckpt_path} holds the last checkpoint: "
                    f"continue with --resume=True", every_rank=True) from None
