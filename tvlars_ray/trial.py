"""One trial as one Ray Train run: the piece both the grid and the ``trial`` command use.

It runs on the trial's driver (a Tune trial's function, or the ``trial`` command itself) and
knows Ray Train, not Tune: a Tune trial passes Tune's report callback in.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from .cluster import cluster_nodes, connect, plan, worker_resources
from .config import TrialConfig
from .store import Store
from .train import train_fn_per_worker


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:500]


def expected_epochs(cfg: TrialConfig) -> int:
    return cfg.epochs + (cfg.cl_epochs if cfg.mode == "bt" else 0)


def final_status(cfg: TrialConfig, epochs: pd.DataFrame) -> str:
    """What a trial that stopped running amounts to, from its stored epochs."""
    if bool(epochs["diverged"].fillna(False).any()):
        return "diverged"
    return "completed" if len(epochs) >= expected_epochs(cfg) else "stopped"


def fit_trial(cfg: TrialConfig, store: str, experiment: str, trial_id: str,
              callbacks: list[Any] | None = None, record_failure: bool = True) -> str:
    """Fit one TorchTrainer for ``cfg`` and keep the trial's store row current.

    The Train run is named after the trial, so fitting the same trial again (a resumed grid)
    continues from its latest checkpoint. Returns the final status; a failed run re-raises,
    after recording ``failed`` unless the caller settles failures itself (under Tune, a run
    that Tune stops early also ends in an exception, and Tune knows which it was).
    """
    st = Store(store)
    st.write_trial(experiment, trial_id, cfg, "running", here=True)
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "store": st.uri_of(), "experiment": experiment,
                           "trial_id": trial_id},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=worker_resources(cfg)),
        run_config=RunConfig(
            name=trial_id, storage_path=st.uri_of(experiment, "train"),
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
            st.write_trial(experiment, trial_id, cfg, "failed", error=one_line(exc))
        raise
    status = final_status(cfg, st.trial_epochs(experiment, trial_id))
    st.write_trial(experiment, trial_id, cfg, status)
    return status


def run_single(cfg: TrialConfig, store: str, experiment: str, trial_id: str,
               address: str | None = None) -> str:
    """The ``trial`` command: on Ray workers, or in this process when ``num_workers == 0``."""
    if cfg.num_workers > 0:
        connect(address)
        plan([cfg], cluster_nodes())  # a trial that cannot fit is an error, not a hang
    try:
        return fit_trial(cfg, store, experiment, trial_id)
    except Exception as exc:  # the store row says failed; say why on one line too
        print(f"trial {trial_id} failed: {one_line(exc)}")
        return "failed"
