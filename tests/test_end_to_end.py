"""The user's path on real MNIST: train a few steps, draw grids, evaluate; a corrupt data file; and the files
we read and write ourselves, to spare every command torchvision's 1.5 s import, as torchvision reads and
writes them."""
import json
import os
import shutil

import pytest
import torch

import data
import evaluate
import sample
from cli import UserError
from conftest import assert_user_error, run_script


def test_train_then_sample_every_mode(trained, tmp_path):
    for name in ("ckpt.pt", "log.csv", "samples_epoch1.png", "losses.png"):
        assert (trained / name).exists(), name
    header = (trained / "log.csv").read_text().splitlines()[0]
    assert header.startswith("epoch,step,seconds,train_loss") and "test_mse" in header

    result = run_script("sample.py", f"--out_dir={trained}", f"--out={tmp_path / 'grid.png'}",
                        f"--tensor={tmp_path / 'grid.pt'}", "--num=16", "--nrow=4")
    assert result.returncode == 0, result.stderr[-2000:]
    images = torch.load(tmp_path / "grid.pt", weights_only=True)
    assert images.shape == (16, 1, 28, 28) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0
    assert (tmp_path / "grid.png").stat().st_size > 0

    for mode in ("traverse", "interpolate", "reconstruct"):
        sample.main([f"--out_dir={trained}", f"--mode={mode}", "--num=16", "--nrow=4",
                     f"--out={tmp_path / (mode + '.png')}", f"--tensor={tmp_path / (mode + '.pt')}"])
        images = torch.load(tmp_path / f"{mode}.pt", weights_only=True)
        assert images.shape == (16, 1, 28, 28) and 0 <= images.min() and images.max() <= 1


def test_sample_is_reproducible_from_its_seed(trained, tmp_path):
    for name in ("a", "b"):
        sample.main([f"--out_dir={trained}", f"--out={tmp_path / name}.png",
                     f"--tensor={tmp_path / name}.pt"])
    sample.main([f"--out_dir={trained}", f"--out={tmp_path}/c.png", f"--tensor={tmp_path}/c.pt", "--seed=1"])
    a, b, c = (torch.load(tmp_path / f"{name}.pt") for name in "abc")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_evaluate_end_to_end(trained, mnist_dir):
    result = run_script("evaluate.py", f"--checkpoint={trained / 'ckpt.pt'}", "--json", "--num_samples=2000",
                        f"--data_dir={mnist_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(result.stdout)
    assert metrics["classifier_accuracy"] >= 0.99
    assert 0 < metrics["mse"] < 0.08 and metrics["fid"] > metrics["real_fid"] >= 0
    # The decomposition: every set scores above the real-vs-real floor, and the ratios are against the
    # two sets of reconstructions. (Their order is not asserted: after 200 steps this tiny decoder, trained
    # by the pixel MMD on prior draws, scored N(0, I) FID 1142 against reconstructions' 1235.)
    for name in ("recon", "gmm", "train_recon"):
        assert metrics[f"{name}_fid"] > metrics["real_fid"], name
    for ceiling in ("recon", "train_recon"):
        assert metrics[f"fid_over_{ceiling}"] == metrics["fid"] / metrics[f"{ceiling}_fid"]
        assert metrics[f"gmm_fid_over_{ceiling}"] == metrics["gmm_fid"] / metrics[f"{ceiling}_fid"]
    assert 1 <= metrics["train_recon_is"] <= 10 and 0 <= metrics["train_recon_coverage"] <= 1
    assert 1 <= metrics["gmm_is"] <= 10
    assert 0 <= metrics["gmm_coverage"] <= 1 and 0 <= metrics["gmm_confident"] <= 1
    for name in ("test", "recon", "normal", "gmm"):
        assert metrics[f"nearest_train_{name}"] > 0, name
    assert 1 <= metrics["is"] <= 10 and 1 <= metrics["real_is"] <= 10
    assert 0.1 <= metrics["probe"] <= 1 and 0.1 <= metrics["knn"] <= 1
    assert len(metrics["cov_eigenvalues"]) == 4
    with pytest.raises(UserError, match="trained on mnist, not fashion"):
        evaluate.main([f"--checkpoint={trained / 'ckpt.pt'}", "--dataset=fashion"])


def test_corrupt_data_file_is_moved_aside_with_a_clear_error(tmp_path, mnist_dir):
    raw = data.raw_folder("mnist", str(tmp_path))
    os.makedirs(raw)
    for name in data.SHA256["mnist"]:
        shutil.copy(os.path.join(data.raw_folder("mnist", mnist_dir), name), raw)
    labels = os.path.join(raw, "t10k-labels-idx1-ubyte")
    with open(labels, "r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    result = run_script("train.py", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}")
    assert_user_error(result, "t10k-labels-idx1-ubyte", "SHA-256", "run again")
    assert not os.path.exists(labels) and os.path.exists(labels + ".corrupt")
    # Run again: the missing file is fetched afresh and verified.
    data.ensure_files("mnist", str(tmp_path))
    assert data.sha256(labels) == data.SHA256["mnist"]["t10k-labels-idx1-ubyte"]


def test_mnist_loads_as_torchvision_reads_it(mnist_dir):
    import torchvision
    splits = data.load("mnist", mnist_dir)
    for split, size in (("train", 60000), ("test", 10000)):
        images, labels = splits[split]
        reference = torchvision.datasets.MNIST(mnist_dir, train=split == "train", download=False)
        assert images.shape == (size, 28, 28) and images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert torch.equal(images, reference.data) and torch.equal(labels, reference.targets)


@pytest.mark.parametrize("count, nrow", [(64, 8), (17, 10), (1, 8)])
def test_a_grid_is_one_png_nrow_images_to_a_row_replacing_the_old_file(tmp_path, count, nrow):
    import numpy as np
    from PIL import Image

    from cli import save_grid
    images = torch.rand(count, 1, 28, 28, generator=torch.Generator().manual_seed(count))
    path = tmp_path / "grid.png"
    path.write_bytes(b"the previous grid")
    save_grid(images, str(path), nrow=nrow, pad_value=0.5)
    columns, pad = min(nrow, count), 0 if count == 1 else 2  # torchvision writes a lone image unpadded
    rows = -(-count // columns)
    grid = Image.open(path)
    assert grid.format == "PNG" and grid.size == (columns * (28 + pad) + pad, rows * (28 + pad) + pad)
    assert os.listdir(tmp_path) == ["grid.png"]  # replaced whole, no temporary file left
    pixels = torch.from_numpy(np.array(grid.convert("L"))).float() / 255
    last = (count - 1) // columns * (28 + pad) + pad, (count - 1) % columns * (28 + pad) + pad
    for image, (top, left) in ((images[0, 0], (pad, pad)), (images[-1, 0], last)):
        assert (pixels[top:top + 28, left:left + 28] - image).abs().max() <= 1 / 255 + 1e-6
