"""One trial as one Ray Train run: the piece both the grid and the ``trial`` command use.

It runs on the trial's driver (a Tune trial's function, or the ``trial`` command itself) and
knows Ray Train, not Tune: a Tune trial passes Tune's report callback in.
"""

from __future__ import annotations

import sys
import uuid
from dataclasses import dataclass
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

from .cluster import cluster_nodes, connect, plan, worker_resources
from .compat import TorchTrainer
from .config import TrialConfig
from .errors import UserError
from .store import (
    Lock,
    Store,
    StoreError,
    StoreWriteError,
    final_status,
    lost_epochs,
)
from .train import train_fn_per_worker


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:500]


@dataclass
class Rerun:
    """What resuming a stored trial takes."""

    done: bool  # nothing to run: every epoch is stored (or it diverged)
    fill: list[tuple[str, int]] | None = None  # lost epochs: re-run from the start for these


def rerun(st: Store, experiment: str, trial_id: str, cfg: TrialConfig,
          finish: bool = True) -> Rerun:
    """How to resume a stored trial.

    Epochs it lost (moved aside by ``check --repair``, or a gap before its last stored epoch)
    cannot come from a checkpoint, which holds only the latest state: the trial re-runs from
    its first epoch and writes only the missing ones (epochs are deterministic in (seed,
    epoch, rank)). Otherwise an unfinished trial continues from its latest checkpoint, when
    ``finish`` asks for it (a grid; an Optuna study leaves that to Tune, whose ASHA may have
    cut a trial short on purpose).
    """
    status = st.trial_row(experiment, trial_id).get("status")
    epochs = st.trial_epochs(experiment, trial_id)
    recorded = st.read_lost(experiment).get(trial_id, [])
    lost = lost_epochs(cfg, epochs, status, recorded)
    if lost:
        return Rerun(False, lost_epochs(cfg, epochs, "completed") if finish else lost)
    ended = final_status(cfg, epochs) in ("completed", "diverged")
    return Rerun(ended or not finish)


def fit_trial(cfg: TrialConfig, store: str, experiment: str, trial_id: str,
              callbacks: list[Any] | None = None, record_failure: bool = True,
              fill: list[tuple[str, int]] | None = None,
              provenance: dict[str, Any] | None = None) -> str:
    """Fit one TorchTrainer for ``cfg`` and keep the trial's store row current.

    The Train run is named after the trial, so fitting the same trial again (a resumed grid)
    continues from its latest checkpoint; a refill (``fill``, see :func:`rerun`) is a fresh
    Train run from the first epoch. Returns the final status; a failed run re-raises,
    after recording ``failed`` unless the caller settles failures itself (under Tune, a run
    that Tune stops early also ends in an exception, and Tune knows which it was).
    ``provenance``: the trial-table columns of the command running it.
    """
    st = Store(store)
    st.write_trial(experiment, trial_id, cfg, "running", here=True, provenance=provenance)
    name = f"{trial_id}-refill-{uuid.uuid4().hex[:6]}" if fill else trial_id
    moved = st.set_aside_damaged_train_state(experiment, name)
    if moved:
        print(f"trial {trial_id}: Ray Train's checkpoint record was unreadable, moved to {moved}; "
              f"the trial starts over")
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "store": st.uri_of(), "experiment": experiment,
                           "trial_id": trial_id, "fill": fill},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=worker_resources(cfg)),
        run_config=RunConfig(
            name=name, storage_path=st.uri_of(experiment, "train"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or [],
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        trainer.fit()
    except Exception as exc:
        if record_failure:
            try:
                st.write_trial(experiment, trial_id, cfg, "failed", error=one_line(exc))
            except StoreWriteError as write:  # the store itself is what failed
                print(f"could not record trial {trial_id} as failed: {write}")
        raise
    status = final_status(cfg, st.trial_epochs(experiment, trial_id))
    st.write_trial(experiment, trial_id, cfg, status)
    return status


def run_single(cfg: TrialConfig, store: str, experiment: str, trial_id: str,
               address: str | None = None, resume: bool = False,
               provenance: dict[str, Any] | None = None) -> str:
    """The ``trial`` command: on Ray workers, or in this process when ``num_workers == 0``.

    It shares the experiment's lock with other ``trial`` commands (a grid or a study holds it
    alone). Ctrl-C or SIGTERM stops the run, records the trial ``stopped`` and raises
    ``KeyboardInterrupt``; ``resume`` continues a stored trial (see :func:`rerun`).
    """
    st = Store(store)
    if st.exists(experiment) and not st.is_experiment(experiment):
        raise StoreError(f"{st.path(experiment)} is not an experiment of this tool: pick "
                         f"another --experiment")
    fill = None
    if resume:
        plan_ = rerun(st, experiment, trial_id, cfg)
        if plan_.done:
            return st.settle(experiment, trial_id, only_running=False) or "completed"
        fill = plan_.fill
    lock = Lock(st, experiment, "trial", shared=True).acquire()
    try:
        if cfg.num_workers > 0:
            connect(address)
            plan([cfg], cluster_nodes())  # a trial that cannot fit is an error, not a hang
        return fit_trial(cfg, store, experiment, trial_id, fill=fill, provenance=provenance)
    except (KeyboardInterrupt, SystemExit):  # Ray Train's own Ctrl-C handler exits
        ray.shutdown()  # the workers end with it: nothing writes after this
        st.settle(experiment, trial_id)
        raise KeyboardInterrupt from None
    except Exception as exc:  # the store row says failed; say why on one line too
        if isinstance(exc, UserError):
            raise
        print(f"trial {trial_id} failed: {one_line(exc)}", file=sys.stderr)
        return "failed"
    finally:
        lock.release()
