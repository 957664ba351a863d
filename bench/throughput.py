"""Throughput, measured side by side in one run (these machines are noisy: read the ratios).

Sections (all by default; pick with --only):

- ``loader``: batches per second of the data path alone (augmentation included, no model):
  the device-resident loader against the DataLoader path (per-sample torchvision transforms,
  with 0 and 2 loader processes). Target: device >= 5x DataLoader.
- ``epoch``: a full ResNet-18 training epoch in a plain loop with either loader.
  Target: the device loader no slower.
- ``ray``: the same trial through Ray Train with 2 DDP workers, through ``trial --local``
  (Ray Train's in-process mode) and through a plain PyTorch loop with no Ray at all.
  Target (CPU): Ray's per-epoch overhead under 10% of the plain loop.
- ``gpu`` (with --device cuda): ResNet-18 with the CIFAR and the ImageNet stem at batch 512,
  device loader vs DataLoader, bf16 vs fp32, images/s of training.

Data: the CIFAR-10 JPEGs in ../shared/datasets when present, else the synthetic dataset.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CIFAR_ZIP = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.zip"

from tvlars_ray.config import TrialConfig  # noqa: E402
from tvlars_ray.data import (  # noqa: E402
    BatchAugment,
    DeviceLoader,
    Transformed,
    dataset_stats,
    in_memory_dataset,
    load_dataset,
    torch_transform,
)


def data_config(args) -> dict:
    if CIFAR_ZIP.exists() and not args.synthetic:
        return {"ds": "imagefolder", "data_dir": str(CIFAR_ZIP)}
    return {"ds": "synthetic"}


def _loaders(cfg: TrialConfig, device: torch.device, kind: str, loader_workers: int = 0):
    train, test = load_dataset(cfg.ds, cfg.data_dir, cfg.seed, cfg.train_subset,
                               cfg.test_subset)
    mean, std = dataset_stats(cfg.ds, cfg.norm, train)
    if kind == "device":
        return (DeviceLoader(train, cfg.bs, BatchAugment(mean, std), device, seed=cfg.seed),
                DeviceLoader(test, cfg.bs, BatchAugment(mean, std, train=False), device,
                             shuffle=False))
    sets = []
    for data, is_train in ((train, True), (test, False)):
        dataset = Transformed(in_memory_dataset(data), torch.arange(len(data)),
                              torch_transform(mean, std, data.image_size, is_train))
        sets.append(torch.utils.data.DataLoader(
            dataset, batch_size=cfg.bs, shuffle=is_train, num_workers=loader_workers,
            pin_memory=device.type == "cuda", persistent_workers=loader_workers > 0))
    return tuple(sets)


def bench_loader(args) -> None:
    cfg = TrialConfig.from_dict({**data_config(args), "bs": 256, "train_subset": 10000,
                                 "test_subset": 100})
    device = torch.device(args.device)
    print(f"\n== loader: batches/s of {cfg.ds} (bs {cfg.bs}, augmentation, no model)")
    rows = {}
    for name, kind, workers in (("device", "device", 0), ("DataLoader, 0 procs", "torch", 0),
                                ("DataLoader, 2 procs", "torch", 2)):
        train, _ = _loaders(cfg, device, kind, workers)
        times = []
        for epoch in range(args.repeats):
            if kind == "device":
                train.set_epoch(epoch)
            start = time.perf_counter()
            count = 0
            for x, _ in train:
                x = x.to(device, non_blocking=True)
                count += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(count / (time.perf_counter() - start))
        rows[name] = statistics.median(times)
    best_torch = max(v for k, v in rows.items() if k != "device")
    for name, rate in rows.items():
        print(f"  {name:22s} {rate:9.1f} batches/s   x{rate / best_torch:.2f} of the best "
              f"DataLoader")
    ok = rows["device"] >= 5 * best_torch
    print(f"  target device >= 5x DataLoader: {'PASS' if ok else 'FAIL'} "
          f"({rows['device'] / best_torch:.1f}x)")


def plain_epochs(cfg: TrialConfig, device: torch.device, kind: str, epochs: int,
                 amp: bool = False, channels_last: bool = False) -> list[float]:
    """Training images/s per epoch of a plain loop (no Ray), the project's model and data."""
    from tvlars_ray.models import build_model
    from tvlars_ray.optim import build_optimizer
    from tvlars_ray.train import Worker, train_epoch

    torch.manual_seed(cfg.seed)
    worker = Worker(0, 1, device, amp, channels_last)
    train, _ = _loaders(cfg, device, kind, cfg.workers)
    model = build_model(cfg.model, 10, cfg.stem).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.opt, model, cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    rates = []
    for epoch in range(epochs):
        if kind == "device":
            train.set_epoch(epoch)
        else:
            train = _DeviceMove(train, device)
        start = time.perf_counter()
        metrics = train_epoch(model, train, optimizer, schedule, worker)
        rates.append(metrics["train_samples"] / (time.perf_counter() - start))
    return rates


class _DeviceMove:
    """Move DataLoader batches to the device, as prepare_data_loader does."""

    def __init__(self, loader, device) -> None:
        self.loader, self.device = loader, device

    def __iter__(self):
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def bench_epoch(args) -> None:
    cfg = TrialConfig.from_dict({**data_config(args), "model": "resnet18", "stem": "imagenet",
                                 "opt": "lars", "lr": 5.0, "bs": 128, "train_subset": 3000,
                                 "test_subset": 100, "workers": 0})
    device = torch.device(args.device)
    print(f"\n== epoch: ResNet-18 (ImageNet stem) training images/s, plain loop, {cfg.ds}")
    rates = {}
    for kind in ("device", "torch"):
        rates[kind] = statistics.median(plain_epochs(cfg, device, kind, args.repeats))
    for kind, rate in rates.items():
        print(f"  {kind:8s} loader  {rate:8.1f} images/s   x{rate / rates['torch']:.2f}")
    ok = rates["device"] >= 0.97 * rates["torch"]
    print(f"  target device loader no slower: {'PASS' if ok else 'FAIL'}")


def bench_ray(args) -> None:
    from tvlars_ray.store import Store
    from tvlars_ray.sweep import connect
    from tvlars_ray.trial import fit_trial

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    epochs = max(args.repeats, 3)
    base = {**data_config(args), "model": "resnet18", "stem": "imagenet", "opt": "lars",
            "lr": 5.0, "bs": 128, "train_subset": 4000, "test_subset": 500, "epochs": epochs}
    print(f"\n== ray: the same trial ({base['ds']}, ResNet-18, bs 128, {epochs} epochs), "
          f"steady-state epochs (the first is left out)")
    plain = plain_epochs(TrialConfig.from_dict({**base, "num_workers": 0}),
                         torch.device("cpu"), "device", epochs)
    rates = {"plain loop (no Ray)": statistics.median(plain[1:])}
    walls = {}
    connect(num_cpus=2)
    with tempfile.TemporaryDirectory() as store:
        for name, workers in (("Ray Train --local", 0), ("Ray Train, 2 DDP workers", 2)):
            cfg = TrialConfig.from_dict({**base, "num_workers": workers})
            fit_trial(cfg, store, "bench", name.split()[-2])
            rows = Store(store).trial_epochs("bench", name.split()[-2])
            rates[name] = statistics.median(rows["samples_per_s"].iloc[1:])
            gaps = rows["recorded_at"].diff().dt.total_seconds().iloc[1:]
            walls[name] = statistics.median(gaps / rows["epoch_time_s"].iloc[1:])
    reference = rates["plain loop (no Ray)"]
    for name, rate in rates.items():
        extra = f"   epoch wall / work x{walls[name]:.2f}" if name in walls else ""
        print(f"  {name:26s} {rate:8.1f} images/s   x{rate / reference:.2f} of plain{extra}")
    overhead = max(1 - rates["Ray Train, 2 DDP workers"] / reference,
                   1 - rates["Ray Train --local"] / reference)
    print(f"  target Ray overhead < 10% of the plain loop: "
          f"{'PASS' if overhead < 0.10 else 'FAIL'} ({100 * overhead:.1f}%)")


def bench_gpu(args) -> None:
    print("\n== gpu: ResNet-18 training images/s at batch 512")
    device = torch.device("cuda")
    data = data_config(args)
    results = {}
    for stem in ("cifar", "imagenet"):
        for kind in ("device", "torch"):
            for amp in (True, False):
                cfg = TrialConfig.from_dict({**data, "model": "resnet18", "stem": stem,
                                             "opt": "lars", "lr": 5.0, "bs": 512,
                                             "train_subset": 20000, "test_subset": 100,
                                             "workers": 8 if kind == "torch" else 0})
                rates = plain_epochs(cfg, device, kind, 3, amp=amp, channels_last=amp)
                results[(stem, kind, amp)] = statistics.median(rates[1:])
                print(f"  stem {stem:8s} {kind:6s} loader  {'bf16+CL' if amp else 'fp32   '} "
                      f"{results[(stem, kind, amp)]:9.0f} images/s", flush=True)
    best = results[("cifar", "device", True)]
    ratio = results[("imagenet", "device", True)] / results[("imagenet", "torch", True)]
    print(f"  target CIFAR stem, bf16, device loader >= 15k images/s: "
          f"{'PASS' if best >= 15000 else 'FAIL'} ({best:.0f})")
    print(f"  target device loader >= 3x DataLoader (ImageNet stem): "
          f"{'PASS' if ratio >= 3 else 'FAIL'} ({ratio:.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", choices=["loader", "epoch", "ray", "gpu"], action="append")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--synthetic", action="store_true", help="use the synthetic data")
    args = parser.parse_args()
    sections = args.only or (["loader", "epoch", "gpu"] if args.device == "cuda"
                             else ["loader", "epoch", "ray"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    for section in sections:
        {"loader": bench_loader, "epoch": bench_epoch, "ray": bench_ray,
         "gpu": bench_gpu}[section](args)


if __name__ == "__main__":
    main()
