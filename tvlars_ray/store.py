"""The parquet experiment store: every epoch of every trial, and one row per trial.

Layout under the store root (a local folder or a ``pyarrow.fs`` URI such as ``s3://b/p``)::

    <root>/<experiment>/epochs/<trial_id>/<stage>-<epoch>.parquet   one row each
    <root>/<experiment>/trials/<trial_id>.parquet                   one row each, replaced
    <root>/<experiment>/layers/<trial_id>/<stage>-<epoch>.parquet   per-layer history
    <root>/<experiment>/grid.json, provenance.json                   the grid, the commands
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
from .provenance import PROVENANCE_FILE

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
# Where the trial's DDP workers ran (epochs: that epoch's attempt; trials: hosts of every
# epoch, the rest from the last one).
PLACE_COLUMNS = [
    ("hosts", pa.string(), "", "host names of the machines the DDP workers ran on, "
     "comma-separated"),
    ("gpus", pa.string(), "", "GPU models of the DDP workers with their counts, e.g. "
     "'2 x NVIDIA H200' (null on CPUs)"),
    ("cuda_version", pa.string(), "", "CUDA version of the workers' torch, where they used GPUs"),
    ("cudnn_version", pa.string(), "", "cuDNN version of the workers' torch, where they used GPUs"),
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
    ("val_loss", pa.float64(), "nats", "mean loss over the validation images held out of the "
     "training set (val_subset)"),
    ("val_acc", pa.float64(), "fraction", "top-1 accuracy over those validation images"),
    ("val_samples", pa.int64(), "images", "validation images evaluated, all ranks"),
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
    *PLACE_COLUMNS,
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
# What the command that last ran the trial ran from (see tvlars_ray.provenance).
PROVENANCE_COLUMNS = [
    ("git_commit", pa.string(), "", "git commit of the code (null outside a git checkout)"),
    ("git_dirty", pa.bool_(), "", "the checkout had uncommitted changes (or untracked files)"),
    ("git_diff_sha256", pa.string(), "", "SHA-256 of those changes: git diff HEAD and the "
     "untracked files"),
    ("versions", pa.string(), "JSON", "versions of python, tvlars-ray, torch, torchvision, ray, "
     "optuna, pyarrow and numpy"),
    ("command", pa.string(), "", "the command line that started (or resumed) the trial"),
    ("command_host", pa.string(), "", "host name of the machine that command ran on"),
]
TRIAL_COLUMNS = [
    ("config", pa.string(), "JSON", "every setting of the trial, exactly as it ran"),
    ("status", pa.string(), "", "running, completed, diverged, stopped or failed"),
    ("epochs_done", pa.int64(), "epochs", "epoch rows stored for the trial (all stages)"),
    ("best_test_acc", pa.float64(), "fraction", "highest test_acc of any epoch"),
    ("best_epoch", pa.int64(), "epochs", "epoch of best_test_acc"),
    ("final_test_acc", pa.float64(), "fraction", "test_acc of the last epoch"),
    ("best_val_acc", pa.float64(), "fraction", "highest val_acc of any epoch (with val_subset)"),
    ("final_val_acc", pa.float64(), "fraction", "val_acc of the last epoch (with val_subset)"),
    ("wall_time_s", pa.float64(), "s", "time from the trial's first start to its last update"),
    ("node_ip", pa.string(), "", "address of the node that ran the trial's driver"),
    ("node_id", pa.string(), "", "Ray node id of the node that ran the trial's driver"),
    ("driver_host", pa.string(), "", "host name of the node that ran the trial's driver"),
    *PLACE_COLUMNS,
    ("error", pa.string(), "", "why the trial failed, if it did"),
    ("started_at", _TS, "UTC", "first start of the trial"),
    ("updated_at", _TS, "UTC", "last change of this row"),
    *PROVENANCE_COLUMNS,
]


LAYER_COLUMNS = [
    ("experiment", pa.string(), "", "experiment name"),
    ("trial_id", pa.string(), "", "the trial the row belongs to"),
    ("stage", pa.string(), "", "train, pretrain or linear"),
    ("epoch", pa.int64(), "epochs", "0-based epoch within the stage"),
    ("step", pa.int64(), "steps", "the optimizer step (1-based within the stage) after which "
     "the values were read"),
    ("layer", pa.string(), "", "the parameter's name in the model (model.named_parameters())"),
    ("layer_index", pa.int64(), "", "its position among the adapted parameters, input first"),
    ("numel", pa.int64(), "elements", "the parameter's size"),
    ("trust_ratio", pa.float64(), "", "the layer's trust ratio in that step (TVLARS: phi "
     "included)"),
    ("weight_norm", pa.float64(), "", "L2 norm of the weights before that step, unclipped"),
    ("update_norm", pa.float64(), "", "L2 norm of the direction the ratio scales, unclipped: "
     "g + wd * w (LARS, TVLARS), Adam's direction + wd * w (LAMB)"),
    ("lr_now", pa.float64(), "", "the learning rate of that step"),
]


def _schema(columns: Iterable[tuple]) -> pa.Schema:
    return pa.schema([pa.field(name, typ) for name, typ, *_ in columns])


EPOCH_SCHEMA = _schema(IDENTITY_COLUMNS + CONFIG_COLUMNS + EPOCH_COLUMNS)
TRIAL_SCHEMA = _schema(IDENTITY_COLUMNS + CONFIG_COLUMNS + TRIAL_COLUMNS)
LAYER_SCHEMA = _schema(LAYER_COLUMNS)
SCHEMA = {"epochs": EPOCH_SCHEMA, "trials": TRIAL_SCHEMA, "layers": LAYER_SCHEMA}


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

    def write_layers(self, experiment: str, trial_id: str, stage: str, epoch: int,
                     columns: dict[str, list]) -> None:
        """Store one epoch's per-layer history of a trial (one row per step and layer); a
        re-run epoch replaces its file, so each (trial, stage, step, layer) is stored once."""
        n = len(columns["step"])
        table = pa.Table.from_pydict({"experiment": [experiment] * n, "trial_id": [trial_id] * n,
                                      "stage": [stage] * n, "epoch": [int(epoch)] * n,
                                      **columns}, schema=LAYER_SCHEMA)
        self._write(table, experiment, "layers", trial_id, f"{stage}-{int(epoch):05d}.parquet")

    def write_trial(self, experiment: str, trial_id: str, cfg: TrialConfig, status: str,
                    error: str | None = None, here: bool = False,
                    provenance: dict[str, Any] | None = None) -> dict[str, Any]:
        """Replace the trial's row: its status, and a summary of its stored epochs.

        ``here``: this process runs the trial, so its node is the trial's node; otherwise
        the node recorded before is kept. ``provenance``: the PROVENANCE_COLUMNS of the
        command running the trial (see :func:`tvlars_ray.provenance.trial_columns`);
        otherwise those recorded before are kept."""
        if status not in STATUSES:
            raise StoreError(f"unknown trial status '{status}': one of {', '.join(STATUSES)}")
        previous = self._read_one_trial(experiment, trial_id)
        now = _now()
        started = previous.get("started_at") or now
        kept = provenance or {name: previous.get(name) for name, *_ in PROVENANCE_COLUMNS}
        row = {"experiment": experiment, "trial_id": trial_id, **config_columns(cfg),
               "config": json.dumps(cfg.to_dict(), sort_keys=True), "status": status,
               **self.summary(experiment, trial_id),
               "wall_time_s": (now - started).total_seconds(),
               "node_ip": (None if here else previous.get("node_ip")) or node_ip(),
               "node_id": (None if here else previous.get("node_id")) or node_id(),
               "driver_host": (None if here else previous.get("driver_host"))
               or socket.gethostname(),
               "error": error, "started_at": started, "updated_at": now, **kept}
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

    def add_provenance(self, experiment: str, record: dict[str, Any]) -> None:
        """Append one command's provenance to the experiment's ``provenance.json`` (its
        ``runs``: the command that started the experiment, then each that resumed it)."""
        runs = (self.read_json(experiment, PROVENANCE_FILE) or {}).get("runs", [])
        self.write_json(experiment, PROVENANCE_FILE, {"runs": [*runs, record]})

    def provenance(self, experiment: str) -> list[dict[str, Any]]:
        """The experiment's recorded commands, first to last ([] if none were recorded)."""
        return (self.read_json(experiment, PROVENANCE_FILE) or {}).get("runs", [])

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

    def epoch_files(self, experiment: str, trial_id: str) -> list[str]:
        """The trial's epoch files by name: a reader following a running trial reads the
        new ones only (with :meth:`read_epoch_files`)."""
        return self._files(self.path(experiment, "epochs", trial_id))

    def read_epoch_files(self, files: list[str]) -> pd.DataFrame:
        return _in_order(self._read(files, EPOCH_SCHEMA))

    def trial_epochs(self, experiment: str, trial_id: str) -> pd.DataFrame:
        return self.read_epoch_files(self.epoch_files(experiment, trial_id))

    def summary(self, experiment: str, trial_id: str) -> dict[str, Any]:
        """epochs_done, best_test_acc, best_epoch, final_test_acc, best_val_acc and
        final_val_acc from the stored epochs, and where they ran: the hosts of every epoch,
        the GPUs, CUDA and cuDNN of the last."""
        epochs = self.trial_epochs(experiment, trial_id)
        summary: dict[str, Any] = {"epochs_done": len(epochs), "best_test_acc": None,
                                   "best_epoch": None, "final_test_acc": None,
                                   "best_val_acc": None, "final_val_acc": None,
                                   **{name: None for name, *_ in PLACE_COLUMNS}}
        if len(epochs):
            last = epochs.iloc[-1]
            hosts = {h for cell in epochs["hosts"].dropna() for h in cell.split(",")}
            summary.update({name: None if pd.isna(last[name]) else last[name]
                            for name in ("gpus", "cuda_version", "cudnn_version")},
                           hosts=",".join(sorted(hosts)) or None)
        scored = epochs.dropna(subset=["test_acc"])
        if len(scored):
            best = scored.loc[scored["test_acc"].idxmax()]
            summary.update(best_test_acc=float(best["test_acc"]), best_epoch=int(best["epoch"]),
                           final_test_acc=float(scored["test_acc"].iloc[-1]))
        validated = epochs.dropna(subset=["val_acc"])
        if len(validated):
            summary.update(best_val_acc=float(validated["val_acc"].max()),
                           final_val_acc=float(validated["val_acc"].iloc[-1]))
        return summary

    def read_epochs(self, experiment: str | None = None) -> pd.DataFrame:
        names = [experiment] if experiment else self.experiments()
        files = [f for name in names for f in self._files(self.path(name, "epochs"))]
        return _in_order(self._read(files, EPOCH_SCHEMA))

    def read_layers(self, experiment: str | None = None) -> pd.DataFrame:
        """One row per (trial, stage, step, layer), in that order."""
        names = [experiment] if experiment else self.experiments()
        files = [f for name in names for f in self._files(self.path(name, "layers"))]
        return (self._read(files, LAYER_SCHEMA)
                .sort_values(["experiment", "trial_id", "stage", "step", "layer_index"])
                .reset_index(drop=True))

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


def read_layers(store: str, experiment: str | None = None) -> pd.DataFrame:
    """The per-layer history: one row per (trial, stage, step, layer)."""
    return Store(store).read_layers(experiment)
