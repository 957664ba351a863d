"""Grids and Optuna studies through real Ray Tune, each trial a TorchTrainer with DDP workers."""

import json
import re
import subprocess
from pathlib import Path

import pandas as pd
import yaml
from ray import tune

from tvlars_ray.config import TrialConfig
from tvlars_ray.run import main
from tvlars_ray.store import Store, read_epochs, read_trials
from tvlars_ray.sweep import POINT, TrialNames, grid_space, settings_from_tune, train_driver_fn

ROOT = Path(__file__).resolve().parent.parent

TINY = {"ds": "synthetic", "model": "cnn", "stem": "cifar", "train_subset": 256,
        "test_subset": 128, "epochs": 2, "bs": 32, "num_workers": 2, "cpus_per_worker": 1}


def _space(tmp_path, name, body):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return str(path)


def test_grid_of_two_trials_fills_the_store(ray_session, tmp_path, capsys, monkeypatch):
    """One grid, read back every way: the store, Tune's results, provenance, the report, and
    the three trackers through Tune's logger callbacks (W&B offline, MLflow in a local file)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    space = _space(tmp_path, "two", {"fixed": TINY, "grid": {
        "opt": {"sgd": {"lr": 0.05}, "tvlars": {"lr": 2.0, "lmbda": 1e-3}}}})
    store = str(tmp_path / "store")
    assert main(["grid", "--space", space, "--store", store, "--logger", "tensorboard",
                 "--logger", "mlflow", "--logger", "wandb"]) == 0
    out = capsys.readouterr().out
    assert f"tensorboard --logdir {store}/two/tune" in out and "mlflow.db" in out
    assert "final_acc" in out and "completed" in out and "report:" in out
    trials = read_trials(store, "two")
    assert len(trials) == 2 and set(trials["status"]) == {"completed"}
    assert set(trials["opt"]) == {"sgd", "tvlars"} and (trials["epochs_done"] == 2).all()
    epochs = read_epochs(store)
    assert len(epochs) == 4 and not epochs.duplicated(["trial_id", "epoch"]).any()
    assert (epochs["world_size"] == 2).all() and (epochs["test_samples"] == 128).all()
    assert len(pd.read_parquet(tmp_path / "store" / "two" / "epochs")) == 4
    report = tmp_path / "store" / "two" / "report"
    assert (report / "report.md").exists() and list(report.glob("*.png"))
    # the same experiment again is refused; --resume finds nothing left to do
    assert main(["grid", "--space", space, "--store", store]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["grid", "--space", space, "--store", store, "--resume", "--no-report"]) == 0
    assert len(read_epochs(store)) == 4 and len(read_trials(store)) == 2
    assert main(["status", "--store", store]) == 0
    assert "2 completed" in capsys.readouterr().out
    # Tune was given the real settings: its results, dataframe and folders show them
    tune_dir = tmp_path / "store" / "two" / "tune"
    assert {p.name for p in tune_dir.iterdir() if p.is_dir()} == {"sgd-lr0.05-s0",
                                                                   "tvlars-lr2-s0"}
    frame = tune.Tuner.restore(str(tune_dir), trainable=train_driver_fn).get_results() \
        .get_dataframe()
    by_opt = frame.set_index("config/opt")
    assert by_opt.loc["tvlars", "config/lr"] == 2.0 and by_opt.loc["sgd", "config/lr"] == 0.05
    assert by_opt.loc["tvlars", "config/lmbda"] == 1e-3
    assert pd.isna(by_opt.loc["sgd", "config/lmbda"])  # does not apply to SGD, as in the store
    assert (frame["config/epochs"] == 2).all() and (frame["config/ds"] == "synthetic").all()
    assert set(frame["trial_id"]) == set(trials["trial_id"])
    # provenance: the command that started it and the one that resumed it, and per trial
    runs = Store(store).provenance("two")
    assert [r["command"].split(" ", 3)[3].split()[0] for r in runs] == ["grid", "grid"]
    assert runs[1]["command"].endswith("--resume --no-report")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    assert runs[0]["git"]["commit"] == head and runs[0]["versions"]["ray"] == "2.60.0"
    trials = read_trials(store, "two")
    assert (trials["git_commit"] == head).all() and trials["hosts"].notna().all()
    assert trials["driver_host"].notna().all() and trials["command"].str.contains("grid").all()
    assert json.loads(trials["versions"].iloc[0])["torch"]
    assert "## Provenance" in (report / "report.md").read_text()
    _trackers_hold_the_grid(Path(store), trials)


def _trackers_hold_the_grid(store: Path, trials: pd.DataFrame) -> None:
    """MLflow, W&B and TensorBoard each hold both trials: settings and every stored epoch."""
    from .test_trackers import mlflow_runs, tensorboard_run, wandb_run

    names = {"sgd-lr0.05-s0", "tvlars-lr2-s0"}  # named by what varies, as Tune's folders
    runs = mlflow_runs(f"sqlite:///{store}/mlflow.db", "two")
    assert set(runs) == names
    tv = runs["tvlars-lr2-s0"]
    assert tv["params"]["opt"] == "tvlars" and tv["params"]["lmbda"] == "0.001"
    assert runs["sgd-lr0.05-s0"]["params"]["lmbda"] == "None"  # does not apply to SGD
    stored = read_epochs(str(store), "two")
    tv_id = trials.loc[trials.opt == "tvlars", "trial_id"].item()
    assert tv["metrics"]["test_acc"] == list(stored.loc[stored.trial_id == tv_id, "test_acc"])
    assert tv["tags"]["mlflow.source.git.commit"] == trials["git_commit"].iloc[0]
    folders = sorted((store / "two" / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    by_opt = {c["opt"]: (c, h) for c, h in map(wandb_run, map(str, folders))}
    assert set(by_opt) == {"sgd", "tvlars"} and by_opt["tvlars"][0]["lr"] == 2.0
    assert by_opt["tvlars"][1]["test_acc"] == tv["metrics"]["test_acc"]
    scalars, hparams = tensorboard_run(str(store / "two" / "tune" / "tvlars-lr2-s0"))
    assert hparams["opt"] == "tvlars" and hparams["lr"] == 2.0 and hparams["lmbda"] == 0.001
    assert hparams["bs"] == 32 and hparams["point"] == "0001"
    assert scalars["ray/tune/test_acc"] == tv["metrics"]["test_acc"]


def test_optuna_study_lands_in_the_store(ray_session, tmp_path):
    space = _space(tmp_path, "study", {
        # one worker on half a CPU a trial: the two trials run at once (the grid above has
        # the two-rank trials); two samples are a study, ASHA compares them at each rung
        "fixed": {**TINY, "opt": "tvlars", "epochs": 3, "num_workers": 1, "cpus_per_worker": 0.5},
        "search": {"lr": {"loguniform": [0.5, 5.0]}, "lmbda": {"loguniform": [1e-5, 1e-2]},
                   "alpha": {"uniform": [0.1, 1.0]}}})
    store = str(tmp_path / "store")
    assert main(["optuna", "--space", space, "--store", store, "--num-samples", "2",
                 "--asha", "--quiet"]) == 0
    trials = read_trials(store, "study")
    assert len(trials) == 2 and trials["trial_id"].is_unique
    assert set(trials["status"]) <= {"completed", "stopped"}
    assert trials["lr"].nunique() == 2 and trials["lr"].between(0.5, 5.0).all()
    # stopped trials are those ASHA cut short; completed ones ran every epoch
    assert (trials.loc[trials.status == "completed", "epochs_done"] == 3).all()
    assert (trials.loc[trials.status == "stopped", "epochs_done"] < 3).all()
    epochs = read_epochs(store, "study")
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    # Tune's config holds the sampled values and every fixed setting; folders say which
    tune_dir = tmp_path / "store" / "study" / "tune"
    frame = tune.Tuner.restore(str(tune_dir), trainable=train_driver_fn).get_results() \
        .get_dataframe()
    assert sorted(frame["config/lr"]) == sorted(trials["lr"])
    assert (frame["config/epochs"] == 3).all() and (frame["config/opt"] == "tvlars").all()
    assert (frame["config/cpus_per_worker"] == 0.5).all()
    folders = sorted(p.name for p in tune_dir.iterdir() if p.is_dir())
    assert len(folders) == 2 and all(re.fullmatch(  # the sampled settings, the seed, an id
        r"tvlars(-(lr|lmbda|alpha)[0-9.e+-]+){3}-s0-[0-9a-f]+", f) for f in folders)


def test_tune_is_given_every_setting_of_each_grid_point():
    """The grid's points, deduplicated, each as its full settings (not an index)."""
    from ray.tune.search.variant_generator import generate_variants

    trials = [TrialConfig(ds="synthetic", opt="lars", lr=1.0, bs=512),
              TrialConfig(ds="synthetic", opt="tvlars", lr=2.0, lmbda=1e-4, bs=512),
              TrialConfig(ds="synthetic", opt="tvlars", lr=2.0, lmbda=1e-3, bs=1024, seed=1)]
    grid = {f"{i:04d}": c.to_dict() for i, c in enumerate(trials)}
    configs = [spec["config"] for _, spec in generate_variants({"config": grid_space(grid)})]
    assert [c[POINT] for c in configs] == ["0000", "0001", "0002"]
    for config, cfg in zip(configs, trials):
        assert settings_from_tune(config).science_key == cfg.science_key
    assert configs[0]["lmbda"] is None and configs[1]["lmbda"] == 1e-4  # null where moot
    names = TrialNames(grid=grid)

    class Trial:  # what Tune hands a name creator
        def __init__(self, config):
            self.config, self.trial_id = config, "x_00000"

    assert [names(Trial(c)) for c in configs] == [
        "lars-bs512-lr1-s0", "tvlars-bs512-lr2-lmbda0.0001-s0", "tvlars-bs1024-lr2-lmbda0.001-s1"]
