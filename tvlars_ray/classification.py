"""Classification (``mode="clf"``): the paper's supervised training, as a recipe over the
worker library.

Data, model and optimizer for one trial, then one :class:`~tvlars_ray.worker.Stage` run by
the shared epoch loop.
"""

from __future__ import annotations

from typing import Any

from .config import TrialConfig
from .data import build_loaders
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
    train_loader, test_loader, val_loader, num_classes = build_loaders(
        cfg, worker.rank, worker.world, worker.device)
    recorder.mark("data_ready_at")
    model = prepare_model(build_model(cfg.model, num_classes, cfg.stem), worker, cfg.compile)
    optimizer = build_optimizer(cfg.opt, model, cfg)
    schedule = build_schedule(optimizer, cfg.sd, cfg.epochs, len(train_loader), cfg.bs,
                              cfg.warmup_epochs, phi=cfg.phi_args)

    def evaluate_all() -> dict[str, Any]:
        metrics = evaluate(model, test_loader, worker, topk5=num_classes > 10)
        if val_loader is not None:
            metrics.update(evaluate(model, val_loader, worker, topk5=False, split="val"))
        return metrics

    stage = Stage(
        "train", model, optimizer, schedule, train_loader, cfg.epochs,
        one_epoch=lambda batches: train_epoch(model, batches, optimizer, schedule, worker),
        evaluate=evaluate_all)
    run_stage(stage, worker, cfg, recorder, load_checkpoint(worker.device))
