import math

import pytest
import torch

from tvlars_ray.config import TrialConfig
from tvlars_ray.optim import build_optimizer
from tvlars_ray.schedules import build_schedule, lr_multiplier


def test_cosine_is_one_half_wave_over_the_run():
    total = 1000
    assert lr_multiplier("cosine", 0, total) == 1.0
    assert lr_multiplier("cosine", 500, total) == pytest.approx(0.5)
    assert lr_multiplier("cosine", 1000, total) == pytest.approx(0.0)
    values = [lr_multiplier("cosine", s, total) for s in range(total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:])), "no oscillation"


def test_lars_warm_follows_the_reference_formula():
    bs, total, warm = 1024, 1000, 200
    peak = bs / 256
    assert lr_multiplier("lars-warm", 0, total, bs, warm) == 0.0
    assert lr_multiplier("lars-warm", 50, total, bs, warm) == pytest.approx(peak * 50 / 200)
    assert lr_multiplier("lars-warm", 200, total, bs, warm) == pytest.approx(peak)
    s = 600
    q = 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
    assert lr_multiplier("lars-warm", s, total, bs, warm) == pytest.approx(
        peak * q + 0.001 * peak * (1 - q))
    assert lr_multiplier("lars-warm", total, total, bs, warm) == pytest.approx(0.001 * peak)


@pytest.mark.parametrize("opt", ["tvlars", "adam", "lamb", "sgd"])
def test_schedules_drive_every_optimizer_per_iteration(opt):
    cfg = TrialConfig(ds="synthetic", opt=opt, lr=0.5, bs=512, epochs=10, sd="lars-warm",
                      warmup_epochs=2)
    model = torch.nn.Linear(4, 3)
    optimizer = build_optimizer(opt, model, cfg)
    steps_per_epoch = 5
    schedule = build_schedule(optimizer, cfg.sd, cfg.epochs, steps_per_epoch, cfg.bs,
                              cfg.warmup_epochs)
    seen = []
    for _ in range(cfg.epochs * steps_per_epoch):
        seen.append(optimizer.param_groups[0]["lr"])
        model(torch.randn(8, 4)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    total, warm = 50, 10
    expected = [0.5 * lr_multiplier("lars-warm", s, total, 512, warm) for s in range(total)]
    assert seen == pytest.approx(expected)
    assert seen[5] == pytest.approx(0.5 * 2 * 5 / 10)  # half-way up to lr * bs / 256
    assert len({g["lr"] for g in optimizer.param_groups}) == 1  # every group, same schedule
