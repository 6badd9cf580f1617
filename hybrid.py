"""The hybrid preset's extra terms and its two critics (config/hybrid.py): not part of the MMD-VAE.

train.py calls this file only when one of their weights is above 0:
  pixel_mmd_weight   MMD^2 between decoded N(0, I) draws and the batch's images, in pixel space
                     (Li, Swersky & Zemel, "Generative Moment Matching Networks", 2015);
  adv_weight         a critic on decoded N(0, I) draws, against the batch's images (a DCGAN-style
                     discriminator, Radford et al., 2016; non-saturating loss, Goodfellow et al., 2014);
  latent_adv_weight  a critic on the codes, against N(0, I) draws: InfoVAE's adversarial divergence, or the
                     discriminator of adversarial autoencoders (Makhzani et al., 2015).
Why they exist: the latent MMD leaves prior mass between the codes' clusters, where the decoder draws blends
(docs/prior_gap.md). The critics are modules of their own, kept in the checkpoint's "critics"; sampling never
uses them.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mmd import mmd

# The hybrid's options, with their defaults (every term off): train.py takes them as its own, so that
# `python train.py --adv_weight=20` and config/hybrid.py set them as they set any other.
OPTIONS = dict(
    pixel_mmd_weight=0.0,          # weight of MMD^2(decoded N(0, I) draws, the batch's images) in pixel space
    pixel_kernel_scales="3,10,30",  # its bandwidths in squared pixel distance (two digits lie ~100 apart)
    adv_weight=0.0,                # weight of a critic's non-saturating GAN loss on decoded N(0, I) draws
    # a fully connected layer of this many units before the critic's logit; 0 = none
    critic_hidden=128,
    critic_channels=0,             # the critic's conv widths are critic_channels and twice that; 0 = channels
    critic_lr=5e-4,                # the critic's Adam learning rate at the start (betas 0.5, 0.999, as DCGAN)
    # weight of a latent critic's GAN loss on the codes (InfoVAE's adversarial term)
    latent_adv_weight=0.0,
    latent_critic_lr=5e-4,         # the latent critic's Adam learning rate at the start (betas 0.5, 0.999)
)
# Each critic, as the checkpoint names it: the options of its weight and of its learning rate.
CRITICS = {"critic": ("adv_weight", "critic_lr"), "latent_critic": ("latent_adv_weight", "latent_critic_lr")}
WEIGHTS = ("pixel_mmd_weight", "adv_weight", "latent_adv_weight")
# The loss terms this file adds (each maker's loss, then each critic's own), as train.py logs them.
TERMS = ("pixel_mmd", "adv", "critic", "latent_adv", "latent_critic")
# The weight that switches each term on (a critic's own loss goes with its maker's).
TERM_WEIGHTS = {"pixel_mmd": "pixel_mmd_weight", "adv": "adv_weight", "critic": "adv_weight",
                "latent_adv": "latent_adv_weight", "latent_critic": "latent_adv_weight"}


def in_use(cfg):
    """Whether a run needs this file at all: the MMD-VAE (every weight 0) does not."""
    return any(cfg[weight] > 0 for weight in WEIGHTS)


def critic_width(channels, critic_channels):
    """The image critic's first width (the second's is twice it): critic_channels or channels."""
    return critic_channels or channels


def image_critic(channels, hidden):
    """A logit per image: real digit (> 0) or decoded prior draw (< 0). The encoder's convolutions, then one
    linear layer (DCGAN's discriminator, LeakyReLU slope 0.2), or with hidden > 0 a fully connected layer of
    that width first, which sees the whole digit at once."""
    head = [nn.Linear(2 * channels * 7 * 7, hidden), nn.LeakyReLU(0.2)] if hidden else []
    return nn.Sequential(
        nn.Conv2d(1, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Flatten(), *head, nn.Linear(hidden or 2 * channels * 7 * 7, 1),
    )


def latent_critic(latent_dim, hidden):
    """A logit per code: drawn from N(0, I) (> 0) or encoded from an image (< 0); an MLP, `hidden` wide."""
    return nn.Sequential(
        nn.Linear(latent_dim, hidden), nn.LeakyReLU(0.2),
        nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
        nn.Linear(hidden, 1),
    )


def make_critics(cfg, device):
    """nn.ModuleDict of the critics whose weights are above 0 (empty for the MMD-VAE), built after the model,
    so that a run draws the initial weights it drew when the critics lived inside it."""
    critics = nn.ModuleDict()
    if cfg["adv_weight"] > 0:
        critics["critic"] = image_critic(critic_width(cfg["channels"], cfg["critic_channels"]),
                                         cfg["critic_hidden"])
    if cfg["latent_adv_weight"] > 0:
        critics["latent_critic"] = latent_critic(cfg["latent_dim"], cfg["hidden"])
    return critics.to(device)


def terms(vae, critics, x, z, cfg, scales, gather=None):
    """{name: term} for TERMS, per image. `vae` is the plain MMDVAE, `z` the batch's float32 codes (gathered
    from every rank under torchrun), `scales` the pixel kernel's bandwidths. Terms whose weight is 0 are 0.

    A maker's term reaches only the maker (decoder or encoder); a critic's own loss only that critic
    (adversarial), so one backward pass of the total plus both critics' losses trains every side."""
    zero = z.new_zeros(())
    out = dict.fromkeys(TERMS, zero)
    if cfg["pixel_mmd_weight"] > 0 or cfg["adv_weight"] > 0:
        drawn = decode_prior_draws(vae, z.shape[0], gather)
        if cfg["pixel_mmd_weight"] > 0:
            out["pixel_mmd"] = pixel_mmd(drawn, x, scales, cfg["mmd_estimator"], gather)
        if cfg["adv_weight"] > 0:
            out["adv"], out["critic"] = adversarial(critics["critic"], drawn, x.float())
    if cfg["latent_adv_weight"] > 0:
        # The encoder learns to make its codes pass for prior draws. In float32, as the MMD.
        with torch.autocast(z.device.type, enabled=False):
            out["latent_adv"], out["latent_critic"] = adversarial(critics["latent_critic"], z,
                    torch.randn_like(z))
    return out


def decode_prior_draws(vae, global_batch, gather=None):
    """As many decoded N(0, I) draws as the (global) batch has images, as this rank's (N, 1, 28, 28) float32
    share. Under torchrun every rank draws the whole batch's draws (the same on every rank) and decodes its
    slice."""
    draws = torch.randn(global_batch, vae.latent_dim, device=next(vae.parameters()).device)
    if gather is not None:
        draws = draws.chunk(dist.get_world_size())[dist.get_rank()]
    return torch.sigmoid(vae.decode_logits(draws)).float()


def pixel_mmd(drawn, x, scales, estimator, gather=None):
    """MMD^2 between decoded N(0, I) draws and as many of the batch's images, in pixel space: the decoder's
    own samples must match the data. Only the decoder learns from it. Under torchrun, over all ranks'
    images."""
    drawn, real = drawn.flatten(1), x.float().flatten(1)
    if gather is not None:
        drawn, real = gather(drawn), gather(real)
    with torch.autocast(x.device.type, enabled=False):
        return mmd(drawn, real, "gaussian", scales, bandwidth=1.0, estimator=estimator)


def adversarial(critic, made, real):
    """(the maker's loss, the critic's loss): the non-saturating GAN losses (Goodfellow et al., 2014).

    The critic learns to score `real` above `made`; the maker learns to make what it scores as real. The
    maker's loss goes through a detached copy of the critic, the critic's sees `made` detached. Both are means
    over the batch, so under torchrun the ranks' averaged gradients are the one-process ones."""
    frozen = {name: p.detach() for name, p in critic.named_parameters()}
    fooled = F.softplus(-torch.func.functional_call(critic, frozen, (made,))).mean()
    scores = critic(torch.cat([real, made.detach()])).float()
    critic_loss = F.softplus(-scores[:len(real)]).mean() + F.softplus(scores[len(real):]).mean()
    return fooled, critic_loss


def average_gradients(critics, world_size):
    """Under torchrun: the critics' gradients averaged over ranks (DDP wraps only the model)."""
    for p in critics.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size
