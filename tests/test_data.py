import os
import pickle

import numpy as np
import pytest
import torch
from conftest import REPO

from prunetrack import data


def _write_cifar10(root, n_train=50, n_test=20):
    """A tiny dataset in the official python-version layout."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    arrays = {}
    for name, n in [*[(f"data_batch_{i}", n_train // 5) for i in range(1, 6)], ("test_batch", n_test)]:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = list(rng.integers(0, 10, n))
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"data": x, b"labels": y}, f)
        arrays[name] = (x, y)
    return arrays


def test_reads_official_layout(tmp_path):
    arrays = _write_cifar10(tmp_path)
    ds = data.load("cifar10", str(tmp_path), download=False)
    assert ds.train_x.shape == (50, 3, 32, 32) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (20, 3, 32, 32)
    # Rows are 1024 R, then 1024 G, then 1024 B values: channel planes in NCHW order.
    first = arrays["data_batch_1"][0][0]
    assert torch.equal(ds.train_x[0, 1].reshape(-1), torch.from_numpy(first[1024:2048]))
    assert ds.train_y[:10].tolist() == [int(v) for v in arrays["data_batch_1"][1]]
    assert len(ds.sha256) == 64


def test_subsets(tmp_path):
    _write_cifar10(tmp_path)
    ds = data.load("cifar10", str(tmp_path), download=False, train_subset=30, test_subset=5)
    assert len(ds.train_y) == 30 and len(ds.test_y) == 5


def test_subsets_larger_than_the_data_are_refused(tmp_path):
    _write_cifar10(tmp_path)
    with pytest.raises(ValueError, match=r"train_subset=51 is larger than the cifar10 train set \(50 examples"):
        data.load("cifar10", str(tmp_path), download=False, train_subset=51)
    with pytest.raises(ValueError, match=r"test_subset=300 is larger than the synthetic test set \(200 examples"):
        data.load("synthetic", test_subset=300)


def test_truncated_file_names_it_and_the_remedy(tmp_path):
    _write_cifar10(tmp_path)
    path = os.path.join(tmp_path, "cifar-10-batches-py", "data_batch_3")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(data.DataCorruptError) as e:
        data.load("cifar10", str(tmp_path), download=False)
    msg = str(e.value)
    assert path in msg and "truncated or corrupt" in msg and "download it again" in msg
    assert f"cifar10_jpeg.py materialize {tmp_path}" in msg


def test_missing_data_names_path_and_remedy(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(data, "_download", offline)
    with pytest.raises(data.DataNotFoundError) as e:
        data.load("cifar10", str(tmp_path / "nowhere"), download=True)
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "network is unreachable" in msg
    assert "cifar10_jpeg.py materialize" in msg and "cifar-10-python.tar.gz" in msg


def test_no_download_when_disabled(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_download", lambda *a: pytest.fail("must not download"))
    with pytest.raises(data.DataNotFoundError, match="download=false"):
        data.load("cifar100", str(tmp_path), download=False)


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match="cifar10, cifar100, synthetic"):
        data.load("mnist")


@pytest.mark.parametrize("channels_last", [False, True])
def test_augment_is_crop_and_flip_of_padded_image(channels_last):
    x = torch.arange(16 * 3 * 8 * 8, dtype=torch.int32).reshape(16, 3, 8, 8).to(torch.uint8)
    g = torch.Generator().manual_seed(0)
    out = data.augment(x, g, pad=2, channels_last=channels_last)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    seen = set()
    for i in range(16):
        # Every output must be some 8x8 window of the padded image, possibly mirrored.
        found = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
                 if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8].flip(2) if f
                                else padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert found, f"image {i} is no crop of its padded image"
        seen.add(found[0][2])
    assert seen == {False, True}  # both flipped and unflipped images occur


def test_augment_layouts_agree():
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    a = data.augment(x, torch.Generator().manual_seed(3))
    b = data.augment(x, torch.Generator().manual_seed(3), channels_last=True)
    assert torch.equal(a, b)


def test_augment_varies_and_is_seeded():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    a = data.augment(x, torch.Generator().manual_seed(1))
    b = data.augment(x, torch.Generator().manual_seed(1))
    c = data.augment(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, x)


def test_batches_cover_the_split_and_normalize():
    ds = data.load("synthetic")
    batches = data.Batches(ds.test_x, ds.test_y, 64, ds.mean, ds.std)
    ys = torch.cat([y for _, y in batches])
    assert len(batches) == 4 and torch.equal(ys, ds.test_y)
    x, _ = next(iter(batches))
    assert x.dtype == torch.float32 and abs(float(x.mean())) < 1.0


def test_pruning_batches_pick_per_class():
    ds = data.load("synthetic")
    batches = data.pruning_batches(ds, per_class=3, batch_size=8, seed=0)
    y = torch.cat([b[1] for b in batches])
    assert len(y) == 30 and torch.bincount(y).tolist() == [3] * 10
    again = data.pruning_batches(ds, per_class=3, batch_size=8, seed=0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


def test_pruning_batches_refuse_too_many_per_class():
    ds = data.load("synthetic", train_subset=20)
    with pytest.raises(ValueError, match="prune_per_class=5"):
        data.pruning_batches(ds, per_class=5, batch_size=8, seed=0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalize_matches_to_tensor_then_normalize(channels_last):
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    expected = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    out = data.normalize(x, *data.standardizer(mean, std, x.device), channels_last)
    assert torch.allclose(out, expected, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_source_names_the_offline_copy_by_its_hash():
    folder = os.path.join(REPO, "data")
    if not os.path.exists(os.path.join(folder, "cifar-10-batches-py", "test_batch")):
        pytest.skip("CIFAR-10 not materialized in data/ (scripts/bootstrap.sh does it from ../shared/data)")
    ds = data.load("cifar10", folder, download=False)
    if ds.sha256 not in data.KNOWN_COPIES:
        pytest.skip("data/ holds a CIFAR-10 copy other than the offline one")
    assert "JPEG round trip" in data.source(ds)
    ds.sha256 = "0" * 64  # any other copy is named as unknown, never as the offline one
    assert "not a copy known by hash" in data.source(ds)
    assert data.source(data.load("synthetic")) == "synthetic (generated)"
