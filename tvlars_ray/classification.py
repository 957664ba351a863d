"""Classification (``mode="clf"``): the paper's supervised training, as a recipe over the
worker library.

Data, model and optimizer for one trial, then one :class:`~tvlars_ray.worker.Stage` run by
the shared epoch loop.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from .config import TrialConfig
from .data import (
    FOLDER_DATASETS,
    BatchAugment,
    DeviceLoader,
    Transformed,
    dataset_stats,
    in_memory_dataset,
    load_dataset,
    streamed_folders,
    torch_transform,
)
from .models import build_model
from .optim import build_optimizer
from .schedules import build_schedule
from .worker import (
    Recorder,
    Stage,
    Worker,
    evaluate,
    load_checkpoint,
    prepare_model,
    run_stage,
    seed_everything,
    train_epoch,
)


def run(cfg: TrialConfig, job: dict[str, Any]) -> None:
    """One classification trial on this worker, from its checkpoint if it has one."""
    worker = Worker.current(cfg)
    recorder = Recorder(cfg, job, worker)
    seed_everything(cfg.seed)
    train_loader, test_loader, num_classes = build_loaders(cfg, worker)
    recorder.mark("data_ready_at")
    model = prepare_model(build_model(cfg.model, num_classes, cfg.stem), worker, cfg.compile)
    optimizer = build_optimizer(cfg.opt, model, cfg)
    schedule = build_schedule(optimizer, cfg.sd, cfg.epochs, len(train_loader), cfg.bs,
                              cfg.warmup_epochs)
    stage = Stage(
        "train", model, optimizer, schedule, train_loader, cfg.epochs,
        one_epoch=lambda batches: train_epoch(model, batches, optimizer, schedule, worker),
        evaluate=lambda: evaluate(model, test_loader, worker, topk5=num_classes > 10))
    run_stage(stage, worker, cfg, recorder, load_checkpoint(worker.device))


# -- data ------------------------------------------------------------------------------------
def build_loaders(cfg: TrialConfig, worker: Worker):
    """Train and test batch iterables for this rank, plus the number of classes."""
    per_worker = cfg.bs // worker.world
    if cfg.loader == "torch" and cfg.ds in FOLDER_DATASETS:  # streamed from disk
        train, test, num_classes, (mean, std) = streamed_folders(
            cfg.ds, cfg.data_dir, cfg.seed, cfg.train_subset, cfg.test_subset, cfg.norm)
        size = None
    else:
        train_set, test_set = load_dataset(cfg.ds, cfg.data_dir, cfg.seed, cfg.train_subset,
                                           cfg.test_subset)
        mean, std = dataset_stats(cfg.ds, cfg.norm, train_set)
        num_classes, size = train_set.num_classes, train_set.image_size
        if cfg.loader == "device":
            train_loader = DeviceLoader(train_set, per_worker, BatchAugment(mean, std),
                                        worker.device, worker.rank, worker.world, cfg.seed,
                                        shuffle=True)
            test_loader = DeviceLoader(test_set, per_worker, BatchAugment(mean, std, train=False),
                                       worker.device, worker.rank, worker.world, cfg.seed,
                                       shuffle=False)
            return train_loader, test_loader, num_classes
        train = (in_memory_dataset(train_set), torch.arange(len(train_set)))
        test = (in_memory_dataset(test_set), torch.arange(len(test_set)))
    return (_torch_loader(cfg, worker, train, torch_transform(mean, std, size, True),
                          per_worker, True),
            _torch_loader(cfg, worker, test, torch_transform(mean, std, size, False),
                          per_worker, False), num_classes)


def _torch_loader(cfg: TrialConfig, worker: Worker, source, transform, per_worker: int,
                  train: bool):
    """The classic path: a DataLoader with per-sample transforms and a seeded sampler."""
    dataset = Transformed(*source, transform)
    if train:
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=worker.world, rank=worker.rank, shuffle=True, seed=cfg.seed)
    else:  # every test image exactly once over the ranks
        sampler = list(range(worker.rank, len(dataset), worker.world))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=per_worker, sampler=sampler, num_workers=cfg.loader_workers,
        worker_init_fn=_seed_loader_worker, persistent_workers=cfg.loader_workers > 0,
        pin_memory=worker.device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed))
    return EpochLoader(loader, worker.device, sampler if train else None)


def _seed_loader_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class EpochLoader:
    """A DataLoader behaving like the device loader: ``set_epoch`` reseeds the sampler's
    order, batches arrive on the device. (Ray's ``prepare_data_loader`` would add its own,
    unseeded sampler; moving batches here also keeps the loop usable without Ray.)"""

    def __init__(self, loader, device: torch.device, sampler=None) -> None:
        self.loader, self.device, self.sampler = loader, device, sampler

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
