"""Shared helpers: the repo on sys.path, real MNIST once per session, scripts run as a user would."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# A network small enough that a real training run takes seconds on 2 CPU cores; no ex-post prior unless a test
# asks for one. fp32, not auto: many tests compare the weights of two runs, and auto's start-up timing of bf16
# against fp32 is noise at this size (1.71, 2.14, 0.99, 2.83 and 1.13 in five calls on a busy 2-core machine),
# so two runs of one command could choose differently. The trained fixture keeps auto.
HYBRID = os.path.join(REPO, "config", "hybrid.py")  # the hybrid preset, as a command line names it
TINY = ["--channels=4", "--hidden=32", "--latent_dim=4", "--batch_size=32", "--log_interval=5",
        "--prior_components=0",
        "--precision=fp32"]


def run_script(script, *args, timeout=300, **kwargs):
    """Run `python script args...` from the repo root; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def train_here(*args):
    """train.main(args) in this process: no interpreter start-up or imports (about 4 s of a small run on 2
    cores). For runs whose files a test reads; its stdout goes to capsys. The command-line behaviour (exit
    status, one-line errors, signals) is tested through run_script."""
    import train
    train.main(list(args))


def assert_user_error(result, *words):
    """Exit status 2, one line on stderr naming the problem, no traceback."""
    lines = [line.split("\r")[-1] for line in result.stderr.strip().splitlines()]  # past tqdm's redraws
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    assert lines and lines[-1].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[-1], (word, lines[-1])


@pytest.fixture(scope="session")
def mnist_dir():
    """The repo's data/ folder with verified MNIST (fetched on first use, as train.py would)."""
    import data
    path = os.path.join(REPO, "data")
    data.ensure_files("mnist", path)
    return path


@pytest.fixture(scope="session")
def trained(tmp_path_factory, mnist_dir):
    """A checkpoint from a short real run of train.py, with a 5-component ex-post prior: read only."""
    out = tmp_path_factory.mktemp("trained")
    train_here(*TINY, "--max_steps=200", "--lr=3e-3", "--prior_components=5", "--precision=auto",
               f"--out_dir={out}",
               f"--data_dir={mnist_dir}")
    return out
