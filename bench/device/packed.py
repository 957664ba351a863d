"""Aggregate training images/s of trials sharing one GPU, against one trial alone.

Reads the device check's store: `gpu-check` (trials run one at a time, a whole GPU each) and
`gpu-pack` (four trials at 0.25 GPU each). Only steady epochs count (the first of each trial
carries cuDNN's autotuning), and for the packed trials only epochs that ran while all of them
were running, so the sum is a real aggregate and not four rates taken at different times.

    python bench/device/packed.py STORE
"""

import sys
from pathlib import Path

import pandas as pd

from tvlars_ray.store import read_epochs, read_trials

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _figures import emit  # noqa: E402


def steady(epochs: pd.DataFrame) -> pd.DataFrame:
    """Epochs after each trial's first, with their start time."""
    rows = epochs[epochs["epoch"] > 0].copy()
    rows["start"] = rows["recorded_at"] - pd.to_timedelta(rows["epoch_time_s"], unit="s")
    return rows


def main(store: str) -> int:
    alone = steady(read_epochs(store, "gpu-check"))
    packed = steady(read_epochs(store, "gpu-pack"))
    trials = read_trials(store, "gpu-pack")
    if not (trials["status"] == "completed").all() or len(trials) != 4:
        print(f"packed grid: {trials['status'].value_counts().to_dict()} (4 completed needed)")
        return 1
    one = alone["samples_per_s"].median()
    spans = packed.groupby("trial_id").agg(first=("start", "min"), last=("recorded_at", "max"))
    t0, t1 = spans["first"].max(), spans["last"].min()
    overlap = packed[(packed["start"] >= t0) & (packed["recorded_at"] <= t1)]
    if overlap["trial_id"].nunique() < len(spans):
        print(f"the packed trials never all ran at once (overlap {t0} .. {t1}); "
              "no aggregate to report")
        return 1
    each = overlap.groupby("trial_id")["samples_per_s"].median()
    total = each.sum()
    print(f"one trial alone (a whole GPU): {one:,.0f} images/s (median of steady epochs)")
    print("four trials sharing it, while all four ran: "
          + ", ".join(f"{v:,.0f}" for v in each) + f" images/s each; aggregate {total:,.0f}")
    emit("device.packed_vs_alone", total / one, "x", at_least=1.5)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
