"""One writer per run folder: a second process that would write a run being written is refused, with real
processes.

Each test starts a training run, lets it write a checkpoint, and stops it in place (SIGSTOP) while the second
process tries, so that "unchanged" compares the folder with itself and not with a moving target."""
import os
import signal
import subprocess
import sys
import time

import pytest

import checkpoint
from cli import LOCK_NAME, RunLock
from conftest import REPO, TINY, assert_user_error, run_script
from test_distributed import launch

LONG_RUN = [*TINY, "--max_steps=100000", "--ckpt_interval=20"]


def start_writer(out, mnist_dir, *args):
    """train.py on `out`, returned once its first checkpoint is on disk (the lock is held from the start)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "train.py", *LONG_RUN, f"--out_dir={out}",
                                f"--data_dir={mnist_dir}",
                                *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    deadline = time.time() + 120
    while not (out / "ckpt.pt").exists():
        assert process.poll() is None and time.time() < deadline, \
            process.stderr.read()[-2000:] if process.stderr else ""
        time.sleep(0.2)
    return process


def snapshot(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


@pytest.fixture
def writer(tmp_path, mnist_dir):
    """A training run on tmp_path/run, stopped in place (SIGSTOP) between two checkpoints."""
    out = tmp_path / "run"
    process = start_writer(out, mnist_dir)
    time.sleep(0.5)  # past the first save's rename
    process.send_signal(signal.SIGSTOP)
    yield out, process
    process.send_signal(signal.SIGCONT)
    process.kill()
    process.communicate()


@pytest.mark.parametrize("second", [["--overwrite=True"], ["--resume=True"], []])
def test_a_second_train_py_on_a_folder_being_trained_is_refused_and_changes_nothing(writer, mnist_dir,
        second):
    out, first = writer
    before = snapshot(out)
    result = run_script("train.py", *TINY, f"--out_dir={out}", f"--data_dir={mnist_dir}", *second,
                        timeout=120)
    assert_user_error(result, f"{out} is being written by another process", f"PID {first.pid}", "since",
                      "one writer at a time", "another --out_dir")
    assert snapshot(out) == before
    # The holder, named in the lock file, goes on: after SIGCONT it still trains and saves.
    first.send_signal(signal.SIGCONT)
    step = checkpoint.load(str(out / "ckpt.pt"))["step"]
    deadline = time.time() + 60
    while checkpoint.load(str(out / "ckpt.pt"))["step"] == step:
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.2)


def test_fit_prior_on_a_run_being_trained_is_refused_and_changes_nothing(writer):
    out, first = writer
    before = snapshot(out)
    result = run_script("sample.py", f"--out_dir={out}", "--fit_prior", "--prior_components=2",
                        f"--out={out.parent / 'g.png'}", timeout=120)
    assert_user_error(result, f"{out} is being written by another process", f"PID {first.pid}",
                      "without --fit_prior")
    assert snapshot(out) == before and not (out.parent / "g.png").exists()


def test_sample_and_evaluate_read_a_checkpoint_while_its_run_trains(tmp_path, mnist_dir):
    out = tmp_path / "run"
    first = start_writer(out, mnist_dir)
    try:
        result = run_script("sample.py", f"--out_dir={out}", f"--out={tmp_path / 'g.png'}", timeout=120)
        assert result.returncode == 0 and (tmp_path / "g.png").exists(), result.stderr[-2000:]
        result = run_script("evaluate.py", f"--checkpoint={out / 'ckpt.pt'}", "--num_samples=200", "--json",
                            timeout=300)
        assert result.returncode == 0 and '"fid"' in result.stdout, result.stderr[-2000:]
        assert first.poll() is None  # and the run went on meanwhile
    finally:
        first.kill()
        first.communicate()


def test_after_sigkill_of_the_holder_a_resume_takes_the_lock_at_once(tmp_path, mnist_dir):
    # SIGKILL leaves the lock file, but not the lock: the OS ends it with the process. (That the resumed run
    # is bit-identical to an uninterrupted one is test_checkpoint's SIGKILL test, which runs under this lock
    # too.)
    out = tmp_path / "run"
    first = start_writer(out, mnist_dir)
    first.kill()
    first.communicate()
    assert (out / LOCK_NAME).exists()
    step = checkpoint.load(str(out / "ckpt.pt"))["step"]
    result = run_script("train.py", *TINY, f"--out_dir={out}", f"--data_dir={mnist_dir}", "--resume=True",
                        f"--max_steps={step + 3}", timeout=120)
    assert result.returncode == 0 and "being written" not in result.stderr, result.stderr[-2000:]
    assert checkpoint.load(str(out / "ckpt.pt"))["step"] == step + 3


def test_under_torchrun_every_rank_is_refused_when_rank_0_cannot_take_the_lock(tmp_path, mnist_dir):
    out = tmp_path / "run"
    with RunLock(str(out), "wait"):  # this test process is the writer now
        ranks = launch(["train.py", *TINY, f"--out_dir={out}", f"--data_dir={mnist_dir}"], timeout=120)
    assert_user_error(ranks[0], f"{out} is being written by another process", f"PID {os.getpid()}")
    assert ranks[1].returncode == 2 and "Traceback" not in ranks[1].stderr
    assert os.listdir(out) == [LOCK_NAME]


def test_a_filesystem_without_locks_gets_one_warning_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    import fcntl

    def no_locks(*args):
        raise OSError(37, "No locks available")  # ENOLCK, as some network filesystems answer

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with RunLock(str(tmp_path), "wait") as lock:
        assert lock.file is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: ") and "no working file locks" in err
