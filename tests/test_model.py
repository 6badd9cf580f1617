"""The encoder/decoder interface other scripts rely on, and that training moves the loss."""
import math
import os

import pytest
import torch

import data
import hybrid
import train
from cli import read_presets
from conftest import REPO
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


@pytest.mark.parametrize("bad", [dict(latent_dim=0), dict(channels=-1), dict(hidden=2.5),
                                 dict(latent_dim=True)])
def test_rejects_non_positive_widths(bad):
    with pytest.raises(ValueError, match="positive integer"):
        MMDVAE(**bad)


def test_the_default_is_the_mmd_vae_alone():
    # The MMD-VAE: reconstruction + mmd_weight * MMD^2, no KL, no critic, no pixel-space term.
    cfg = train.DEFAULTS
    assert cfg["mmd_weight"] > 0 and cfg["kl_weight"] == 0 and not cfg["stochastic_encoder"]
    assert all(cfg[weight] == 0 for weight in hybrid.WEIGHTS) and not hybrid.in_use(cfg)
    model, critics = train.make_model(cfg, torch.device("cpu"))
    assert len(critics) == 0 and {name for name, _ in model.named_children()} == {"encoder", "decoder"}
    assert not any("critic" in name for name in model.state_dict())


def small(overrides):
    return {**train.DEFAULTS, "latent_dim": 4, "channels": 8, "hidden": 64, **overrides}


@pytest.mark.parametrize("overrides", [
    {},                                                                  # the default: the MMD-VAE
    {"mmd_weight": 0.0, "kl_weight": 1.0, "stochastic_encoder": True},   # ELBO-VAE
    {"kernel": "imq", "kernel_scales": "0.5,1,2", "recon_loss": "mse"},
    {"prior_draws": 200, "mmd_estimator": "biased"},                     # more prior draws than codes
    # decoded prior draws vs images, no critic
    {"pixel_mmd_weight": 300.0},
    "hybrid",                                                            # config/hybrid.py: both critics too
])
def test_one_optimiser_step_lowers_the_loss(overrides):
    if overrides == "hybrid":
        overrides = read_presets([os.path.join(REPO, "config", "hybrid.py")], train.DEFAULTS, "train.py")[0]
    cfg = small(overrides)
    torch.manual_seed(0)
    model, critics = train.make_model(cfg, torch.device("cpu"))
    x = torch.rand(32, 1, 28, 28).round()
    optimizer = torch.optim.Adam([*model.parameters(), *critics.parameters()], lr=1e-3)

    def loss_now():
        torch.manual_seed(1)  # same prior draws and reparameterisation noise each time
        return train.compute_loss(model, x, cfg, critics)

    before, terms = loss_now()
    assert torch.isfinite(before) and set(terms) == {*train.TERMS, "logits"}
    optimizer.zero_grad()
    train.backward_target(before, terms, critics).backward()
    optimizer.step()
    after, _ = loss_now()
    assert after.item() < before.item()


def test_the_mmd_compares_the_codes_with_prior_draws_of_their_own_number():
    # prior_draws sets how many N(0, I) draws the batch's codes meet; 0 means as many as the batch.
    cfg = small({})
    model, critics = train.make_model(cfg, torch.device("cpu"))
    x = torch.rand(16, 1, 28, 28)
    seen = []
    real_mmd = train.mmd

    def spy(z, draws, *args, **kwargs):
        seen.append((len(z), len(draws)))
        return real_mmd(z, draws, *args, **kwargs)

    train.mmd = spy
    try:
        train.compute_loss(model, x, {**cfg, "prior_draws": 0}, critics)
        train.compute_loss(model, x, {**cfg, "prior_draws": 200}, critics)
    finally:
        train.mmd = real_mmd
    assert seen == [(16, 16), (16, 200)]


def test_pure_mmd_vae_has_no_kl_and_elbo_has_no_mmd():
    x = torch.rand(16, 1, 28, 28)
    cfg = small({"stochastic_encoder": True})
    model, _ = train.make_model(cfg, torch.device("cpu"))
    _, mmd_vae = train.compute_loss(model, x, cfg)
    _, elbo = train.compute_loss(model, x, {**cfg, "mmd_weight": 0.0, "kl_weight": 1.0})
    assert mmd_vae["kl"].item() == 0 and mmd_vae["mmd"].item() != 0
    assert elbo["mmd"].item() == 0 and elbo["kl"].item() > 0
    assert all(mmd_vae[term].item() == 0 for term in hybrid.TERMS)


def test_the_test_mse_is_of_the_reconstruction_from_the_code_mean():
    # The log's test MSE comes from compute_loss's reconstruction; it must be the MSE of decode(encode(x)),
    # the code mean's reconstruction, and not of a sampled code, even for a Gaussian encoder.
    torch.manual_seed(0)
    model = MMDVAE(latent_dim=4, channels=4, hidden=16, stochastic=True)
    images = torch.randint(0, 256, (30, 28, 28), dtype=torch.uint8)
    cfg = {**train.DEFAULTS, "latent_dim": 4, "stochastic_encoder": True, "kl_weight": 1.0,
           "precision": "fp32"}
    metrics = train.test_metrics(model, images, cfg, batch_size=20)  # two batches of unequal size
    x = data.to_float(images)
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(model.decode(model.encode(x)), x).item()
    assert metrics["mse"] == pytest.approx(expected, rel=1e-6)
    assert model.training  # test_metrics puts the model back into training mode


@pytest.mark.parametrize("floor", [0.1, 0.01, 0.0, 1.0])
def test_the_learning_rate_decays_by_a_cosine_from_lr_to_its_floor(floor):
    cfg = {**train.DEFAULTS, "lr": 3e-3, "min_lr_ratio": floor}
    rates = [train.lr_at(step, 1000, cfg) for step in range(0, 1001, 50)]
    assert rates[0] == pytest.approx(3e-3) and rates[-1] == pytest.approx(floor * 3e-3)
    assert rates[10] == pytest.approx((1 + floor) / 2 * 3e-3)  # halfway down at half the run
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert train.lr_at(500, 1000, {**cfg, "lr_decay": False}) == 3e-3


def test_auto_precision_takes_bf16_only_where_it_measures_faster(monkeypatch):
    import speed
    cpu, cfg = torch.device("cpu"), {**train.DEFAULTS, "channels": 4, "hidden": 16, "latent_dim": 3,
                                     "batch_size": 8}
    # The measurement itself: a ratio of two real timings of this run's pass, the run's random numbers
    # untouched.
    rng = torch.get_rng_state()
    # timed on any CPU, with oneDNN's kernels or without
    monkeypatch.setattr(speed, "bf16_kernels", lambda: True)
    def make_pass():  # what train.resolve_precision times: a forward and backward pass of the run's model
        model, _ = train.make_model(cfg, cpu)
        return lambda dtype: train.compute_loss(model, torch.rand(8, 1, 28, 28), cfg)[0].backward()
    speedup = speed.bf16_speedup(make_pass, repeats=1)
    assert 0 < speedup < math.inf and torch.equal(torch.get_rng_state(), rng)
    # Where oneDNN has no bf16 kernels, bf16 is emulated: fp32 at once, and the first line says why.
    monkeypatch.setattr(speed, "bf16_kernels", lambda: False)
    monkeypatch.setattr(train, "make_model", lambda *args: pytest.fail("timed a CPU without bf16 kernels"))
    assert train.resolve_precision(cfg, cpu) == ("fp32", 0.0)
    assert speed.precision_name(cpu, "fp32", 0.0) == "fp32: no bf16 kernels for this CPU"
    assert speed.precision_name(cpu, "bf16", 1.6) == "bf16 autocast: bf16 measured 1.60x as fast as fp32 here"
    # The choice: bf16 only past the margin, a near tie in fp32; what is asked for is kept unmeasured.
    for measured, chosen in ((1.6, "bf16"), (speed.BF16_MARGIN, "bf16"), (1.1, "fp32"), (0.7, "fp32")):
        monkeypatch.setattr(speed, "bf16_speedup", lambda *args, measured=measured: measured)
        assert train.resolve_precision(cfg, cpu) == (chosen, measured)
    monkeypatch.setattr(speed, "bf16_speedup",
                        lambda *args: pytest.fail("measured where nothing is to be chosen"))
    for asked in ("bf16", "fp32"):
        assert train.resolve_precision({**cfg, "precision": asked}, cpu) == (asked, None)
    # too small a model to pay there
    assert train.resolve_precision(cfg, torch.device("cuda")) == ("fp32", None)
    with pytest.raises(ValueError, match="auto"):
        speed.autocast_dtype(cpu, "auto")
