import io
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tvlars_ray.data import (
    BatchAugment,
    DataError,
    DeviceLoader,
    ImageSet,
    ensure_available,
    load_dataset,
    stratified_subset,
    synthetic_arrays,
    torch_transform,
)
from tvlars_ray.models import build_model


def test_synthetic_is_deterministic_and_cifar_shaped():
    a, la = synthetic_arrays(300, seed=3)
    b, lb = synthetic_arrays(300, seed=3)
    assert a.shape == (300, 3, 32, 32) and a.dtype == torch.uint8 and la.dtype == torch.int64
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert set(la.tolist()) == set(range(10)) and torch.bincount(la).min() == 30
    c, _ = synthetic_arrays(300, seed=4)
    test, _ = synthetic_arrays(300, seed=3, split="test")
    assert not torch.equal(a, c) and not torch.equal(a, test)


def _normalise(x):
    x = x.float() / 255
    return (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)


def test_synthetic_is_learnable_but_not_trivially_separable():
    torch.manual_seed(0)
    train, test = load_dataset("synthetic", None, seed=0, train_subset=2000, test_subset=500)
    xtr, xte = _normalise(train.images), _normalise(test.images)
    # nearest class mean on raw pixels: well below what a CNN reaches
    means = torch.stack([xtr[train.labels == c].mean(0) for c in range(10)]).flatten(1)
    ncm = (torch.cdist(xte.flatten(1), means).argmin(1) == test.labels).float().mean().item()
    model = build_model("cnn", 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    accs = []
    for _ in range(6):
        model.train()
        for idx in torch.randperm(2000).split(64):
            loss = F.cross_entropy(model(xtr[idx]), train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            accs.append((model(xte).argmax(1) == test.labels).float().mean().item())
    assert accs[0] < 0.6, "one epoch should not solve it"
    assert max(accs) > 0.45 and max(accs) > ncm + 0.1, (accs, ncm)


def test_stratified_subset_keeps_proportions_and_is_seeded():
    train, _ = load_dataset("synthetic", None, seed=0, train_subset=1000, test_subset=10)
    sub = stratified_subset(train, 105, seed=7)
    counts = torch.bincount(sub.labels, minlength=10)
    assert len(sub) == 105 and counts.min() >= 10 and counts.max() <= 11
    assert torch.equal(sub.images, stratified_subset(train, 105, seed=7).images)
    assert not torch.equal(sub.images, stratified_subset(train, 105, seed=8).images)


def _set(n):
    images = torch.arange(n, dtype=torch.int64).view(n, 1, 1, 1).expand(n, 3, 4, 4)
    return ImageSet((images % 256).to(torch.uint8).contiguous(), torch.arange(n), ("a",))


@pytest.mark.parametrize("n, world, bs", [(103, 2, 8), (100, 4, 16), (7, 3, 2)])
def test_device_loader_shards_are_disjoint_and_cover_the_epoch(n, world, bs):
    data = _set(n)
    aug = BatchAugment((0.0,) * 3, (1 / 255,) * 3, train=False)
    seen, lengths = [], []
    for rank in range(world):
        loader = DeviceLoader(data, bs, aug, torch.device("cpu"), rank, world, seed=1)
        loader.set_epoch(3)
        labels = torch.cat([y for _, y in loader])
        lengths.append(len(loader))
        seen.append(labels)
    assert len(set(lengths)) == 1, "every rank must step the same number of times"
    union = torch.cat(seen)
    assert set(union.tolist()) == set(range(n))
    assert len(union) - n < world  # only the DistributedSampler-style padding repeats
    # evaluation: every sample exactly once
    evals = [torch.cat([y for _, y in DeviceLoader(data, bs, aug, torch.device("cpu"), r, world,
                                                   shuffle=False)]) for r in range(world)]
    assert sorted(torch.cat(evals).tolist()) == list(range(n))
    # a new epoch is a new permutation, the same for every rank
    a = DeviceLoader(data, bs, aug, torch.device("cpu"), 0, world, seed=1)
    a.set_epoch(4)
    assert not torch.equal(torch.cat([y for _, y in a]), seen[0]) or n < 10


def test_batch_augment_is_exactly_crop_and_flip_without_rotation():
    images, _ = synthetic_arrays(16, seed=0)
    aug = BatchAugment((0.0,) * 3, (1 / 255,) * 3, degrees=0.0)
    out = aug(images, torch.Generator().manual_seed(0))
    padded = F.pad(images.float(), (4, 4, 4, 4))
    for i in range(len(images)):
        candidates = [padded[i, :, y:y + 32, x:x + 32] for y in range(9) for x in range(9)]
        candidates += [c.flip(2) for c in candidates]
        assert any(torch.equal(out[i], c) for c in candidates), f"image {i} is no crop/flip"


def test_batch_augment_matches_torchvision_statistics():
    images, _ = synthetic_arrays(512, seed=1)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    torch.manual_seed(0)
    ours = torch.cat([BatchAugment(mean, std)(images, torch.Generator().manual_seed(s))
                      for s in range(4)])
    transform = torch_transform(mean, std, 32, train=True)
    theirs = torch.stack([transform(img) for img in images.repeat(4, 1, 1, 1)])
    pad = (-torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1)  # a zero pixel, normalised
    for stat in (lambda x: x.mean(), lambda x: x.std(), lambda x: (x == pad).float().mean(),
                 lambda x: x[:, :, :, :16].mean() - x[:, :, :, 16:].mean()):
        assert abs(stat(ours) - stat(theirs)) < 0.02, (stat(ours), stat(theirs))
    assert 0.1 < (ours == pad).float().mean() < 0.3  # padding and rotation corners are zero


def _zip_folder(path, classes=("cat", "dog"), per_split=(6, 3), size=8, fmt="PNG"):
    from PIL import Image

    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as archive:
        for split, n in zip(("train", "test"), per_split):
            for c in classes:
                for i in range(n):
                    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                    buffer = io.BytesIO()
                    Image.fromarray(pixels).save(buffer, format=fmt)
                    archive.writestr(f"root/{split}/{c}/{i:03d}.png", buffer.getvalue())


def test_imagefolder_zip_is_decoded_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TVLARS_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "tiny.zip"
    _zip_folder(source)
    ensure_available("imagefolder", str(source))
    train, test = load_dataset("imagefolder", str(source), seed=0)
    assert train.images.shape == (12, 3, 8, 8) and test.images.shape == (6, 3, 8, 8)
    assert train.classes == ("cat", "dog") and torch.bincount(test.labels).tolist() == [3, 3]
    decoded = next((tmp_path / "cache" / "decoded").glob("tiny-*/train_images.npy"))
    stamp = decoded.stat().st_mtime_ns
    again, _ = load_dataset("imagefolder", str(source), seed=0, train_subset=4)
    assert decoded.stat().st_mtime_ns == stamp and len(again) == 4
    assert torch.bincount(again.labels).tolist() == [2, 2]


def test_missing_datasets_say_where_to_put_the_files(tmp_path, monkeypatch):
    monkeypatch.setenv("TVLARS_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"imagefolder needs --data-dir"):
        ensure_available("imagefolder", None)
    with pytest.raises(DataError, match=r"not found in .*folder or \.zip"):
        ensure_available("imagefolder", str(tmp_path / "nothing"))
    with pytest.raises(DataError, match=r"tinyimagenet not found .*tinyimagenet"):
        ensure_available("tinyimagenet", str(tmp_path))
    half = tmp_path / "half.zip"
    with zipfile.ZipFile(half, "w") as archive:
        archive.writestr("train/a/1.png", b"")
    with pytest.raises(DataError, match="no images under test"):
        ensure_available("imagefolder", str(half))
