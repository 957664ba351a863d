import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tvlars_ray.config import TrialConfig
from tvlars_ray.optim import build_optimizer, tvlars_phi
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


PHI = dict(lmbda=0.02, alpha=0.5, delay=50.0, gamma_min=0.05)


def test_phi_is_tvlars_phi_counted_from_one_at_the_first_step():
    for s in (0, 1, 49, 50, 500):
        assert lr_multiplier("phi", s, 1000, phi=PHI) == tvlars_phi(s + 1, **PHI)
    reference = dict(lmbda=1e-3, alpha=0.1, delay=0.0, gamma_min=0.0)  # phi starts at 0.908
    assert lr_multiplier("phi", 0, 10, phi=reference) == pytest.approx(1 / (0.1 + math.exp(1e-3)))
    with pytest.raises(ValueError, match="lmbda"):
        lr_multiplier("phi", 0, 10)


@pytest.fixture
def one_thread():
    """One intra-op thread: two threads waiting on each other at every op of a tiny model
    slow it down many times on a small shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
def test_lars_under_phi_takes_tvlars_steps(foreach, one_thread):
    """The ablation's premise: with momentum 0 and a norm clip that never binds, LARS whose lr
    follows phi(t) is TVLARS. Biases and norm weights are left out here: both optimizers skip
    them in the trust ratio, and TVLARS then steps them at lr while the schedule scales all."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.Tanh(), nn.Flatten(),
                        nn.Linear(4 * 6 * 6, 3, bias=False)).double()
    twin = copy.deepcopy(net)
    start = [p.detach().clone() for p in net.parameters()]
    steps = 200
    draw = torch.Generator().manual_seed(1)  # a fresh batch each step, as in training
    batches = [(torch.randn(16, 3, 8, 8, dtype=torch.float64, generator=draw),
                torch.randint(0, 3, (16,), generator=draw)) for _ in range(steps)]
    lars_cfg = TrialConfig(ds="synthetic", opt="lars", sd="phi", lr=3.0, wd=5e-4, momentum=0.0,
                           eta=0.01, **PHI)
    tv_cfg = lars_cfg.replace(opt="tvlars", sd="none")
    runs = []
    for model, cfg in ((net, lars_cfg), (twin, tv_cfg)):
        optimizer = build_optimizer(cfg.opt, model, cfg)
        for group in optimizer.param_groups:
            group["foreach"] = foreach
        schedule = build_schedule(optimizer, cfg.sd, 1, steps, cfg.bs, cfg.warmup_epochs,
                                  phi=cfg.phi_args)
        runs.append((model, optimizer, schedule))
    for x, y in batches:
        for model, optimizer, schedule in runs:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            schedule.step()
        assert runs[1][1].last_norms.max() < tv_cfg.norm_clip, "the clip must not bind"
        for a, b in zip(net.parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    moved = sum((p.detach() - s).norm() / s.norm() for p, s in zip(net.parameters(), start))
    assert moved > 0.1, "the run must move the weights for the match to mean anything"
    assert tvlars_phi(1, **PHI) / tvlars_phi(steps, **PHI) > 5, "phi must vary over the run"
