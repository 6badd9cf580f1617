"""torchrun: N ranks (CPU processes, gloo) compute what one process computes, and only rank 0 writes.

Each rank is a process with the environment torchrun gives it (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT); `launch` starts them directly so that each rank's exit status can be
checked, and `torchrun` goes through the real launcher, as a user would.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import train
from conftest import REPO, TINY, assert_user_error, train_here

# Two ranks of 16 images against one process of 32, in float32 (TINY's) so that only summation order differs.
RUN = [*TINY, "--lr_decay=False"]
# Measured after 10 steps of RUN on a 2-core CPU: 2 ranks vs 1 process 1.5e-8 (9.7e-8 with the pixel MMD on),
# 1 vs 2 threads 1.5e-8, per-rank MMDs (each rank's 16 codes against 16 prior draws) 9e-3, every rank decoding
# the same half of the pixel MMD's prior draws 1.4e-2. With the critic (default since the ninth round of the
# prior gap) on an Intel Xeon with AMX: 1 vs 2 threads 2.1e-5 alone (3.0e-6 without the critic), 2 ranks vs 1
# process 2.1e-5.
SAME_RUN = 1e-4


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank, world_size, port):
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def start_ranks(command, world_size=2):
    port = free_port()
    return [subprocess.Popen([sys.executable, *command], cwd=REPO, env=rank_env(r, world_size, port),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for r in range(world_size)]


def launch(command, world_size=2, timeout=300):
    """Run `python command...` as `world_size` ranks; their CompletedProcesses, by rank."""
    processes = start_ranks(command, world_size)
    results = []
    for p in processes:
        out, err = p.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def torchrun(*args, world_size=2):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={world_size}", "train.py", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def largest_weight_difference(a, b):
    a, b = checkpoint.load(str(a / "ckpt.pt")), checkpoint.load(str(b / "ckpt.pt"))
    assert a["step"] == b["step"]
    return max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])


GATHER_WORKER = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
import distributed
from mmd import mmd
dist.init_process_group("gloo")
rank = dist.get_rank()
z = torch.load({codes!r})[rank * 8:(rank + 1) * 8].clone().requires_grad_()
prior = torch.load({prior!r})
loss = mmd(distributed.gather_codes(z), prior, scales=[0.2, 1, 5])
loss.backward()
# DDP averages gradients over ranks: what reaches this rank's codes is divided by the world size.
torch.save({{"loss": loss.detach(), "grad": z.grad / dist.get_world_size()}}, {out!r}.format(rank))
dist.destroy_process_group()
"""


def test_gathered_mmd_and_its_gradients_equal_the_one_process_mmd(tmp_path):
    from mmd import mmd
    generator = torch.Generator().manual_seed(0)
    codes, prior = torch.randn(16, 4, generator=generator) * 1.5 + 0.3, torch.randn(16, 4,
            generator=generator)
    torch.save(codes, tmp_path / "codes.pt")
    torch.save(prior, tmp_path / "prior.pt")
    out = str(tmp_path / "rank{}.pt")
    code = GATHER_WORKER.format(repo=REPO, codes=str(tmp_path / "codes.pt"),
                                prior=str(tmp_path / "prior.pt"), out=out)
    for result in launch(["-c", code], timeout=120):
        assert result.returncode == 0, result.stderr[-2000:]

    z = codes.clone().requires_grad_()
    expected = mmd(z, prior, scales=[0.2, 1, 5])
    expected.backward()
    ranks = [torch.load(out.format(r)) for r in range(2)]
    for rank in ranks:
        torch.testing.assert_close(rank["loss"], expected.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]), z.grad, rtol=1e-5, atol=1e-7)
    # The per-rank MMD that the gather replaces is another statistic, not a rounding away from it.
    assert abs(mmd(codes[:8], prior[:8], scales=[0.2, 1, 5]) - expected).item() > 1e-3


PRECISION_WORKER = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
import speed, train
dist.init_process_group("gloo")
rank = dist.get_rank()
speed.bf16_speedup = lambda *args: (1.6, 1.0)[rank]  # bf16 pays on rank 0's CPU, not on rank 1's
print(train.resolve_precision(train.DEFAULTS, torch.device("cpu"), world_size=2)[0])
dist.destroy_process_group()
"""


def test_ranks_that_measure_bf16_differently_all_compute_in_fp32():
    results = launch(["-c", PRECISION_WORKER.format(repo=REPO)], timeout=120)
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    assert [r.stdout.strip() for r in results] == ["fp32", "fp32"]


# The MMD-VAE default (1,000 prior draws), and the hybrid's terms as config/hybrid.py runs them (as many prior
# draws as the batch): the pixel MMD, where each rank decodes its half of the prior draws and the MMD is over
# all images; the critic on the draws, whose gradients DDP averages; the latent critic, which scores the
# gathered codes of the whole batch against the same prior draws on every rank.
@pytest.mark.parametrize("terms", [[], ["--pixel_mmd_weight=300", "--adv_weight=20", "--latent_adv_weight=5",
                                        "--prior_draws=0"]])
def test_two_ranks_under_torchrun_train_as_one_process_and_only_rank_0_writes(tmp_path, mnist_dir, terms):
    args = [*RUN, *terms, "--max_steps=10", f"--data_dir={mnist_dir}"]
    train_here(*args, f"--out_dir={tmp_path / 'one'}")  # the one process: this one
    process = torchrun(*args, f"--out_dir={tmp_path / 'two'}")
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]

    assert largest_weight_difference(tmp_path / "one", tmp_path / "two") < SAME_RUN
    assert checkpoint.load(str(tmp_path / "two" / "ckpt.pt"))["world_size"] == 2
    # One writer: one set of files, one log row, each message printed once, one progress bar.
    assert sorted(os.listdir(tmp_path / "two")) == [".writer.lock", "ckpt.pt", "log.csv", "losses.png",
                                                    "samples_epoch1.png"]
    assert len((tmp_path / "two" / "log.csv").read_text().splitlines()) == 2
    assert stdout.count("training on") == 1 and stdout.count("epoch 1:") == 1
    assert "2 ranks of 16 images" in stdout
    assert stderr.count(f"epoch 1/{train.DEFAULTS['epochs']}:   0%") == 1  # one progress bar, rank 0's


def test_sigterm_under_torchrun_saves_once_and_resumes_exactly_on_one_process(tmp_path, mnist_dir, capsys):
    stopped, reference = tmp_path / "stopped", tmp_path / "reference"
    process = torchrun(*RUN, "--max_steps=100000", f"--data_dir={mnist_dir}", f"--out_dir={stopped}")
    for line in process.stdout:  # past imports and data loading: the loop runs
        if line.startswith("training on"):
            break
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)  # to torchrun, which forwards it to both ranks
    _, stderr = process.communicate(timeout=120)
    assert stderr.count("SIGTERM: stopped at step") == 1, stderr[-3000:]
    # no temporaries, no half-written epoch outputs
    assert sorted(os.listdir(stopped)) == [".writer.lock", "ckpt.pt"]
    saved = checkpoint.load(str(stopped / "ckpt.pt"))
    assert saved["world_size"] == 2 and 0 < saved["step"] < 1875

    # Continue to 10 steps past the stop with one process, and compare with 2 ranks that stopped at the same
    # step by --max_steps and were continued the same way. (Not with one process all along: 2 ranks and 1
    # process differ only in summation order, but that drift grows with the steps, from 1e-7 after 10 steps to
    # about 2e-5 after 100, and the signal lands at a step the machine's speed decides.)
    end = f"--max_steps={saved['step'] + 10}"
    train_here(*RUN, end, "--resume=True", f"--data_dir={mnist_dir}", f"--out_dir={stopped}")
    assert "saved by 2 ranks, now 1" in capsys.readouterr().out
    process = torchrun(*RUN, f"--max_steps={saved['step']}", f"--data_dir={mnist_dir}",
                       f"--out_dir={reference}")
    assert process.wait(timeout=300) == 0
    train_here(*RUN, end, "--resume=True", f"--data_dir={mnist_dir}", f"--out_dir={reference}")
    assert largest_weight_difference(stopped, reference) < SAME_RUN


def test_every_rank_refuses_a_batch_that_does_not_divide_and_one_prints_it(tmp_path, monkeypatch, capsys):
    import train
    from cli import run
    monkeypatch.setattr(sys, "argv", ["train.py", "--batch_size=33", f"--out_dir={tmp_path}"])
    for rank in (0, 1):  # the check comes before any rank waits for another, so no process group is needed
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(SystemExit) as exit_status:
            run(train.main)
        assert exit_status.value.code == 2
        stderr = capsys.readouterr().err
        if rank == 0:
            assert stderr.startswith("error: --batch_size=33 does not divide into 2 ranks")
            assert "multiple of 2" in stderr
            assert stderr.count("\n") == 1
        else:
            assert stderr == ""
    assert os.listdir(tmp_path) == []


def test_divergence_stops_every_rank(tmp_path, mnist_dir):
    ranks = launch(["train.py", *RUN, "--lr=1e6", "--max_steps=300", f"--data_dir={mnist_dir}",
                    f"--out_dir={tmp_path}"])
    assert_user_error(ranks[0], "diverged")
    assert ranks[1].returncode == 2 and "Traceback" not in ranks[1].stderr


def test_a_rank_that_dies_stops_the_other_with_one_line_and_a_loadable_checkpoint(tmp_path, mnist_dir):
    ranks = start_ranks(["train.py", *RUN, "--max_steps=100000", "--ckpt_interval=10",
                         f"--data_dir={mnist_dir}",
                         f"--out_dir={tmp_path}"])
    for line in ranks[0].stdout:
        if line.startswith("training on"):
            break
    time.sleep(1.0)
    ranks[1].kill()
    _, stderr = ranks[0].communicate(timeout=60)
    assert_user_error(subprocess.CompletedProcess([], ranks[0].returncode, "", stderr),
                      "another rank stopped",
                      "--resume=True")
    ranks[1].communicate()
    assert checkpoint.load(str(tmp_path / "ckpt.pt"))["step"] > 0
