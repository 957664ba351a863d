import dataclasses

import pytest
import torch

from tvlars_ray.config import HELP, ConfigError, TrialConfig, irrelevant_fields
from tvlars_ray.optim import (
    OptimizerSpec,
    available_optimizers,
    build_optimizer,
    get_spec,
    optimizer_settings,
    register_optimizer,
)


def test_defaults_follow_the_reference_cli():
    cfg = TrialConfig()
    assert (cfg.bs, cfg.epochs, cfg.lr, cfg.wd, cfg.ds, cfg.model, cfg.opt, cfg.sd) == (
        32, 1, 0.01, 5e-4, "cifar10", "resnet18", "lars", "none")
    assert (cfg.lmbda, cfg.cl_epochs, cfg.btlmbda, cfg.projector) == (
        1e-3, 1000, 0.005, "4096-4096-4096")
    assert (cfg.lr_classifier, cfg.lr_backbone, cfg.mode) == (0.3, 0.0, "clf")


def test_text_values_are_typed():
    cfg = TrialConfig.from_dict({"lr": "1e-3", "bs": "64", "use_gpu": "false", "sd": "None",
                                 "norm_clip": "none", "epochs": 2.0})
    assert cfg.lr == 0.001 and cfg.bs == 64 and cfg.use_gpu is False
    assert cfg.sd == "none" and cfg.norm_clip is None and cfg.epochs == 2


@pytest.mark.parametrize("values, words", [
    ({"opt": "adamm"}, ["optimizer", "adamm", "did you mean 'adam'"]),
    ({"ds": "imagenet21k"}, ["dataset", "imagenet21k"]),
    ({"bs": 30, "num_workers": 4}, ["bs 30", "not divisible", "num_workers 4"]),
    ({"lr": -1}, ["lr", "positive"]),
    ({"momentum": 1.0}, ["momentum"]),
    ({"bs": "big"}, ["bs", "int", "'big'"]),
    ({"epochs": 2.5}, ["epochs", "int"]),
    ({"lrr": 1}, ["unknown setting 'lrr'", "did you mean 'lr'"]),
    ({"projector": "4096x4096"}, ["projector"]),
    ({"sd": "step"}, ["schedule", "step"]),
    ({"opt": "tvlars", "sd": "phi"}, ["sd phi", "tvlars", "twice"]),
])
def test_bad_values_are_one_line_errors_naming_the_setting(values, words):
    with pytest.raises(ConfigError) as err:
        TrialConfig.from_dict(values)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_settings_that_cannot_matter_do_not_change_the_key():
    lars = TrialConfig(opt="lars", lmbda=1e-3)
    assert "lmbda" in irrelevant_fields(lars)
    assert lars.science_key == TrialConfig(opt="lars", lmbda=1e-6).science_key
    assert (TrialConfig(opt="tvlars", lmbda=1e-3).science_key
            != TrialConfig(opt="tvlars", lmbda=1e-6).science_key)
    assert TrialConfig(sd="none", warmup_epochs=5).science_key == TrialConfig(sd="none").science_key


@pytest.mark.parametrize("opt", ["lars", "sgd", "lamb"])
def test_the_phi_schedule_makes_phis_settings_count_for_any_optimizer(opt):
    cfg = TrialConfig(opt=opt, sd="phi")
    irrelevant = irrelevant_fields(cfg)
    assert not irrelevant & {"lmbda", "alpha", "delay", "gamma_min"}
    assert "norm_clip" in irrelevant  # the clip stays TVLARS's own
    for name, value in (("lmbda", 1e-4), ("alpha", 0.5), ("delay", 10.0), ("gamma_min", 0.1)):
        assert cfg.science_key != cfg.replace(**{name: value}).science_key, name
    assert cfg.phi_args == dict(lmbda=1e-3, alpha=0.1, delay=0.0, gamma_min=0.0)
    assert "lmbda" in irrelevant_fields(cfg.replace(sd="cosine"))
    assert "any optimizer with sd phi" in HELP["lmbda"] and "phi" in HELP["sd"]


def test_every_setting_is_explained():
    assert set(HELP) == {f.name for f in dataclasses.fields(TrialConfig)}


def test_every_numeric_setting_has_one_bound_and_must_be_finite():
    from tvlars_ray.bounds import BOUNDS
    from tvlars_ray.config import field_type

    numeric = {f.name for f in dataclasses.fields(TrialConfig)
               if field_type(f.name)[0] in (int, float)}
    assert numeric - {"seed"} <= set(BOUNDS)
    for name in ("lr", "wd", "delay", "alpha", "lmbda"):
        for value in ("inf", "-inf", "nan"):
            with pytest.raises(ConfigError, match=name):
                TrialConfig.from_dict({name: value})


def test_the_reference_workers_flag_is_the_loader_workers_setting():
    from tvlars_ray.run import build_parser

    args = build_parser().parse_args(["trial", "--workers", "3"])
    assert args.loader_workers == "3"


# -- what the registry says about each optimizer, derived here --------------------------------
@pytest.mark.parametrize("name", available_optimizers())
def test_optimizer_settings_come_from_the_registry(name):
    spec = get_spec(name)
    irrelevant = irrelevant_fields(TrialConfig(opt=name))
    assert f"{name} - {spec.description}" in HELP["opt"]
    for setting in optimizer_settings():
        applies = setting in spec.settings
        assert (setting in irrelevant) != applies, setting
        assert (spec.display in HELP[setting].split(":")[0].split(", ")) == applies, setting
    assert not irrelevant & {"lr", "wd"}


class ScaledSGD(torch.optim.SGD):
    """A test-only optimizer taking one LARS setting."""

    def __init__(self, params, lr, weight_decay, momentum, eta):
        super().__init__(params, lr=lr * eta, weight_decay=weight_decay, momentum=momentum)


@pytest.fixture
def scaled_sgd(monkeypatch):
    """ScaledSGD registered for one test, the registry restored after it."""
    from tvlars_ray.optim import registry

    monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))
    return register_optimizer(OptimizerSpec(
        "scaledsgd", ScaledSGD, "ScaledSGD", "SGD with its lr scaled by eta (a test)",
        settings=("momentum", "eta")))


def test_a_registered_optimizer_is_known_everywhere_without_other_edits(scaled_sgd):
    from tvlars_ray.report import method_name

    cfg = TrialConfig(opt="scaledsgd", eta=0.5, momentum=0.8, lmbda=0.3)
    assert "scaledsgd - SGD with its lr scaled by eta (a test)" in HELP["opt"]
    assert "ScaledSGD" in HELP["eta"] and "ScaledSGD" in HELP["momentum"]
    assert "ScaledSGD" not in HELP["lmbda"]
    irrelevant = irrelevant_fields(cfg)
    assert {"lmbda", "alpha", "delay", "gamma_min", "norm_clip"} <= irrelevant
    assert not {"eta", "momentum"} & irrelevant
    assert cfg.science_key == cfg.replace(lmbda=0.7).science_key
    assert cfg.science_key != cfg.replace(eta=0.7).science_key
    assert method_name("scaledsgd", "none") == "ScaledSGD"
    optimizer = build_optimizer("scaledsgd", torch.nn.Linear(2, 2), cfg)
    assert isinstance(optimizer, ScaledSGD)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.lr * 0.5)
