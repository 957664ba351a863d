"""One typed, validated description of a trial.

Everything a worker needs to run one training run lives in :class:`TrialConfig`. It is built
from the CLI, a YAML search space or a dict, and validated once, before anything starts: a bad
value is a :class:`ConfigError` whose message is one line naming the setting and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .bounds import BOUNDS, check
from .data import DATASETS
from .errors import UserError
from .models import MODELS
from .optim.registry import PHI_SETTINGS, available_optimizers, get_spec, optimizer_settings

MODES = ("clf", "bt")
SCHEDULES = ("none", "cosine", "lars-warm", "phi")
STEMS = ("imagenet", "cifar")
NORMS = ("dataset", "imagenet")
LOADERS = ("device", "torch")
AMPS = ("auto", "none", "bf16")


class ConfigError(UserError, ValueError):
    """A bad setting. The message is one readable line naming the setting and the fix."""


@dataclass(frozen=True)
class TrialConfig:
    """The full description of one trial: what to train, how, and on what resources.

    Names follow the reference code's CLI (``bs``, ``lr``, ``wd``, ``sd``, ``lmbda``, ...).
    """

    # what is trained
    mode: str = "clf"
    ds: str = "cifar10"
    model: str = "resnet18"
    stem: str = "imagenet"
    epochs: int = 1
    bs: int = 32
    seed: int = 0
    # the optimizer under study
    opt: str = "lars"
    lr: float = 0.01
    wd: float = 5e-4
    momentum: float = 0.9
    eta: float = 0.001
    lmbda: float = 1e-3
    alpha: float = 0.1
    delay: float = 0.0
    gamma_min: float = 0.0
    norm_clip: float | None = 10.0
    # learning-rate schedule, stepped every iteration
    sd: str = "none"
    warmup_epochs: int = 20
    # data
    data_dir: str | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    val_subset: int | None = None
    norm: str = "dataset"
    loader: str = "device"
    loader_workers: int = 0
    # Barlow Twins (mode bt)
    cl_epochs: int = 1000
    btlmbda: float = 0.005
    projector: str = "4096-4096-4096"
    lr_classifier: float = 0.3
    lr_backbone: float = 0.0
    # compute
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    amp: str = "auto"
    channels_last: bool | None = None
    compile: bool = False
    # what is recorded besides the epochs
    layer_every: int | None = None
    # fault tolerance
    checkpoint_every: int = 1
    max_failures: int = 2

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name)))
        if isinstance(self.sd, str) and self.sd.lower() == "none":
            object.__setattr__(self, "sd", "none")
        _validate(self)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrialConfig:
        """Build from a mapping, refusing unknown keys with a suggestion."""
        check_keys(values, "trial config")
        return cls(**values)

    def replace(self, **changes: Any) -> TrialConfig:
        check_keys(changes, "override")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- derived values -----------------------------------------------------------------
    @property
    def per_worker_bs(self) -> int:
        return self.bs // max(self.num_workers, 1)

    @property
    def phi_args(self) -> dict[str, float]:
        """The keyword arguments of ``tvlars_phi``: TVLARS's phi(t) and the ``phi`` schedule."""
        return {name: getattr(self, name) for name in PHI_SETTINGS}

    @property
    def projector_dims(self) -> list[int]:
        return [int(x) for x in self.projector.split("-")]

    @property
    def science_key(self) -> str:
        """A short stable hash of the settings that change the numbers (not the resources)."""
        skip = RESOURCE_FIELDS | irrelevant_fields(self)
        keep = {k: v for k, v in self.to_dict().items() if k not in skip}
        blob = json.dumps(keep, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


_HELP = {
    "mode": "clf (classification) or bt (Barlow Twins pre-training, then linear evaluation)",
    "ds": "dataset: synthetic, cifar10, cifar100, tinyimagenet, imagenet or imagefolder",
    "model": "network: cnn (small, for demos), resnet18, resnet34, resnet50, effb0",
    "stem": "imagenet (torchvision's 7x7/2 stem and max-pool, as the reference) or cifar "
            "(3x3/1, no max-pool)",
    "epochs": "training epochs (in bt mode: linear-evaluation epochs)",
    "bs": "global batch size, split evenly over the DDP workers",
    "seed": "seeds python, numpy, torch and the data order in every worker",
    "opt": "optimizer",  # the list comes from the registry
    "lr": "base learning rate",
    "wd": "weight decay",
    # optimizer settings: which optimizers take each comes from the registry
    "momentum": "heavy-ball momentum factor",
    "eta": "trust coefficient of the layer-wise ratio",
    "lmbda": "delay factor lambda, how fast phi decays",
    "alpha": "phi starts near 1/alpha",
    "delay": "d_e, the optimizer steps before phi's decay is centred",
    "gamma_min": "phi's floor",
    "norm_clip": "clip on both norms of the trust ratio (none: no clip)",
    "sd": "lr schedule per iteration: none, cosine, lars-warm, or phi (the lr times TVLARS's "
          "phi(t), for any optimizer but TVLARS)",
    "warmup_epochs": "warm-up epochs of lars-warm",
    "data_dir": "where datasets live (default TVLARS_DATA_DIR, else a user cache folder); "
                "for imagefolder, the folder or .zip itself",
    "train_subset": "use a stratified, seeded subset of this many training images (of those "
                    "left after the validation hold-out)",
    "test_subset": "use a stratified, seeded subset of this many test images",
    "val_subset": "hold out a stratified, seeded set of this many training images for "
                  "validation (never trained on; val_loss / val_acc every epoch)",
    "norm": "normalisation statistics: dataset (its own) or imagenet (as the reference)",
    "loader": "device (images on the worker's device, batched augmentation) or torch "
              "(DataLoader, per-sample transforms; for data that does not fit in memory or "
              "whose images differ in size)",
    "loader_workers": "DataLoader processes per DDP worker with loader torch (the reference "
                      "--workers)",
    "cl_epochs": "Barlow Twins pre-training epochs (0: linear evaluation of a random backbone)",
    "btlmbda": "Barlow Twins weight of the off-diagonal terms",
    "projector": "Barlow Twins projector widths, e.g. 4096-4096-4096",
    "lr_classifier": "linear evaluation: learning rate of the classifier",
    "lr_backbone": "linear evaluation: learning rate of the backbone (0: frozen)",
    "num_workers": "DDP workers of the trial (0: run in this process, for debugging)",
    "use_gpu": "one GPU-backed worker per DDP rank (NCCL); else CPU workers (gloo)",
    "cpus_per_worker": "CPUs reserved per DDP worker",
    "gpus_per_worker": "GPUs reserved per DDP worker: 1, or a share such as 0.25 (four "
                       "one-worker trials on each GPU, each capped at its share of the "
                       "GPU's memory)",
    "amp": "mixed precision: auto (bf16 on GPU, off on CPU), none or bf16",
    "channels_last": "channels-last memory layout (default: on GPU only)",
    "compile": "torch.compile the model",
    "layer_every": "per-layer trust ratio and norms every k optimizer steps (LARS family; "
                   "none: at each epoch's last step)",
    "checkpoint_every": "checkpoint every k epochs (and at the end)",
    "max_failures": "restarts from the last checkpoint after a worker dies",
}



class _Help(Mapping[str, str]):
    """One line per setting; the optimizer's part is read from the registry when asked,
    so an optimizer registered later is listed too."""

    def __getitem__(self, name: str) -> str:
        text = _HELP[name]
        if name == "opt":
            return f"{text}, one of: " + "; ".join(
                f"{n} - {get_spec(n).description}" for n in available_optimizers())
        if name in optimizer_settings():
            users = [get_spec(n).display for n in available_optimizers()
                     if name in get_spec(n).settings]
            if name in PHI_SETTINGS:
                users.append("any optimizer with sd phi")
            return f"{', '.join(users)}: {text}"
        return text

    def __iter__(self) -> Iterator[str]:
        return iter(_HELP)

    def __len__(self) -> int:
        return len(_HELP)


HELP: Mapping[str, str] = _Help()

# Settings that decide where and how fast a trial runs, or what it records besides, not what
# it computes.
RESOURCE_FIELDS = frozenset(
    {"data_dir", "loader_workers", "use_gpu", "cpus_per_worker", "gpus_per_worker",
     "checkpoint_every", "max_failures", "compile", "layer_every"}
)

BT_FIELDS = frozenset({"cl_epochs", "btlmbda", "projector", "lr_classifier", "lr_backbone"})


def irrelevant_fields(c: TrialConfig) -> frozenset[str]:
    """Settings that cannot change this trial's numbers (lmbda for LARS, warm-up without
    lars-warm, ...): nulled in the store and ignored when deduplicating a grid."""
    out = set(optimizer_settings() - set(get_spec(c.opt).settings))
    if c.sd == "phi":
        out -= set(PHI_SETTINGS)
    if not get_spec(c.opt).lars_family:
        out.add("layer_every")
    if c.sd != "lars-warm":
        out.add("warmup_epochs")
    if c.mode != "bt":
        out |= BT_FIELDS
    if c.loader != "torch" or c.mode == "bt":
        out.add("loader_workers")
    if c.mode == "bt":  # Barlow Twins always augments its views on the device
        out.add("loader")
    if not c.use_gpu:
        out.add("gpus_per_worker")
    return frozenset(out)


def trial_table(trials: Sequence[TrialConfig]) -> list[dict[str, Any]]:
    """The settings that vary across trials, one dict per trial (for --dry-run and display)."""
    keys = varying_keys(trials)
    return [{k: getattr(c, k) for k in keys} for c in trials]


def varying_keys(trials: Sequence[TrialConfig]) -> list[str]:
    keys = []
    for name in TrialConfig.__dataclass_fields__:
        values = {getattr(c, name) for c in trials if name not in irrelevant_fields(c)}
        if len(values) > 1:
            keys.append(name)
    return keys


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrialConfig))
_HINTS = typing.get_type_hints(TrialConfig)


def check_keys(values: dict[str, Any], where: str) -> None:
    for key in values:
        if key not in FIELD_NAMES:
            close = difflib.get_close_matches(key, FIELD_NAMES, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(FIELD_NAMES)}"
            raise ConfigError(f"{where}: unknown setting '{key}' ({hint})")


def field_type(name: str) -> tuple[type, bool]:
    """The base type of a field and whether it may be None."""
    hint = _HINTS[name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        base = next(a for a in args if a is not type(None))
        return base, True
    return hint, False


_NONE_WORDS = {"none", "null", "~", ""}
_TRUE_WORDS = {"true", "yes", "1", "on"}
_FALSE_WORDS = {"false", "no", "0", "off"}


def _coerce(name: str, value: Any) -> Any:
    """Turn CLI / YAML text into the field's type (YAML reads ``1e-3`` as a string)."""
    base, optional = field_type(name)
    if value is None or (optional and isinstance(value, str) and value.lower() in _NONE_WORDS):
        if optional:
            return None
        raise ConfigError(f"setting '{name}' may not be empty: give a {base.__name__}")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE_WORDS:
                return True
            if text in _FALSE_WORDS:
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            if isinstance(value, str):
                number = float(value)
                if not number.is_integer():
                    raise ValueError
                return int(number)
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"setting '{name}' must be {'an' if base is int else 'a'} {base.__name__}, "
            f"got {value!r}"
        ) from None
    return value


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(name: str, value: str, choices: typing.Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown {name} '{value}'{hint}: choose one of {', '.join(choices)}")


def _validate(c: TrialConfig) -> None:
    _one_of("mode", c.mode, MODES)
    _one_of("dataset (ds)", c.ds, DATASETS)
    _one_of("model", c.model, MODELS)
    _one_of("stem", c.stem, STEMS)
    _one_of("optimizer (opt)", c.opt, available_optimizers())
    _one_of("schedule (sd)", c.sd, SCHEDULES)
    _one_of("norm", c.norm, NORMS)
    _one_of("loader", c.loader, LOADERS)
    _one_of("amp", c.amp, AMPS)

    for name in FIELD_NAMES:
        if name in BOUNDS:
            unused = name == "gpus_per_worker" and not c.use_gpu  # only finite, then
            try:
                check(name, getattr(c, name), "delay" if unused else None)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    _need(not (c.use_gpu and c.gpus_per_worker < 1 and c.num_workers > 1),
          f"gpus_per_worker {c.gpus_per_worker:g} shares a GPU between trials, which needs one "
          f"worker per trial (NCCL cannot run two ranks of one trial on one GPU): set "
          f"num_workers 1, or gpus_per_worker 1")
    spec = get_spec(c.opt)
    _need(
        not (c.sd == "phi" and set(PHI_SETTINGS) <= set(spec.settings)),
        f"sd phi with opt {c.opt}: {spec.display} already scales its steps by phi(t), so the "
        f"schedule would apply it twice; use sd none (or phi with another optimizer)",
    )
    if c.num_workers > 0:
        _need(
            c.bs % c.num_workers == 0,
            f"bs {c.bs} is not divisible by num_workers {c.num_workers}: "
            f"use a batch size that is a multiple of the worker count",
        )

    _need(c.mode != "bt" or c.loader == "device",
          "mode bt augments its two views on the device: loader torch is not supported there "
          "(drop loader=torch)")
    _need(
        re.fullmatch(r"[1-9]\d*(-[1-9]\d*)*", c.projector) is not None,
        f"projector must look like 4096-4096-4096 (dims joined by '-'), got {c.projector!r}",
    )
