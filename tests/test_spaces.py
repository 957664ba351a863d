from collections import Counter

import pytest
import yaml

from tvlars_ray.config import ConfigError
from tvlars_ray.spaces import SPACES_DIR, load_space, parse_space

# MISSION.md's table: lr and lambda lists per batch size (no warm-up)
PAPER = {512: ([1, 2, 3], 4), 1024: ([5, 8, 10], 5), 2048: ([10, 12, 15], 6),
         4096: ([12, 15, 17, 20], 7), 8192: ([12, 15, 17, 20, 25, 30], 7),
         16384: ([12, 15, 17, 20, 25, 30, 35], 7), 32768: ([12, 15, 17, 20, 25, 30, 35], 7)}

EXPECTED = {"paper-nowarmup": 246, "paper-warmup": 42, "readme-grid": 18, "quickstart": 6,
            "tinyimagenet": 42, "readme-grid-bt": 18, "ablation-phi": 63,
            "imagenet-lars": 24, "cifar10-cpu": 18}


@pytest.mark.parametrize("name", sorted(p.stem for p in SPACES_DIR.glob("*.yaml")))
def test_every_shipped_space_loads(name):
    space = load_space(name)
    if space.is_optuna:
        assert space.search
    else:
        assert len(space.trials()) == EXPECTED[name]


def test_paper_nowarmup_matches_the_table_exactly():
    trials = load_space("paper-nowarmup").trials()
    lars = Counter((t.bs, t.lr) for t in trials if t.opt == "lars")
    tvlars = Counter((t.bs, t.lr, t.lmbda) for t in trials if t.opt == "tvlars")
    assert set(lars) == {(bs, float(lr)) for bs, (lrs, _) in PAPER.items() for lr in lrs}
    assert all(n == 1 for n in (*lars.values(), *tvlars.values()))
    per_bs = Counter(bs for bs, _, _ in tvlars)
    assert per_bs == {bs: len(lrs) * k for bs, (lrs, k) in PAPER.items()}
    assert len(lars) == 33 and len(tvlars) == 213
    assert {t.lmbda for t in trials if t.opt == "tvlars" and t.bs == 512} == {1e-6, 1e-5, 1e-4,
                                                                             1e-3}
    assert all(t.sd == "none" and t.epochs == 100 and t.wd == 5e-4 and t.ds == "cifar10"
               and t.model == "resnet18" for t in trials)


def test_paper_warmup_and_readme_grid():
    warm = load_space("paper-warmup").trials()
    assert Counter(t.opt for t in warm) == {"lars": 21, "lamb": 21}
    assert {t.lr for t in warm} == {0.5, 0.3, 0.1} and {t.sd for t in warm} == {"lars-warm"}
    readme = load_space("readme-grid").trials()
    points = {(lr, lm) for lr in (1.0, 2.0, 3.0) for lm in (1e-6, 1e-5, 1e-4, 1e-3, 5e-3, 1e-2)}
    assert {(t.lr, t.lmbda) for t in readme} == points
    bt = load_space("readme-grid-bt").trials()
    assert {(t.lr, t.lmbda) for t in bt} == points
    assert {(t.mode, t.cl_epochs, t.bs, t.opt) for t in bt} == {("bt", 1000, 512, "tvlars")}


def test_ablation_phi_has_its_seven_arms_on_one_lr_axis():
    trials = load_space("ablation-phi").trials()
    arms: dict[tuple, set] = {}
    for t in trials:
        arms.setdefault((t.opt, t.sd, t.delay, t.gamma_min), set()).add((t.lr, t.seed))
    lars = {("lars", sd, 0.0, 0.0) for sd in ("none", "cosine", "phi", "lars-warm")}
    tvlars = {("tvlars", "none", 0.0, 0.0), ("tvlars", "none", 4600.0, 0.0),
              ("tvlars", "none", 0.0, 0.1)}
    assert set(arms) == lars | tvlars
    assert all(points == {(lr, seed) for lr in (1.0, 2.0, 3.0) for seed in range(3)}
               for points in arms.values())
    assert {(t.lmbda, t.alpha, t.momentum, t.bs) for t in trials} == {(1e-3, 0.1, 0.9, 512)}


def test_branches_seeds_and_dedup(tmp_path):
    space = parse_space({
        "fixed": {"ds": "synthetic", "model": "cnn"},
        "grid": {"lr": [0.1, 0.2], "lmbda": [1e-3, 1e-4],
                 "opt": {"lars": {}, "tvlars": {"alpha": [0.1, 0.5]}}},
        "seeds": 2}, "t")
    trials = space.trials()
    # lars ignores lmbda and alpha: 2 lr x 2 seeds; tvlars: 2 lr x 2 lmbda x 2 alpha x 2 seeds
    assert Counter(t.opt for t in trials) == {"lars": 4, "tvlars": 16}
    assert space.raw_points() == 2 * 2 * 3 * 2


def test_overrides_apply_to_every_trial():
    space = load_space("readme-grid").with_overrides({"epochs": "2", "lr": 1})
    trials = space.trials()
    assert {t.epochs for t in trials} == {2} and len(trials) == 6


@pytest.mark.parametrize("data, words", [
    ({"grid": {"lr": [0.1]}, "fixd": {}}, ["unknown top-level key 'fixd'"]),
    ({"grid": {"lrr": [0.1]}}, ["unknown setting 'lrr'", "did you mean 'lr'"]),
    ({"grid": {"lr": []}}, ["grid.lr", "empty axis"]),
    ({"grid": {"opt": ["lars", "nadam"]}}, ["unknown optimizer (opt) 'nadam'"]),
    ({"fixed": {"ds": "mnist"}, "grid": {"lr": [1]}}, ["dataset", "mnist"]),
    ({"fixed": {"bs": 100, "num_workers": 3}, "grid": {"lr": [1]}}, ["not divisible"]),
    ({"fixed": {"epochs": "many"}, "grid": {"lr": [1]}}, ["epochs", "int"]),
    ({"grid": {"lr": [1]}, "search": {"lr": {"uniform": [1, 2]}}}, ["either 'grid'"]),
    ({"search": {"lr": {"normal": [1, 2]}}}, ["search.lr", "normal"]),
    ({"search": {"lr": {"loguniform": [0, 2]}}}, ["loguniform", "positive"]),
    ({"search": {"lr": {"uniform": [-2, -1]}}}, ["search.lr", "lr must be positive"]),
    ({"grid": {"lr": [1]}, "seeds": 0}, ["seeds"]),
    (None, ["the space is empty"]),  # an empty or comment-only file
    ({}, ["the space is empty"]),
    ({"grid": {"lr": [float("inf")]}}, ["lr must be finite and positive, got inf"]),
    ({"fixed": {"wd": float("nan")}, "grid": {"lr": [1]}}, ["wd must be finite"]),
    ({"search": {"lr": {"uniform": [1, 2]}}, "metric": "val_acc"}, ["val_acc", "val_subset"]),
    ({"search": {"lr": {"uniform": [1, 2]}}, "metric": "accuracy"}, ["unknown metric"]),
])
def test_malformed_spaces_are_refused_with_one_line(data, words):
    with pytest.raises(ConfigError) as err:
        parse_space(data, "bad")
    message = str(err.value)
    assert "\n" not in message and message.startswith("bad")
    for word in words:
        assert word in message


def test_bad_yaml_and_unknown_names(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("grid: {lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_space(str(path))
    with pytest.raises(ConfigError, match="no search space 'nope'"):
        load_space("nope")
    ok = tmp_path / "mine.yaml"
    ok.write_text(yaml.safe_dump({"fixed": {"ds": "synthetic"}, "grid": {"lr": [1, 2]}}))
    assert len(load_space(str(ok)).trials()) == 2


def test_an_optuna_study_may_tune_on_validation():
    space = parse_space({"fixed": {"ds": "synthetic", "val_subset": 500}, "metric": "val_acc",
                         "search": {"lr": {"loguniform": [0.1, 1.0]}}}, "val")
    assert space.metric == "val_acc" and space.base_config()["val_subset"] == 500
