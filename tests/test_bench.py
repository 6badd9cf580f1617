"""bench.py compares like with like: the naive loop computes the same loss, the FLOP count is the model's."""
import pytest
import torch

import bench
import data
import train
from cli import UserError
from mmd import mmd
from model import MMDVAE


def test_naive_mmd_is_the_same_statistic_as_ours():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 16, generator=g, dtype=torch.float64)
    y = torch.randn(50, 16, generator=g, dtype=torch.float64) * 1.3
    scales = train.parse_scales(train.DEFAULTS["kernel_scales"])
    expected = mmd(x, y, "gaussian", scales)
    assert torch.allclose(bench.mmd_expanded(x, y, scales, 2.0 * 16), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("pixel_mmd_weight, adv_weight, latent_adv_weight",
                         [(0.0, 0.0, 0.0), (100.0, 0.0, 0.0), (100.0, 10.0, 0.0), (0.0, 0.0, 5.0), (100.0,
                                 10.0, 5.0)])
def test_the_naive_loop_computes_train_py_s_loss(pixel_mmd_weight, adv_weight, latent_adv_weight):
    cfg = {**train.DEFAULTS, "pixel_mmd_weight": pixel_mmd_weight, "adv_weight": adv_weight,
           "latent_adv_weight": latent_adv_weight, "latent_dim": 4, "channels": 4, "hidden": 16}
    model, critics = train.make_model(cfg, torch.device("cpu"))
    x = torch.rand(20, 1, 28, 28)
    torch.manual_seed(0)  # the same prior draws for both
    ours, terms = train.compute_loss(model, x, cfg, critics)
    torch.manual_seed(0)
    naive, scored = bench.naive_loss(model, x, cfg)
    assert (terms["pixel_mmd"] > 0) == (pixel_mmd_weight > 0)
    assert set(scored) == {name for name, weight in (("critic", adv_weight), ("latent_critic",
            latent_adv_weight)) if weight}
    for name, weight in (("critic", adv_weight), ("latent_critic", latent_adv_weight)):
        if name in scored:  # the naive loop's critic terms, as its step adds them
            real, made = scored[name]
            naive = naive + weight * bench.naive_fooled(critics[name], made)
            torch.testing.assert_close(bench.naive_critic_loss(critics[name], real, made), terms[name],
                                       rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(naive, ours, rtol=1e-5, atol=1e-4)


def hand_count(latent_dim, c, hidden):
    """Multiply-adds of one image through model.py's layers, from their shapes."""
    conv1 = 14 * 14 * c * (1 * 4 * 4)          # each output value reads a 1 x 4 x 4 patch
    conv2 = 7 * 7 * 2 * c * (c * 4 * 4)
    fc = 2 * c * 49 * hidden + hidden * latent_dim
    defc = latent_dim * hidden + hidden * 2 * c * 49
    deconv1 = 2 * c * 7 * 7 * (c * 4 * 4)     # each input value writes a c x 4 x 4 patch
    deconv2 = c * 14 * 14 * (1 * 4 * 4)
    return conv1 + conv2 + fc + defc + deconv1 + deconv2


def test_multiply_adds_match_a_hand_count():
    assert bench.multiply_adds_per_image(MMDVAE(16, 32, 512)) == hand_count(16, 32, 512) == 6_639_616
    assert bench.multiply_adds_per_image(MMDVAE(4, 8, 64)) == hand_count(4, 8, 64)


def test_both_loops_and_the_mmd_timings_run_on_real_mnist(mnist_dir):
    device = torch.device("cpu")
    images = data.load("mnist", mnist_dir, device)["train"][0][:1000]
    cfg = dict(train.DEFAULTS)
    ms, first = bench.interleaved_ms_per_step({"ours": bench.our_step(images, device, cfg),
                                               "naive": bench.naive_step(images, device, cfg)}, device,
                                               steps=2, repeats=1)
    assert set(ms) == {"ours", "naive"} and all(t > 0 for t in ms.values())
    threads = torch.get_num_threads()
    one = bench.one_thread_ratio(images, device, cfg, steps=1, repeats=1)
    assert one["ratio"] > 0 and torch.get_num_threads() == threads  # the thread count is put back
    # The expanded form's N x M x D difference tensor (1024 * 1024 * 64 floats = 256 MiB) shows in its
    # peak; ours holds N x M matrices (4 MiB each). Resident-memory peaks are coarse, hence the margins.
    _, ours_peak = bench.time_mmd("ours", 1024, 64, device, repeats=1)
    _, expanded_peak = bench.time_mmd("expanded", 1024, 64, device, repeats=1)
    assert expanded_peak > 200 * 2**20 and ours_peak < 64 * 2**20


@pytest.mark.parametrize("args, words", [
    (["--hidden=0"], ["--hidden=0 must be positive"]),
    (["--batch_size=1"], ["--batch_size must be at least 2"]),
    (["--lr=1"], ["unknown option --lr"]),
    (["--adv_weight=-1"], ["--adv_weight=-1.0 must be zero or positive"]),
])
def test_bad_options_are_refused_before_any_timing(args, words, monkeypatch):
    monkeypatch.setattr(bench, "interleaved_ms_per_step",
                        lambda *a: pytest.fail("timed despite a bad option"))
    with pytest.raises(UserError) as info:
        bench.main(args)
    for word in words:
        assert word in str(info.value)
