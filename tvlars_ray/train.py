"""What runs on every Ray Train worker: one trial, epoch by epoch.

A plain PyTorch loop plus Ray Train's calls (``prepare_model``, ``get_checkpoint``,
``report``). It knows nothing of Tune: the trial's settings, store and id arrive in the
``train_loop_config`` dict, and rank 0 writes each epoch's row into the store as it ends.

Reproducibility: every rank seeds python, numpy and torch from the trial's seed before
building the model, and re-seeds at the start of each epoch from (seed, epoch, rank); the
data order comes from (seed, epoch). An epoch therefore computes the same numbers whether it
runs straight through or after a restart from a checkpoint, which holds the model, the
optimizer and the schedule.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

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
from .monitor import TrialMetrics
from .optim import build_optimizer
from .schedules import build_schedule
from .store import Store, node_id, node_ip

CHECKPOINT_FILE = "state.pt"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch) * 1009 + rank


@dataclass
class Worker:
    """This process's place in the trial: rank, world, device and numeric settings."""

    rank: int
    world: int
    device: torch.device
    amp: bool
    channels_last: bool

    @classmethod
    def current(cls, cfg: TrialConfig) -> Worker:
        ctx = ray.train.get_context()
        device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
        on_gpu = device.type == "cuda"
        if on_gpu:
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels
        amp = cfg.amp == "bf16" or (cfg.amp == "auto" and on_gpu)
        channels_last = on_gpu if cfg.channels_last is None else cfg.channels_last
        return cls(ctx.get_world_rank(), ctx.get_world_size(), device, amp, channels_last)

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def all_sum(self, values: torch.Tensor) -> list[float]:
        """Sum a small vector over all ranks and bring it to the host (one sync)."""
        if self.distributed:
            dist.all_reduce(values)
        return values.tolist()

    def tally(self, size: int) -> Tally:
        return Tally(self, size)


class Tally:
    """Per-epoch sums kept on the device, so the hot loop never waits for the GPU; the
    sample count is known on the host. ``total()`` reads everything once, summed over ranks."""

    def __init__(self, worker: Worker, size: int) -> None:
        self.worker, self.count = worker, 0
        self.values = torch.zeros(size, device=worker.device, dtype=torch.float64)

    def add(self, n: int, *terms: torch.Tensor) -> None:
        self.values += torch.stack([t.detach().double() for t in terms])
        self.count += n

    def total(self) -> tuple[list[float], int]:
        """(summed terms, summed count) over all ranks."""
        count = torch.full((1,), float(self.count), device=self.values.device,
                           dtype=torch.float64)
        *sums, count_all = self.worker.all_sum(torch.cat([self.values, count]))
        return sums, int(count_all)


class Recorder:
    """Rank 0's link to the store and the live metrics; the other ranks record nothing."""

    def __init__(self, cfg: TrialConfig, job: dict[str, Any], worker: Worker) -> None:
        self.cfg, self.worker = cfg, worker
        self.experiment, self.trial_id = job.get("experiment"), job.get("trial_id")
        lead = worker.rank == 0
        self.store = Store(job["store"]) if job.get("store") and lead else None
        self.live = TrialMetrics(self.experiment, self.trial_id if lead else None, cfg.opt,
                                 cfg.bs)
        self.node, self.node_id = node_ip(), node_id()

    def record(self, stage: str, epoch: int, metrics: dict[str, Any]) -> None:
        if self.store is not None:
            row = {"stage": stage, "epoch": epoch, "world_size": self.worker.world,
                   "backend": dist.get_backend() if self.worker.distributed else None,
                   "precision": "bf16" if self.worker.amp else "fp32",
                   "node_ip": self.node, "node_id": self.node_id, **metrics}
            self.store.write_epoch(self.experiment, self.trial_id, self.cfg, row)
        self.live.update({**metrics, "epoch": epoch + 1})


# Reported first, so they lead Tune's result tables.
LEADING_METRICS = ("epoch", "test_acc", "train_loss", "samples_per_s", "cl_loss")


def report(worker: Worker, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
    """Hand the epoch to Ray Train, with a checkpoint from rank 0 when one is due.

    Settings that do not apply (None) are left out; a diverged epoch reports NaN accuracy so
    searchers see a failed point rather than a missing one.
    """
    ordered = {k: metrics[k] for k in LEADING_METRICS if k in metrics}
    ordered.update(metrics)
    numbers = {k: v for k, v in ordered.items() if v is not None and not isinstance(v, str)}
    if metrics.get("diverged"):
        numbers.setdefault("test_acc", float("nan"))
    if state is None or worker.rank != 0:
        ray.train.report(numbers)
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save(state, os.path.join(folder, CHECKPOINT_FILE))
        ray.train.report(numbers, checkpoint=ray.train.Checkpoint.from_directory(folder))


def load_checkpoint(device: torch.device) -> dict[str, Any] | None:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return torch.load(os.path.join(folder, CHECKPOINT_FILE), map_location=device,
                          weights_only=False)


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def optimizer_stats(optimizer: torch.optim.Optimizer) -> dict[str, float | None]:
    """Trust-ratio summaries of the last step (LARS family), read once per epoch."""
    ratios = getattr(optimizer, "last_trust_ratios", None)
    phi = getattr(optimizer, "last_phi", None)
    out: dict[str, float | None] = {"trust_ratio_mean": None, "trust_ratio_min": None,
                                    "trust_ratio_max": None, "phi": None}
    if ratios is not None and ratios.numel():
        ratios = ratios.detach().double()
        mean, low, high = torch.stack([ratios.mean(), ratios.min(), ratios.max()]).tolist()
        out.update(trust_ratio_mean=mean, trust_ratio_min=low, trust_ratio_max=high)
    if phi is not None:
        out["phi"] = float(phi)
    return out


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


# -- the steps -------------------------------------------------------------------------------
def evaluate(model: nn.Module, loader, worker: Worker, topk5: bool) -> dict[str, float]:
    """Loss and accuracy over the whole test set: each rank its disjoint shard, then summed."""
    net = unwrap(model)
    net.eval()
    tally = worker.tally(3)
    with torch.no_grad(), worker.autocast():
        for x, y in loader:
            out = net(worker.inputs(x)).float()
            top = out.topk(min(5, out.shape[1]), dim=1).indices
            tally.add(len(y), F.cross_entropy(out, y, reduction="sum"), (top[:, 0] == y).sum(),
                      (top == y[:, None]).any(1).sum())
    (loss, correct, correct5), count = tally.total()
    return {"test_loss": loss / count, "test_acc": correct / count,
            "test_acc5": correct5 / count if topk5 else None, "test_samples": int(count)}


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer, schedule,
               worker: Worker, tally: Tally) -> None:
    """One optimizer step; nothing in it waits for the device."""
    with worker.autocast():
        out = model(worker.inputs(x))
        loss = F.cross_entropy(out.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
    tally.add(len(y), loss * len(y), (out.detach().argmax(1) == y).sum())


def train_epoch(model: nn.Module, loader, optimizer, schedule, worker: Worker) -> dict:
    """One pass over this rank's shard; the sums stay on the device until the end."""
    model.train()
    tally = worker.tally(2)
    lr = optimizer.param_groups[0]["lr"]
    for x, y in loader:
        lr = optimizer.param_groups[0]["lr"]
        train_step(model, x, y, optimizer, schedule, worker, tally)
    (loss_sum, correct), count = tally.total()
    return {"train_loss": loss_sum / count, "train_acc": correct / count, "lr_now": lr,
            "train_samples": int(count)}


# -- the trial -------------------------------------------------------------------------------
def train_func(job: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point (also run in-process by ``trial --local``).

    ``job`` holds ``cfg`` (a TrialConfig as a dict) and, to record epochs, ``store``,
    ``experiment`` and ``trial_id``.
    """
    cfg = TrialConfig.from_dict(job["cfg"])
    _quiet_report_log()
    if cfg.mode == "bt":
        from .bt import run_barlow_twins

        run_barlow_twins(cfg, job)
        return
    run_classification(cfg, job)


def _quiet_report_log() -> None:
    """Ray Train logs every report at INFO, on workers under a logger named by its file path
    (so its LoggingConfig cannot reach it): a wall of text per epoch. Keep warnings only."""
    from ray.train.v2._internal.execution import context, train_fn_utils

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    logging.getLogger(train_fn_utils.__name__).setLevel(logging.WARNING)  # local mode


def run_classification(cfg: TrialConfig, job: dict[str, Any]) -> None:
    worker = Worker.current(cfg)
    seed_everything(cfg.seed)
    train_loader, test_loader, num_classes = build_loaders(cfg, worker)
    model = build_model(cfg.model, num_classes, cfg.stem)
    if worker.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model, move_to_device=worker.device)
    optimizer = build_optimizer(cfg.opt, model, cfg)
    schedule = build_schedule(optimizer, cfg.sd, cfg.epochs, len(train_loader), cfg.bs,
                              cfg.warmup_epochs, phi=cfg.phi_args)
    start = 0
    state = load_checkpoint(worker.device)
    if state is not None:
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start = state["epoch"] + 1
    if cfg.compile:
        model = torch.compile(model)
    recorder = Recorder(cfg, job, worker)

    for epoch in range(start, cfg.epochs):
        began = time.perf_counter()
        torch.manual_seed(epoch_seed(cfg.seed, epoch, worker.rank))
        train_loader.set_epoch(epoch)
        metrics = train_epoch(model, train_loader, optimizer, schedule, worker)
        train_time = time.perf_counter() - began
        diverged = not math.isfinite(metrics["train_loss"])
        if diverged:
            metrics.update(test_loss=None, test_acc=None, test_acc5=None)
        else:
            metrics.update(evaluate(model, test_loader, worker, num_classes > 10))
        samples = metrics["train_samples"]
        metrics.update(optimizer_stats(optimizer))
        metrics.update(epoch=epoch, step=schedule.last_epoch, diverged=diverged,
                       epoch_time_s=time.perf_counter() - began,
                       samples_per_s=samples / max(train_time, 1e-9))
        recorder.record("train", epoch, metrics)
        last = diverged or epoch == cfg.epochs - 1
        due = not diverged and (last or (epoch + 1) % cfg.checkpoint_every == 0)
        checkpoint = None
        if due:
            checkpoint = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                          "schedule": schedule.state_dict(), "epoch": epoch}
        report(worker, metrics, checkpoint)
        if diverged:
            break

