"""The paper's tables and plots, drawn from the store alone.

Tables: per (dataset, model, mode), one row per batch size and one column per method (the
optimizer, with or without warm-up), the best configuration's accuracy (best over lr and
lambda, mean +- std over seeds) and which lr / lambda won; diverged trials are counted in
every cell, never hidden. Plots: test-accuracy curves, lr x lambda heatmaps, the lr and phi
schedules, trust-ratio summaries over epochs and, for Barlow Twins, the pre-training losses
(its table holds the linear-evaluation accuracy).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .config import FIELD_NAMES, RESOURCE_FIELDS  # noqa: E402
from .optim import PHI_SETTINGS, available_optimizers, get_spec, tvlars_phi  # noqa: E402
from .schedules import lr_multiplier  # noqa: E402
from .store import ENDED, Store  # noqa: E402

GROUP = ["ds", "model", "mode"]
SCIENCE = [f for f in FIELD_NAMES if f not in RESOURCE_FIELDS and f != "seed"]


def method_name(opt: str, sd: str) -> str:
    """The optimizer's display name from the registry, with its schedule when it has one."""
    name = get_spec(opt).display if opt in available_optimizers() else opt
    return f"{name} + warm-up" if sd == "lars-warm" else name if sd == "none" else f"{name} ({sd})"


def _points(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (all settings but the seed), with seed statistics."""
    keys = [k for k in SCIENCE if k in trials]
    frame = trials.copy()
    frame["_key"] = [json.dumps([None if pd.isna(v) else v for v in row], default=str)
                     for row in frame[keys].itertuples(index=False)]
    frame["_diverged"] = frame["status"].eq("diverged")
    rows = []
    for _, g in frame.groupby("_key", sort=False):
        first = g.iloc[0]
        ok = g[~g["_diverged"]]
        rows.append({
            **{k: first[k] for k in keys},
            "method": method_name(first["opt"], first["sd"]),
            "seeds": len(g), "diverged": int(g["_diverged"].sum()),
            "best_mean": ok["best_test_acc"].mean(), "best_std": ok["best_test_acc"].std(ddof=0),
            "final_mean": ok["final_test_acc"].mean(),
            "final_std": ok["final_test_acc"].std(ddof=0),
            "trial_ids": ",".join(g["trial_id"]),
        })
    return pd.DataFrame(rows)


def paper_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Per (ds, model, mode, bs, method): the winning configuration and the counts."""
    points = _points(trials)
    if points.empty:
        return points
    rows = []
    for key, g in points.groupby([*GROUP, "bs", "method"], sort=True):
        scored = g.dropna(subset=["best_mean"])
        win = scored.loc[scored["best_mean"].idxmax()] if len(scored) else g.iloc[0]
        rows.append({
            **dict(zip([*GROUP, "bs", "method"], key)),
            "best_acc": win["best_mean"], "best_std": win["best_std"],
            "final_acc": win["final_mean"], "final_std": win["final_std"],
            "lr": win["lr"], "lmbda": win["lmbda"] if win["opt"] == "tvlars" else None,
            "seeds": int(win["seeds"]), "configs": len(g), "trials": int(g["seeds"].sum()),
            "diverged": int(g["diverged"].sum()),
        })
    return pd.DataFrame(rows)


def _cell(row: pd.Series, which: str) -> str:
    mean, std = row[f"{which}_acc"], row[f"{which}_std"]
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        text = "diverged"
    else:
        text = f"{100 * mean:.2f}"
        if row["seeds"] > 1:
            text += f" ± {100 * std:.2f}"
    won = f"lr {row['lr']:g}"
    if row["lmbda"] is not None and not pd.isna(row["lmbda"]):
        won += f", λ {row['lmbda']:g}"
    div = f", {row['diverged']}/{row['trials']} diverged" if row["diverged"] else ""
    return f"{text} ({won}{div})"


def markdown_tables(table: pd.DataFrame) -> str:
    """Rows: batch sizes; columns: methods side by side (with and without warm-up)."""
    if table.empty:
        return "_no finished trials yet_\n"
    out = []
    for key, g in table.groupby(GROUP, sort=True):
        ds, model, mode = key
        methods = sorted(g["method"].unique(), key=lambda m: (m.split(" ")[0], "warm" in m, m))
        for which, title in (("best", "best test accuracy"), ("final", "final test accuracy")):
            label = "linear-eval top-1" if mode == "bt" else title
            out.append(f"### {ds} / {model} / {mode}: {label} (%)"
                       + (" — best epoch" if mode == "bt" and which == "best" else ""))
            out.append("")
            out.append("| batch | " + " | ".join(methods) + " |")
            out.append("|---|" + "---|" * len(methods))
            for bs, rows in g.groupby("bs", sort=True):
                cells = []
                for method in methods:
                    hit = rows[rows["method"] == method]
                    cells.append(_cell(hit.iloc[0], which) if len(hit) else "")
                out.append(f"| {bs} | " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


# -- plots ---------------------------------------------------------------------------------
def _winners(table: pd.DataFrame, trials: pd.DataFrame) -> dict[tuple, list[str]]:
    """Trial ids of each table cell's winning configuration."""
    points = _points(trials)
    out = {}
    for _, row in table.iterrows():
        g = points[(points[GROUP + ["bs", "method"]] == row[GROUP + ["bs", "method"]]).all(axis=1)]
        scored = g.dropna(subset=["best_mean"])
        win = scored.loc[scored["best_mean"].idxmax()] if len(scored) else g.iloc[0]
        out[tuple(row[GROUP + ["bs", "method"]])] = win["trial_ids"].split(",")
    return out


def plot_curves(table, trials, epochs, out: Path) -> list[Path]:
    """Test accuracy over epochs, one line per method, one figure per batch size."""
    files = []
    winners = _winners(table, trials)
    scored = epochs.dropna(subset=["test_acc"])
    for key, g in table.groupby([*GROUP, "bs"], sort=True):
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in sorted(g["method"]):
            ids = winners[(*key, method)]
            rows = scored[scored["trial_id"].isin(ids)]
            stage = "linear" if key[2] == "bt" else "train"
            curve = rows[rows["stage"] == stage].groupby("epoch")["test_acc"].mean()
            if len(curve):
                ax.plot(curve.index + 1, 100 * curve.values, marker="o", ms=3, label=method)
        ax.set(xlabel="epoch", ylabel="test accuracy (%)",
               title=f"{key[0]} {key[1]} {key[2]}, batch {key[3]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        files.append(_save(fig, out / f"curves_{key[0]}_{key[1]}_{key[2]}_bs{key[3]}.png"))
    return files


def plot_heatmaps(trials: pd.DataFrame, out: Path) -> list[Path]:
    """TVLARS final accuracy over lr x lambda, one heatmap per batch size."""
    files = []
    tv = trials[(trials["opt"] == "tvlars") & trials["final_test_acc"].notna()]
    for key, g in tv.groupby([*GROUP, "bs", "sd"], sort=True):
        grid = g.pivot_table(index="lmbda", columns="lr", values="final_test_acc", aggfunc="mean")
        if grid.shape[0] < 2 and grid.shape[1] < 2:
            continue
        fig, ax = plt.subplots(figsize=(1.2 * grid.shape[1] + 2.5, 0.6 * grid.shape[0] + 2))
        image = ax.imshow(100 * grid.values, cmap="viridis", aspect="auto")
        ax.set_xticks(range(grid.shape[1]), [f"{v:g}" for v in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [f"{v:g}" for v in grid.index])
        for (i, j), value in np.ndenumerate(grid.values):
            if not np.isnan(value):
                ax.text(j, i, f"{100 * value:.1f}", ha="center", va="center", color="w",
                        fontsize=8)
        ax.set(xlabel="lr", ylabel="lambda",
               title=f"TVLARS final acc: {key[0]} {key[1]} bs {key[3]} ({key[4]})")
        fig.colorbar(image, ax=ax, label="%")
        files.append(_save(fig, out / f"heatmap_{key[0]}_{key[1]}_{key[2]}_bs{key[3]}_{key[4]}"
                                      ".png"))
    return files


def plot_schedules(trials: pd.DataFrame, epochs: pd.DataFrame, out: Path) -> list[Path]:
    """The lr multiplier of each schedule present, and TVLARS phi(t) for each lambda."""
    if trials.empty:
        return []
    steps_per_epoch = 1
    last = epochs.dropna(subset=["step"])
    if len(last):
        per = last.groupby(["trial_id", "stage"])["step"].max() / (
            last.groupby(["trial_id", "stage"])["epoch"].max() + 1)
        steps_per_epoch = max(1, int(per.median()))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    curves = trials[["sd", "bs", "epochs", "warmup_epochs", *PHI_SETTINGS]].copy()
    curves.loc[curves["sd"] != "phi", list(PHI_SETTINGS)] = np.nan  # phi's only with sd phi
    for _, row in curves.drop_duplicates().iterrows():
        total = int(row["epochs"]) * steps_per_epoch
        warm = row["warmup_epochs"]
        warm_steps = 0 if pd.isna(warm) else int(warm) * steps_per_epoch
        phi = {k: float(row[k]) for k in PHI_SETTINGS} if row["sd"] == "phi" else None
        xs = np.linspace(0, total, 200).astype(int)
        ys = [lr_multiplier(row["sd"], int(s), total, int(row["bs"]), warm_steps, phi)
              for s in xs]
        label = f"{row['sd']}, bs {row['bs']}" + (f", λ {phi['lmbda']:g}" if phi else "")
        ax1.plot(xs, ys, label=label)
    ax1.set(xlabel="step", ylabel="lr multiplier", title="learning-rate schedules")
    ax1.legend(fontsize=7)
    tv = trials[(trials["opt"] == "tvlars") | (trials["sd"] == "phi")]
    total = int(trials["epochs"].max()) * steps_per_epoch
    xs = np.arange(1, max(total, 2) + 1)
    for (lmbda, alpha, delay, gmin), _ in tv.groupby(["lmbda", "alpha", "delay", "gamma_min"]):
        label = f"λ {lmbda:g}" + (f", d_e {delay:g}" if delay else "") + (
            f", γ_min {gmin:g}" if gmin else "")
        ax2.plot(xs, [tvlars_phi(float(t), lmbda, alpha, delay, gmin) for t in xs], label=label)
    ax2.set(xlabel="step t", ylabel="phi(t)", title="phi(t) of TVLARS and of sd phi")
    if len(tv):
        ax2.legend(fontsize=7)
    return [_save(fig, out / "schedules.png")]


def plot_trust_ratios(table, trials, epochs, out: Path) -> list[Path]:
    """Mean per-layer trust ratio (min-max band) over epochs, LARS-family winners."""
    winners = _winners(table, trials)
    fam = epochs.dropna(subset=["trust_ratio_mean"])
    if fam.empty:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, ids in sorted(winners.items()):
        rows = fam[fam["trial_id"] == ids[0]]
        if rows.empty:
            continue
        rows = rows.sort_values(["stage", "epoch"])
        x = np.arange(1, len(rows) + 1)
        line, = ax.plot(x, rows["trust_ratio_mean"], label=f"{key[4]}, bs {key[3]}")
        ax.fill_between(x, rows["trust_ratio_min"], rows["trust_ratio_max"], alpha=0.15,
                        color=line.get_color())
    ax.set(xlabel="epoch", ylabel="trust ratio", yscale="log", title="per-layer trust ratios")
    ax.legend(fontsize=7)
    return [_save(fig, out / "trust_ratios.png")]


def plot_pretrain_losses(table, trials, epochs, out: Path) -> list[Path]:
    """Barlow Twins pre-training loss over epochs, one line per method, per batch size."""
    files = []
    winners = _winners(table, trials)
    pre = epochs[(epochs["stage"] == "pretrain") & epochs["cl_loss"].notna()]
    for key, g in table[table["mode"] == "bt"].groupby([*GROUP, "bs"], sort=True):
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in sorted(g["method"]):
            rows = pre[pre["trial_id"].isin(winners[(*key, method)])]
            curve = rows.groupby("epoch")["cl_loss"].mean()
            if len(curve):
                ax.plot(curve.index + 1, curve.values, label=method)
        ax.set(xlabel="pre-training epoch", ylabel="Barlow Twins loss", yscale="log",
               title=f"{key[0]} {key[1]} pre-training, batch {key[3]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        files.append(_save(fig, out / f"pretrain_{key[0]}_{key[1]}_bs{key[3]}.png"))
    return files


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(store: Store, experiment: str | None, out: str | Path | None) -> Path:
    """Write report.md, table.csv, points.csv and the PNGs; returns the folder."""
    folder = Path(out) if out else _default_out(store, experiment)
    folder.mkdir(parents=True, exist_ok=True)
    trials = store.read_trials(experiment)
    epochs = store.read_epochs(experiment)
    finished = trials[trials["status"].isin(ENDED)]
    table = paper_table(finished)
    points = _points(finished)
    table.to_csv(folder / "table.csv", index=False)
    points.to_csv(folder / "points.csv", index=False)
    counts = trials["status"].value_counts().to_dict()
    lines = [f"# Report: {experiment or 'all experiments'} ({store.uri})", "",
             f"{len(trials)} trials: " + ", ".join(f"{v} {k}" for k, v in counts.items()), "",
             markdown_tables(table)]
    images: list[Path] = []
    if not table.empty:
        images += plot_curves(table, finished, epochs, folder)
        images += plot_heatmaps(finished, folder)
        images += plot_schedules(finished, epochs, folder)
        images += plot_trust_ratios(table, finished, epochs, folder)
        images += plot_pretrain_losses(table, finished, epochs, folder)
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images]
    text = "\n".join(lines) + "\n"
    (folder / "report.md").write_text(text)
    print(markdown_tables(table))
    return folder


def _default_out(store: Store, experiment: str | None) -> Path:
    if store.is_local:
        return Path(store.path(experiment, "report") if experiment else store.path("report"))
    return Path("report") / (experiment or "all")


def export_reference(store: Store, experiment: str | None, out: Path) -> list[Path]:
    """The reference code's layout: runs/{ds}_{model}/{opt}[_{lmbda}]/{bs}_{lr}_{sd}.parquet.

    Four columns per file (train_loss, train_acc, test_loss, test_acc), one row per epoch,
    accuracies in percent and ``None`` for no schedule, as the reference wrote them. Trials with
    several seeds get a ``_s{seed}`` suffix so none overwrites another.
    """
    trials = store.read_trials(experiment)
    epochs = store.read_epochs(experiment)
    written = []
    multi_seed = trials.groupby([c for c in SCIENCE if c in trials], dropna=False)[
        "seed"].transform("nunique").gt(1) if len(trials) else pd.Series(dtype=bool)
    for (_, row), several in zip(trials.iterrows(), multi_seed):
        rows = epochs[(epochs["trial_id"] == row["trial_id"])
                      & (epochs["experiment"] == row["experiment"])]
        rows = rows[rows["stage"] != "pretrain"].sort_values(["stage", "epoch"])
        if rows.empty:
            continue
        # python's str() of the float flags, as the reference's f-strings wrote them
        opt = f"tvlars_{float(row['lmbda'])}" if row["opt"] == "tvlars" else row["opt"]
        sd = "None" if row["sd"] == "none" else row["sd"]
        name = f"{row['bs']}_{float(row['lr'])}_{sd}" + (f"_s{row['seed']}" if several else "")
        path = out / f"{row['ds']}_{row['model']}" / opt / f"{name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame = pd.DataFrame({
            "train_loss": rows["train_loss"].to_numpy(),
            "train_acc": 100 * rows["train_acc"].to_numpy(),
            "test_loss": rows["test_loss"].to_numpy(),
            "test_acc": 100 * rows["test_acc"].to_numpy(),
        })
        frame.to_parquet(path, index=False)
        written.append(path)
    return written
