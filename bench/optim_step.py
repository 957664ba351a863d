"""Time ``optimizer.step()`` of TVLARS, LARS and LAMB against torch's SGD and Adam, fairly.

Fair means: every optimizer steps the same ResNet-18 (the project's model, ImageNet stem, 10
classes) with the same real gradients (one forward and backward pass on a CIFAR-sized
batch), at the settings a user would run it with (printed at the start: SGD, LARS and TVLARS
at the paper's momentum and weight decay and an lr of their own range, Adam and LAMB likewise),
and subnormal floats are either flushed for every optimizer or for none (``--flush-denormal``;
the default is none, torch's default), and the bench says which. After the run it counts the
subnormal values left in each optimizer's parameters and state: a slow path hit by one
optimizer only would show there.

Two figures per optimizer, each measured interleaved (round-robin, the first one rotating each
round, so machine noise hits all alike):

1. **paired step ratio**: in each round, its ``step()`` time over that of the faster torch
   baseline in the same round (the faster of ``foreach=True`` / ``False`` by median); the
   median over rounds. Targets (CPU): TVLARS and LARS <= 1.6x the faster SGD (momentum, weight
   decay), LAMB <= 1.3x the faster Adam (weight decay).
2. **share of a training step**: a full ResNet-18 step (forward, backward, ``step()``) at a
   realistic CPU batch; the step's share of it and the whole step's time over the baseline's,
   which is what a user waits for.

On CUDA it also checks that no ``step()`` synchronises with the host, and the ratios are shown
for information (the targets are for the CPU). Exit status 1 if a check fails.

    python bench/optim_step.py [--device cuda] [--rounds 60] [--flush-denormal]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from _figures import emit
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from tvlars_ray.models import build_model  # noqa: E402
from tvlars_ray.optim import LAMB, LARS, TVLARS  # noqa: E402

LARS_TARGET = 1.6
LAMB_TARGET = 1.3
WD = 5e-4

Factory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class Entry:
    name: str
    settings: str  # as printed
    make: Factory
    baseline: str  # "SGD" or "Adam": what it is judged against ("" for a baseline)
    target: float | None = None


ENTRIES = [
    Entry("SGD foreach", "lr 0.1, momentum 0.9, wd 5e-4",
          lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=WD, foreach=True),
          ""),
    Entry("SGD loop", "same, foreach=False",
          lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=WD, foreach=False),
          ""),
    Entry("Adam foreach", "lr 1e-3, betas (0.9, 0.999), eps 1e-8, wd 5e-4",
          lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=WD, foreach=True), ""),
    Entry("Adam loop", "same, foreach=False",
          lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=WD, foreach=False), ""),
    Entry("LARS", "lr 2 (the paper's range at batch 512), momentum 0.9, eta 1e-3, wd 5e-4",
          lambda ps: LARS(ps, lr=2.0, momentum=0.9, eta=1e-3, weight_decay=WD),
          "SGD", LARS_TARGET),
    Entry("TVLARS", "as LARS, lmbda 1e-3, alpha 0.1, norm_clip 10",
          lambda ps: TVLARS(ps, lr=2.0, momentum=0.9, eta=1e-3, weight_decay=WD, lmbda=1e-3),
          "SGD", LARS_TARGET),
    Entry("LAMB", "lr 1e-2, betas (0.9, 0.999), eps 1e-6, wd 5e-4, weight_norm_clip 10",
          lambda ps: LAMB(ps, lr=1e-2, weight_decay=WD), "Adam", LAMB_TARGET),
]
NAMES = [e.name for e in ENTRIES]
BY_NAME = {e.name: e for e in ENTRIES}


def make_model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", 10, "imagenet").to(device)


def batch(size: int, device: torch.device, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (size,), generator=g)
    return x.to(device), y.to(device)


def real_grads(device: torch.device, batch_size: int) -> list[torch.Tensor]:
    """The gradients of one real forward/backward pass: realistic magnitudes and zeros."""
    model = make_model(device)
    x, y = batch(batch_size, device)
    F.cross_entropy(model(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def param_copies(device: torch.device, grads: list[torch.Tensor]) -> list[nn.Parameter]:
    params = []
    for p, g in zip(make_model(device).parameters(), grads):
        q = nn.Parameter(p.detach().clone())
        q.grad = g.clone()
        params.append(q)
    return params


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def sync_free(opt: torch.optim.Optimizer) -> str:
    """One step with CUDA sync debugging set to raise; '' or the error."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        return ""
    except RuntimeError as err:
        return str(err).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def subnormals(opt: torch.optim.Optimizer) -> int:
    """Subnormal values in the parameters and the state: each costs a slow path on x86."""
    count = 0
    for group in opt.param_groups:
        for p in group["params"]:
            tensors = [p.detach(), *opt.state.get(p, {}).values()]
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 1:
                    tiny = torch.finfo(t.dtype).tiny
                    count += int(((t != 0) & (t.abs() < tiny)).sum())
    return count


def interleaved(rounds: int, run: Callable[[str], dict[str, float]]) -> dict[str, list[dict]]:
    """``run(name)`` once per optimizer per round, the starting optimizer rotating."""
    samples: dict[str, list[dict]] = {name: [] for name in NAMES}
    for r in range(rounds):
        for name in NAMES[r % len(NAMES):] + NAMES[: r % len(NAMES)]:
            samples[name].append(run(name))
    return samples


def faster(samples: dict[str, list[dict]], family: str, key: str) -> str:
    """The faster of a baseline's two variants, by median."""
    pair = [n for n in NAMES if n.startswith(family + " ")]
    return min(pair, key=lambda n: statistics.median(s[key] for s in samples[n]))


def paired(samples: dict[str, list[dict]], name: str, ref: str, key: str) -> float:
    """Median over rounds of this optimizer's time over the reference's in the same round."""
    return statistics.median(a[key] / b[key] for a, b in zip(samples[name], samples[ref]))


def step_section(device: torch.device, rounds: int, warmup: int, grads_batch: int,
                 failures: list[str]) -> dict[str, float]:
    grads = real_grads(device, grads_batch)
    opts = {e.name: e.make(param_copies(device, grads)) for e in ENTRIES}
    for name, opt in opts.items():
        for _ in range(warmup):
            if device.type == "cuda":
                err = sync_free(opt)
                if err:
                    failures.append(f"{name}: host sync in step(): {err}")
                    break
            else:
                opt.step()
    if device.type == "cuda":
        for name in NAMES:
            ok = not any(f.startswith(f"{name}:") for f in failures)
            print(f"sync-free step() {name:<13} {'PASS' if ok else 'FAIL'}")

    def run(name: str) -> dict[str, float]:
        sync(device)
        start = time.perf_counter()
        opts[name].step()
        sync(device)
        return {"step": time.perf_counter() - start}

    samples = interleaved(rounds, run)
    refs = {family: faster(samples, family, "step") for family in ("SGD", "Adam")}
    print(f"\n1. step() alone, {rounds} interleaved rounds after {warmup} untimed steps; "
          f"gradients of one real batch of {grads_batch}")
    print(f"{'optimizer':<14}{'median ms':>10}{'x SGD':>8}{'x Adam':>8}   "
          f"(paired: per-round ratio to {refs['SGD']} / {refs['Adam']}, median)")
    ratios = {}
    for name in NAMES:
        med = statistics.median(s["step"] for s in samples[name])
        x_sgd, x_adam = (paired(samples, name, refs[f], "step") for f in ("SGD", "Adam"))
        print(f"{name:<14}{med * 1e3:>10.2f}{x_sgd:>8.2f}{x_adam:>8.2f}")
        ratios[name] = x_sgd if BY_NAME[name].baseline == "SGD" else x_adam
    print("subnormal values left in parameters and state: "
          + ", ".join(f"{name} {subnormals(opt)}" for name, opt in opts.items()))
    return ratios


def train_section(device: torch.device, rounds: int, batch_size: int) -> None:
    x, y = batch(batch_size, device, seed=2)
    models = {name: make_model(device) for name in NAMES}
    opts = {e.name: e.make(list(models[e.name].parameters())) for e in ENTRIES}

    def run(name: str) -> dict[str, float]:
        model, opt = models[name], opts[name]
        sync(device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        sync(device)
        middle = time.perf_counter()
        opt.step()
        sync(device)
        end = time.perf_counter()
        return {"fwd_bwd": middle - start, "step": end - middle, "total": end - start}

    for name in NAMES:  # warm-up: allocator, state, one-time kernels
        run(name)
    samples = interleaved(rounds, run)
    refs = {family: faster(samples, family, "total") for family in ("SGD", "Adam")}
    print(f"\n2. a full ResNet-18 training step (forward, backward, step) at batch {batch_size} "
          f"of 32x32 images, {rounds} interleaved rounds")
    print(f"{'optimizer':<14}{'fwd+bwd ms':>11}{'step ms':>9}{'step share':>12}"
          f"{'x SGD':>8}{'x Adam':>8}   (whole step, paired)")
    for name in NAMES:
        fb = statistics.median(s["fwd_bwd"] for s in samples[name])
        st = statistics.median(s["step"] for s in samples[name])
        share = statistics.median(s["step"] / s["total"] for s in samples[name])
        x_sgd, x_adam = (paired(samples, name, refs[f], "total") for f in ("SGD", "Adam"))
        print(f"{name:<14}{fb * 1e3:>11.1f}{st * 1e3:>9.2f}{100 * share:>11.1f}%"
              f"{x_sgd:>8.3f}{x_adam:>8.3f}")
        if BY_NAME[name].baseline:
            key = name.lower()
            emit(f"optim_step.{key}_share_of_train_step", 100 * share, "%")
            x_ref = x_sgd if BY_NAME[name].baseline == "SGD" else x_adam
            emit(f"optim_step.{key}_train_step_vs_{BY_NAME[name].baseline.lower()}", x_ref, "x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--rounds", type=int, default=60, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per optimizer")
    parser.add_argument("--train-rounds", type=int, default=8,
                        help="timed training steps per optimizer (0: skip section 2)")
    parser.add_argument("--batch", type=int, default=128, help="batch of section 2")
    parser.add_argument("--flush-denormal", action="store_true",
                        help="flush subnormal floats to zero for every optimizer")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but CUDA is not available")
    flushed = torch.set_flush_denormal(args.flush_denormal) and args.flush_denormal
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    n_params = sum(p.numel() for p in make_model(device).parameters())
    print(f"ResNet-18 ({n_params / 1e6:.1f}M params, ImageNet stem, 10 classes), "
          f"device={device}, threads={torch.get_num_threads()}, load avg {load:.1f} on "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}")
    print("subnormals: " + ("flushed to zero for every optimizer" if flushed else
                            "not flushed, for every optimizer (torch's default)"))
    for e in ENTRIES:
        print(f"  {e.name:<13} {e.settings}")

    failures: list[str] = []
    ratios = step_section(device, args.rounds, args.warmup, args.batch, failures)
    if args.train_rounds:
        train_section(device, args.train_rounds, args.batch)

    print()
    cuda = device.type == "cuda"
    for e in ENTRIES:
        if e.target is None:
            continue
        ratio, ok = ratios[e.name], ratios[e.name] <= e.target
        if cuda:  # the targets were set for the CPU; on a GPU the ratios are for information
            verdict = f"({'PASS' if ok else 'FAIL'} against the CPU target, not judged on cuda)"
            emit(f"optim_step.{e.name.lower()}_vs_{e.baseline.lower()}_cuda", ratio, "x")
        else:
            verdict = "PASS" if ok else "FAIL"
            emit(f"optim_step.{e.name.lower()}_vs_{e.baseline.lower()}", ratio, "x",
                 at_most=e.target)
            if not ok:
                failures.append(f"{e.name}: {ratio:.2f}x the faster {e.baseline}")
        print(f"{e.name:<7} {ratio:.2f}x the faster {e.baseline} (target <= {e.target}x)  "
              f"{verdict}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
