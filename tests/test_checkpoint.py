"""Checkpoints: what they hold, that resuming is exact, and that faults lose nothing."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import train
from cli import UserError
from conftest import HYBRID, REPO, TINY, assert_user_error, run_script, train_here

# Epochs of 234 steps with a tiny model: crosses an epoch boundary (test pass, grid, log row). Without the
# moving average, whose resume the mid-epoch test covers: so both ways of resuming are tested.
FAULT_RUN = TINY + ["--batch_size=256", "--max_steps=250", "--ckpt_interval=7", "--ema_decay=0"]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_checkpoint_holds_everything_needed_to_rebuild_and_resume(trained):
    ckpt = torch.load(trained / "ckpt.pt", weights_only=True)
    for key in ("model", "model_args", "config", "optimizer", "epoch", "step", "epoch_step", "rng"):
        assert key in ckpt, key
    assert ckpt["step"] == 200 and ckpt["config"]["max_steps"] == 200
    assert ckpt["model_args"] == {"latent_dim": 4, "channels": 4, "hidden": 32, "stochastic": False}
    # The default is the MMD-VAE: not one critic tensor in the checkpoint.
    assert "critics" not in ckpt and not any("critic" in name for key in ("model",
            "train_model") for name in ckpt[key])
    model, _ = checkpoint.load_model(str(trained / "ckpt.pt"))
    assert model.decode(torch.zeros(1, 4)).shape == (1, 1, 28, 28)


def test_save_load_round_trip_and_atomic_write(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    config = {"dataset": "mnist", "data_dir": "data", "seed": 1}
    payload = {"model": {"w": torch.arange(3.0)}, "model_args": {}, "config": config}
    checkpoint.save(path, payload)
    loaded = checkpoint.load(path)
    assert torch.equal(loaded["model"]["w"], torch.arange(3.0)) and loaded["config"] == config
    # A save that fails midway leaves the previous file and no temporary behind.
    with pytest.raises(Exception):
        checkpoint.save(path, {"model": lambda: 0, "model_args": {}, "config": {}})
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.arange(3.0))
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_rng_states_round_trip():
    import numpy as np
    states = checkpoint.rng_states()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    checkpoint.set_rng_states(states)
    assert torch.equal(torch.rand(3), expected[0])
    assert (np.random.rand(3) == expected[1]).all() and random.random() == expected[2]


def start_training(out, *args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    process = subprocess.Popen([sys.executable, "train.py", *FAULT_RUN, f"--out_dir={out}", *args], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Wait until the loop runs (after imports and data loading), so a kill lands mid-training.
    for line in process.stdout:
        if line.startswith("training on"):
            return process
    raise AssertionError(process.stderr.read())


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path, mnist_dir):
    reference = tmp_path / "uninterrupted"
    result = run_script("train.py", *FAULT_RUN, f"--out_dir={reference}", f"--data_dir={mnist_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    epoch_lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    # the time left, until the end
    assert len(epoch_lines) == 2 and "left" in epoch_lines[0] and "left" not in epoch_lines[1]

    out, rng = tmp_path / "killed", random.Random(0)
    process = start_training(out, f"--data_dir={mnist_dir}")
    kills = 0
    for _ in range(3):  # up to three kills at random moments, then let it finish
        time.sleep(rng.uniform(0.2, 1.2))
        if process.poll() is not None:
            break
        process.send_signal(signal.SIGKILL)
        kills += 1
        process.wait()
        resume = ["--resume=True"] if (out / "ckpt.pt").exists() else ["--overwrite=True"]
        process = start_training(out, f"--data_dir={mnist_dir}", *resume)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    assert kills >= 1, "the run ended before it could be killed once; kill sooner"
    assert_same_weights(weights(out / "ckpt.pt"), weights(reference / "ckpt.pt"))
    # What a kill mid-write left behind was cleaned up by the resumed run.
    assert not [f for f in os.listdir(out) if ".tmp" in f]


@pytest.mark.parametrize("preset", [[], [HYBRID]])
def test_a_run_ended_mid_epoch_by_max_steps_resumes_as_if_never_stopped(tmp_path, mnist_dir, preset):
    # Its end-of-run test pass draws prior samples; the resumed run must not see that in its own draws. (No lr
    # decay: the cosine schedule spans max_steps, so a cap is meant to change it.) The hybrid's critics'
    # weights and Adam state must come back too, and both the last and the averaged weights.
    run = [*preset, *TINY, "--lr_decay=False", f"--data_dir={mnist_dir}", "--ema_decay=0.9"]
    capped, reference = tmp_path / "capped", tmp_path / "uncapped"
    for args in (["--max_steps=20"], ["--max_steps=30", "--resume=True"]):
        train_here(*run, *args, f"--out_dir={capped}")
    train_here(*run, "--max_steps=30", f"--out_dir={reference}")
    resumed, uncapped = (torch.load(path / "ckpt.pt", weights_only=True) for path in (capped, reference))
    for key in ("model", "train_model", *(["critics"] if preset else [])):
        assert_same_weights(resumed[key], uncapped[key])
    assert ("critics" in resumed) == bool(preset)
    assert resumed["config"]["preset"] == ("hybrid" if preset else "")


def test_the_checkpoint_holds_the_moving_average_for_sampling_and_the_last_weights_for_training(tmp_path,
        mnist_dir):
    # Two runs from the same seed take the same steps; only what "model" holds differs. At decay d the average
    # after n steps is the sum over steps t of (1 - d) d^(n - t) w_t, plus d^n times the initial weights:
    # with d = 0.5 it stays within a few steps of the last weights, but is not them.
    run = [*TINY, f"--data_dir={mnist_dir}", "--max_steps=12"]
    for name, extra in (("last", ["--ema_decay=0"]), ("averaged", ["--ema_decay=0.5"])):
        train_here(*run, f"--out_dir={tmp_path / name}", *extra)
    last = torch.load(tmp_path / "last" / "ckpt.pt", weights_only=True)
    averaged = torch.load(tmp_path / "averaged" / "ckpt.pt", weights_only=True)
    assert_same_weights(averaged["train_model"], last["model"])
    assert "train_model" not in last  # without an average, the last weights are the only ones
    moved = [(averaged["model"][name] - last["model"][name]).abs().max() for name in last["model"]]
    assert max(moved) > 0
    step_sizes = [(averaged["model"][name] - last["model"][name]).norm()
                  / last["model"][name].norm().clamp(min=1e-6)
                  for name in last["model"] if last["model"][name].is_floating_point()]
    assert max(step_sizes) < 0.5
    # what sample.py and evaluate.py read
    model, _ = checkpoint.load_model(str(tmp_path / "averaged" / "ckpt.pt"))
    assert all(torch.equal(model.state_dict()[name], averaged["model"][name]) for name in averaged["model"])


def test_the_moving_average_of_a_short_run_is_of_its_steps_not_of_its_initial_weights(tmp_path, mnist_dir):
    # Bias-corrected as Adam's moments are: after one step the average is that step's weights, however close
    # to 1 the decay (uncorrected, 99.9% of it would be the random initial weights).
    train_here(*TINY, f"--data_dir={mnist_dir}", "--max_steps=1", "--ema_decay=0.999",
               f"--out_dir={tmp_path}")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    for name in saved["model"]:
        torch.testing.assert_close(saved["model"][name], saved["train_model"][name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_save_a_checkpoint_and_exit_with_the_documented_status(tmp_path, mnist_dir,
        signum, status):
    process = start_training(tmp_path, f"--data_dir={mnist_dir}", "--max_steps=100000", "--ckpt_interval=0")
    time.sleep(1.0)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == status, stderr[-2000:]
    assert "--resume=True" in stderr and "Traceback" not in stderr
    saved = checkpoint.load(str(tmp_path / "ckpt.pt"))
    assert saved["step"] > 0


def test_train_called_from_python_gives_ctrl_c_back(tmp_path, mnist_dir):
    # A run installs its own SIGINT and SIGTERM handlers (to save a checkpoint and stop); a notebook or a
    # script that calls train.main must get its own back, or Ctrl-C would do nothing there afterwards.
    def handlers():
        return [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]

    before = handlers()
    train_here(*TINY, f"--data_dir={mnist_dir}", "--max_steps=1", f"--out_dir={tmp_path}")
    assert handlers() == before
    with pytest.raises(UserError, match="diverged"):
        train_here(*TINY, f"--data_dir={mnist_dir}", "--max_steps=50", "--lr=1e6",
                   f"--out_dir={tmp_path / 'nan'}")
    assert handlers() == before


def test_malicious_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": checkpoint.FORMAT, "model": Payload(), "model_args": {}, "config": {}},
               tmp_path / "ckpt.pt")
    assert_user_error(run_script("sample.py", f"--out_dir={tmp_path}", f"--out={tmp_path / 'x.png'}"),
                      "run code")
    with pytest.raises(UserError, match="run code"):
        train.main([f"--out_dir={tmp_path}", "--resume=True"])
    assert not marker.exists()


def test_resume_refuses_a_different_model_but_accepts_safe_changes(trained, tmp_path, mnist_dir, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes((trained / "ckpt.pt").read_bytes())
    before = (out / "ckpt.pt").read_bytes()
    result = run_script("train.py", f"--out_dir={out}", "--resume=True", "--latent_dim=16")
    assert_user_error(result, "--latent_dim=16", "latent_dim=4")
    assert (out / "ckpt.pt").read_bytes() == before
    train_here(f"--out_dir={out}", "--resume=True", "--max_steps=210", f"--data_dir={mnist_dir}")
    assert "max_steps changed from 200 to 210" in capsys.readouterr().out
    assert checkpoint.load(str(out / "ckpt.pt"))["step"] == 210


def test_a_resumed_run_keeps_the_precision_that_auto_chose(trained, tmp_path, mnist_dir, capsys):
    # The trained fixture ran with --precision=auto: its checkpoint holds the answer, not "auto". Here it says
    # bf16 whatever this machine would measure, and the resumed run computes in bf16 without measuring again.
    saved = checkpoint.load(str(trained / "ckpt.pt"))
    assert saved["config"]["precision"] in ("bf16", "fp32")
    out = tmp_path / "run"
    out.mkdir()
    checkpoint.save(str(out / "ckpt.pt"), {**saved, "config": {**saved["config"], "precision": "bf16"}})
    train_here(f"--out_dir={out}", "--resume=True", "--max_steps=202", f"--data_dir={mnist_dir}")
    stdout = capsys.readouterr().out
    assert "training on cpu (bf16 autocast)" in stdout and "measured" not in stdout
    assert checkpoint.load(str(out / "ckpt.pt"))["config"]["precision"] == "bf16"


def legacy_layout(ckpt):
    """A checkpoint as train.py wrote it until December 2026: the critics inside the model."""
    critics = ckpt.pop("critics", {})
    for key in ("model", "train_model"):
        if key in ckpt:
            ckpt[key] = {**ckpt[key], **critics}
    names = {name.split(".")[0] for name in critics}
    ckpt["model_args"] = {**ckpt["model_args"], "critic": "critic" in names,
                          "latent_critic": "latent_critic" in names,
                          "critic_hidden": ckpt["config"]["critic_hidden"],
                          "critic_channels": ckpt["config"]["critic_channels"]}
    del ckpt["config"]["preset"], ckpt["config"]["prior_draws"]
    return ckpt


@pytest.mark.parametrize("missing, model_args, sums, trained_with", [
    # before the pixel MMD and the critic: four running sums instead of nine
    (("pixel_mmd_weight", "pixel_kernel_scales", "adv_weight", "critic_lr", "latent_adv_weight",
      "latent_critic_lr"),
     ("critic", "latent_critic"), 4, ("--pixel_mmd_weight=0", "--adv_weight=0", "--latent_adv_weight=0")),
    # before the latent critic: seven
    (("latent_adv_weight", "latent_critic_lr"), ("latent_critic",), 7,
     ("--pixel_mmd_weight=100", "--adv_weight=20", "--latent_adv_weight=0")),
    # before the critic's fully connected layer (its features went straight to the logit) and the moving
    # average
    (("critic_hidden", "ema_decay"), ("critic_hidden",), 9, ("--adv_weight=20", "--critic_hidden=0",
            "--ema_decay=0")),
    # before the critic's own widths (its convolutions were as wide as the encoder's)
    (("critic_channels",), ("critic_channels",), 9, ("--adv_weight=20", "--critic_channels=0")),
])
def test_a_checkpoint_from_before_an_option_resumes_as_it_was_trained(tmp_path, mnist_dir, missing,
        model_args, sums,
                                                                      trained_with):
    # Made before the options existed (and before the critics had a module of their own): trained as
    # trained_with says, and without the missing settings in its config or model_args, or their running sums.
    # It resumes as it was trained, whatever today's defaults are.
    run = (*TINY, f"--out_dir={tmp_path / 'run'}", f"--data_dir={mnist_dir}")
    train_here(*run, "--max_steps=3", *trained_with)
    old = legacy_layout(torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True))
    for name in missing:
        del old["config"][name]
    for name in model_args:
        del old["model_args"][name]
    old["running"] = old["running"][:sums]
    torch.save(old, tmp_path / "run" / "ckpt.pt")
    train_here(*run, "--resume=True", "--max_steps=5")
    resumed = checkpoint.load(str(tmp_path / "run" / "ckpt.pt"))
    assert resumed["step"] == 5
    for option in trained_with:
        name, value = option[2:].split("=")
        assert resumed["config"][name] == type(train.DEFAULTS[name])(value), name


def test_a_hybrid_checkpoint_from_before_the_critics_module_samples_and_resumes(tmp_path, mnist_dir):
    # tests/data/hybrid_v1_ckpt.pt: 10 steps of a tiny hybrid run (both critics, pixel MMD, a 3-component
    # ex-post prior) written by train.py at commit f78ea7d, when MMDVAE held the critics.
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(open(os.path.join(REPO, "tests", "data", "hybrid_v1_ckpt.pt"), "rb").read())
    old = torch.load(out / "ckpt.pt", weights_only=True)
    for prior in ("normal", "gmm"):
        result = run_script("sample.py", f"--out_dir={out}", f"--prior={prior}",
                            f"--out={tmp_path / prior}.png")
        assert result.returncode == 0 and (tmp_path / f"{prior}.png").exists(), result.stderr[-2000:]
    train_here(f"--out_dir={out}", "--resume=True", "--max_steps=14", f"--data_dir={mnist_dir}")
    resumed = checkpoint.load(str(out / "ckpt.pt"))
    assert resumed["step"] == 14
    assert resumed["config"]["adv_weight"] == 20 and resumed["config"]["latent_adv_weight"] == 5
    assert set(resumed["model_args"]) == {"latent_dim", "channels", "hidden", "stochastic"}
    assert {name.split(".")[0] for name in resumed["critics"]} == {"critic", "latent_critic"}
    assert not any("critic" in name for name in resumed["model"])
    # The critics went on training from their saved weights.
    moved = [(resumed["critics"][name] - old["train_model"][name]).abs().max() for name in resumed["critics"]]
    assert max(moved) > 0 and resumed["critics"].keys() <= old["train_model"].keys()


def test_divergence_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, mnist_dir):
    result = run_script("train.py", *TINY, "--lr=1e6", "--ckpt_interval=1", "--max_steps=300",
                        f"--out_dir={tmp_path}", f"--data_dir={mnist_dir}")
    assert_user_error(result, "diverged", "by step", "--lr")
    if (tmp_path / "ckpt.pt").exists():
        saved = checkpoint.load(str(tmp_path / "ckpt.pt"))
        assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_unwritable_out_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = run_script("train.py", f"--out_dir={blocker / 'run'}")
    assert_user_error(result, "cannot write", "--out_dir")
    assert blocker.read_text() == "x"
