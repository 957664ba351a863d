"""The GPU path: no host synchronisation in the hot loop (skipped without CUDA)."""

import pytest
import torch

from tvlars_ray.config import TrialConfig
from tvlars_ray.data import BatchAugment, DeviceLoader, load_dataset
from tvlars_ray.models import build_model
from tvlars_ray.optim import build_optimizer
from tvlars_ray.schedules import build_schedule
from tvlars_ray.worker import Worker, optimizer_stats, train_step

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _no_sync(steps):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("opt, sd", [("tvlars", "none"), ("lars", "lars-warm"),
                                     ("lamb", "cosine"), ("sgd", "none")])
def test_training_steps_never_wait_for_the_gpu(opt, sd):
    device = torch.device("cuda")
    cfg = TrialConfig(ds="synthetic", model="resnet18", stem="cifar", opt=opt, lr=1.0, bs=256,
                      sd=sd, epochs=2, warmup_epochs=1)
    worker = Worker(0, 1, device, amp=True, channels_last=True)
    train, _ = load_dataset("synthetic", None, 0, train_subset=2048, test_subset=10)
    loader = DeviceLoader(train, cfg.bs, BatchAugment((0.5,) * 3, (0.25,) * 3), device)
    model = build_model(cfg.model, 10, cfg.stem).to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(opt, model, cfg)
    schedule = build_schedule(optimizer, cfg.sd, cfg.epochs, len(loader), cfg.bs, 1)
    tally = worker.tally(2)
    batches = iter(loader)
    x, y = next(batches)
    train_step(model, x, y, optimizer, schedule, worker, tally)  # warm-up: lazy state, kernels

    def steps():
        for _ in range(4):
            xb, yb = next(batches)
            train_step(model, xb, yb, optimizer, schedule, worker, tally)

    _no_sync(steps)
    (loss, correct), count = tally.total()
    assert count == 5 * cfg.bs and loss == loss and 0 <= correct <= count
    stats = optimizer_stats(optimizer)
    if opt in ("tvlars", "lars", "lamb"):
        assert stats["trust_ratio_mean"] > 0


def test_barlow_twins_steps_never_wait_for_the_gpu():
    from tvlars_ray.bt import BarlowTwins, TwoViews
    from tvlars_ray.models import split_head

    device = torch.device("cuda")
    cfg = TrialConfig(ds="synthetic", mode="bt", model="resnet18", stem="cifar", opt="tvlars",
                      lr=1.0, bs=128, projector="1024-1024-1024")
    worker = Worker(0, 1, device, amp=True, channels_last=True)
    train, _ = load_dataset("synthetic", None, 0, train_subset=1024, test_subset=10)
    loader = DeviceLoader(train, cfg.bs, TwoViews((0.5,) * 3, (0.25,) * 3), device)
    backbone, dim = split_head(build_model(cfg.model, 10, cfg.stem))
    model = BarlowTwins(backbone, dim, cfg.projector_dims, cfg.btlmbda, cfg.bs).to(device)
    optimizer = build_optimizer(cfg.opt, model, cfg)
    batches = iter(loader)

    def step():
        (y1, y2), _ = next(batches)
        with worker.autocast():
            loss = model(worker.inputs(y1), worker.inputs(y2))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    step()
    _no_sync(lambda: [step() for _ in range(3)])
    assert torch.isfinite(step()).item()


def test_device_loader_on_the_gpu_matches_the_cpu_order():
    train, _ = load_dataset("synthetic", None, 0, train_subset=300, test_subset=10)
    aug = BatchAugment((0.5,) * 3, (0.25,) * 3, train=False)
    gpu = DeviceLoader(train, 64, aug, torch.device("cuda"), rank=1, world=2, seed=3)
    cpu = DeviceLoader(train, 64, aug, torch.device("cpu"), rank=1, world=2, seed=3)
    for loader in (gpu, cpu):
        loader.set_epoch(2)
    for (xg, yg), (xc, yc) in zip(gpu, cpu):
        assert torch.equal(yg.cpu(), yc) and torch.allclose(xg.cpu(), xc)
