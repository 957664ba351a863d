"""TensorBoard, MLflow and W&B through Ray's logger callbacks, read back for real (offline)."""

import glob
import json
import os
import struct
import sys
from pathlib import Path

import pytest

from tvlars_ray.config import TrialConfig
from tvlars_ray.run import main
from tvlars_ray.store import Store
from tvlars_ray.sweep import tune_settings
from tvlars_ray.trackers import TrackerError, TrialTrackers, check

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
pytest.importorskip("wandb", reason="the wandb extra is not installed")
event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="tensorboard (the test extra) is not installed")
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402
from wandb.proto import wandb_internal_pb2  # noqa: E402

# one worker per trial (DDP is not the point here): the grid's two trials run at once on 2 CPUs
TINY = {"ds": "synthetic", "model": "cnn", "stem": "cifar", "train_subset": 128,
        "test_subset": 64, "epochs": 2, "bs": 32, "num_workers": 1, "cpus_per_worker": 1}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """W&B writes runs to disk only; MLflow's default store is a file in the test's store."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)


# -- reading what the trackers wrote --------------------------------------------------------
def tensorboard_run(folder: str) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Scalars (tag -> values by step) and hyperparameters of one TensorBoard run folder."""
    acc = event_accumulator.EventAccumulator(folder)
    acc.Reload()
    scalars = {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    hparams = {}
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]).session_start_info
    for name, value in start.hparams.items():
        hparams[name] = getattr(value, value.WhichOneof("kind"))
    return scalars, hparams


def mlflow_runs(uri: str, experiment: str) -> dict[str, dict]:
    """Run name -> params, metric histories (key -> values by step) and status."""
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = {}
    for run in client.search_runs([exp.experiment_id]):
        history = {key: [m.value for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                 key=lambda m: m.step)]
                   for key in run.data.metrics}
        runs[run.info.run_name] = {"params": run.data.params, "metrics": history,
                                   "status": run.info.status, "tags": run.data.tags}
    return runs


def wandb_records(path: str) -> list:
    """The records of a W&B run file (its LevelDB-style log of protobuf records)."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def wandb_run(folder: str) -> tuple[dict, dict[str, list]]:
    """A W&B offline run's config and its logged history (key -> values)."""
    (path,) = glob.glob(os.path.join(folder, "run-*.wandb"))
    config, history = {}, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                history.setdefault(key, []).append(json.loads(item.value_json))
    return {k: v.get("value", v) if isinstance(v, dict) else v for k, v in config.items()}, history


# -- refusals before anything starts --------------------------------------------------------
def test_a_missing_extra_is_one_line_and_starts_nothing(monkeypatch, tmp_path, capsys, no_ray):
    import ray

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if `pip install .[mlflow]` was not run
    with pytest.raises(TrackerError, match=r"needs the mlflow package: pip install "):
        check(["mlflow"], Store(str(tmp_path)))
    store = tmp_path / "store"
    assert main(["grid", "--logger", "tensorboard", "--logger", "mlflow", "--store",
                 str(store)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --logger mlflow needs the mlflow package") and "\n" not in err
    assert not ray.is_initialized() and not store.exists()
    assert main(["trial", "--local", "--ds", "synthetic", "--logger", "mlflow", "--store",
                 str(store)]) == 2
    assert "tvlars-ray[mlflow]" in capsys.readouterr().err and not store.exists()


def test_wandb_online_without_a_login_is_refused(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no W&B settings
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    with pytest.raises(TrackerError, match="WANDB_MODE=offline"):
        check(["wandb"], Store(str(tmp_path)))


def test_mlflow_needs_a_tracking_uri_beside_a_remote_store():
    remote = Store("mock:///bucket/results")  # pyarrow's in-memory filesystem, as s3:// is
    with pytest.raises(TrackerError, match="MLFLOW_TRACKING_URI"):
        check(["mlflow"], remote)


# -- the `trial` command's trackers, fed from the store ---------------------------------------
def test_trial_trackers_follow_the_stored_epochs(tmp_path):
    """TensorBoard and MLflow (no Ray needed) get every stored epoch and the settings."""
    st = Store(str(tmp_path / "store"))
    cfg = TrialConfig.from_dict({**TINY, "opt": "tvlars", "lr": 2.0, "lmbda": 1e-4})
    with TrialTrackers(["tensorboard", "mlflow"], st, "solo", "t1", tune_settings(cfg),
                       every=0.05) as trackers:
        for epoch, acc in enumerate([0.25, 0.5, 0.75]):
            st.write_epoch("solo", "t1", cfg, {"epoch": epoch, "test_acc": acc,
                                               "train_loss": 1.0 - acc, "diverged": False})
        trackers.poll()
    scalars, hparams = tensorboard_run(str(tmp_path / "store/solo/tensorboard/t1"))
    assert scalars["ray/tune/test_acc"] == [0.25, 0.5, 0.75]
    assert hparams["opt"] == "tvlars" and hparams["lr"] == 2.0 and hparams["lmbda"] == 1e-4
    assert "momentum" in hparams and "alpha" in hparams  # every setting that applies
    runs = mlflow_runs(f"sqlite:///{tmp_path}/store/mlflow.db", "solo")
    assert list(runs) == ["t1"] and runs["t1"]["status"] == "FINISHED"
    assert runs["t1"]["params"]["lmbda"] == "0.0001" and runs["t1"]["params"]["bs"] == "32"
    assert runs["t1"]["metrics"]["test_acc"] == [0.25, 0.5, 0.75]


# -- a trial in this process (Ray Train's local mode) ----------------------------------------
# A grid's trackers (Tune's callbacks) are read back in tests/test_sweep.py, on the grid that
# test runs anyway: one Ray grid fewer in the suite.
def test_a_local_trial_reaches_mlflow_wandb_and_tensorboard(tmp_path):
    store = tmp_path / "store"
    loggers = ["--logger", "tensorboard", "--logger", "mlflow", "--logger", "wandb"]
    assert main(["trial", "--local", *sum(([f"--{k}", str(v)] for k, v in TINY.items()
                                           if k != "num_workers"), []),
                 "--opt", "lars", "--lr", "1", "--epochs", "2", "--store", str(store),
                 "--experiment", "solo", *loggers]) == 0
    (trial_id,) = Store(str(store)).read_trials("solo")["trial_id"]
    solo = mlflow_runs(f"sqlite:///{store}/mlflow.db", "solo")
    assert list(solo) == [trial_id] and solo[trial_id]["params"]["opt"] == "lars"
    assert len(solo[trial_id]["metrics"]["test_acc"]) == 2
    assert solo[trial_id]["params"]["num_workers"] == "0"
    (folder,) = glob.glob(str(store / "solo/wandb/offline-run-*"))
    config, history = wandb_run(folder)
    assert config["opt"] == "lars" and history["test_acc"] == solo[trial_id]["metrics"]["test_acc"]
    scalars, hparams = tensorboard_run(str(store / "solo/tensorboard" / trial_id))
    assert hparams["opt"] == "lars" and len(scalars["ray/tune/test_acc"]) == 2
