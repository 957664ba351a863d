"""The parquet experiment store: every epoch of every trial, and one row per trial.

Layout under the store root (a local folder or a ``pyarrow.fs`` URI such as ``s3://b/p``)::

    <root>/<experiment>/epochs/<trial_id>/<stage>-<epoch>.parquet   one row each
    <root>/<experiment>/trials/<trial_id>.parquet                   one row each, replaced
    <root>/<experiment>/tune/, train/                               Ray's own state

Each file is written under a hidden temporary name, then renamed into place, so readers
never see half a file, and a re-run epoch (after a worker restart or a resume) replaces its
file instead of adding a second row: the store holds each (trial, stage, epoch) once by
construction. Every file carries the full :data:`SCHEMA`, so ``pandas.read_parquet`` on the
``epochs`` folder works directly.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import socket
import uuid
from collections.abc import Iterable
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from .config import TrialConfig, field_type, irrelevant_fields
from .errors import UserError

STATUSES = ("running", "completed", "diverged", "stopped", "failed")
# Trials that ended: those the report tables count.
ENDED = ("completed", "diverged", "stopped")
STAGES = ("train", "pretrain", "linear")
GRID_FILE = "grid.json"

_PA_TYPES = {int: pa.int64(), float: pa.float64(), bool: pa.bool_(), str: pa.string()}
_TS = pa.timestamp("us", tz="UTC")

# (column, arrow type, unit, meaning): the documented schema, in file order.
IDENTITY_COLUMNS = [
    ("experiment", pa.string(), "", "experiment name (a folder under the store root)"),
    ("trial_id", pa.string(), "", "Tune trial id (or the id given to a single `trial` run)"),
]
CONFIG_COLUMNS = [
    (f.name, _PA_TYPES[field_type(f.name)[0]], "", "trial setting (null where it does not apply)")
    for f in dataclasses.fields(TrialConfig)
]
EPOCH_COLUMNS = [
    ("stage", pa.string(), "", "train (classification), pretrain or linear (Barlow Twins)"),
    ("epoch", pa.int64(), "epochs", "0-based epoch within the stage"),
    ("step", pa.int64(), "steps", "optimizer steps taken by the end of this epoch"),
    ("train_loss", pa.float64(), "nats", "mean training loss over every sample of the epoch"),
    ("train_acc", pa.float64(), "fraction", "top-1 accuracy on the augmented training samples"),
    ("test_loss", pa.float64(), "nats", "mean loss over the whole test set"),
    ("test_acc", pa.float64(), "fraction", "top-1 accuracy over the whole test set"),
    ("test_acc5", pa.float64(), "fraction", "top-5 accuracy (datasets with more than 10 classes)"),
    ("train_samples", pa.int64(), "images", "training samples stepped over, all ranks"),
    ("test_samples", pa.int64(), "images", "test images evaluated, all ranks (the whole set)"),
    ("cl_loss", pa.float64(), "", "Barlow Twins loss (pretrain stage)"),
    ("lr_now", pa.float64(), "", "learning rate of the last step of the epoch"),
    ("epoch_time_s", pa.float64(), "s", "wall time of the epoch, evaluation included"),
    ("samples_per_s", pa.float64(), "images/s", "training images per second, all workers"),
    ("trust_ratio_mean", pa.float64(), "", "mean per-layer trust ratio of the epoch's last step"),
    ("trust_ratio_min", pa.float64(), "", "smallest per-layer trust ratio of that step"),
    ("trust_ratio_max", pa.float64(), "", "largest per-layer trust ratio of that step"),
    ("phi", pa.float64(), "", "TVLARS phi(t) at the epoch's last step"),
    ("diverged", pa.bool_(), "", "the training loss went non-finite in this epoch"),
    ("world_size", pa.int64(), "workers", "DDP workers that ran the epoch"),
    ("backend", pa.string(), "", "torch.distributed backend (nccl on GPUs, gloo on CPUs)"),
    ("precision", pa.string(), "", "what the forward pass ran in: bf16 (autocast) or fp32"),
    ("node_ip", pa.string(), "", "address of the node that ran rank 0"),
    ("node_id", pa.string(), "", "Ray node id of the node that ran rank 0"),
    ("recorded_at", _TS, "UTC", "when the row was written"),
    ("worker_started_at", _TS, "UTC", "when rank 0's process of this attempt started"),
    ("worker_ready_at", _TS, "UTC", "when Ray Train handed that process the trial (imports, "
     "Train context and process group done)"),
    ("data_ready_at", _TS, "UTC", "when that process had its data (loaded, on its device)"),
    ("loop_started_at", _TS, "UTC", "when data, model and optimizer were ready and the "
     "attempt's first epoch began"),
    ("first_step_s", pa.float64(), "s", "time to the end of the epoch's first optimizer step "
     "(data, forward, backward, step: warm-up costs show here)"),
]
TRIAL_COLUMNS = [
    ("config", pa.string(), "JSON", "every setting of the trial, exactly as it ran"),
    ("status", pa.string(), "", "running, completed, diverged, stopped or failed"),
    ("epochs_done", pa.int64(), "epochs", "epoch rows stored for the trial (all stages)"),
    ("best_test_acc", pa.float64(), "fraction", "highest test_acc of any epoch"),
    ("best_epoch", pa.int64(), "epochs", "epoch of best_test_acc"),
    ("final_test_acc", pa.float64(), "fraction", "test_acc of the last epoch"),
    ("wall_time_s", pa.float64(), "s", "time from the trial's first start to its last update"),
    ("node_ip", pa.string(), "", "address of the node that ran the trial's driver"),
    ("node_id", pa.string(), "", "Ray node id of the node that ran the trial's driver"),
    ("error", pa.string(), "", "why the trial failed, if it did"),
    ("started_at", _TS, "UTC", "first start of the trial"),
    ("updated_at", _TS, "UTC", "last change of this row"),
]


def _schema(columns: Iterable[tuple]) -> pa.Schema:
    return pa.schema([pa.field(name, typ) for name, typ, *_ in columns])


EPOCH_SCHEMA = _schema(IDENTITY_COLUMNS + CONFIG_COLUMNS + EPOCH_COLUMNS)
TRIAL_SCHEMA = _schema(IDENTITY_COLUMNS + CONFIG_COLUMNS + TRIAL_COLUMNS)
SCHEMA = {"epochs": EPOCH_SCHEMA, "trials": TRIAL_SCHEMA}


class StoreError(UserError, RuntimeError):
    """The store cannot be used as asked."""


def node_ip() -> str:
    try:
        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - the address is informative only
        pass
    return socket.gethostname()


def node_id() -> str | None:
    """This process's Ray node (two nodes on one machine share an address, not an id)."""
    try:
        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - informative only
        pass
    return None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def config_columns(cfg: TrialConfig) -> dict[str, Any]:
    """The trial's settings as columns, null where they do not apply (lmbda for LARS, ...)."""
    skip = irrelevant_fields(cfg)
    return {k: (None if k in skip else v) for k, v in cfg.to_dict().items()}


class Store:
    """One store root; ``experiment`` names a folder in it."""

    def __init__(self, root: str) -> None:
        self.uri = str(root)
        if "://" in self.uri:
            self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(self.uri)
        self.root = self.root.rstrip("/")

    # -- paths ----------------------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def uri_of(self, *parts: str) -> str:
        """A path Ray and pyarrow both accept: the absolute path, or the URI for remote stores."""
        if self.is_local:
            return self.path(*parts)
        scheme = self.uri.split("://", 1)[0]
        return f"{scheme}://{self.path(*parts)}"

    def experiments(self) -> list[str]:
        info = self.fs.get_file_info(self.root)
        if info.type != pafs.FileType.Directory:
            return []
        found = self.fs.get_file_info(pafs.FileSelector(self.root))
        return sorted(i.base_name for i in found if i.type == pafs.FileType.Directory
                      and not i.base_name.startswith((".", "_")))

    def exists(self, experiment: str) -> bool:
        return self.fs.get_file_info(self.path(experiment)).type == pafs.FileType.Directory

    def delete(self, experiment: str) -> None:
        if self.exists(experiment):
            self.fs.delete_dir(self.path(experiment))

    # -- writing --------------------------------------------------------------------------
    def _write(self, table: pa.Table, *parts: str) -> None:
        final = self.path(*parts)
        folder, name = final.rsplit("/", 1)
        self.fs.create_dir(folder, recursive=True)
        tmp = f"{folder}/.tmp-{uuid.uuid4().hex}-{name}"
        pq.write_table(table, tmp, filesystem=self.fs)
        self.fs.move(tmp, final)

    def write_epoch(self, experiment: str, trial_id: str, cfg: TrialConfig,
                    metrics: dict[str, Any]) -> None:
        """Store one epoch of a trial; writing the same (stage, epoch) again replaces it."""
        row = {"experiment": experiment, "trial_id": trial_id, **config_columns(cfg),
               "recorded_at": _now(), **metrics}
        unknown = set(row) - set(EPOCH_SCHEMA.names)
        if unknown:
            raise StoreError(f"epoch row has columns outside the schema: {sorted(unknown)}")
        stage = row.get("stage") or "train"
        row["stage"] = stage
        table = pa.Table.from_pylist([row], schema=EPOCH_SCHEMA)
        name = f"{stage}-{int(row['epoch']):05d}.parquet"
        self._write(table, experiment, "epochs", trial_id, name)

    def write_trial(self, experiment: str, trial_id: str, cfg: TrialConfig, status: str,
                    error: str | None = None, here: bool = False) -> dict[str, Any]:
        """Replace the trial's row: its status, and a summary of its stored epochs.

        ``here``: this process runs the trial, so its node is the trial's node; otherwise
        the node recorded before is kept."""
        if status not in STATUSES:
            raise StoreError(f"unknown trial status '{status}': one of {', '.join(STATUSES)}")
        previous = self._read_one_trial(experiment, trial_id)
        now = _now()
        started = previous.get("started_at") or now
        row = {"experiment": experiment, "trial_id": trial_id, **config_columns(cfg),
               "config": json.dumps(cfg.to_dict(), sort_keys=True), "status": status,
               **self.summary(experiment, trial_id),
               "wall_time_s": (now - started).total_seconds(),
               "node_ip": (None if here else previous.get("node_ip")) or node_ip(),
               "node_id": (None if here else previous.get("node_id")) or node_id(),
               "error": error, "started_at": started, "updated_at": now}
        self._write(pa.Table.from_pylist([row], schema=TRIAL_SCHEMA),
                    experiment, "trials", f"{trial_id}.parquet")
        return row

    def trial_row(self, experiment: str, trial_id: str) -> dict[str, Any]:
        """The trial's stored row ({} if none)."""
        return self._read_one_trial(experiment, trial_id)

    @staticmethod
    def row_config(row: dict[str, Any]) -> TrialConfig:
        """The TrialConfig a stored trial row was written from, exactly."""
        return TrialConfig.from_dict(json.loads(row["config"]))

    # -- experiment files -------------------------------------------------------------------
    def write_json(self, experiment: str, name: str, value: Any) -> None:
        """A small JSON file in the experiment's folder, replaced atomically."""
        folder = self.path(experiment)
        self.fs.create_dir(folder, recursive=True)
        tmp = f"{folder}/.tmp-{uuid.uuid4().hex}-{name}"
        with self.fs.open_output_stream(tmp) as fh:
            fh.write(json.dumps(value, indent=1, sort_keys=True).encode())
        self.fs.move(tmp, self.path(experiment, name))

    def read_json(self, experiment: str, name: str) -> Any | None:
        """The JSON file's value, or None if the experiment has no such file."""
        path = self.path(experiment, name)
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as fh:
            return json.loads(fh.read().decode())

    def write_grid(self, experiment: str, grid: dict[str, dict[str, Any]]) -> None:
        """The grid as it was started: trial key -> settings (a resume runs exactly this)."""
        self.write_json(experiment, GRID_FILE, grid)

    def read_grid(self, experiment: str) -> dict[str, dict[str, Any]] | None:
        """The grid the experiment was started with, or None if `grid` did not start it."""
        return self.read_json(experiment, GRID_FILE)

    # -- reading --------------------------------------------------------------------------
    def _files(self, folder: str) -> list[str]:
        if self.fs.get_file_info(folder).type != pafs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(folder, recursive=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File
                      and i.base_name.endswith(".parquet") and not i.base_name.startswith("."))

    def _read(self, files: list[str], schema: pa.Schema) -> pd.DataFrame:
        if not files:
            return schema.empty_table().to_pandas()
        return pads.dataset(files, schema=schema, filesystem=self.fs,
                            format="parquet").to_table().to_pandas()

    def _read_one_trial(self, experiment: str, trial_id: str) -> dict[str, Any]:
        path = self.path(experiment, "trials", f"{trial_id}.parquet")
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return {}
        rows = pq.read_table(path, filesystem=self.fs, schema=TRIAL_SCHEMA).to_pylist()
        return rows[0] if rows else {}

    def trial_epochs(self, experiment: str, trial_id: str) -> pd.DataFrame:
        files = self._files(self.path(experiment, "epochs", trial_id))
        return _in_order(self._read(files, EPOCH_SCHEMA))

    def summary(self, experiment: str, trial_id: str) -> dict[str, Any]:
        """epochs_done, best_test_acc, best_epoch and final_test_acc from the stored epochs."""
        epochs = self.trial_epochs(experiment, trial_id)
        summary: dict[str, Any] = {"epochs_done": len(epochs), "best_test_acc": None,
                                   "best_epoch": None, "final_test_acc": None}
        scored = epochs.dropna(subset=["test_acc"])
        if len(scored):
            best = scored.loc[scored["test_acc"].idxmax()]
            summary.update(best_test_acc=float(best["test_acc"]), best_epoch=int(best["epoch"]),
                           final_test_acc=float(scored["test_acc"].iloc[-1]))
        return summary

    def read_epochs(self, experiment: str | None = None) -> pd.DataFrame:
        names = [experiment] if experiment else self.experiments()
        files = [f for name in names for f in self._files(self.path(name, "epochs"))]
        return _in_order(self._read(files, EPOCH_SCHEMA))

    def read_trials(self, experiment: str | None = None) -> pd.DataFrame:
        names = [experiment] if experiment else self.experiments()
        files = [f for name in names for f in self._files(self.path(name, "trials"))]
        return (self._read(files, TRIAL_SCHEMA).sort_values(["experiment", "trial_id"])
                .reset_index(drop=True))


def _in_order(epochs: pd.DataFrame) -> pd.DataFrame:
    """Epoch rows by experiment, trial, stage (pre-training first) and epoch."""
    stage = epochs["stage"].map({s: i for i, s in enumerate(STAGES)})
    return (epochs.assign(_stage=stage).sort_values(["experiment", "trial_id", "_stage", "epoch"])
            .drop(columns="_stage").reset_index(drop=True))


def read_epochs(store: str, experiment: str | None = None) -> pd.DataFrame:
    """One row per (trial, stage, epoch), for one experiment or all of them."""
    return Store(store).read_epochs(experiment)


def read_trials(store: str, experiment: str | None = None) -> pd.DataFrame:
    """Exactly one row per trial: its latest status and summary."""
    return Store(store).read_trials(experiment)
