"""The encoder/decoder interface other scripts rely on, and that training moves the loss."""
import math

import pytest
import torch

import data
import train
from model import MMDVAE


@pytest.mark.parametrize("stochastic", [False, True])
def test_shapes_and_output_range(stochastic):
    model = MMDVAE(latent_dim=5, channels=8, hidden=64, stochastic=stochastic)
    x = torch.rand(6, 1, 28, 28)
    z = model.encode(x)
    assert z.shape == (6, 5)
    x_hat = model.decode(torch.randn(6, 5) * 10)   # even far from the prior
    assert x_hat.shape == (6, 1, 28, 28)
    assert x_hat.min() >= 0 and x_hat.max() <= 1
    logits, z, mu, logvar = model(x)
    assert logits.shape == x.shape and z.shape == mu.shape == (6, 5)
    assert (logvar is None) == (not stochastic)


def test_stochastic_encoder_samples_in_training_and_uses_the_mean_in_eval():
    model = MMDVAE(latent_dim=3, channels=4, hidden=16, stochastic=True)
    x = torch.rand(4, 1, 28, 28)
    _, z, mu, _ = model.train()(x)
    assert not torch.allclose(z, mu)
    _, z, mu, _ = model.eval()(x)
    assert torch.equal(z, mu) and torch.equal(model.encode(x), mu)


def test_rebuilds_from_model_args():
    model = MMDVAE(latent_dim=3, channels=4, hidden=16)
    twin = MMDVAE(**model.model_args)
    twin.load_state_dict(model.state_dict())
    z = torch.randn(2, 3)
    assert torch.equal(model.decode(z), twin.decode(z))


@pytest.mark.parametrize("bad", [dict(latent_dim=0), dict(channels=-1), dict(hidden=2.5), dict(critic_hidden=-1),
                                 dict(critic_channels=-1)])
def test_rejects_non_positive_widths(bad):
    with pytest.raises(ValueError, match="(positive|non-negative) integer"):
        MMDVAE(**bad)


@pytest.mark.parametrize("overrides", [
    {},                                                                  # the default: MMD-VAE, pixel MMD, both critics
    {"latent_adv_weight": 0.0},                                          # without the critic on the codes
    {"pixel_mmd_weight": 0.0, "adv_weight": 0.0, "latent_adv_weight": 0.0},  # the plain MMD-VAE
    {"mmd_weight": 0.0, "kl_weight": 1.0, "stochastic_encoder": True, "pixel_mmd_weight": 0.0, "adv_weight": 0.0,
     "latent_adv_weight": 0.0},                                          # ELBO-VAE
    {"kernel": "imq", "kernel_scales": "0.5,1,2", "recon_loss": "mse"},
    {"pixel_mmd_weight": 300.0, "adv_weight": 0.0},                      # decoded prior draws vs images, no critic
])
def test_one_optimiser_step_lowers_the_loss(overrides):
    cfg = {**train.DEFAULTS, **overrides}
    torch.manual_seed(0)
    model = MMDVAE(latent_dim=4, channels=8, hidden=64, stochastic=cfg["stochastic_encoder"], critic=cfg["adv_weight"] > 0,
                   latent_critic=cfg["latent_adv_weight"] > 0)
    x = torch.rand(32, 1, 28, 28).round()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss_now():
        torch.manual_seed(1)  # same prior draws and reparameterisation noise each time
        return train.compute_loss(model, x, cfg)

    before, terms = loss_now()
    assert torch.isfinite(before) and set(terms) == {*train.TERMS, "logits"}
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    after, _ = loss_now()
    assert after.item() < before.item()


def test_pure_mmd_vae_has_no_kl_and_elbo_has_no_mmd():
    x = torch.rand(16, 1, 28, 28)
    model = MMDVAE(latent_dim=4, channels=4, hidden=16, stochastic=True, critic=True, latent_critic=True)  # as the default
    _, mmd_vae = train.compute_loss(model, x, train.DEFAULTS)
    _, elbo = train.compute_loss(model, x, {**train.DEFAULTS, "mmd_weight": 0.0, "kl_weight": 1.0})
    assert mmd_vae["kl"].item() == 0 and mmd_vae["mmd"].item() != 0
    assert elbo["mmd"].item() == 0 and elbo["kl"].item() > 0


def test_the_test_mse_is_of_the_reconstruction_from_the_code_mean():
    # The log's test MSE comes from compute_loss's reconstruction; it must be the MSE of decode(encode(x)), the code
    # mean's reconstruction, and not of a sampled code, even for a Gaussian encoder.
    torch.manual_seed(0)
    model = MMDVAE(latent_dim=4, channels=4, hidden=16, stochastic=True, critic=True, latent_critic=True)
    images = torch.randint(0, 256, (30, 28, 28), dtype=torch.uint8)
    cfg = {**train.DEFAULTS, "stochastic_encoder": True, "kl_weight": 1.0, "precision": "fp32"}
    metrics = train.test_metrics(model, images, cfg, batch_size=20)  # two batches of unequal size
    x = data.to_float(images)
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(model.decode(model.encode(x)), x).item()
    assert metrics["mse"] == pytest.approx(expected, rel=1e-6)
    assert model.training  # test_metrics puts the model back into training mode


def test_the_pixel_mmd_trains_the_decoder_only_and_sees_blank_samples():
    torch.manual_seed(0)
    model = MMDVAE(latent_dim=4, channels=4, hidden=16)
    x = (torch.rand(32, 1, 28, 28) > 0.8).float()
    cfg = {**train.DEFAULTS, "pixel_mmd_weight": 1.0}
    train.pixel_mmd(train.decode_prior_draws(model, x, len(x)), x, cfg).backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())
    # A decoder that draws the data's own kind of image scores lower than one that draws blanks.
    with torch.no_grad():
        model.decoder[-1].bias.fill_(-20.0)
        model.decoder[-1].weight.zero_()
        blank = train.pixel_mmd(train.decode_prior_draws(model, x, len(x)), x, cfg)
    data_like = train.mmd(x[:16].flatten(1), x[16:].flatten(1), scales=train.parse_scales(cfg["pixel_kernel_scales"]),
                          bandwidth=1.0)
    assert blank > 0.1 and abs(data_like) < blank / 10


@pytest.mark.parametrize("critic_name", ["critic", "latent_critic"])
def test_the_maker_and_its_critic_each_learn_from_their_own_adversarial_loss_only(critic_name):
    torch.manual_seed(0)
    model = MMDVAE(latent_dim=4, channels=4, hidden=16, critic=True, latent_critic=True)
    x = (torch.rand(32, 1, 28, 28) > 0.8).float()
    if critic_name == "critic":  # the decoder's draws against the images
        maker, bystanders = model.decoder, [model.encoder, model.latent_critic]
        made, real = train.decode_prior_draws(model, x, len(x)), x
    else:  # the encoder's codes against N(0, I) draws
        maker, bystanders = model.encoder, [model.decoder, model.critic]
        made = model.encode(x)
        real = torch.randn_like(made)
    critic = getattr(model, critic_name)

    def grads(*parts):
        return [p.grad for part in parts for p in part.parameters()]

    fooled, critic_loss = train.adversarial(critic, made, real)
    fooled.backward(retain_graph=True)
    assert all(g is None for g in grads(critic, *bystanders))
    assert all(g is not None and g.abs().sum() > 0 for g in grads(maker))
    model.zero_grad(set_to_none=True)
    critic_loss.backward()
    assert all(g is None for g in grads(maker, *bystanders))
    assert all(g is not None and g.abs().sum() > 0 for g in grads(critic))


def train_critic_alone(critic, made_and_real, steps):
    """Trains only `critic`, for `steps` steps of Adam, on train.adversarial(critic, *made_and_real()); the
    (maker's loss, critic's loss) before each step."""
    optimizer = torch.optim.Adam(critic.parameters(), lr=1e-2, betas=(0.5, 0.999))
    losses = []
    for _ in range(steps):
        fooled, critic_loss = train.adversarial(critic, *made_and_real())
        losses.append((fooled.item(), critic_loss.item()))
        optimizer.zero_grad()
        critic_loss.backward()
        optimizer.step()
    return losses


def test_the_critic_learns_to_tell_the_data_from_blank_draws_and_the_decoder_then_pays_for_them():
    torch.manual_seed(0)
    model = MMDVAE(latent_dim=4, channels=4, hidden=16, critic=True)
    x = (torch.rand(32, 1, 28, 28) > 0.8).float()
    with torch.no_grad():  # a decoder that draws only blanks
        model.decoder[-1].bias.fill_(-20.0)
        model.decoder[-1].weight.zero_()
    losses = train_critic_alone(model.critic, lambda: (train.decode_prior_draws(model, x, len(x)), x), 30)
    # At the start the critic cannot tell them apart (both losses near log 2 and 2 log 2); then it can.
    assert abs(losses[0][1] - 2 * math.log(2)) < 0.2 and losses[-1][1] < 0.1
    assert losses[-1][0] > 3 * losses[0][0]


def test_the_latent_critic_sees_codes_in_clusters_that_the_moments_miss_and_the_encoder_then_pays():
    # Codes in four tight clusters with N(0, I)'s mean and covariance: the first two moments match, as they
    # do for the trained codes (README: the prior gap), yet the critic learns to tell them from prior draws.
    torch.manual_seed(0)
    model = MMDVAE(latent_dim=2, channels=4, hidden=64, latent_critic=True)
    corners = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    codes = (corners.repeat(64, 1) + 0.05 * torch.randn(256, 2)).requires_grad_()
    assert codes.mean(0).abs().max() < 0.1 and (codes.T.cov() - torch.eye(2)).abs().max() < 0.1
    losses = train_critic_alone(model.latent_critic, lambda: (codes, torch.randn(256, 2)), 150)
    # At the start the critic cannot tell them apart (both losses near log 2 and 2 log 2); then it can.
    # (Codes drawn from N(0, I) themselves leave it at 1.35 after as many steps.)
    assert abs(losses[0][1] - 2 * math.log(2)) < 0.2 and losses[-1][1] < 0.7
    assert losses[-1][0] > 3 * losses[0][0]


@pytest.mark.parametrize("floor", [0.1, 0.01, 0.0, 1.0])
def test_the_learning_rate_decays_by_a_cosine_from_lr_to_its_floor(floor):
    cfg = {**train.DEFAULTS, "lr": 3e-3, "min_lr_ratio": floor}
    rates = [train.lr_at(step, 1000, cfg) for step in range(0, 1001, 50)]
    assert rates[0] == pytest.approx(3e-3) and rates[-1] == pytest.approx(floor * 3e-3)
    assert rates[10] == pytest.approx((1 + floor) / 2 * 3e-3)  # halfway down at half the run
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert train.lr_at(500, 1000, {**cfg, "lr_decay": False}) == 3e-3


def test_auto_precision_takes_bf16_only_where_it_measures_faster(monkeypatch):
    cpu, cfg = torch.device("cpu"), {**train.DEFAULTS, "channels": 4, "hidden": 16, "latent_dim": 3, "batch_size": 8}
    # The measurement itself: a ratio of two real timings, and the run's random numbers left as they were.
    rng = torch.get_rng_state()
    monkeypatch.setattr(train, "bf16_kernels", lambda: True)  # timed on any CPU, with oneDNN's kernels or without
    speedup = train.bf16_speedup(cfg, cpu, repeats=1)
    assert 0 < speedup < math.inf and torch.equal(torch.get_rng_state(), rng)
    # Where oneDNN has no bf16 kernels, bf16 is emulated: fp32 at once, and the first line says why.
    monkeypatch.setattr(train, "bf16_kernels", lambda: False)
    monkeypatch.setattr(train, "make_model", lambda *args: pytest.fail("timed a CPU without bf16 kernels"))
    assert train.resolve_precision(cfg, cpu) == ("fp32", 0.0)
    assert train.precision_name(cpu, "fp32", 0.0) == "fp32: no bf16 kernels for this CPU"
    assert train.precision_name(cpu, "bf16", 1.6) == "bf16 autocast: bf16 measured 1.60x as fast as fp32 here"
    # The choice: bf16 only past the margin, a near tie in fp32; what is asked for is kept unmeasured.
    for measured, chosen in ((1.6, "bf16"), (train.BF16_MARGIN, "bf16"), (1.1, "fp32"), (0.7, "fp32")):
        monkeypatch.setattr(train, "bf16_speedup", lambda *args, measured=measured: measured)
        assert train.resolve_precision(cfg, cpu) == (chosen, measured)
    monkeypatch.setattr(train, "bf16_speedup", lambda *args: pytest.fail("measured where nothing is to be chosen"))
    for asked in ("bf16", "fp32"):
        assert train.resolve_precision({**cfg, "precision": asked}, cpu) == (asked, None)
    assert train.resolve_precision(cfg, torch.device("cuda")) == ("fp32", None)  # too small a model for bf16 to pay there
    with pytest.raises(ValueError, match="auto"):
        train.autocast_dtype(cpu, "auto")
