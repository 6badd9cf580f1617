"""The hybrid preset's terms (hybrid.py): each side learns from its own loss only, and each critic learns to
see what the MMD misses."""
import math

import pytest
import torch

import hybrid
import train
from model import MMDVAE


def hybrid_cfg(**overrides):
    return {**train.DEFAULTS, "latent_dim": 4, "channels": 4, "hidden": 16, **overrides}


def test_critics_are_built_only_for_weights_above_zero():
    cpu = torch.device("cpu")
    assert set(hybrid.make_critics(hybrid_cfg(adv_weight=1.0), cpu)) == {"critic"}
    assert set(hybrid.make_critics(hybrid_cfg(latent_adv_weight=1.0), cpu)) == {"latent_critic"}
    assert set(hybrid.make_critics(hybrid_cfg(pixel_mmd_weight=1.0), cpu)) == set()
    assert hybrid.in_use(hybrid_cfg(pixel_mmd_weight=1.0)) and not hybrid.in_use(hybrid_cfg())


def test_the_pixel_mmd_trains_the_decoder_only_and_sees_blank_samples():
    torch.manual_seed(0)
    model = MMDVAE(latent_dim=4, channels=4, hidden=16)
    x = (torch.rand(32, 1, 28, 28) > 0.8).float()
    scales = train.parse_scales(train.DEFAULTS["pixel_kernel_scales"])
    hybrid.pixel_mmd(hybrid.decode_prior_draws(model, len(x)), x, scales, "unbiased").backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())
    # A decoder that draws the data's own kind of image scores lower than one that draws blanks.
    with torch.no_grad():
        model.decoder[-1].bias.fill_(-20.0)
        model.decoder[-1].weight.zero_()
        blank = hybrid.pixel_mmd(hybrid.decode_prior_draws(model, len(x)), x, scales, "unbiased")
    data_like = train.mmd(x[:16].flatten(1), x[16:].flatten(1), scales=scales, bandwidth=1.0)
    assert blank > 0.1 and abs(data_like) < blank / 10


@pytest.mark.parametrize("critic_name", ["critic", "latent_critic"])
def test_the_maker_and_its_critic_each_learn_from_their_own_adversarial_loss_only(critic_name):
    torch.manual_seed(0)
    cfg = hybrid_cfg(adv_weight=1.0, latent_adv_weight=1.0)
    model, critics = train.make_model(cfg, torch.device("cpu"))
    x = (torch.rand(32, 1, 28, 28) > 0.8).float()
    if critic_name == "critic":  # the decoder's draws against the images
        maker, bystanders = model.decoder, [model.encoder, critics["latent_critic"]]
        made, real = hybrid.decode_prior_draws(model, len(x)), x
    else:  # the encoder's codes against N(0, I) draws
        maker, bystanders = model.encoder, [model.decoder, critics["critic"]]
        made = model.encode(x)
        real = torch.randn_like(made)
    critic = critics[critic_name]

    def grads(*parts):
        return [p.grad for part in parts for p in part.parameters()]

    fooled, critic_loss = hybrid.adversarial(critic, made, real)
    fooled.backward(retain_graph=True)
    assert all(g is None for g in grads(critic, *bystanders))
    assert all(g is not None and g.abs().sum() > 0 for g in grads(maker))
    for module in (model, critics):
        module.zero_grad(set_to_none=True)
    critic_loss.backward()
    assert all(g is None for g in grads(maker, *bystanders))
    assert all(g is not None and g.abs().sum() > 0 for g in grads(critic))


def train_critic_alone(critic, made_and_real, steps):
    """Trains only `critic`, for `steps` steps of Adam, on hybrid.adversarial(critic, *made_and_real()); the
    (maker's loss, critic's loss) before each step."""
    optimizer = torch.optim.Adam(critic.parameters(), lr=1e-2, betas=(0.5, 0.999))
    losses = []
    for _ in range(steps):
        fooled, critic_loss = hybrid.adversarial(critic, *made_and_real())
        losses.append((fooled.item(), critic_loss.item()))
        optimizer.zero_grad()
        critic_loss.backward()
        optimizer.step()
    return losses


def test_the_critic_learns_to_tell_the_data_from_blank_draws_and_the_decoder_then_pays_for_them():
    torch.manual_seed(0)
    model = MMDVAE(latent_dim=4, channels=4, hidden=16)
    critic = hybrid.image_critic(4, 0)
    x = (torch.rand(32, 1, 28, 28) > 0.8).float()
    with torch.no_grad():  # a decoder that draws only blanks
        model.decoder[-1].bias.fill_(-20.0)
        model.decoder[-1].weight.zero_()
    losses = train_critic_alone(critic, lambda: (hybrid.decode_prior_draws(model, len(x)), x), 30)
    # At the start the critic cannot tell them apart (both losses near log 2 and 2 log 2); then it can.
    assert abs(losses[0][1] - 2 * math.log(2)) < 0.2 and losses[-1][1] < 0.1
    assert losses[-1][0] > 3 * losses[0][0]


def test_the_latent_critic_sees_codes_in_clusters_that_the_moments_miss_and_the_encoder_then_pays():
    # Codes in four tight clusters with N(0, I)'s mean and covariance: the first two moments match, as they
    # do for the trained codes (docs/prior_gap.md), yet the critic learns to tell them from prior draws.
    torch.manual_seed(0)
    critic = hybrid.latent_critic(2, 64)
    corners = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    codes = (corners.repeat(64, 1) + 0.05 * torch.randn(256, 2)).requires_grad_()
    assert codes.mean(0).abs().max() < 0.1 and (codes.T.cov() - torch.eye(2)).abs().max() < 0.1
    losses = train_critic_alone(critic, lambda: (codes, torch.randn(256, 2)), 150)
    # At the start the critic cannot tell them apart (both losses near log 2 and 2 log 2); then it can.
    # (Codes drawn from N(0, I) themselves leave it at 1.35 after as many steps.)
    assert abs(losses[0][1] - 2 * math.log(2)) < 0.2 and losses[-1][1] < 0.7
    assert losses[-1][0] > 3 * losses[0][0]
