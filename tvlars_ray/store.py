"""The parquet experiment store: every epoch of every trial, and one row per trial.

Layout under the store root (a local folder or a ``pyarrow.fs`` URI such as ``s3://b/p``)::

    <root>/<experiment>/epochs/<trial_id>/<stage>-<epoch>.parquet   one row each
    <root>/<experiment>/trials/<trial_id>.parquet                   one row each, replaced
    <root>/<experiment>/layers/<trial_id>/<stage>-<epoch>.parquet   per-layer history
    <root>/<experiment>/grid.json, provenance.json                   the grid, the commands
    <root>/<experiment>/tune/, train/                               Ray's own state
    <root>/<experiment>/.tvlars-experiment                          written when created
    <root>/<experiment>/lock.json                                   who runs it now

Each file is written under a hidden temporary name, then renamed into place, so readers
never see half a file (a write that fails, a full disk, removes its temporary), and a re-run
epoch (after a worker restart or a resume) replaces its file instead of adding a second row:
the store holds each (trial, stage, epoch) once by construction. Every file carries the full
:data:`SCHEMA`, so ``pandas.read_parquet`` on the ``epochs`` folder works directly.

Safety: an experiment name is one plain folder name (:func:`check_name`), checked by every
path the store builds, so nothing is written outside the root; only a folder holding the
marker this tool writes when it creates an experiment may be deleted; a file that is not
readable parquet is skipped with a :class:`DamagedFileWarning` naming it (``check --repair``
moves it aside); :class:`Lock` says who runs an experiment, so two runs never share one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import fcntl
import json
import os
import re
import socket
import threading
import uuid
import warnings
from collections.abc import Iterable
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from .config import FIELD_NAMES, TrialConfig, field_type, irrelevant_fields
from .errors import UserError
from .provenance import PROVENANCE_FILE

STATUSES = ("running", "completed", "diverged", "stopped", "failed")
# Trials that ended: those the report tables count.
ENDED = ("completed", "diverged", "stopped")
STAGES = ("train", "pretrain", "linear")
GRID_FILE = "grid.json"
LOST_FILE = "lost.json"  # epochs `check --repair` moved aside, per trial, for --resume
MARKER = ".tvlars-experiment"  # written when this tool creates an experiment folder
LOCK_FILE = "lock.json"
DAMAGED_DIR = "damaged"  # where `check --repair` moves unreadable files
TRAIN_STATE_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's, in each run's folder
NAME_RULE = ("one folder name of 1-100 letters, digits, '.', '_' or '-', starting with a "
             "letter or digit")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

# What reading a file that is not (whole) parquet raises.
_UNREADABLE = (pa.ArrowException, OSError, ValueError)
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


class StoreWriteError(OSError):
    """A file could not be written (a full disk, a read-only store); nothing half-written
    is left behind."""


class DamagedFileWarning(UserWarning):
    """A store file that is not readable parquet was skipped."""


def check_name(name: str) -> str:
    """An experiment name is one plain folder name, so no name reaches outside the store."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise StoreError(f"experiment name {name!r} is not allowed: use {NAME_RULE}")
    return name


def _check_part(part: str) -> str:
    """Any other component of a store path (a trial id, a file name): one plain name."""
    if not part or part in (".", "..") or "/" in part or "\\" in part or "\0" in part:
        raise StoreError(f"{part!r} is not a plain file or folder name")
    return part


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


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
        self.damaged: dict[str, str] = {}  # file -> why it could not be read (once each)

    # -- paths ----------------------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        """A path under the root; the first part is an experiment name (checked), the rest
        plain names, so no path leaves the root."""
        if parts:
            parts = (check_name(parts[0]), *(_check_part(p) for p in parts[1:]))
        return "/".join([self.root, *parts])

    def uri_of(self, *parts: str) -> str:
        """A path Ray and pyarrow both accept: the absolute path, or the URI for remote stores."""
        if self.is_local:
            return self.path(*parts)
        scheme = self.uri.split("://", 1)[0]
        return f"{scheme}://{self.path(*parts)}"

    def _kind(self, path: str) -> pafs.FileType:
        return self.fs.get_file_info(path).type

    def root_exists(self) -> bool:
        return self._kind(self.root) == pafs.FileType.Directory

    def experiments(self) -> list[str]:
        """The experiments in the store (folders holding the marker or trial data: a report
        folder or anything else beside them is not one)."""
        if not self.root_exists():
            return []
        found = self.fs.get_file_info(pafs.FileSelector(self.root))
        return sorted(i.base_name for i in found if i.type == pafs.FileType.Directory
                      and _NAME.fullmatch(i.base_name) and self.is_experiment(i.base_name))

    def exists(self, experiment: str) -> bool:
        """Anything at the experiment's path (an experiment or not): a writer keeps off it."""
        return self._kind(self.path(experiment)) != pafs.FileType.NotFound

    def is_experiment(self, experiment: str) -> bool:
        if self._kind(self.path(experiment)) != pafs.FileType.Directory:
            return False
        return any(self._kind(self.path(experiment, name)) != pafs.FileType.NotFound
                   for name in (MARKER, "trials", "epochs", GRID_FILE))

    def created_here(self, experiment: str) -> bool:
        """The folder holds the marker this tool writes when it creates an experiment."""
        return self._kind(self.path(experiment, MARKER)) == pafs.FileType.File

    def require(self, experiment: str | None = None) -> None:
        """For readers: the store (and the experiment) must exist; nothing is created."""
        if not self.root_exists():
            raise StoreError(f"no store at {self.uri}: check --store (a folder or URI that a "
                             f"grid, optuna or trial run wrote to)")
        if experiment is not None and not self.is_experiment(experiment):
            raise StoreError(f"no experiment '{experiment}' in {self.uri}: found "
                             f"{', '.join(self.experiments()) or 'none'}")

    def create(self, experiment: str) -> None:
        """Make the experiment's folder, marked as this tool's (so --overwrite may delete it)."""
        if self.exists(experiment):
            return
        try:
            self.fs.create_dir(self.path(experiment), recursive=True)
        except OSError as exc:
            raise _write_error(exc, self.path(experiment)) from exc
        stamp = {"tool": "tvlars-ray", "experiment": experiment, "host": socket.gethostname(),
                 "created_at": _now().isoformat()}
        self._put_bytes(self.path(experiment, MARKER), json.dumps(stamp).encode())

    def delete(self, experiment: str) -> None:
        """Empty an experiment this tool created (its marker and lock stay): never a folder
        without the marker, never the root or a path outside it."""
        if not self.exists(experiment):
            return
        self.check_deletable(experiment)
        folder = self.path(experiment)
        for info in self.fs.get_file_info(pafs.FileSelector(folder)):
            if info.base_name in (MARKER, LOCK_FILE):
                continue
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(info.path)
            else:
                self.fs.delete_file(info.path)

    def check_deletable(self, experiment: str) -> None:
        """Refuse to delete a folder this tool did not create (or a link to one)."""
        folder = self.path(experiment)
        if self.is_local and os.path.islink(folder):
            raise StoreError(f"{folder} is a link, not an experiment folder: --overwrite "
                             f"will not follow it; remove the link by hand")
        if not self.created_here(experiment):
            raise StoreError(
                f"{folder} was not created by this tool (no {MARKER} marker: an older "
                f"version's experiment, or a folder of your own), so --overwrite will not "
                f"delete it: check what it holds and delete it by hand (rm -r {folder}), or "
                f"pick another --experiment")

    def check_writable(self) -> None:
        """A writer's first step: the root takes a file. A root made for the probe is removed
        again: a command refused later (bad data, say) leaves nothing behind."""
        probe = f"{self.root}/.tmp-probe-{uuid.uuid4().hex}"
        made = not self.root_exists()
        try:
            self.fs.create_dir(self.root, recursive=True)
            self._put_bytes(probe, b"probe")
            self.fs.delete_file(probe)
            if made and self.is_local:
                self.fs.delete_dir(self.root)
        except (OSError, StoreWriteError) as exc:
            raise StoreError(f"cannot write to the store {self.uri}: {_one_line(exc)}: pick a "
                             f"--store you can write to (and with free space)") from None

    # -- writing --------------------------------------------------------------------------
    def _atomic(self, final: str, write) -> None:
        """``write(tmp)`` then rename onto ``final``; on any failure the temporary goes."""
        folder, name = final.rsplit("/", 1)
        tmp = f"{folder}/.tmp-{uuid.uuid4().hex}-{name}"
        try:
            self.fs.create_dir(folder, recursive=True)
            write(tmp)
            self.fs.move(tmp, final)
        except BaseException as exc:
            try:
                self.fs.delete_file(tmp)
            except OSError:
                pass  # never created, or the store is gone: nothing half-written is left
            if isinstance(exc, OSError) and not isinstance(exc, StoreWriteError):
                raise _write_error(exc, final) from exc
            raise

    def _put_bytes(self, path: str, data: bytes) -> None:
        def write(tmp: str) -> None:
            with self.fs.open_output_stream(tmp) as fh:
                fh.write(data)

        self._atomic(path, write)

    def _write(self, table: pa.Table, *parts: str) -> None:
        if not self.exists(parts[0]):
            self.create(parts[0])
        self._atomic(self.path(*parts), lambda tmp: pq.write_table(table, tmp,
                                                                   filesystem=self.fs))

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
        if not self.exists(experiment):
            self.create(experiment)
        self._put_bytes(self.path(experiment, name),
                        json.dumps(value, indent=1, sort_keys=True).encode())

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
        self.create(experiment)  # marked as this tool's, as every writer's first write does
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
        """All files as one frame; if any is damaged, file by file, skipping (and naming)
        the damaged ones, so one bad file never hides the rest."""
        if not files:
            return schema.empty_table().to_pandas()
        try:
            return pads.dataset(files, schema=schema, filesystem=self.fs,
                                format="parquet").to_table().to_pandas()
        except _UNREADABLE:
            tables = [t for t in (self._read_file(f, schema) for f in files) if t is not None]
        if not tables:
            return schema.empty_table().to_pandas()
        return pa.concat_tables(tables).to_pandas()

    def _read_file(self, path: str, schema: pa.Schema) -> pa.Table | None:
        """One file with the schema, or None (with a warning naming it) if it is damaged."""
        try:
            return pq.read_table(path, filesystem=self.fs, schema=schema)
        except FileNotFoundError:
            return None  # replaced or removed since it was listed
        except _UNREADABLE as exc:
            self._damaged(path, exc)
            return None

    def _damaged(self, path: str, exc: BaseException) -> None:
        if path in self.damaged:
            return
        self.damaged[path] = _why(exc, path)
        warnings.warn(f"skipped damaged file {path}: {self.damaged[path]} "
                      f"(`python -m tvlars_ray.run check --repair` moves it aside)",
                      DamagedFileWarning, stacklevel=3)

    def _read_one_trial(self, experiment: str, trial_id: str) -> dict[str, Any]:
        path = self.path(experiment, "trials", f"{trial_id}.parquet")
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return {}
        table = self._read_file(path, TRIAL_SCHEMA)
        rows = table.to_pylist() if table is not None else []
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

    # -- health ---------------------------------------------------------------------------
    def scan(self, experiment: str) -> dict[str, str]:
        """Every parquet file of the experiment that does not read whole, with why."""
        bad: dict[str, str] = {}
        for kind, schema in SCHEMA.items():
            for path in self._files(self.path(experiment, kind)):
                try:
                    pq.read_table(path, filesystem=self.fs, schema=schema)
                except FileNotFoundError:
                    continue
                except _UNREADABLE as exc:
                    bad[path] = _why(exc, path)
        return bad

    def leftovers(self, experiment: str) -> list[str]:
        """Temporaries of writes that never finished (a process killed mid-write)."""
        found = []
        for kind in SCHEMA:
            folder = self.path(experiment, kind)
            if self._kind(folder) == pafs.FileType.Directory:
                found += [i.path for i in self.fs.get_file_info(
                    pafs.FileSelector(folder, recursive=True))
                    if i.type == pafs.FileType.File and i.base_name.startswith(".tmp-")]
        return sorted(found)

    def move_aside(self, experiment: str, path: str, stamp: str) -> str:
        """Move one of the experiment's files under ``damaged/<stamp>/`` (never deleted)."""
        base = self.path(experiment) + "/"
        if not path.startswith(base):
            raise StoreError(f"{path} is not in experiment '{experiment}'")
        target = f"{self.path(experiment, DAMAGED_DIR, stamp)}/{path[len(base):]}"
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        self.fs.move(path, target)
        return target

    def set_aside_damaged_train_state(self, experiment: str, run: str) -> str | None:
        """Ray Train's record of a run's checkpoints (a JSON file in the run's folder) cut
        short, by a full disk say, stops every resume of the trial with Ray's own error. Moved
        aside (never deleted), the run starts over and rewrites the trial's epochs in place
        (each stored once). Returns where it went, or None if it was whole or absent."""
        path = self.path(experiment, "train", run, TRAIN_STATE_FILE)
        if self._kind(path) != pafs.FileType.File:
            return None
        try:
            with self.fs.open_input_stream(path) as fh:
                json.loads(fh.read())
            return None
        except (ValueError, OSError):
            return self.move_aside(experiment, path, _now().strftime("%Y%m%d-%H%M%S"))

    def holder(self, experiment: str) -> dict[str, Any] | None:
        """Who runs the experiment now (see :class:`Lock`), or None if nobody does."""
        return Lock(self, experiment, "").holder()

    def read_lost(self, experiment: str) -> dict[str, list[tuple[str, int]]]:
        """Trial id -> the epochs ``check --repair`` moved aside (refilled by --resume)."""
        return {k: [(s, int(e)) for s, e in v]
                for k, v in (self.read_json(experiment, LOST_FILE) or {}).items()}

    def settle(self, experiment: str, trial_id: str, only_running: bool = True) -> str | None:
        """Give a trial whose driver is gone the status its stored epochs amount to."""
        row = self.trial_row(experiment, trial_id)
        if not row or (only_running and row["status"] != "running"):
            return row.get("status")
        cfg = self.row_config(row)
        epochs = self.trial_epochs(experiment, trial_id)
        status = final_status(cfg, epochs)
        if lost_epochs(cfg, epochs, status, self.read_lost(experiment).get(trial_id, [])):
            status = "stopped"  # not done until --resume refills what it lost
        if status != row["status"]:
            self.write_trial(experiment, trial_id, cfg, status, error=row.get("error"))
        return status

    def settle_running(self, experiment: str) -> dict[str, StoreWriteError]:
        """After a run ends or is stopped, no trial of it stays ``running``. Returns the
        trials whose rows could not be written (a full disk), with why."""
        trials = self.read_trials(experiment)
        failed = {}
        for trial_id in trials.loc[trials["status"] == "running", "trial_id"]:
            try:
                self.settle(experiment, trial_id)
            except StoreWriteError as exc:
                failed[trial_id] = exc
        return failed


    def health(self, experiment: str) -> Health:
        """What ``check`` reports: damaged files, leftovers of killed writes, trials that lost
        epochs or have no readable row, and trials marked running whose driver is gone."""
        return self._health(experiment, self.holder(experiment))

    def _health(self, experiment: str, owner: dict[str, Any] | None) -> Health:
        with warnings.catch_warnings():  # the health lists them itself
            warnings.simplefilter("ignore", DamagedFileWarning)
            trials = self.read_trials(experiment)
            epochs = self.read_epochs(experiment)
        recorded = self.read_lost(experiment)
        rows = {r["trial_id"]: r for r in trials.to_dict("records")}
        lost = {}
        for trial_id, row in rows.items():
            got = lost_epochs(self.row_config(row), epochs[epochs["trial_id"] == trial_id],
                              row["status"], recorded.get(trial_id, []))
            if got:
                lost[trial_id] = got
        running = [t for t, r in rows.items() if r["status"] == "running"]
        return Health(experiment, owner, self.scan(experiment),
                      self.leftovers(experiment) if owner is None else [], lost,
                      running if owner is None else [],
                      sorted(set(epochs["trial_id"]) - set(rows)))

    def repair(self, experiment: str) -> tuple[Health, list[str]]:
        """Move damaged files and leftovers aside (under ``damaged/<time>/``, never deleted),
        record the epochs that went with them for ``--resume`` to refill, rebuild a trial's
        row from its epochs where the row went, and settle trials whose driver is gone.
        Returns the health afterwards and the files moved."""
        with Lock(self, experiment, "check --repair"):
            found = self._health(experiment, None)
            stamp = _now().strftime("%Y%m%dT%H%M%SZ")
            recorded = self.read_lost(experiment)
            moved = []
            for path in [*found.damaged, *found.leftovers]:
                match = re.search(r"/(epochs|layers)/([^/]+)/([a-z]+)-(\d+)\.parquet$", path)
                if match and path in found.damaged:
                    kind, trial_id, stage, epoch = match.groups()
                    recorded.setdefault(trial_id, []).append((stage, int(epoch)))
                    row = self.path(experiment, "epochs", trial_id, f"{stage}-{epoch}.parquet")
                    if kind == "layers" and self._kind(row) == pafs.FileType.File:
                        # an epoch is its row and its layer history: a refill writes both
                        moved.append(self.move_aside(experiment, row, stamp))
                moved.append(self.move_aside(experiment, path, stamp))
            if recorded:
                self.write_json(experiment, LOST_FILE, {k: sorted(set(v))
                                                        for k, v in recorded.items()})
            after = self._health(experiment, None)
            for trial_id in after.rowless:
                cfg = self._config_from_epochs(experiment, trial_id)
                self.write_trial(experiment, trial_id, cfg, final_status(
                    cfg, self.trial_epochs(experiment, trial_id)))
            after = self._health(experiment, None)
            for trial_id in sorted(set(after.lost) | set(after.running)):
                if trial_id in after.lost:
                    row = self.trial_row(experiment, trial_id)
                    self.write_trial(experiment, trial_id, self.row_config(row), "stopped",
                                     error=f"lost {len(after.lost[trial_id])} epochs: "
                                           f"--resume runs them again")
                else:
                    self.settle(experiment, trial_id)
            return self._health(experiment, None), moved

    def _config_from_epochs(self, experiment: str, trial_id: str) -> TrialConfig:
        """A trial's settings from its epoch rows (the grid's own entry where one matches:
        the rows null the settings that cannot matter)."""
        first = self.trial_epochs(experiment, trial_id).iloc[0]
        cfg = TrialConfig.from_dict({k: first[k] for k in FIELD_NAMES if pd.notna(first[k])})
        for values in (self.read_grid(experiment) or {}).values():
            entry = TrialConfig.from_dict(values)
            if entry.science_key == cfg.science_key:
                return entry
        return cfg


@dataclasses.dataclass
class Health:
    """An experiment's state as ``check`` sees it."""

    experiment: str
    owner: dict[str, Any] | None  # who runs it now, if anyone
    damaged: dict[str, str]  # file -> why it does not read
    leftovers: list[str]  # temporaries of writes killed half-way
    lost: dict[str, list[tuple[str, int]]]  # trial -> epochs it ran but the store lacks
    running: list[str]  # marked running, but nothing runs the experiment: driver gone
    rowless: list[str]  # epochs stored, but no readable trial row

    @property
    def ok(self) -> bool:
        return not (self.damaged or self.leftovers or self.lost or self.running
                    or self.rowless)


def expected_epochs(cfg: TrialConfig) -> int:
    return cfg.epochs + (cfg.cl_epochs if cfg.mode == "bt" else 0)


def final_status(cfg: TrialConfig, epochs: pd.DataFrame) -> str:
    """What a trial that stopped running amounts to, from its stored epochs."""
    if bool(epochs["diverged"].fillna(False).any()):
        return "diverged"
    return "completed" if len(epochs) >= expected_epochs(cfg) else "stopped"


def stage_epochs(cfg: TrialConfig) -> list[tuple[str, int]]:
    """Every (stage, epoch) a trial of ``cfg`` stores when it runs to the end, in order."""
    if cfg.mode == "bt":
        return ([("pretrain", e) for e in range(cfg.cl_epochs)]
                + [("linear", e) for e in range(cfg.epochs)])
    return [("train", e) for e in range(cfg.epochs)]


def lost_epochs(cfg: TrialConfig, epochs: pd.DataFrame, status: str | None,
                recorded: Iterable[tuple[str, int]] = ()) -> list[tuple[str, int]]:
    """Epochs the trial ran but the store does not hold: a gap before its last stored epoch,
    for a trial recorded ``completed`` any epoch it should hold, and those ``recorded`` as
    moved aside. (A trial cut short, by ASHA or an interrupt, lacks its later epochs without
    having lost them.)"""
    order = stage_epochs(cfg)
    recorded = set(recorded)
    stored = set(zip(epochs["stage"], epochs["epoch"].astype(int)))
    diverged = epochs[epochs["diverged"].fillna(False).astype(bool)]
    if len(diverged):  # a diverged trial ends at that epoch
        last = (diverged["stage"].iloc[0], int(diverged["epoch"].iloc[0]))
        order = order[:order.index(last) + 1] if last in order else order
    if status == "completed":
        upto = len(order)
    else:
        upto = max((i + 1 for i, key in enumerate(order) if key in stored or key in recorded),
                   default=0)
    return [key for key in order[:upto] if key not in stored]


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(owner: dict[str, Any]) -> bool:
    """Whether the process that wrote a lock file still runs (or, on another host, still
    refreshes it)."""
    if owner.get("host") == socket.gethostname():
        pid = int(owner.get("pid", 0))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # alive, another user's
        start = owner.get("process_start")
        return start is None or start == _process_start(pid)
    try:
        beat = dt.datetime.fromisoformat(owner["heartbeat_at"])
    except (KeyError, TypeError, ValueError):
        return False
    return (_now() - beat).total_seconds() < Lock.STALE_S


class Lock:
    """Who runs an experiment now: ``lock.json`` in its folder, held for the whole run.

    A grid or an Optuna study holds it alone; ``trial`` commands filing into one experiment
    share it. On a local (or NFS) store the operating system holds it (``flock``), so a run
    that dies in any way, SIGKILL included, leaves it free and the next run needs no
    cleanup; the file names the holder (host, pid, start time, command) for the refusal.
    Object stores (S3, GCS) have no such lock: there the file alone says it, refreshed every
    minute, and a lock whose process is gone (same host) or that went unrefreshed for five
    minutes (another host) is taken over.
    """

    STALE_S = 300.0
    HEARTBEAT_S = 60.0

    def __init__(self, store: Store, experiment: str, command: str,
                 shared: bool = False) -> None:
        self.store, self.experiment, self.command, self.shared = (store, experiment, command,
                                                                  shared)
        self.path = store.path(experiment, LOCK_FILE)
        self.fd: int | None = None
        self.taken_over: dict[str, Any] | None = None  # a dead holder's lock, taken over
        self._stop = threading.Event()

    def me(self) -> dict[str, Any]:
        now = _now().isoformat(timespec="seconds")
        return {"command": self.command, "host": socket.gethostname(), "pid": os.getpid(),
                "process_start": _process_start(os.getpid()), "started_at": now,
                "heartbeat_at": now}

    def busy(self, owner: dict[str, Any] | None) -> str:
        if not owner or not owner.get("pid"):
            return (f"experiment '{self.experiment}' is in use by another run (a `trial` "
                    f"command filing into it): wait for it to finish")
        return (f"experiment '{self.experiment}' is being run by `{owner.get('command')}` "
                f"(pid {owner.get('pid')} on host {owner.get('host')}, since "
                f"{owner.get('started_at')}): wait for it to finish, or stop it first "
                f"(Ctrl-C there, or kill {owner.get('pid')})")

    def acquire(self) -> Lock:
        """Hold the lock, or raise :class:`StoreError` naming who holds it."""
        self.store.create(self.experiment)
        if self.store.is_local:
            self._acquire_local()
        elif not self.shared:
            owner = self.store.read_json(self.experiment, LOCK_FILE)
            if owner and _alive(owner):
                raise StoreError(self.busy(owner))
            self.taken_over = owner or None
            self.store.write_json(self.experiment, LOCK_FILE, self.me())
            threading.Thread(target=self._heartbeat, daemon=True).start()
        return self

    def _acquire_local(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            owner = _read_owner(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise StoreError(self.busy(owner)) from None
        self.fd = fd
        previous = _read_owner(fd)  # a holder that died without letting go: stale
        if previous and not self.shared:
            self.taken_over = previous
        if not self.shared or previous:
            os.ftruncate(fd, 0)
        if not self.shared:
            os.pwrite(fd, json.dumps(self.me()).encode(), 0)
            os.fsync(fd)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_S):
            try:
                self.store.write_json(self.experiment, LOCK_FILE, self.me())
            except OSError:
                pass  # the next beat tries again; a lock that goes stale is taken over

    def release(self) -> None:
        if self.fd is not None:
            if not self.shared:
                os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        elif not self.store.is_local and not self.shared:
            self._stop.set()
            owner = self.store.read_json(self.experiment, LOCK_FILE) or {}
            if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
                self.store.fs.delete_file(self.path)

    def holder(self) -> dict[str, Any] | None:
        """The live holder's details ({} for `trial` commands sharing it), or None."""
        if not self.store.is_local:
            owner = self.store.read_json(self.experiment, LOCK_FILE)
            return owner if owner and _alive(owner) else None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return _read_owner(fd)
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _write_error(exc: OSError, path: str) -> StoreWriteError:
    why = exc.strerror or _one_line(exc)
    if "Detail: [errno" in why:  # pyarrow's wording: keep the system's reason
        why = why.rsplit("] ", 1)[-1]
    return StoreWriteError(exc.errno, f"cannot write {path}: {why}")


def _why(exc: BaseException, path: str) -> str:
    """Why a file did not read, without repeating its name."""
    return _one_line(exc).replace(f"Could not open Parquet input source '{path}': ", "")


def _read_owner(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 1 << 16, 0).decode() or "{}")
    except (ValueError, OSError):
        return {}


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
