"""Overrides from the shell: good ones apply, bad ones are one clear line and exit status 2."""
import os
import subprocess
import sys

import pytest
import torch

import evaluate
import sample
import train
from cli import UserError, parse_overrides, read_presets
from conftest import REPO, assert_user_error, run_script, train_here

DEFAULTS = {"batch_size": 100, "lr": 1e-3, "resume": False, "kernel": "gaussian"}


def test_overrides_apply_with_the_defaults_types():
    config, given = parse_overrides(DEFAULTS, ["--batch_size=32", "--lr=1", "--resume=True", "--kernel=imq"],
                                    "t.py")
    assert config == {"batch_size": 32, "lr": 1.0, "resume": True, "kernel": "imq"}
    assert type(config["lr"]) is float and given == {"batch_size", "lr", "resume", "kernel"}
    assert parse_overrides(DEFAULTS, [], "t.py") == (DEFAULTS, set())
    assert parse_overrides(DEFAULTS, ["--lr=3e-4"], "t.py")[0]["lr"] == 3e-4


@pytest.mark.parametrize("argv, words", [
    (["--batchsize=3"], ["unknown option --batchsize", "--batch_size"]),
    (["--batch_size=1.5"], ["--batch_size=1.5", "whole number"]),
    (["--batch_size=abc"], ["whole number"]),
    (["--lr=fast"], ["a number"]),
    (["--resume=maybe"], ["True or False"]),
    (["--batch_size", "3"], ["--name=value"]),
    (["batch_size=3"], ["--name=value"]),
])
def test_bad_overrides_are_user_errors(argv, words):
    with pytest.raises(UserError) as info:
        parse_overrides(DEFAULTS, argv, "t.py")
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("args, words", [
    (["--epochs=1.5"], ["--epochs=1.5", "whole number"]),
    (["--learning_rate=0.1"], ["unknown option --learning_rate"]),
    (["--batch_size=0"], ["--batch_size=0", "positive"]),
    (["--latent_dim=-3"], ["--latent_dim=-3", "positive"]),
    (["--lr=-0.1"], ["--lr", "positive"]),
    (["--min_lr_ratio=1.5"], ["--min_lr_ratio=1.5", "between 0 and 1"]),
    (["--ema_decay=1"], ["--ema_decay=1.0", "below 1"]),
    (["--dataset=cifar"], ["unknown dataset 'cifar'", "mnist"]),
    (["--kernel=laplace"], ["unknown kernel 'laplace'", "gaussian"]),
    (["--kernel_scales=1,x"], ["--kernel_scales"]),
    (["--kl_weight=1"], ["--stochastic_encoder=True"]),
    (["--device=tpu"], ["device"]),
])
def test_train_refuses_bad_input_before_touching_anything(tmp_path, args, words):
    out = tmp_path / "run"
    with pytest.raises(UserError) as info:
        train.main([f"--out_dir={out}", *args])
    for word in words:
        assert word in str(info.value)
    assert not out.exists()


def test_a_user_error_is_one_line_and_exit_status_2(tmp_path):
    result = run_script("train.py", f"--out_dir={tmp_path / 'run'}", "--epochs=ten")
    assert_user_error(result, "--epochs=ten", "whole number")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("unbuffered", ["1", ""])  # the pipe fails at a print, or at the flush on exit
def test_output_into_a_closed_pipe_ends_quietly(unbuffered):
    """python train.py --help | head -3: the reader goes away early; no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, stdout=write_end,
                            stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": unbuffered}, timeout=60)
    os.close(write_end)
    assert (result.returncode, result.stderr) == (1, "")


def test_train_will_not_overwrite_an_existing_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"the user's precious run")
    with pytest.raises(UserError, match="already exists.*--resume=True"):
        train.main([f"--out_dir={tmp_path}"])
    assert ckpt.read_bytes() == b"the user's precious run"


def make_bad_checkpoints(folder):
    """Files a user might point at by mistake, each with the words its error must contain."""
    torch.save({"state_dict": {}}, folder / "foreign.pt")
    (folder / "notes.txt").write_text("not a checkpoint at all\n")
    return {
        str(folder / "missing.pt"): "no checkpoint",
        str(folder / "foreign.pt"): "not an MMD-VAE checkpoint",
        str(folder / "notes.txt"): "not a readable checkpoint",
    }


def test_scripts_refuse_bad_checkpoints(tmp_path):
    for path, words in make_bad_checkpoints(tmp_path).items():
        before = sorted(os.listdir(tmp_path))
        for main, extra in ((sample.main, f"--out={tmp_path / 'grid.png'}"), (evaluate.main, "--json")):
            with pytest.raises(UserError) as info:
                main([f"--checkpoint={path}", extra])
            assert words in str(info.value) and path in str(info.value)
        assert sorted(os.listdir(tmp_path)) == before


def test_truncated_checkpoint_is_refused_and_left_alone(tmp_path, trained):
    ckpt = (trained / "ckpt.pt").read_bytes()
    truncated = tmp_path / "ckpt.pt"
    truncated.write_bytes(ckpt[: len(ckpt) // 2])
    out = tmp_path / "grid.png"
    out.write_bytes(b"an earlier grid")
    result = run_script("sample.py", f"--checkpoint={truncated}", f"--out={out}")
    assert_user_error(result, "truncated or corrupt")
    assert out.read_bytes() == b"an earlier grid"
    assert truncated.read_bytes() == ckpt[: len(ckpt) // 2]
    # --resume from it is refused the same way, and the file is kept.
    with pytest.raises(UserError, match="truncated or corrupt"):
        train.main([f"--out_dir={tmp_path}", "--resume=True"])
    assert truncated.read_bytes() == ckpt[: len(ckpt) // 2]


@pytest.mark.parametrize("args, words", [
    (["--mode=dream"], ["unknown mode 'dream'"]),
    (["--num=0"], ["--num=0", "positive"]),
    (["--axes=0,99"], ["--axes=0,99"]),
])
def test_sample_refuses_bad_options(trained, tmp_path, args, words):
    with pytest.raises(UserError) as info:
        sample.main([f"--out_dir={trained}", f"--out={tmp_path / 'x.png'}", *args])
    for word in words:
        assert word in str(info.value)
    assert not (tmp_path / "x.png").exists()


PRESETS = sorted(name for name in os.listdir(os.path.join(REPO, "config")) if name.endswith(".py"))


def test_the_shipped_presets_include_the_ones_the_readme_measures():
    assert {"hybrid.py", "elbo.py", "tutorial.py", "seed_notebook.py"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_each_shipped_preset_parses_and_trains_two_steps(name, tmp_path, mnist_dir):
    path = os.path.join(REPO, "config", name)
    values, names, rest = read_presets([path, "--seed=3"], train.DEFAULTS, "train.py")
    assert values and names == [name[:-3]] and rest == ["--seed=3"]
    with open(path) as f:
        assert f.readline().startswith("# "), "a preset starts with comment lines saying what it is"
    train_here(path, "--max_steps=2", "--prior_components=0", "--precision=fp32", f"--data_dir={mnist_dir}",
               f"--out_dir={tmp_path}")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert saved["step"] == 2 and saved["config"]["preset"] == name[:-3]
    assert all(saved["config"][k] == v for k, v in values.items() if k != "max_steps")


def test_a_preset_applies_first_and_the_flags_after_it(tmp_path):
    hybrid = os.path.join(REPO, "config", "hybrid.py")
    for argv in ([hybrid, "--epochs=20"], ["--epochs=20", hybrid]):  # wherever the flag stands
        cfg, given = train.read_config(argv)
        assert cfg["epochs"] == 20 and cfg["adv_weight"] == 20.0 and cfg["latent_dim"] == 24
        assert cfg["preset"] == "hybrid" and {"epochs", "adv_weight", "latent_dim"} <= given
    cfg, _ = train.read_config([])
    assert cfg["preset"] == "" and cfg["adv_weight"] == 0


@pytest.mark.parametrize("text, words", [
    ("latent_dim = 8\nlattent_dim = 8\n", ["line 2", "unknown option lattent_dim", "latent_dim"]),
    ("# a comment\nlatent_dim = 'eight'\n", ["line 2", "latent_dim must be a whole number", "'eight'"]),
    ("lr = fast\n", ["line 1", "lr must be a number"]),
    ("lr = 1e-3 * 2\n", ["line 1", "lr must be"]),
    ("resume = 1\n", ["line 1", "resume must be True or False"]),
    ("import os\n", ["line 1", "only `name = value` lines", "import os"]),
    ("print('hi')\n", ["line 1", "only `name = value` lines"]),
    ("a = b = 1\n", ["line 1", "only `name = value` lines"]),
    ("latent_dim += 1\n", ["line 1", "only `name = value` lines"]),
    ("if True:\n    latent_dim = 8\n", ["line 1", "only `name = value` lines"]),
    ("latent_dim = (8\n", ["not valid Python"]),
])
def test_a_bad_preset_is_one_line_naming_the_file_and_line_and_touches_nothing(tmp_path, text, words):
    preset = tmp_path / "bad.py"
    preset.write_text(text)
    out = tmp_path / "run"
    result = run_script("train.py", str(preset), f"--out_dir={out}")
    assert_user_error(result, str(preset), *words)
    assert not out.exists()


def test_a_missing_preset_is_one_line_and_touches_nothing(tmp_path):
    out = tmp_path / "run"
    result = run_script("train.py", "config/no_such_preset.py", f"--out_dir={out}")
    assert_user_error(result, "cannot read preset config/no_such_preset.py", "No such file")
    assert not out.exists()
    marker = tmp_path / "ran"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w')\n")
    assert_user_error(run_script("train.py", str(tmp_path / "evil.py"), f"--out_dir={out}"),
                      "only `name = value`")
    assert not marker.exists() and not out.exists()  # parsed, never run
