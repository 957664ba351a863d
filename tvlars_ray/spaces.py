"""Search spaces: YAML files that describe a grid or an Optuna study, loaded and validated once.

The format (every key optional except one of ``grid`` / ``search``)::

    description: one line shown by --dry-run
    experiment: paper-nowarmup      # default experiment name (else the file's stem)
    fixed:                          # settings every trial shares (TrialConfig fields)
      ds: cifar10
      epochs: 100
    grid:                           # a block, or a list of blocks whose trials are joined
      bs: [512, 1024]               # an axis: a list of values (a scalar is one value)
      opt:                          # a branching axis: each key is a value of the axis,
        lars: {}                    #   with axes that apply to that value only
        tvlars: {lmbda: [1e-4, 1e-3]}
    search:                         # Optuna distributions (instead of grid)
      lr: {loguniform: [1, 20]}     # also uniform: [lo, hi], int: [lo, hi], choice: [...]
    seeds: 3                        # seeds 0, 1, 2 for every point (or a list: [0, 7])
    metric: test_acc                # what Optuna / ASHA optimise (with mode: max | min);
                                    # val_acc / val_loss need val_subset

Each block of ``grid`` is a cartesian product. Trials whose settings differ only where a
setting cannot matter (``lmbda`` for LARS, ``warmup_epochs`` without ``lars-warm``) are the
same trial and are kept once.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import FIELD_NAMES, ConfigError, TrialConfig, check_keys, field_type


def _spaces_dir() -> Path:
    """The shipped spaces: inside the package when it is installed from a wheel (pyproject.toml
    maps the top-level search_spaces/ folder there), else that folder beside the package in a
    checkout (an editable install, PYTHONPATH, a Ray job's working_dir). Found from this file's
    place rather than by importing: a checkout on PYTHONPATH must not read the spaces of another
    checkout that an editable install maps."""
    package = Path(__file__).resolve().parent
    installed = package / "search_spaces"
    return installed if installed.is_dir() else package.parent / "search_spaces"


SPACES_DIR = _spaces_dir()
TOP_KEYS = ("description", "experiment", "fixed", "grid", "search", "seeds", "metric", "mode")
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int")
# What a study may optimise: numbers every epoch reports (val_* only with a val_subset).
METRICS = ("test_acc", "test_loss", "val_acc", "val_loss", "train_acc", "train_loss")


@dataclass
class Space:
    """A loaded, validated search space."""

    name: str
    path: Path | None
    experiment: str = ""
    description: str = ""
    fixed: dict[str, Any] = field(default_factory=dict)
    grid: list[dict[str, Any]] = field(default_factory=list)
    search: dict[str, tuple[str, list[Any]]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    metric: str = "test_acc"
    mode: str = "max"
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def is_optuna(self) -> bool:
        return bool(self.search)

    def with_seeds(self, count: int) -> Space:
        """``grid --seeds N``: seeds 0 .. N-1 for every point, whatever the file says."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"--seeds must be a positive count, got {count!r}")
        return Space(**{**self.__dict__, "seeds": list(range(count))})

    def with_overrides(self, overrides: dict[str, Any]) -> Space:
        """Apply ``--set key=value``: the value replaces the setting in every trial."""
        check_keys(overrides, f"{self.name}: --set")
        search = {k: v for k, v in self.search.items() if k not in overrides}
        space = Space(**{**self.__dict__, "overrides": {**self.overrides, **overrides},
                         "search": search})
        space.validate()
        return space

    # -- grids ----------------------------------------------------------------------------
    def trials(self) -> list[TrialConfig]:
        """Every trial of the grid, validated, deduplicated, in file order."""
        if self.is_optuna:
            raise ConfigError(f"{self.name} is an Optuna space (it has 'search'): run it with "
                              f"`python -m tvlars_ray.run optuna --space {self.name}`")
        seen: dict[str, TrialConfig] = {}
        for point in self._points():
            for seed in self.seeds:
                values = {**self.fixed, **point, "seed": seed, **self.overrides}
                cfg = _build(self.name, values)
                seen.setdefault(cfg.science_key, cfg)
        return list(seen.values())

    def _points(self) -> Iterator[dict[str, Any]]:
        for block in self.grid or [{}]:
            yield from _expand(block)

    def raw_points(self) -> int:
        """Points before deduplication (times seeds), to say how many were merged."""
        return sum(1 for _ in self._points()) * len(self.seeds)

    # -- Optuna ---------------------------------------------------------------------------
    def base_config(self) -> dict[str, Any]:
        return {**self.fixed, "seed": self.seeds[0], **self.overrides}

    def validate(self) -> None:
        if self.is_optuna:
            base = self.base_config()
            if self.metric.startswith("val_") and base.get("val_subset") is None:
                raise ConfigError(f"{self.name}: metric {self.metric} needs a validation split: "
                                  f"set val_subset (images held out of training) under fixed")
            for key, (kind, args) in self.search.items():
                ends = args if kind == "choice" else [args[0], args[1]]
                for value in ends:
                    _build(self.name, {**base, key: value}, where=f"search.{key}")
        else:
            self.trials()


def _build(space: str, values: dict[str, Any], where: str = "") -> TrialConfig:
    try:
        return TrialConfig.from_dict(values)
    except ConfigError as exc:
        raise ConfigError(f"{space}: {where + ': ' if where else ''}{exc}") from None


def _expand(block: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The cartesian product of a block's axes; a mapping axis branches per value."""
    choices: list[list[dict[str, Any]]] = []
    for key, axis in block.items():
        if isinstance(axis, dict):
            options = []
            for value, sub in axis.items():
                options += [{key: value, **rest} for rest in _expand(sub or {})]
        else:
            options = [{key: value} for value in (axis if isinstance(axis, list) else [axis])]
        choices.append(options)
    for combo in itertools.product(*choices):
        merged: dict[str, Any] = {}
        for part in combo:
            merged.update(part)
        yield merged


def _check_block(name: str, block: Any, where: str) -> None:
    if not isinstance(block, dict):
        raise ConfigError(f"{name}: {where} must be a mapping of setting -> values, "
                          f"got {type(block).__name__}")
    for key, axis in block.items():
        if key not in FIELD_NAMES:
            check_keys({key: None}, f"{name}: {where}")
        if key == "seed":
            raise ConfigError(f"{name}: {where}: use the top-level 'seeds' instead of a seed axis")
        if isinstance(axis, dict):
            if not axis:
                raise ConfigError(f"{name}: {where}.{key} is an empty branching axis")
            for value, sub in axis.items():
                _check_block(name, sub or {}, f"{where}.{key}.{value}")
        elif isinstance(axis, list) and not axis:
            raise ConfigError(f"{name}: {where}.{key} is an empty axis: give at least one value")


def _check_distribution(name: str, key: str, spec: Any) -> tuple[str, list[Any]]:
    where = f"{name}: search.{key}"
    if key not in FIELD_NAMES:
        check_keys({key: None}, f"{name}: search")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where} must be one of {{{', '.join(DISTRIBUTIONS)}: [...]}}, "
                          f"got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution '{kind}': use one of "
                          f"{', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}.{kind} needs a non-empty list")
    if kind == "choice":
        return kind, args
    if len(args) != 2:
        raise ConfigError(f"{where}.{kind} needs [low, high], got {args!r}")
    base = field_type(key)[0]
    if base not in (int, float):
        raise ConfigError(f"{where}: {kind} needs a numeric setting; '{key}' is "
                          f"{base.__name__}: use choice")
    try:
        low, high = (int(float(a)) if kind == "int" else float(a) for a in args)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}.{kind}: bounds must be numbers, got {args!r}") from None
    if not low < high:
        raise ConfigError(f"{where}.{kind}: low must be below high, got {args!r}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}.loguniform: bounds must be positive, got {args!r}")
    return kind, [low, high]


def resolve(name_or_path: str) -> Path:
    """A path as given, or a name (with or without .yaml) from search_spaces/."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") and candidate.exists():
        return candidate
    stem = candidate.name.removesuffix(".yaml").removesuffix(".yml")
    shipped = SPACES_DIR / f"{stem}.yaml"
    if shipped.exists():
        return shipped
    known = ", ".join(sorted(p.stem for p in SPACES_DIR.glob("*.yaml")))
    if not known:
        raise ConfigError(f"no search space '{name_or_path}' and no shipped spaces in "
                          f"{SPACES_DIR}: reinstall tvlars-ray, or give a YAML path")
    raise ConfigError(f"no search space '{name_or_path}': give a YAML path or one of: {known}")


def load_space(name_or_path: str, overrides: dict[str, Any] | None = None) -> Space:
    """Read, check and validate a space (every trial it implies is built once)."""
    path = resolve(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        at = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"{path.name}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") \
            from None
    return parse_space(data, path.stem, path)


def parse_space(data: Any, name: str, path: Path | None = None) -> Space:
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: a search space is a mapping with 'fixed', 'grid' or 'search'")
    for key in data:
        if key not in TOP_KEYS:
            raise ConfigError(f"{name}: unknown top-level key '{key}': use {', '.join(TOP_KEYS)}")
    if "grid" in data and "search" in data:
        raise ConfigError(f"{name}: give either 'grid' (grid search) or 'search' (Optuna), "
                          f"not both: Optuna cannot sample a grid axis")
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"{name}: 'fixed' must be a mapping of setting: value")
    check_keys(fixed, f"{name}: fixed")
    grid = data.get("grid") or []
    blocks = grid if isinstance(grid, list) else [grid]
    for i, block in enumerate(blocks):
        _check_block(name, block, f"grid[{i}]" if isinstance(grid, list) else "grid")
    search = data.get("search") or {}
    if not isinstance(search, dict):
        raise ConfigError(f"{name}: 'search' must be a mapping of setting: distribution")
    search = {key: _check_distribution(name, key, spec) for key, spec in search.items()}
    seeds = data.get("seeds", [fixed.get("seed", 0)])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ConfigError(f"{name}: seeds must be a positive count or a list, got {seeds}")
        seeds = list(range(seeds))
    if not isinstance(seeds, list) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{name}: seeds must be a positive count or a list of integers")
    metric = data.get("metric", "test_acc")
    if metric not in METRICS:
        raise ConfigError(f"{name}: unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    mode = data.get("mode", "max")
    if mode not in ("max", "min"):
        raise ConfigError(f"{name}: mode must be max or min, got {mode!r}")
    fixed = {k: v for k, v in fixed.items() if k != "seed"}
    space = Space(name=name, path=path, experiment=str(data.get("experiment") or name),
                  description=str(data.get("description") or ""), fixed=fixed, grid=blocks,
                  search=search, seeds=seeds, metric=metric,
                  mode=mode)
    space.validate()
    return space


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["epochs=2", "lr=0.1"]`` -> ``{"epochs": "2", "lr": "0.1"}`` (typed by TrialConfig)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else value
    return out
