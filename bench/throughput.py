"""Throughput, measured side by side in one run (these machines are noisy: read the ratios).

Sections (all by default; pick with --only):

- ``loader``: batches per second of the data path alone (augmentation included, no model):
  the device-resident loader against the DataLoader path (per-sample torchvision transforms,
  with 0 and 2 loader processes). Target: device >= 5x DataLoader.
- ``epoch``: a full ResNet-18 training epoch in a plain loop with either loader.
  Target: the device loader no slower.
- ``ray``: the same trial (training and evaluation each epoch) through Ray Train with 2 DDP
  workers and through ``trial --local`` (Ray Train's in-process mode), each beside the same
  loop without Ray (2 DDP processes with gloo; one process). Target (CPU): Ray's per-epoch
  overhead (store write, report and checkpoint included) under 10% of the plain loop.
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
from _figures import emit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CIFAR_ZIP = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.zip"

from tvlars_ray.config import TrialConfig  # noqa: E402
from tvlars_ray.data import (  # noqa: E402
    BatchAugment,
    DeviceLoader,
    EpochLoader,
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
        sets.append(EpochLoader(torch.utils.data.DataLoader(
            dataset, batch_size=cfg.bs, shuffle=is_train, num_workers=loader_workers,
            pin_memory=device.type == "cuda", persistent_workers=loader_workers > 0), device))
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
            train.set_epoch(epoch)
            start = time.perf_counter()
            count = 0
            for _ in train:
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
    emit(f"throughput.loader_device_vs_dataloader_{device.type}", rows["device"] / best_torch,
         "x", at_least=5)


def plain_epochs(cfg: TrialConfig, device: torch.device, kind: str, epochs: int,
                 amp: bool = False, channels_last: bool = False) -> list[float]:
    """Training images/s per epoch of a plain loop (no Ray), the project's model and data."""
    from tvlars_ray.models import build_model
    from tvlars_ray.optim import build_optimizer
    from tvlars_ray.worker import Worker, train_epoch

    torch.manual_seed(cfg.seed)
    worker = Worker(0, 1, device, amp, channels_last)
    train, _ = _loaders(cfg, device, kind, cfg.loader_workers)
    model = build_model(cfg.model, 10, cfg.stem).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.opt, model, cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    rates = []
    for epoch in range(epochs):
        train.set_epoch(epoch)
        start = time.perf_counter()
        metrics = train_epoch(model, train, optimizer, schedule, worker)
        rates.append(metrics["train_samples"] / (time.perf_counter() - start))
    return rates


def bench_epoch(args) -> None:
    cfg = TrialConfig.from_dict({**data_config(args), "model": "resnet18", "stem": "imagenet",
                                 "opt": "lars", "lr": 5.0, "bs": 128, "train_subset": 3000,
                                 "test_subset": 100, "loader_workers": 0})
    device = torch.device(args.device)
    print(f"\n== epoch: ResNet-18 (ImageNet stem) training images/s, plain loop, {cfg.ds}")
    rates = {}
    for kind in ("device", "torch"):
        rates[kind] = statistics.median(plain_epochs(cfg, device, kind, args.repeats))
    for kind, rate in rates.items():
        print(f"  {kind:8s} loader  {rate:8.1f} images/s   x{rate / rates['torch']:.2f}")
    ok = rates["device"] >= 0.97 * rates["torch"]
    print(f"  target device loader no slower: {'PASS' if ok else 'FAIL'}")
    emit("throughput.epoch_device_vs_torch_loader", rates["device"] / rates["torch"], "x",
         at_least=0.97)


def plain_trial(cfg: TrialConfig, rank: int = 0, world: int = 1) -> list[dict]:
    """The trial as a plain PyTorch loop (DDP when world > 1): per epoch, training
    images/s and the wall time of train + evaluation."""
    import torch.distributed as dist

    from tvlars_ray.data import build_loaders
    from tvlars_ray.models import build_model
    from tvlars_ray.optim import build_optimizer
    from tvlars_ray.schedules import build_schedule
    from tvlars_ray.worker import Worker, evaluate, train_epoch

    torch.manual_seed(cfg.seed)
    worker = Worker(rank, world, torch.device("cpu"), False, False)
    train, test, _, classes = build_loaders(cfg, worker.rank, worker.world, worker.device)
    model = build_model(cfg.model, classes, cfg.stem)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = build_optimizer(cfg.opt, model, cfg)
    schedule = build_schedule(optimizer, cfg.sd, cfg.epochs, len(train), cfg.bs, 0)
    epochs = []
    for epoch in range(cfg.epochs):
        train.set_epoch(epoch)
        start = time.perf_counter()
        metrics = train_epoch(model, train, optimizer, schedule, worker)
        train_time = time.perf_counter() - start
        evaluate(model, test, worker, False)
        epochs.append({"samples_per_s": metrics["train_samples"] / train_time,
                       "wall_s": time.perf_counter() - start})
    if world > 1:
        dist.barrier()
    return epochs


def _plain_ddp_worker(rank: int, cfg_dict: dict, port: int, out: str) -> None:
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)  # as Ray gives a 1-CPU worker
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    epochs = plain_trial(TrialConfig.from_dict(cfg_dict), rank, 2)
    if rank == 0:
        Path(out).write_text(json.dumps(epochs))
    dist.destroy_process_group()


def plain_ddp(cfg: TrialConfig) -> list[dict]:
    """Two spawned processes (no fork: this process may hold Ray's connections)."""
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:  # a free port for the process group
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "epochs.json")
        mp.spawn(_plain_ddp_worker, args=(cfg.to_dict(), port, out), nprocs=2)
        return json.loads(Path(out).read_text())


def ray_trial(cfg: TrialConfig, store: str, name: str) -> list[dict]:
    """The trial through Ray Train: images/s, and the wall time from one epoch's row to the
    next (training, evaluation, the store write, the report and the checkpoint)."""
    from tvlars_ray.store import Store
    from tvlars_ray.trial import fit_trial

    fit_trial(cfg, store, "bench", name)
    rows = Store(store).trial_epochs("bench", name)
    walls = rows["recorded_at"].diff().dt.total_seconds()
    return [{"samples_per_s": r, "wall_s": w}
            for r, w in zip(rows["samples_per_s"], walls.fillna(rows["epoch_time_s"]))]


def bench_ray(args) -> None:
    from tvlars_ray.cluster import connect

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    epochs = max(args.repeats, 3) + 1
    base = {**data_config(args), "model": "resnet18", "stem": "imagenet", "opt": "lars",
            "lr": 5.0, "bs": 128, "train_subset": 4000, "test_subset": 500, "epochs": epochs}
    print(f"\n== ray: the same trial ({base['ds']}, ResNet-18, bs 128, {epochs} epochs; the "
          f"first epoch is left out), Ray Train against the same loop without Ray, "
          f"{args.rounds} interleaved rounds")
    single = TrialConfig.from_dict({**base, "num_workers": 0})
    pair = TrialConfig.from_dict({**base, "num_workers": 2})
    connect(num_cpus=2)  # Ray's daemons run through every round, plain ones included
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as store:
        for round_ in range(args.rounds):  # interleaved: machine noise hits all alike
            for name, run in (
                    ("plain loop, 1 process", lambda _: plain_trial(single)),
                    ("Ray Train --local", lambda r: ray_trial(single, store, f"local{r}")),
                    ("plain DDP, 2 processes", lambda _: plain_ddp(pair)),
                    ("Ray Train, 2 DDP workers", lambda r: ray_trial(pair, store, f"ddp{r}"))):
                runs.setdefault(name, []).extend(run(round_)[1:])
    summary = {name: (statistics.median(e["samples_per_s"] for e in rows),
                      statistics.median(e["wall_s"] for e in rows))
               for name, rows in runs.items()}
    worst = 0.0
    for ray_name, plain_name in (("Ray Train --local", "plain loop, 1 process"),
                                 ("Ray Train, 2 DDP workers", "plain DDP, 2 processes")):
        for name in (plain_name, ray_name):
            rate, wall = summary[name]
            print(f"  {name:26s} {rate:8.1f} images/s   epoch {wall:6.2f} s")
        overhead = summary[ray_name][1] / summary[plain_name][1] - 1
        worst = max(worst, overhead)
        print(f"  -> Ray's per-epoch overhead: {100 * overhead:+.1f}% of the plain epoch")
    print(f"  target Ray overhead < 10% of the plain loop: "
          f"{'PASS' if worst < 0.10 else 'FAIL'} (worst {100 * worst:+.1f}%)")
    emit("throughput.ray_epoch_overhead_worst", 100 * worst, "%", at_most=10)


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
                                             "loader_workers": 8 if kind == "torch" else 0})
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
    emit("throughput.gpu_cifar_bf16_images_per_s", best, "img/s", at_least=15000)
    emit("throughput.gpu_device_vs_dataloader", ratio, "x", at_least=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", choices=["loader", "epoch", "ray", "gpu"], action="append")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of `ray`")
    parser.add_argument("--synthetic", action="store_true", help="use the synthetic data")
    args = parser.parse_args()
    sections = args.only or (["loader", "gpu"] if args.device == "cuda"
                             else ["loader", "epoch", "ray"])
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    for section in sections:
        {"loader": bench_loader, "epoch": bench_epoch, "ray": bench_ray,
         "gpu": bench_gpu}[section](args)


if __name__ == "__main__":
    main()
