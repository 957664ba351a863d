"""Tests of tvlars_ray.optim: LARS, TVLARS and LAMB against plain-loop references written here
from the formulas (not from the optimizers' code), plus phi, state round trips, observability,
argument checks, the registry, and a short training run per LARS-family optimizer."""

from __future__ import annotations

import copy
import io
import math
import types
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tvlars_ray.optim import (
    LAMB,
    LARS,
    TVLARS,
    available_optimizers,
    build_optimizer,
    get_spec,
    tvlars_phi,
)

TIGHT = dict(rtol=1e-10, atol=1e-12)
FAMILY = ("lars", "tvlars", "lamb")
CLASSES = {"lars": LARS, "tvlars": TVLARS, "lamb": LAMB}

# Two param groups with their own hyper-parameters, per optimizer and per variant.
VARIANTS: dict[str, dict[str, tuple[dict, dict, dict]]] = {
    "lars": {
        "base": (
            dict(lr=0.5, momentum=0.9, weight_decay=1e-2, eta=0.02),
            dict(),
            dict(lr=0.2, momentum=0.5, weight_decay=0.0, eta=0.05),
        ),
        "no_exclude": (
            dict(lr=0.3, momentum=0.8, weight_decay=5e-3, eta=0.01, exclude_1d=False),
            dict(),
            dict(lr=0.1, momentum=0.0, weight_decay=1e-3),
        ),
    },
    "tvlars": {
        "no_clip": (
            dict(lr=0.5, momentum=0.9, weight_decay=1e-2, eta=0.02, lmbda=0.2, alpha=0.5,
                 delay=4, gamma_min=0.05, norm_clip=None),
            dict(),
            dict(lr=0.2, momentum=0.7, weight_decay=0.0, lmbda=0.05, alpha=2.0, delay=0,
                 gamma_min=0.0),
        ),
        "clipped": (
            dict(lr=0.5, momentum=0.9, weight_decay=1e-2, eta=0.02, lmbda=0.2, alpha=0.3,
                 delay=6, gamma_min=0.1, norm_clip=0.8),
            dict(),
            dict(lr=0.1, eta=0.05, norm_clip=1.5, exclude_1d=False),
        ),
    },
    "lamb": {
        "plain": (
            dict(lr=0.02, betas=(0.9, 0.999), eps=1e-6, weight_decay=1e-2),
            dict(),
            dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.0, weight_norm_clip=None),
        ),
        "bias_exclude": (
            dict(lr=0.02, betas=(0.9, 0.99), eps=1e-8, weight_decay=5e-2, bias_correction=True,
                 exclude_1d=True, weight_norm_clip=0.8),
            dict(),
            dict(lr=0.05, betas=(0.5, 0.9), weight_decay=1e-3, exclude_1d=False),
        ),
        "bias_only": (
            dict(lr=0.02, weight_decay=1e-2, bias_correction=True),
            dict(),
            dict(lr=0.01, weight_decay=0.0, bias_correction=False, exclude_1d=True),
        ),
    },
}
CASES = [(name, variant) for name in FAMILY for variant in VARIANTS[name]]

# name, shape, group, how it starts; "nograd" never gets a gradient
LAYOUT = [
    ("conv", (6, 3, 3, 3), 0, "randn"),
    ("conv_b", (6,), 0, "randn"),
    ("zero", (4, 5), 0, "zeros"),
    ("nograd", (3, 3), 0, "randn"),
    ("lin", (5, 8), 1, "randn"),
    ("lin_b", (5,), 1, "zeros"),
    ("scale", (8,), 1, "ones"),
]
AT = {name: k for k, (name, *_) in enumerate(LAYOUT)}


def make_params(dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    out = []
    for _, shape, _, init in LAYOUT:
        if init == "randn":
            t = torch.randn(shape, generator=g, dtype=dtype)
        else:
            t = getattr(torch, init)(shape, dtype=dtype)
        out.append(t.requires_grad_())
    return out


def set_grads(params: list[torch.Tensor], step: int) -> None:
    """Deterministic gradients for ``step``; one tensor gets an all-zero gradient on step 3."""
    g = torch.Generator().manual_seed(step)
    for (name, shape, _, _), p in zip(LAYOUT, params):
        if name == "nograd":
            p.grad = None
            continue
        grad = torch.randn(shape, generator=g, dtype=p.dtype) * 0.1
        if name == "lin" and step == 3:
            grad.zero_()
        p.grad = grad


def groups_of(params: list[torch.Tensor], hp: tuple[dict, dict, dict]) -> list[dict]:
    _, group0, group1 = hp
    return [
        {"params": [p for (_, _, gi, _), p in zip(LAYOUT, params) if gi == 0], **group0},
        {"params": [p for (_, _, gi, _), p in zip(LAYOUT, params) if gi == 1], **group1},
    ]


def build(name: str, variant: str, params: list[torch.Tensor], foreach: bool | None = None):
    defaults, _, _ = hp = VARIANTS[name][variant]
    return CLASSES[name](groups_of(params, hp), **defaults, foreach=foreach)


# -- plain-loop references, straight from the formulas ---------------------------------------
LARS_DEFAULTS = dict(momentum=0.9, weight_decay=0.0, eta=0.001, exclude_1d=True)
TVLARS_DEFAULTS = dict(LARS_DEFAULTS, lmbda=0.001, alpha=0.1, delay=0.0, gamma_min=0.0,
                       norm_clip=10.0)
LAMB_DEFAULTS = dict(betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, weight_norm_clip=10.0,
                     bias_correction=False, exclude_1d=False)


def phi_formula(t: float, lmbda: float, alpha: float, delay: float, gamma_min: float) -> float:
    return 1.0 / (alpha + math.exp(lmbda * (t - delay))) + gamma_min


class Reference:
    """One optimizer, one parameter at a time, with Python-float trust ratios."""

    def __init__(self, name: str, variant: str, params: list[torch.Tensor]) -> None:
        self.name = name
        base = {"lars": LARS_DEFAULTS, "tvlars": TVLARS_DEFAULTS, "lamb": LAMB_DEFAULTS}[name]
        defaults, group0, group1 = VARIANTS[name][variant]
        self.hp = [{**base, **defaults, **group0}, {**base, **defaults, **group1}]
        self.params = [p.detach().clone() for p in params]
        self.state: dict[int, dict] = {}
        self.ratios: list[float] = []
        self.norms: list[tuple[float, float]] = []  # (||w||, ||direction||) before any clip
        self.phi0: float | None = None
        self.clipped = False

    def step(self, grads: list[torch.Tensor | None]) -> None:
        self.ratios = []
        self.norms = []
        self.phi0 = None
        for k, ((_, _, gi, _), w, g) in enumerate(zip(LAYOUT, self.params, grads)):
            if g is None:
                continue
            h = self.hp[gi]
            s = self.state.setdefault(k, {"t": 0})
            s["t"] += 1
            if self.name == "lamb":
                self._lamb(w, g, h, s)
            else:
                self._lars(w, g, h, s, gi)

    def _lars(self, w, g, h, s, gi) -> None:
        t = s["t"]
        if self.name == "tvlars" and gi == 0 and self.phi0 is None:
            self.phi0 = phi_formula(t, h["lmbda"], h["alpha"], h["delay"], h["gamma_min"])
        if h["exclude_1d"] and w.ndim <= 1:
            d = g.clone()
        else:
            d = g + h["weight_decay"] * w
            wn, dn = w.norm().item(), d.norm().item()
            self.norms.append((wn, dn))
            if wn == 0 or dn == 0:
                q = 1.0
            elif self.name == "lars":
                q = h["eta"] * wn / dn
            else:
                clip = h["norm_clip"]
                if clip is not None:
                    self.clipped |= wn > clip or dn > clip
                    wn, dn = min(wn, clip), min(dn, clip)
                phi = phi_formula(t, h["lmbda"], h["alpha"], h["delay"], h["gamma_min"])
                q = h["eta"] * phi * wn / dn
            d = q * d
            self.ratios.append(q)
        mu = s.get("mu", torch.zeros_like(w))
        s["mu"] = h["momentum"] * mu + d
        w -= h["lr"] * s["mu"]

    def _lamb(self, w, g, h, s) -> None:
        t = s["t"]
        b1, b2 = h["betas"]
        s["m"] = b1 * s.get("m", torch.zeros_like(w)) + (1 - b1) * g
        s["v"] = b2 * s.get("v", torch.zeros_like(w)) + (1 - b2) * g * g
        m_hat, v_hat = s["m"], s["v"]
        if h["bias_correction"]:
            m_hat, v_hat = m_hat / (1 - b1**t), v_hat / (1 - b2**t)
        u = m_hat / (v_hat.sqrt() + h["eps"])
        if h["exclude_1d"] and w.ndim <= 1:
            r = 1.0
        else:
            u = u + h["weight_decay"] * w
            wn, un = w.norm().item(), u.norm().item()
            self.norms.append((wn, un))
            clip = h["weight_norm_clip"]
            if clip is not None:
                self.clipped |= wn > clip
                wn = min(wn, clip)
            r = 1.0 if wn == 0 or un == 0 else wn / un
            self.ratios.append(r)
        w -= h["lr"] * r * u


def run_both(name: str, variant: str, foreach: bool | None, steps: int):
    params = make_params()
    opt = build(name, variant, params, foreach)
    ref = Reference(name, variant, params)
    for step in range(1, steps + 1):
        set_grads(params, step)
        opt.step()
        ref.step([None if p.grad is None else p.grad.clone() for p in params])
        torch.testing.assert_close(
            opt.last_trust_ratios, torch.tensor(ref.ratios, dtype=torch.float64), **TIGHT
        )
        torch.testing.assert_close(
            opt.last_norms, torch.tensor(ref.norms, dtype=torch.float64).T, **TIGHT
        )
        if name == "tvlars":
            torch.testing.assert_close(
                opt.last_phi, torch.tensor(ref.phi0, dtype=torch.float64), **TIGHT
            )
    return params, opt, ref


# -- against the references ----------------------------------------------------------------
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize(("name", "variant"), CASES)
def test_matches_reference(name: str, variant: str, foreach: bool) -> None:
    params, opt, ref = run_both(name, variant, foreach, steps=25)
    for p, expected in zip(params, ref.params):
        torch.testing.assert_close(p.detach(), expected, **TIGHT)
    nograd = params[AT["nograd"]]
    assert nograd not in opt.state
    assert torch.equal(nograd.detach(), make_params()[AT["nograd"]].detach())
    assert params[AT["zero"]].detach().abs().sum() > 0
    assert all(int(s["step"]) == 25 for s in opt.state.values())
    if variant in ("clipped", "bias_exclude"):
        assert ref.clipped, "the variant is meant to exercise the norm clip"


@pytest.mark.parametrize("layout", ["runs_of_30", "one_per_run", "accelerator"])
@pytest.mark.parametrize(("name", "variant"), CASES)
def test_fast_path_layouts(name: str, variant: str, layout: str, monkeypatch) -> None:
    """The multi-tensor path split into many cache-sized runs (as for a large model on CPU),
    and run whole with allocated temporaries (as on an accelerator), still matches."""
    import tvlars_ray.optim._kernels as kernels

    if layout == "accelerator":
        monkeypatch.setattr(kernels, "BLOCKED_DEVICE_TYPES", ())
    else:
        monkeypatch.setattr(kernels, "CPU_CHUNK_NUMEL", 30 if layout == "runs_of_30" else 1)
    params, _, ref = run_both(name, variant, foreach=True, steps=20)
    for p, expected in zip(params, ref.params):
        torch.testing.assert_close(p.detach(), expected, **TIGHT)


@pytest.mark.parametrize(("name", "variant"), CASES)
def test_foreach_matches_loop(name: str, variant: str) -> None:
    results = []
    for foreach in (None, False):
        params = make_params()
        opt = build(name, variant, params, foreach)
        for step in range(1, 21):
            set_grads(params, step)
            opt.step()
        results.append((params, opt.last_trust_ratios, opt.last_norms))
    (p_fast, r_fast, n_fast), (p_loop, r_loop, n_loop) = results
    for a, b in zip(p_fast, p_loop):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r_fast, r_loop, rtol=1e-12, atol=0)
    torch.testing.assert_close(n_fast, n_loop, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", FAMILY)
def test_float32_foreach_matches_loop(name: str) -> None:
    variant = next(iter(VARIANTS[name]))
    results = []
    for foreach in (True, False):
        params = make_params(torch.float32)
        opt = build(name, variant, params, foreach)
        for step in range(1, 11):
            set_grads(params, step)
            opt.step()
        results.append(params)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", FAMILY)
def test_half_precision_params(name: str, dtype: torch.dtype) -> None:
    """Norms are taken in float32, so half-precision tensors step without overflow."""
    variant = next(iter(VARIANTS[name]))
    for foreach in (True, False):
        params = make_params(dtype)
        opt = build(name, variant, params, foreach)
        for step in range(1, 4):
            set_grads(params, step)
            opt.step()
        assert all(p.dtype == dtype and torch.isfinite(p).all() for p in params)
        assert opt.last_trust_ratios.dtype == torch.float32
        assert opt.last_norms.dtype == torch.float32


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize(("name", "variant"), CASES)
def test_step_never_reads_values(name: str, variant: str, foreach: bool) -> None:
    """On the meta device a tensor has no values: any ``.item()``, ``float(t)`` or ``if t``
    inside ``step()`` (each a host sync on a GPU) would raise. It also runs the accelerator
    layout of the multi-tensor path, with every temporary on the parameters' device."""
    params = [p.detach().to("meta").requires_grad_() for p in make_params()]
    opt = build(name, variant, params, foreach)
    for _ in range(3):
        for k, p in enumerate(params):
            p.grad = None if k == AT["nograd"] else torch.empty_like(p)
        opt.step()
    assert opt.last_trust_ratios.device.type == "meta"
    assert opt.last_norms.device.type == "meta"
    assert opt.last_norms.shape == (2, len(opt.last_trust_ratios))
    if name == "tvlars":
        assert opt.last_phi.device.type == "meta"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", FAMILY)
def test_cuda_step_has_no_host_sync(name: str) -> None:
    variant = next(iter(VARIANTS[name]))
    params = [p.detach().cuda().requires_grad_() for p in make_params(torch.float32)]
    cpu_params = make_params(torch.float32)
    opt, cpu_opt = build(name, variant, params), build(name, variant, cpu_params)

    def step(optimizer, step: int) -> None:
        set_grads(cpu_params, step)
        for p, c in zip(params, cpu_params):
            p.grad = None if c.grad is None else c.grad.cuda()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        cpu_opt.step()

    for i in range(1, 4):
        step(opt, i)
    assert opt.last_trust_ratios.device.type == "cuda"
    assert opt.last_norms.device.type == "cuda"
    # a checkpoint read back onto the CPU: the step counters return to the GPU on load
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed = build(name, variant, params)
    resumed.load_state_dict(torch.load(buffer, map_location="cpu"))
    assert all(s["step"].device.type == "cuda" for s in resumed.state.values())
    for i in range(4, 7):
        step(resumed, i)
    for p, c in zip(params, cpu_params):
        torch.testing.assert_close(p.detach().cpu(), c.detach(), rtol=1e-4, atol=1e-5)


# -- phi ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0.0, 1.0, 7.0, 50.0, 1e3, 2e4])
@pytest.mark.parametrize(("lmbda", "alpha", "delay", "gamma_min"),
                         [(1e-3, 0.1, 0.0, 0.0), (0.05, 0.5, 20.0, 0.01), (1.0, 2.0, 3.0, 0.2)])
def test_phi_formula(t: float, lmbda: float, alpha: float, delay: float, gamma_min: float) -> None:
    x = lmbda * (t - delay)
    expected = 1.0 / (alpha + math.exp(x)) + gamma_min if x < 700 else gamma_min
    assert tvlars_phi(t, lmbda, alpha, delay, gamma_min) == pytest.approx(expected, rel=1e-12)
    as_tensor = tvlars_phi(torch.tensor(t, dtype=torch.float64), lmbda, alpha, delay, gamma_min)
    assert as_tensor.item() == pytest.approx(expected, rel=1e-12)


def test_phi_first_step() -> None:
    for lmbda, alpha, delay in [(1e-3, 0.1, 0.0), (0.3, 0.5, 10.0), (2.0, 1.0, 0.0)]:
        expected = 1.0 / (alpha + math.exp(lmbda * (1 - delay)))
        assert tvlars_phi(1, lmbda, alpha, delay) == pytest.approx(expected, rel=1e-14)
        got = tvlars_phi(torch.tensor(1.0, dtype=torch.float64), lmbda, alpha, delay)
        assert got.item() == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_phi_never_overflows(dtype: torch.dtype) -> None:
    t = torch.tensor([0, 1, 1e6, 1e9, 1e12], dtype=torch.float64).to(dtype)
    phi = tvlars_phi(t, lmbda=1.0, alpha=0.1, delay=0.0, gamma_min=0.05)
    assert torch.isfinite(phi).all()
    assert phi[-1].item() == pytest.approx(0.05, rel=1e-7)
    assert tvlars_phi(1e12, 1.0, 0.1, 0.0, 0.05) == pytest.approx(0.05, abs=1e-12)
    assert tvlars_phi(1e300, 1.0, 0.1, 0.0, 0.0) == 0.0
    # far before the delay phi approaches 1/alpha, also finite
    early = tvlars_phi(torch.tensor([0.0]), lmbda=1.0, alpha=0.1, delay=1e12)
    assert early.item() == pytest.approx(10.0, rel=1e-6)


def test_tvlars_step_with_huge_t_stays_finite() -> None:
    params = make_params()
    opt = TVLARS(params, lr=0.1, lmbda=1.0, weight_decay=1e-3)
    set_grads(params, 1)
    opt.step()
    for p in params:
        if p in opt.state:
            opt.state[p]["step"].fill_(10**12)
    opt.step()
    assert opt.last_phi.item() == 0.0
    assert all(torch.isfinite(p).all() for p in params)


# -- state, observability --------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize(("name", "variant"), CASES)
def test_state_dict_round_trip(name: str, variant: str, foreach: bool) -> None:
    params = make_params()
    opt = build(name, variant, params, foreach)
    for step in range(1, 6):
        set_grads(params, step)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    twins = [p.detach().clone().requires_grad_() for p in params]
    fresh = build(name, variant, twins, foreach)
    fresh.load_state_dict(saved)
    for step in range(6, 12):
        for source in (params, twins):
            set_grads(source, step)
        opt.step()
        fresh.step()
    for a, b in zip(params, twins):
        assert torch.equal(a, b)
    assert all(int(s["step"]) == 11 for s in fresh.state.values())


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("name", FAMILY)
def test_observability(name: str, foreach: bool) -> None:
    variant = next(iter(VARIANTS[name]))
    params = make_params()
    opt = build(name, variant, params, foreach)
    ref = Reference(name, variant, params)
    assert opt.last_trust_ratios is None and opt.last_norms is None
    if name == "tvlars":
        assert opt.last_phi is None
    set_grads(params, 1)
    opt.step()
    ref.step([None if p.grad is None else p.grad.clone() for p in params])
    ratios = opt.last_trust_ratios
    assert ratios.ndim == 1 and ratios.device == params[0].device
    torch.testing.assert_close(ratios, torch.tensor(ref.ratios, dtype=torch.float64), **TIGHT)
    norms = opt.last_norms
    assert norms.shape == (2, ratios.numel()) and norms.device == params[0].device
    if name == "tvlars":
        assert opt.last_phi.ndim == 0 and opt.last_phi.device == params[0].device
        assert opt.last_phi.item() == pytest.approx(ref.phi0, rel=1e-12)


@pytest.mark.parametrize("name", FAMILY)
def test_no_adapted_tensor_gives_none(name: str) -> None:
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    opt = CLASSES[name]([bias], lr=0.1, exclude_1d=True)
    bias.grad = torch.randn(4, dtype=torch.float64)
    opt.step()
    assert opt.last_trust_ratios is None and opt.last_norms is None


@pytest.mark.parametrize("name", FAMILY)
def test_trust_ratios_follow_param_order_across_dtypes(name: str) -> None:
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 2, dtype=torch.float32, requires_grad=True)
    c = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    results = []
    for foreach in (True, False):
        ps = [t.detach().clone().requires_grad_() for t in (a, b, c)]
        for p in ps:
            p.grad = torch.full_like(p, 0.1)
        opt = CLASSES[name](ps, lr=0.1, weight_decay=0.01, foreach=foreach)
        opt.step()
        results.append((opt.last_trust_ratios, opt.last_norms))
        # the norms, taken directly: ||w|| before the step and the direction's norm
        direct = []
        for w in (a, b, c):
            w = w.detach().double()
            if name == "lamb":  # first step: m = 0.1 g, v = 0.001 g^2, no bias correction
                g = torch.full_like(w, 0.1)
                direction = 0.1 * g / ((0.001 * g * g).sqrt() + 1e-6) + 0.01 * w
            else:
                direction = 0.1 + 0.01 * w
            direct.append((w.norm().item(), direction.norm().item()))
        torch.testing.assert_close(opt.last_norms.double(),
                                   torch.tensor(direct, dtype=torch.float64).T,
                                   rtol=1e-6, atol=0)
    assert results[0][0].shape == (3,) and results[0][1].shape == (2, 3)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", FAMILY)
def test_sparse_grad_is_refused(name: str) -> None:
    p = torch.randn(4, 3, requires_grad=True)
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        CLASSES[name]([p], lr=0.1).step()


def test_closure_loss_is_returned() -> None:
    w = torch.randn(3, 3, requires_grad=True)
    opt = LARS([w], lr=0.1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    assert isinstance(opt.step(closure), torch.Tensor)


# -- argument checks -----------------------------------------------------------------------
BAD_ARGS = [
    (LARS, dict(lr=-0.1), "lr"),
    (LARS, dict(momentum=1.0), "momentum"),
    (LARS, dict(momentum=-0.1), "momentum"),
    (LARS, dict(weight_decay=-1e-4), "weight_decay"),
    (LARS, dict(eta=-0.001), "eta"),
    (TVLARS, dict(lr=-0.1), "lr"),
    (TVLARS, dict(momentum=1.5), "momentum"),
    (TVLARS, dict(weight_decay=-1.0), "weight_decay"),
    (TVLARS, dict(eta=-1.0), "eta"),
    (TVLARS, dict(alpha=0.0), "alpha"),
    (TVLARS, dict(alpha=-0.1), "alpha"),
    (TVLARS, dict(norm_clip=0.0), "norm_clip"),
    (TVLARS, dict(norm_clip=-1.0), "norm_clip"),
    (TVLARS, dict(lmbda=-1.0), "lmbda"),
    (TVLARS, dict(gamma_min=-0.1), "gamma_min"),
    (LAMB, dict(lr=-0.1), "lr"),
    (LAMB, dict(eps=-1e-6), "eps"),
    (LAMB, dict(weight_decay=-0.1), "weight_decay"),
    (LAMB, dict(betas=(1.0, 0.999)), "betas"),
    (LAMB, dict(betas=(0.9, -0.1)), "betas"),
    (LAMB, dict(weight_norm_clip=0.0), "weight_norm_clip"),
    # the bounds the config holds too: lr and eta positive, nothing infinite or NaN
    (LARS, dict(lr=0.0), "lr"),
    (LARS, dict(eta=0.0), "eta"),
    (LARS, dict(weight_decay=math.inf), "weight_decay"),
    (TVLARS, dict(delay=math.nan), "delay"),
    (TVLARS, dict(lmbda=math.inf), "lmbda"),
    (LAMB, dict(lr=0.0), "lr"),
    (LAMB, dict(eps=math.inf), "eps"),
    (LAMB, dict(betas=(0.9, math.nan)), "betas"),
]


@pytest.mark.parametrize(("cls", "kwargs", "arg"), BAD_ARGS,
                         ids=[f"{c.__name__}-{a}-{list(k.values())[0]}" for c, k, a in BAD_ARGS])
def test_bad_arguments(cls: type, kwargs: dict, arg: str) -> None:
    w = torch.randn(3, 3, requires_grad=True)
    args = {"lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match=arg):
        cls([w], **args)
    # a param group's own values are checked too
    opt = cls([w], lr=0.1)
    with pytest.raises(ValueError, match=arg):
        opt.add_param_group({"params": [torch.randn(2, requires_grad=True)], **args})


# the optimizers' arguments and the TrialConfig settings they come from
SHARED_BOUNDS = [("lr", "lr"), ("weight_decay", "wd"), ("momentum", "momentum"), ("eta", "eta"),
                 ("lmbda", "lmbda"), ("alpha", "alpha"), ("delay", "delay"),
                 ("gamma_min", "gamma_min"), ("norm_clip", "norm_clip")]


@pytest.mark.parametrize(("arg", "setting"), SHARED_BOUNDS)
def test_optimizer_and_config_accept_the_same_values(arg: str, setting: str) -> None:
    from tvlars_ray.config import ConfigError, TrialConfig

    for value in (-1.0, 0.0, 1e-6, 0.5, 1.0, 30.0, math.inf, -math.inf, math.nan):
        try:
            TrialConfig(opt="tvlars", **{setting: value})
            config_ok = True
        except ConfigError:
            config_ok = False
        try:
            TVLARS([torch.randn(3, 3, requires_grad=True)], **{"lr": 0.1, arg: value})
            optimizer_ok = True
        except ValueError:
            optimizer_ok = False
        assert config_ok == optimizer_ok, f"{setting}={value}: config {config_ok}, " \
                                          f"optimizer {optimizer_ok}"


# -- registry --------------------------------------------------------------------------------
def make_cfg(**changes) -> types.SimpleNamespace:
    values = dict(lr=0.05, wd=1e-3, momentum=0.9, eta=0.001, lmbda=1e-3, alpha=0.1, delay=0.0,
                  gamma_min=0.0, norm_clip=10.0)
    return types.SimpleNamespace(**{**values, **changes})


def small_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 6 * 6, 3))
    net[1].weight.requires_grad_(False)  # a frozen tensor must not reach the optimizer
    return net


def test_available_optimizers() -> None:
    assert set(available_optimizers()) == {
        "sgd", "adam", "adamw", "adagrad", "rmsprop", "lars", "tvlars", "lamb"
    }
    assert {n for n in available_optimizers() if get_spec(n).lars_family} == set(FAMILY)
    assert get_spec("tvlars").has_momentum and get_spec("adam").has_betas
    assert get_spec("LARS").cls is LARS


@pytest.mark.parametrize("name", available_optimizers())
def test_registry_builds_and_steps(name: str) -> None:
    net = small_net()
    opt = build_optimizer(name, net, make_cfg(norm_clip=None if name == "tvlars" else 10.0))
    assert isinstance(opt, get_spec(name).cls)
    handed = [p for g in opt.param_groups for p in g["params"]]
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert len(handed) == len(trainable) and all(any(p is q for q in handed) for p in trainable)
    before = [p.detach().clone() for p in trainable]
    F.cross_entropy(net(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, trainable))
    if get_spec(name).lars_family:
        assert opt.last_trust_ratios is not None


def test_registry_passes_config() -> None:
    cfg = make_cfg(lr=0.3, wd=2e-4, momentum=0.8, eta=0.02, lmbda=0.5, alpha=0.4, delay=7.0,
                   gamma_min=0.03, norm_clip=None)
    group = build_optimizer("tvlars", small_net(), cfg).param_groups[0]
    assert {k: group[k] for k in ("lr", "weight_decay", "momentum", "eta", "lmbda", "alpha",
                                  "delay", "gamma_min", "norm_clip")} == dict(
        lr=0.3, weight_decay=2e-4, momentum=0.8, eta=0.02, lmbda=0.5, alpha=0.4, delay=7.0,
        gamma_min=0.03, norm_clip=None)
    assert build_optimizer("lars", small_net(), cfg).param_groups[0]["eta"] == 0.02
    lamb = build_optimizer("lamb", small_net(), cfg).param_groups[0]
    assert (lamb["lr"], lamb["weight_decay"], lamb["betas"]) == (0.3, 2e-4, (0.9, 0.999))
    assert build_optimizer("sgd", small_net(), cfg).param_groups[0]["momentum"] == 0.8
    assert build_optimizer("rmsprop", small_net(), cfg).param_groups[0]["momentum"] == 0


@pytest.mark.parametrize("name", available_optimizers())
def test_registry_weight_decay_groups(name: str) -> None:
    net = small_net()
    opt = build_optimizer(name, net, make_cfg(wd=5e-4))
    if get_spec(name).lars_family:
        assert len(opt.param_groups) == 1
        assert opt.param_groups[0]["weight_decay"] == 5e-4
        return
    by_decay = {g["weight_decay"]: g["params"] for g in opt.param_groups}
    assert set(by_decay) == {0.0, 5e-4}
    assert all(p.ndim <= 1 for p in by_decay[0.0])
    assert all(p.ndim > 1 for p in by_decay[5e-4])


def test_registry_unknown_name() -> None:
    with pytest.raises(ValueError) as info:
        build_optimizer("adamax", small_net(), make_cfg())
    message = str(info.value)
    assert "\n" not in message and "adamax" in message
    assert all(name in message for name in available_optimizers())


# -- training ----------------------------------------------------------------------------------
TRAIN: dict[str, Callable] = {
    "lars": lambda ps: LARS(ps, lr=3.0, weight_decay=5e-4),
    "tvlars": lambda ps: TVLARS(ps, lr=3.0, weight_decay=5e-4, lmbda=0.01),
    "lamb": lambda ps: LAMB(ps, lr=0.05, weight_decay=1e-2),
}


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


@pytest.fixture
def one_thread():
    """One intra-op thread: on a small shared machine, two threads that wait on each other at
    every op slow the training tests down several times as soon as another job runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", FAMILY)
def test_trains_small_cnn(name: str, one_thread) -> None:
    from tvlars_ray.data import synthetic_arrays

    def load(n: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = synthetic_arrays(n, seed=0, split=split)
        return x.float().div_(255).sub_(0.5).div_(0.25), y

    x_train, y_train = load(2500, "train")
    x_test, y_test = load(500, "test")
    torch.manual_seed(0)
    net = tiny_cnn()
    opt = TRAIN[name](net.parameters())
    order = torch.Generator().manual_seed(0)
    # 6 epochs: test accuracy 0.43 to 0.60 for the three, with seeds 0 and 1 (8 epochs: 0.49
    # to 0.76); after 5, tvlars with seed 0 is at 0.34, too near the bar
    for _ in range(6):
        net.train()
        for idx in torch.randperm(len(y_train), generator=order).split(100):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x_train[idx]), y_train[idx]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy > 0.3, f"{name}: test accuracy {accuracy:.3f}"
