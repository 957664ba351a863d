import re
from pathlib import Path

import pandas as pd
import pytest

from tvlars_ray.config import TrialConfig
from tvlars_ray.store import (
    EPOCH_SCHEMA,
    TRAIN_STATE_FILE,
    TRIAL_SCHEMA,
    Store,
    StoreError,
    read_epochs,
    read_trials,
)

ROOT = Path(__file__).resolve().parent.parent


def _metrics(epoch, acc, **extra):
    return {"epoch": epoch, "step": 10 * (epoch + 1), "train_loss": 1.0 / (epoch + 1),
            "train_acc": acc / 2, "test_loss": 2.0, "test_acc": acc, "lr_now": 0.1,
            "epoch_time_s": 1.5, "samples_per_s": 100.0, "diverged": False, **extra}


def test_epochs_and_trials_read_back(tmp_path):
    st = Store(str(tmp_path))
    lars = TrialConfig(opt="lars", ds="synthetic", lmbda=0.5)
    tv = TrialConfig(opt="tvlars", ds="synthetic", lmbda=1e-4)
    for epoch, acc in enumerate([0.2, 0.5, 0.4]):
        st.write_epoch("exp", "a", lars, _metrics(epoch, acc))
    st.write_epoch("exp", "b", tv, _metrics(0, 0.3, trust_ratio_mean=0.01, phi=0.9))
    st.write_trial("exp", "a", lars, "running")
    row = st.write_trial("exp", "a", lars, "completed")
    st.write_trial("exp", "b", tv, "diverged")
    assert row["epochs_done"] == 3 and row["best_test_acc"] == 0.5 and row["best_epoch"] == 1
    assert row["final_test_acc"] == 0.4

    epochs = read_epochs(str(tmp_path), "exp")
    assert list(epochs.columns) == EPOCH_SCHEMA.names
    assert len(epochs) == 4 and not epochs.duplicated(["trial_id", "stage", "epoch"]).any()
    assert list(epochs[epochs.trial_id == "a"]["epoch"]) == [0, 1, 2]
    # settings that cannot matter are null: lmbda for LARS
    assert epochs[epochs.trial_id == "a"]["lmbda"].isna().all()
    assert (epochs[epochs.trial_id == "b"]["lmbda"] == 1e-4).all()
    trials = read_trials(str(tmp_path))
    assert list(trials.columns) == TRIAL_SCHEMA.names
    assert list(trials["trial_id"]) == ["a", "b"] and list(trials["status"]) == [
        "completed", "diverged"]
    # pandas straight on the folder sees the same rows
    direct = pd.read_parquet(tmp_path / "exp" / "epochs")
    assert len(direct) == 4 and set(direct.columns) == set(EPOCH_SCHEMA.names)


def test_rewriting_an_epoch_replaces_it_and_writes_are_atomic(tmp_path):
    st = Store(str(tmp_path))
    cfg = TrialConfig(ds="synthetic")
    st.write_epoch("e", "t", cfg, _metrics(0, 0.1))
    st.write_epoch("e", "t", cfg, _metrics(0, 0.7))  # a re-run epoch after a restart
    epochs = st.read_epochs("e")
    assert len(epochs) == 1 and epochs["test_acc"].iloc[0] == 0.7
    folder = tmp_path / "e" / "epochs" / "t"
    assert [p.name for p in folder.iterdir()] == ["train-00000.parquet"]
    # a writer killed mid-write leaves only a hidden temporary: readers never see it
    (folder / ".tmp-dead-train-00001.parquet").write_bytes(b"PAR1 half a file")
    assert len(st.read_epochs("e")) == 1
    assert len(pd.read_parquet(tmp_path / "e" / "epochs")) == 1


def test_a_row_gives_back_its_config(tmp_path):
    st = Store(str(tmp_path))
    cfg = TrialConfig(ds="synthetic", opt="tvlars", lr=0.3, norm_clip=None)
    st.write_trial("e", "x", cfg, "running")
    row = st.trial_row("e", "x")
    assert row["status"] == "running" and st.trial_row("e", "y") == {}
    assert st.row_config(row) == cfg


def test_schema_guards(tmp_path):
    st = Store(str(tmp_path))
    with pytest.raises(StoreError, match="outside the schema"):
        st.write_epoch("e", "t", TrialConfig(ds="synthetic"), {"epoch": 0, "accuracy": 1})
    with pytest.raises(StoreError, match="unknown trial status"):
        st.write_trial("e", "t", TrialConfig(ds="synthetic"), "exploded")
    assert st.read_epochs("missing").empty and st.read_trials().empty


def test_every_column_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_0-9]+)` \|", readme, flags=re.M))
    missing = (set(EPOCH_SCHEMA.names) | set(TRIAL_SCHEMA.names)) - documented
    assert set(TrialConfig.__dataclass_fields__) <= documented  # the settings table
    assert not missing, f"columns missing from README's schema section: {sorted(missing)}"


def test_a_filesystem_uri_works_like_a_path(tmp_path):
    uri = f"file://{tmp_path}/viauri"
    st = Store(uri)
    cfg = TrialConfig(ds="synthetic")
    st.write_epoch("e", "t", cfg, _metrics(0, 0.4))
    st.write_trial("e", "t", cfg, "completed")
    assert read_epochs(uri, "e")["test_acc"].tolist() == [0.4]
    assert read_trials(str(tmp_path / "viauri"))["status"].tolist() == ["completed"]
    assert st.experiments() == ["e"] and st.uri_of("e") == f"{tmp_path}/viauri/e"


def test_trial_rows_keep_provenance_and_where_the_epochs_ran(tmp_path):
    st = Store(str(tmp_path))
    cfg = TrialConfig(ds="synthetic")
    st.write_epoch("e", "t", cfg, _metrics(0, 0.1, hosts="a", gpus="2 x NVIDIA H200",
                                           cuda_version="13.0", cudnn_version="91000"))
    st.write_epoch("e", "t", cfg, _metrics(1, 0.2, hosts="b,c", gpus="1 x NVIDIA L4",
                                           cuda_version="13.0", cudnn_version="91000"))
    prov = {"git_commit": "abc", "git_dirty": True, "git_diff_sha256": "f" * 64,
            "versions": '{"torch": "2.14.1"}', "command": "python -m tvlars_ray.run grid",
            "command_host": "laptop"}
    row = st.write_trial("e", "t", cfg, "running", here=True, provenance=prov)
    assert row["hosts"] == "a,b,c" and row["gpus"] == "1 x NVIDIA L4"  # every host, last GPUs
    assert row["driver_host"] and row["cuda_version"] == "13.0"
    # a later write that does not know the command (Tune settling the row) keeps it
    st.write_trial("e", "t", cfg, "completed")
    stored = st.trial_row("e", "t")
    assert {k: stored[k] for k in prov} == prov and stored["status"] == "completed"
    assert st.provenance("e") == []
    st.add_provenance("e", {"command": "first"})
    st.add_provenance("e", {"command": "resumed"})
    assert [r["command"] for r in st.provenance("e")] == ["first", "resumed"]


def test_a_cut_short_train_state_is_set_aside_and_a_whole_one_kept(tmp_path):
    """Ray Train's checkpoint record cut short (a full disk) would stop every resume."""
    st = Store(str(tmp_path))
    run = tmp_path / "e" / "train" / "t1"
    run.mkdir(parents=True)
    (run / TRAIN_STATE_FILE).write_text('{"checkpoints": [')
    moved = st.set_aside_damaged_train_state("e", "t1")
    assert moved and "damaged" in moved and not (run / TRAIN_STATE_FILE).exists()
    (run / TRAIN_STATE_FILE).write_text('{"checkpoints": []}')
    assert st.set_aside_damaged_train_state("e", "t1") is None
    assert (run / TRAIN_STATE_FILE).exists()
    assert st.set_aside_damaged_train_state("e", "absent") is None
