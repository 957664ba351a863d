"""What every training mode shares on a Ray Train worker: the library under the recipes.

The recipes (:mod:`~tvlars_ray.classification`, :mod:`~tvlars_ray.bt`) build their models,
data and optimizers, describe each stage of training as a :class:`Stage`, and hand it to
:func:`run_stage`, the one epoch loop: seeding, the pass over the data, evaluation,
divergence, the store row, the report to Ray Train and the checkpoint. Nothing here knows
Tune, and nothing here knows which mode is running.

Reproducibility: every rank seeds python, numpy and torch from the trial's seed before
building the model, and re-seeds at the start of each epoch from (seed, epoch, rank); the data
order comes from (seed, epoch). An epoch therefore computes the same numbers whether it runs
straight through or after a restart from a checkpoint, which holds the model, the optimizer
and the schedule (so no RNG state is saved).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
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
from .monitor import TrialMetrics
from .store import Store, node_id, node_ip

CHECKPOINT_FILE = "state.pt"
# Reported first, so they lead Tune's result tables.
LEADING_METRICS = ("epoch", "test_acc", "train_loss", "samples_per_s", "cl_loss")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch) * 1009 + rank


def process_started_at() -> float | None:
    """When this process started (epoch seconds), from /proc; None where there is none."""
    try:
        with open("/proc/self/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _utc(seconds: float | None) -> dt.datetime | None:
    return None if seconds is None else dt.datetime.fromtimestamp(seconds, dt.timezone.utc)


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
    """Rank 0's link to the store and the live metrics; the other ranks record nothing.

    Every row also says when this attempt's process started, when Ray Train handed it the
    trial (``job["ready_at"]``) and when its first epoch began: where a trial's start-up
    time goes, from the store alone (``bench/trial_overhead.py`` reads them)."""

    def __init__(self, cfg: TrialConfig, job: dict[str, Any], worker: Worker) -> None:
        self.cfg, self.worker = cfg, worker
        self.experiment, self.trial_id = job.get("experiment"), job.get("trial_id")
        lead = worker.rank == 0
        self.store = Store(job["store"]) if job.get("store") and lead else None
        self.live = TrialMetrics(self.experiment, self.trial_id if lead else None, cfg.opt,
                                 cfg.bs)
        self.node, self.node_id = node_ip(), node_id()
        self.attempt = {"worker_started_at": _utc(process_started_at()),
                        "worker_ready_at": _utc(job.get("ready_at")), "data_ready_at": None,
                        "loop_started_at": None}

    def mark(self, moment: str) -> None:
        """Note the time of ``moment`` (data_ready_at, loop_started_at) once per attempt."""
        if self.attempt[moment] is None:
            self.attempt[moment] = _utc(time.time())

    def record(self, stage: str, epoch: int, metrics: dict[str, Any]) -> None:
        if self.store is not None:
            row = {"stage": stage, "epoch": epoch, "world_size": self.worker.world,
                   "backend": dist.get_backend() if self.worker.distributed else None,
                   "precision": "bf16" if self.worker.amp else "fp32",
                   "node_ip": self.node, "node_id": self.node_id, **self.attempt, **metrics}
            self.store.write_epoch(self.experiment, self.trial_id, self.cfg, row)
        self.live.update({**metrics, "epoch": epoch + 1})


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
    """The trial's latest checkpoint (any stage), or None on a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return torch.load(os.path.join(folder, CHECKPOINT_FILE), map_location=device,
                          weights_only=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile and DDP wrappers (what a checkpoint holds)."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def prepare_model(model: nn.Module, worker: Worker, compile: bool) -> nn.Module:
    """Memory layout, device and DDP wrapper, then ``torch.compile`` if asked: every mode's
    models go through here, so each honours the same settings."""
    if worker.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model, move_to_device=worker.device)
    return torch.compile(model) if compile else model


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


# -- the steps -------------------------------------------------------------------------------
def optimise(loss: torch.Tensor, optimizer: torch.optim.Optimizer, schedule) -> None:
    """Backward, one optimizer step, one schedule step; nothing here waits for the device."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer, schedule,
               worker: Worker, tally: Tally) -> None:
    """One supervised step (cross-entropy); the sums go to ``tally`` on the device."""
    with worker.autocast():
        out = model(worker.inputs(x))
        loss = F.cross_entropy(out.float(), y)
    optimise(loss, optimizer, schedule)
    tally.add(len(y), loss * len(y), (out.detach().argmax(1) == y).sum())


def train_epoch(model: nn.Module, loader, optimizer, schedule, worker: Worker) -> dict:
    """One supervised pass over this rank's shard; the sums stay on the device until the end."""
    model.train()
    tally = worker.tally(2)
    lr = optimizer.param_groups[0]["lr"]
    for x, y in loader:
        lr = optimizer.param_groups[0]["lr"]
        train_step(model, x, y, optimizer, schedule, worker, tally)
    (loss_sum, correct), count = tally.total()
    return {"train_loss": loss_sum / count, "train_acc": correct / count, "lr_now": lr,
            "train_samples": int(count)}


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


# -- the one epoch loop ----------------------------------------------------------------------
@dataclass
class Stage:
    """One stage of a trial's training: what the loop steps, and what its checkpoint holds."""

    name: str  # the store's `stage`: train, pretrain or linear
    model: nn.Module  # as trained (compile / DDP wrappers included)
    optimizer: torch.optim.Optimizer
    schedule: Any  # an LRScheduler stepped every iteration
    loader: Any  # set_epoch(epoch), then batches
    epochs: int
    one_epoch: Callable[[Iterable], dict[str, Any]]  # one pass over batches: training metrics
    evaluate: Callable[[], dict[str, Any]] | None = None
    loss: str = "train_loss"  # the metric whose non-finite value means the stage diverged
    seed_offset: int = 0  # keeps the stages' per-epoch seeds apart

    def checkpoint(self, epoch: int) -> dict[str, Any]:
        """The one place a checkpoint is built (and ``restore`` the one place it is read)."""
        return {"stage": self.name, "epoch": epoch, "model": unwrap(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict()}

    def restore(self, state: dict[str, Any]) -> int:
        """Load a checkpoint of this stage; returns the epoch to continue from."""
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        return state["epoch"] + 1


def timed_batches(loader: Iterable, device: torch.device, out: dict[str, Any]) -> Iterator:
    """The loader's batches; ``out["first_step_s"]`` gets the time from the start to the end of
    the first step (when the second batch is asked for), after one device sync per epoch."""
    began = time.perf_counter()
    for i, batch in enumerate(loader):
        if i == 1:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            out["first_step_s"] = time.perf_counter() - began
        yield batch


def checkpoint_due(epoch: int, epochs: int, every: int) -> bool:
    """Every ``every`` epochs, and always after the last one."""
    return epoch == epochs - 1 or (epoch + 1) % every == 0


def run_stage(stage: Stage, worker: Worker, cfg: TrialConfig, recorder: Recorder,
              state: dict[str, Any] | None = None) -> bool:
    """Run a stage's epochs from ``state`` (a checkpoint of this stage) or from the start.

    Each epoch: re-seed, one pass, evaluation unless the loss went non-finite, the store row,
    the report to Ray Train with a checkpoint when one is due. Returns False if the stage
    diverged (a diverged epoch is recorded, never checkpointed, and ends the stage).
    """
    start = stage.restore(state) if state is not None else 0
    recorder.mark("loop_started_at")
    for epoch in range(start, stage.epochs):
        began = time.perf_counter()
        torch.manual_seed(epoch_seed(cfg.seed, stage.seed_offset + epoch, worker.rank))
        stage.loader.set_epoch(epoch)
        timing: dict[str, Any] = {"first_step_s": None}
        metrics = stage.one_epoch(timed_batches(stage.loader, worker.device, timing))
        metrics.update(timing)
        train_time = time.perf_counter() - began
        diverged = not math.isfinite(metrics[stage.loss])
        if stage.evaluate is not None and not diverged:
            metrics.update(stage.evaluate())
        metrics.update(optimizer_stats(stage.optimizer))
        metrics.update(epoch=epoch, step=stage.schedule.last_epoch, diverged=diverged,
                       epoch_time_s=time.perf_counter() - began,
                       samples_per_s=metrics["train_samples"] / max(train_time, 1e-9))
        recorder.record(stage.name, epoch, metrics)
        due = not diverged and checkpoint_due(epoch, stage.epochs, cfg.checkpoint_every)
        report(worker, metrics, stage.checkpoint(epoch) if due else None)
        if diverged:
            return False
    return True
