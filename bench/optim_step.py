"""Time ``optimizer.step()`` on ResNet-18's parameters: TVLARS, LARS and LAMB against torch.

The optimizers run interleaved (round-robin, the starting one rotating every round), so machine
noise hits all of them alike, and only ratios measured side by side are judged:

* TVLARS and LARS: at most 1.6x the faster of torch SGD (momentum 0.9, weight decay) with
  ``foreach=True`` / ``foreach=False``;
* LAMB: at most 1.3x the faster of torch Adam (same weight decay) with ``foreach`` on / off.

The targets are for the CPU. On CUDA it checks instead that no step synchronises with the
host (``torch.cuda.set_sync_debug_mode("error")``) and prints the ratios for information.
Exit status 1 if any check fails.

    python bench/optim_step.py [--device cuda] [--rounds 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from tvlars_ray.optim import LAMB, LARS, TVLARS  # noqa: E402

LARS_TARGET = 1.6
LAMB_TARGET = 1.3

Factory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def factories(lr: float, wd: float) -> dict[str, Factory]:
    return {
        "TVLARS": lambda ps: TVLARS(ps, lr=lr, weight_decay=wd),
        "LARS": lambda ps: LARS(ps, lr=lr, weight_decay=wd),
        "LAMB": lambda ps: LAMB(ps, lr=lr * 1e-3, weight_decay=wd),
        "SGD foreach": lambda ps: torch.optim.SGD(
            ps, lr=lr, momentum=0.9, weight_decay=wd, foreach=True
        ),
        "SGD loop": lambda ps: torch.optim.SGD(
            ps, lr=lr, momentum=0.9, weight_decay=wd, foreach=False
        ),
        "Adam foreach": lambda ps: torch.optim.Adam(
            ps, lr=lr * 1e-3, weight_decay=wd, foreach=True
        ),
        "Adam loop": lambda ps: torch.optim.Adam(
            ps, lr=lr * 1e-3, weight_decay=wd, foreach=False
        ),
    }


def make_params(device: torch.device, seed: int) -> list[nn.Parameter]:
    """ResNet-18's parameters with fixed random gradients; each optimizer gets its own copy."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    params = []
    for p in model.parameters():
        q = nn.Parameter(p.detach().to(device).clone())
        q.grad = torch.randn_like(q) * 1e-2
        params.append(q)
    return params


def sync_free(opt: torch.optim.Optimizer) -> str:
    """Run one step with CUDA sync debugging set to raise; '' or the error."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        return ""
    except RuntimeError as err:
        return str(err).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def run(device: torch.device, rounds: int, warmup: int, lr: float, wd: float) -> int:
    cuda = device.type == "cuda"
    names = list(factories(lr, wd))
    opts = {name: make(make_params(device, 0)) for name, make in factories(lr, wd).items()}

    failures: list[str] = []
    for name, opt in opts.items():
        for _ in range(warmup):
            if cuda:
                err = sync_free(opt)
                if err:
                    failures.append(f"{name}: host sync in step(): {err}")
                    break
            else:
                opt.step()
    if cuda:
        for name in names:
            ok = not any(f.startswith(f"{name}:") for f in failures)
            print(f"sync-free step() {name:<13} {'PASS' if ok else 'FAIL'}")

    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            opt = opts[name]
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            opt.step()
            if cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    sgd = min(med["SGD foreach"], med["SGD loop"])
    adam = min(med["Adam foreach"], med["Adam loop"])
    n_params = sum(p.numel() for p in opts[names[0]].param_groups[0]["params"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\nResNet-18 ({n_params / 1e6:.1f}M params), device={device}, "
        f"threads={torch.get_num_threads()}, rounds={rounds}, load avg {load:.1f} "
        f"on {os.cpu_count()} CPUs, torch {torch.__version__}"
    )
    print(f"{'optimizer':<14}{'median ms':>11}{'x SGD':>8}{'x Adam':>8}")
    for name in names:
        print(f"{name:<14}{med[name] * 1e3:>11.2f}{med[name] / sgd:>8.2f}{med[name] / adam:>8.2f}")

    print()
    checks = [
        ("TVLARS", med["TVLARS"] / sgd, LARS_TARGET, "faster SGD"),
        ("LARS", med["LARS"] / sgd, LARS_TARGET, "faster SGD"),
        ("LAMB", med["LAMB"] / adam, LAMB_TARGET, "faster Adam"),
    ]
    for name, ratio, target, ref in checks:
        ok = ratio <= target
        verdict = "PASS" if ok else "FAIL"
        if cuda:  # the targets were set for the CPU; on a GPU the ratios are for information
            verdict = f"({verdict} against the CPU target, not judged on {device.type})"
        elif not ok:
            failures.append(f"{name}: {ratio:.2f}x {ref}")
        print(f"{name:<7} {ratio:.2f}x {ref} (target <= {target}x)  {verdict}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--rounds", type=int, default=60, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per optimizer")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--wd", type=float, default=5e-4)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but CUDA is not available")
    return run(device, args.rounds, args.warmup, args.lr, args.wd)


if __name__ == "__main__":
    sys.exit(main())
