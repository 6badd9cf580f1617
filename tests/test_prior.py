"""The ex-post prior: EM that fits, a mixture that samples, and a checkpoint that carries it."""
import math
import shutil

import pytest
import torch

import checkpoint
import prior
import sample
from cli import UserError
from conftest import assert_user_error, run_script


def three_gaussians(n=6000, seed=0):
    """Codes from a known 3-component mixture in 2-D: weights, means, covariances and the draws."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.tensor([0.5, 0.3, 0.2])
    means = torch.tensor([[0.0, 0.0], [4.0, 4.0], [-4.0, 3.0]])
    scale_tril = torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[0.5, 0.0], [0.0, 1.0]], [[0.3, 0.0], [-0.2, 0.4]]])
    truth = {"weights": weights, "means": means, "scale_tril": scale_tril}
    return truth, prior.sample_gmm(truth, n, g)


def test_log_densities_match_torch_distributions():
    truth, codes = three_gaussians(500)
    x = codes.double()
    ours = prior._log_densities(x, prior._outer(x), truth["means"].double(), truth["scale_tril"].double())
    reference = torch.distributions.MultivariateNormal(truth["means"].double(),
                                                       scale_tril=truth["scale_tril"].double())
    assert torch.allclose(ours, reference.log_prob(x[:, None, :]), atol=1e-10)


def test_em_recovers_a_known_mixture_and_never_lowers_the_likelihood():
    truth, codes = three_gaussians()
    fit = prior.fit_gmm(codes, 3, seed=0, tol=1e-8)
    history = fit["history"]
    assert all(b >= a - 1e-12 for a, b in zip(history, history[1:])), history
    order = [int((fit["means"] - m).norm(dim=1).argmin()) for m in truth["means"]]
    assert sorted(order) == [0, 1, 2]
    assert torch.allclose(fit["weights"][order], truth["weights"], atol=0.02)
    assert torch.allclose(fit["means"][order], truth["means"], atol=0.1)
    covariances = fit["scale_tril"] @ fit["scale_tril"].transpose(1, 2)
    expected = truth["scale_tril"] @ truth["scale_tril"].transpose(1, 2)
    assert torch.allclose(covariances[order], expected, atol=0.1)
    # The fitted mixture explains held-out draws about as well as the true one does.
    _, held_out = three_gaussians(seed=1)
    assert prior.log_likelihood(fit, held_out) == pytest.approx(prior.log_likelihood(truth, held_out),
            abs=0.01)


def test_fit_and_sampling_are_seeded():
    _, codes = three_gaussians(2000)
    a, b, c = prior.fit_gmm(codes, 4, seed=0), prior.fit_gmm(codes, 4, seed=0), prior.fit_gmm(codes, 4,
            seed=1)
    assert torch.equal(a["means"], b["means"]) and not torch.equal(a["means"], c["means"])
    draws = [prior.sample_gmm(a, 100, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert draws[0].shape == (100, 2)


def test_the_floor_keeps_degenerate_codes_fittable():
    codes = torch.zeros(300, 3)
    codes[:, 0] = torch.randn(300, generator=torch.Generator().manual_seed(0))  # two dimensions never vary
    fit = prior.fit_gmm(codes, 2, seed=0)
    variances = (fit["scale_tril"] @ fit["scale_tril"].transpose(1, 2)).diagonal(dim1=1, dim2=2)
    assert math.isfinite(fit["log_likelihood"]) and (variances >= prior.COV_FLOOR * 0.999).all()


@pytest.mark.parametrize("components, words", [(0, "between 1 and"), (11,
        "between 1 and the number of codes (10)")])
def test_bad_component_counts_are_refused(components, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        prior.fit_gmm(torch.randn(10, 2), components)


def test_non_finite_codes_are_refused():
    codes = torch.randn(50, 2)
    codes[7, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        prior.fit_gmm(codes, 2)


def test_train_stores_the_prior_and_it_round_trips(trained):
    ckpt = checkpoint.load(str(trained / "ckpt.pt"))  # weights_only=True
    gmm = ckpt["prior"]
    assert gmm["kind"] == "gmm" and gmm["components"] == 5
    assert gmm["weights"].shape == (5,) and gmm["means"].shape == (5, 4) and gmm["scale_tril"].shape == (5,
            4, 4)
    assert gmm["weights"].sum().item() == pytest.approx(1.0, abs=1e-5)
    model, _ = checkpoint.load_model(str(trained / "ckpt.pt"))
    # The stored prior is the fit of this model's train codes: refitting reproduces it.
    import data
    images = data.load("mnist", ckpt["config"]["data_dir"])["train"][0]
    again = prior.fit(model, images, 5, ckpt["config"]["seed"])
    assert torch.allclose(again["means"], gmm["means"], atol=1e-5)


def test_sample_from_the_gmm_prior_is_seeded(trained, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        sample.main([f"--out_dir={trained}", "--prior=gmm", f"--seed={seed}", "--num=16",
                     f"--out={tmp_path / name}.png", f"--tensor={tmp_path / name}.pt"])
    a, b, c = (torch.load(tmp_path / f"{name}.pt") for name in "abc")
    assert a.shape == (16, 1, 28, 28) and torch.equal(a, b) and not torch.equal(a, c)
    normal = tmp_path / "n.pt"
    sample.main([f"--out_dir={trained}", "--num=16", f"--out={tmp_path / 'n.png'}", f"--tensor={normal}"])
    assert not torch.equal(a, torch.load(normal))


def test_fit_prior_adds_a_prior_to_a_checkpoint_without_one(trained, tmp_path):
    path = tmp_path / "ckpt.pt"
    ckpt = checkpoint.load(str(trained / "ckpt.pt"))
    del ckpt["prior"]
    checkpoint.save(str(path), ckpt)
    result = run_script("sample.py", f"--checkpoint={path}", "--prior=gmm", f"--out={tmp_path / 'g.png'}")
    assert_user_error(result, "has no ex-post prior", f"python sample.py --fit_prior --checkpoint={path}")
    sample.main([f"--checkpoint={path}", "--fit_prior", "--prior_components=3", "--prior=gmm",
                 f"--out={tmp_path / 'g.png'}"])
    refitted = checkpoint.load(str(path))
    assert refitted["prior"]["components"] == 3 and (tmp_path / "g.png").exists()
    # Everything else in the checkpoint is kept, so training can still resume from it.
    assert refitted["step"] == ckpt["step"] and refitted["optimizer"].keys() == ckpt["optimizer"].keys()


@pytest.mark.parametrize("args, words", [
    (["--prior=uniform"], ["unknown prior 'uniform'", "normal, gmm"]),
    (["--prior=gmm", "--mode=traverse"], ["--prior=gmm applies to --mode=sample"]),
    (["--fit_prior", "--prior_components=-1"], ["--prior_components=-1", "between 1 and"]),
    (["--fit_prior", "--prior_components=60001"], ["--prior_components=60001",
                                                   "between 1 and the 60000 training codes"]),
])
def test_bad_prior_options_are_one_line_errors(trained, tmp_path, args, words):
    shutil.copy(trained / "ckpt.pt", tmp_path / "ckpt.pt")
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(UserError) as info:
        sample.main([f"--out_dir={tmp_path}", f"--out={tmp_path / 'x.png'}", *args])
    for word in words:
        assert word in str(info.value)
    assert (tmp_path / "ckpt.pt").read_bytes() == before and not (tmp_path / "x.png").exists()


def test_a_failed_fit_leaves_the_checkpoint_as_it_was(trained, tmp_path):
    ckpt = checkpoint.load(str(trained / "ckpt.pt"))
    last_weight = [k for k in ckpt["model"] if k.startswith("encoder") and k.endswith("weight")][-1]
    # finite weights, but the first coordinate of every code overflows to inf
    ckpt["model"][last_weight][0] = 3e38
    path = tmp_path / "ckpt.pt"
    checkpoint.save(str(path), ckpt)
    before = path.read_bytes()
    result = run_script("sample.py", f"--checkpoint={path}", "--fit_prior", f"--out={tmp_path / 'x.png'}")
    assert_user_error(result, "could not fit the ex-post prior", "NaN or inf", "left as it was")
    assert path.read_bytes() == before


def test_train_refuses_more_components_than_codes(tmp_path, mnist_dir):
    import train
    with pytest.raises(UserError,
                       match="--prior_components=60001 must be between 1 and the 60000 training codes"):
        train.main([f"--out_dir={tmp_path}", f"--data_dir={mnist_dir}", "--prior_components=60001"])
    assert not (tmp_path / "ckpt.pt").exists()


def test_fit_prior_takes_the_runs_own_component_count_unless_told(trained, tmp_path):
    path = tmp_path / "ckpt.pt"
    ckpt = checkpoint.load(str(trained / "ckpt.pt"))
    del ckpt["prior"]
    checkpoint.save(str(path), ckpt)
    sample.main([f"--checkpoint={path}", "--fit_prior", f"--out={tmp_path / 'g.png'}"])
    assert checkpoint.load(str(path))["prior"]["components"] == ckpt["config"]["prior_components"] == 5
    # A run that fitted none (prior_components=0) names no count: the user gives one.
    checkpoint.save(str(path), {**ckpt, "config": {**ckpt["config"], "prior_components": 0}})
    result = run_script("sample.py", f"--checkpoint={path}", "--fit_prior", f"--out={tmp_path / 'g.png'}")
    assert_user_error(result, "fitted no ex-post prior", "--prior_components=50")
