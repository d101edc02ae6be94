"""Datasets that live on the training device as uint8 tensors.

The whole of CIFAR (150 MB as uint8) fits on any GPU, so we load it once, keep it
there, and make each batch with a few tensor operations: an index, a batched random
crop and flip, and a normalization. No DataLoader, no worker processes, no per-image
PIL transforms in the hot loop.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from prunetrack import config


class DataNotFoundError(FileNotFoundError):
    """The dataset is not where we looked and could not be downloaded."""


class DataCorruptError(ValueError):
    """A dataset file is there but cannot be read (truncated, or not the official format)."""


@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor  # (N, 3, 32, 32) uint8
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    sha256: str  # of the full train and test arrays as read, before any subset

    def to(self, device) -> "Dataset":
        for k in ("train_x", "train_y", "test_x", "test_y"):
            setattr(self, k, getattr(self, k).to(device))
        return self


def _read_pickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, UnicodeDecodeError) as e:
        folder = os.path.dirname(os.path.abspath(path))
        data_dir = os.path.dirname(folder)
        offline = (f", or write it again from the offline copy: python ../shared/data/cifar10_jpeg.py "
                   f"materialize {data_dir}" if os.path.basename(folder) == "cifar-10-batches-py" else "")
        raise DataCorruptError(f"{os.path.abspath(path)} is truncated or corrupt ({type(e).__name__}: {e}). "
                               f"Delete {folder} and download it again (--download true){offline}.") from None


def _read_official(folder: str, files: list[str], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    parts = [_read_pickle(os.path.join(folder, f)) for f in files]
    x = np.concatenate([p[b"data"] for p in parts]).reshape(-1, 3, 32, 32)
    y = np.concatenate([np.asarray(p[label_key], dtype=np.int64) for p in parts])
    return x, y


def _download(tv_class, data_dir: str) -> None:
    """Fetch and unpack the official archive, verifying its MD5 (torchvision does both)."""
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(tv_class.url, data_dir, filename=tv_class.filename, md5=tv_class.tgz_md5)


def _load_cifar(name: str, data_dir: str, download: bool) -> Dataset:
    import torchvision.datasets as tvd

    tv_class = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    folder = os.path.join(data_dir, tv_class.base_folder)
    if name == "cifar10":
        train_files, test_files, label_key = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"
    else:
        train_files, test_files, label_key = ["train"], ["test"], b"fine_labels"
    needed = [os.path.join(folder, f) for f in train_files + test_files]
    if not all(os.path.isfile(p) for p in needed):
        reason = "download=false"
        if download:
            try:
                _download(tv_class, data_dir)
                reason = ""
            except Exception as e:  # offline, proxy, checksum mismatch ...
                reason = f"download failed: {type(e).__name__}: {e}"
        if reason:
            missing = [os.path.basename(p) for p in needed if not os.path.isfile(p)]
            hint = ("python ../shared/data/cifar10_jpeg.py materialize " + data_dir + "   (offline copy), or "
                    if name == "cifar10" else "")
            raise DataNotFoundError(
                f"{name} not found in {os.path.abspath(folder)} (missing: {', '.join(missing)}; {reason}). "
                f"Provide it in the official python-version layout: {hint}download {tv_class.url} "
                f"and extract it into {os.path.abspath(data_dir)}, or pass --data-dir to where it is.")
    train_x, train_y = _read_official(folder, train_files, label_key)
    test_x, test_y = _read_official(folder, test_files, label_key)
    digest = hashlib.sha256()
    for a in (train_x, train_y, test_x, test_y):
        digest.update(np.ascontiguousarray(a).tobytes())
    stats = {  # per-channel mean and std of the training images
        "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    }[name]
    return Dataset(name, torch.from_numpy(train_x), torch.from_numpy(train_y), torch.from_numpy(test_x),
                   torch.from_numpy(test_y), 100 if name == "cifar100" else 10, *stats, digest.hexdigest())


def _synthetic(seed: int = 0, n_train: int = 1000, n_test: int = 200, num_classes: int = 10) -> Dataset:
    """Learnable random images: each class is a fixed smooth pattern plus noise."""
    g = torch.Generator().manual_seed(1234 + seed)
    templates = F.interpolate(torch.rand(num_classes, 3, 4, 4, generator=g), size=32, mode="bilinear")

    def make(n):
        y = torch.arange(n) % num_classes
        x = templates[y] * 0.6 + torch.rand(n, 3, 32, 32, generator=g) * 0.4
        return (x * 255).round().to(torch.uint8), y

    (train_x, train_y), (test_x, test_y) = make(n_train), make(n_test)
    digest = hashlib.sha256(train_x.numpy().tobytes() + test_x.numpy().tobytes()).hexdigest()
    return Dataset("synthetic", train_x, train_y, test_x, test_y, num_classes, (0.5,) * 3, (0.25,) * 3, digest)


# Copies of a dataset that differ from the official release, recognized by the SHA-256
# of their arrays as read (Dataset.sha256), so that a run says which copy it used.
KNOWN_COPIES = {
    "cc390ed5b42efb26fec24d5d0e701522069e7b81129dcabf9671affc05c08a32":
        "CIFAR-10 offline copy (cifar10-jpeg.npz, materialized by cifar10_jpeg.py): a JPEG round trip of "
        "all 60,000 images, so pixels differ slightly from the official release and accuracy lands a "
        "little below published figures",
}


def source(ds: Dataset) -> str:
    """Which copy of the data a run used, for its `dataset_source` tag."""
    if ds.sha256 in KNOWN_COPIES:
        return KNOWN_COPIES[ds.sha256]
    if ds.name == "synthetic":
        return "synthetic (generated)"
    return f"{ds.name} as found in the data directory (not a copy known by hash; see dataset_sha256)"


# The registry of named choices: name -> loader(data_dir, download, seed).
DATASETS = {
    "cifar10": lambda data_dir, download, seed: _load_cifar("cifar10", data_dir, download),
    "cifar100": lambda data_dir, download, seed: _load_cifar("cifar100", data_dir, download),
    "synthetic": lambda data_dir, download, seed: _synthetic(seed),
}
config.check_registry("datasets", DATASETS)


def load(name: str, data_dir: str = "data", download: bool = True, train_subset: int = 0,
         test_subset: int = 0, seed: int = 0) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    ds = DATASETS[name](data_dir, download, seed)
    for split, wanted, have in (("train", train_subset, len(ds.train_y)), ("test", test_subset, len(ds.test_y))):
        if wanted > have:
            raise ValueError(f"{split}_subset={wanted} is larger than the {name} {split} set ({have} examples "
                             f"available); use at most {have}, or 0 for all of it")
    # The official files are already in a random, class-mixed order, so a prefix is a fair subset.
    if train_subset:
        ds.train_x, ds.train_y = ds.train_x[:train_subset], ds.train_y[:train_subset]
    if test_subset:
        ds.test_x, ds.test_y = ds.test_x[:test_subset], ds.test_y[:test_subset]
    return ds


def standardizer(mean, std, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) on `device` such that x * scale + shift = (x / 255 - mean) / std per
    channel. Made once per split: building them from Python numbers is a copy from the
    host, which on CUDA waits for all the work queued before it."""
    mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return 1.0 / (255.0 * std), -mean / std


def normalize(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32, standardized per channel (`standardizer`): one
    conversion (straight into the target memory layout) and one in-place pass."""
    out = x.to(torch.float32, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return torch.addcmul(shift, out, scale, out=out)  # shift + out * scale, written over out


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4, channels_last: bool = False) -> torch.Tensor:
    """Random crop with `pad` zero pixels each side, then a random horizontal flip,
    for a whole uint8 batch at once (the usual CIFAR recipe).

    One gather does it all: each output pixel's offset in the flattened padded image
    is (dy + row) * padded_width + column, with the flip folded into the columns.
    The gather writes straight into the requested memory layout, so channels-last
    batches cost no separate transpose (BENCHMARKS.md, data path)."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad)).reshape(b, c, -1)
    dy = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=generator)
    flip = torch.rand(b, device=x.device, generator=generator) < 0.5
    cols = dx[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    rows = dy[:, None] + torch.arange(h, device=x.device)
    index = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    # (b, h*w, c) storage seen as (b, c, h*w) is exactly the channels-last layout.
    out = (torch.empty(b, h * w, c, dtype=x.dtype, device=x.device).transpose(1, 2) if channels_last
           else torch.empty(b, c, h * w, dtype=x.dtype, device=x.device))
    torch.gather(padded, 2, index, out=out)
    return out.unflatten(2, (h, w))


class Batches:
    """Iterate over (normalized float images, labels) batches of a device-resident split.

    With `train=True` the order is reshuffled and the images augmented every epoch,
    from `generator`, so a seed fixes the whole stream.
    """

    def __init__(self, x, y, batch_size: int, mean, std, train: bool = False,
                 generator: torch.Generator | None = None, channels_last: bool = False):
        if channels_last and not train:
            # Kept channels-last once (a copy of the split), so that each batch is a plain
            # index and dtype conversion; training batches get the layout from `augment`.
            x = x.contiguous(memory_format=torch.channels_last)
        self.x, self.y, self.batch_size = x, y, batch_size
        self.scale, self.shift = standardizer(mean, std, x.device)
        self.train = train
        self.generator, self.channels_last = generator, channels_last

    def __len__(self) -> int:
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        n = len(self.y)
        order = (torch.randperm(n, device=self.x.device, generator=self.generator) if self.train
                 else torch.arange(n, device=self.x.device))
        for i in range(0, n, self.batch_size):
            idx = order[i:i + self.batch_size]
            xb = self.x[idx]
            if self.train:
                xb = augment(xb, self.generator, channels_last=self.channels_last)
            yield normalize(xb, self.scale, self.shift, self.channels_last), self.y[idx]


def pruning_batches(ds: Dataset, per_class: int, batch_size: int, seed: int,
                    channels_last: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`per_class` training examples of every class (a seeded choice), un-augmented."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ds.train_y), generator=g).to(ds.train_y.device)
    labels = ds.train_y[order]
    picked = torch.cat([order[labels == c][:per_class] for c in range(ds.num_classes)])
    if len(picked) < per_class * ds.num_classes:
        raise ValueError(f"prune_per_class={per_class} needs {per_class} training examples of every class; "
                         f"the training set ({len(ds.train_y)} examples) has fewer for some class")
    picked = picked[torch.randperm(len(picked), generator=g).to(picked.device)]
    return list(Batches(ds.train_x[picked], ds.train_y[picked], batch_size, ds.mean, ds.std,
                        channels_last=channels_last))
