"""The paper's tables and plots, drawn from the store alone.

Tables: per (dataset, model, mode), one row per batch size and one column per method (the
optimizer, with or without warm-up), the chosen configuration's accuracy over seeds (mean,
95% Student-t interval, sample std, n) and which lr / lambda won. The configuration is chosen
on the validation split where the trials held one out, and, beside it, on the test set as the
paper did, labelled so. Diverged runs are counted in every cell, never hidden. Then TVLARS
minus each baseline, paired on seed, with a verdict in words. Plots: test-accuracy curves,
lr x lambda heatmaps, the lr and phi schedules, trust-ratio summaries over epochs and, for
Barlow Twins, the pre-training losses (its table holds the linear-evaluation accuracy).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .config import FIELD_NAMES, RESOURCE_FIELDS  # noqa: E402
from .optim import PHI_SETTINGS, available_optimizers, get_spec, tvlars_phi  # noqa: E402
from .schedules import lr_multiplier  # noqa: E402
from .stats import interval, verdict  # noqa: E402
from .store import ENDED, Store  # noqa: E402

GROUP = ["ds", "model", "mode"]
SCIENCE = [f for f in FIELD_NAMES if f not in RESOURCE_FIELDS and f != "seed"]


def method_name(opt: str, sd: str) -> str:
    """The optimizer's display name from the registry, with its schedule when it has one."""
    name = get_spec(opt).display if opt in available_optimizers() else opt
    return f"{name} + warm-up" if sd == "lars-warm" else name if sd == "none" else f"{name} ({sd})"


# Per trial, the numbers a configuration is judged on (columns of the trials table).
METRICS = ("best_test_acc", "final_test_acc", "best_val_acc", "final_val_acc")
# How a method's configuration (lr, lambda) is chosen: the score it is chosen on, the metric
# then reported for it, and the label the report gives it.
SELECTIONS = {
    "validation": ("final_val_acc", "final_test_acc",
                   "chosen on validation: final test accuracy"),
    "test": ("best_test_acc", "best_test_acc",
             "the paper's way, chosen on test: best test accuracy"),
}


def _points(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (all settings but the seed), with seed statistics.

    Per metric: the mean, the sample std and the half-width of the 95% Student-t interval over
    the seeds that finished (``n``); seeds that diverged are counted in ``n_diverged`` and left
    out of the mean (their accuracy is that of a broken run, not a sample of the method's).
    """
    keys = [k for k in SCIENCE if k in trials]
    frame = trials.copy()
    frame["_key"] = [json.dumps([None if pd.isna(v) else v for v in row], default=str)
                     for row in frame[keys].itertuples(index=False)]
    frame["_diverged"] = frame["status"].eq("diverged")
    rows = []
    for _, g in frame.groupby("_key", sort=False):
        first = g.iloc[0]
        ok = g[~g["_diverged"]]
        row = {**{k: first[k] for k in keys}, "method": method_name(first["opt"], first["sd"]),
               "runs": len(g), "n": len(ok), "n_diverged": int(g["_diverged"].sum())}
        for metric in METRICS:
            iv = interval(ok[metric] if metric in ok else [])
            row.update({f"{metric}_mean": iv.mean, f"{metric}_std": iv.std,
                        f"{metric}_ci": iv.half})
        row.update(trial_ids=",".join(g["trial_id"]),
                   seeds=",".join(str(int(s)) for s in g["seed"]))
        rows.append(row)
    return pd.DataFrame(rows)


def select(configs: pd.DataFrame, score: str) -> pd.Series | None:
    """The configuration a method would be run with: the highest mean ``score``, among the
    configurations none of whose seeds diverged when there are any (a setting that sometimes
    blows up is not one to recommend). None if no configuration has the score."""
    scored = configs.dropna(subset=[f"{score}_mean"])
    if scored.empty:
        return None
    clean = scored[scored["n_diverged"] == 0]
    pool = clean if len(clean) else scored
    return pool.loc[pool[f"{score}_mean"].idxmax()]


def paper_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Per (ds, model, mode, bs, method, selection): the chosen configuration and its numbers.

    ``selection`` is ``test`` (the paper's way: lr and lambda chosen by the best test accuracy)
    and, where the trials held out a validation set, ``validation`` (chosen by the final
    validation accuracy; its test accuracy is then a fair estimate)."""
    points = _points(trials)
    if points.empty:
        return points
    rows = []
    for key, g in points.groupby([*GROUP, "bs", "method"], sort=True):
        for selection, (score, _, _) in SELECTIONS.items():
            win = select(g, score)
            if win is None:
                continue
            row = {**dict(zip([*GROUP, "bs", "method"], key)), "selection": selection,
                   "score": win[f"{score}_mean"], "lr": win["lr"],
                   "lmbda": win["lmbda"] if win["opt"] == "tvlars" else None,
                   "n": int(win["n"]), "n_diverged": int(win["n_diverged"])}
            for which in ("best", "final"):
                for stat in ("mean", "std", "ci"):
                    row[f"{which}_{stat}"] = win[f"{which}_test_acc_{stat}"]
            row.update(configs=len(g), runs=int(g["runs"].sum()),
                       runs_diverged=int(g["n_diverged"].sum()), trial_ids=win["trial_ids"])
            rows.append(row)
    return pd.DataFrame(rows)


def paired_differences(table: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """TVLARS minus each other method, per batch size and selection, matched on seed.

    Each side is its method's chosen configuration; a seed counts when both sides ran it and
    neither diverged; seeds where one side diverged are counted apart and named in the
    verdict."""
    rows = []
    by_id = trials.set_index("trial_id")
    for key, cell in table.groupby([*GROUP, "bs", "selection"], sort=True):
        metric = SELECTIONS[key[-1]][1]
        runs = {r["method"]: _runs_by_seed(by_id, r["trial_ids"], metric)
                for _, r in cell.iterrows()}
        opts = dict(zip(cell["method"], [by_id.loc[r.split(",")[0], "opt"]
                                         for r in cell["trial_ids"]]))
        for first in sorted(m for m in runs if opts[m] == "tvlars"):
            for second in sorted(m for m in runs if opts[m] != "tvlars"):
                rows.append({**dict(zip([*GROUP, "bs", "selection"], key)), "metric": metric,
                             **_pair(first, runs[first], second, runs[second])})
    return pd.DataFrame(rows)


def _runs_by_seed(by_id: pd.DataFrame, trial_ids: str, metric: str) -> dict[int, float | None]:
    """seed -> the metric of that seed's run, None where it diverged."""
    out = {}
    for tid in trial_ids.split(","):
        row = by_id.loc[tid]
        out[int(row["seed"])] = None if row["status"] == "diverged" else float(row[metric])
    return out


def _pair(first: str, a: dict[int, float | None], second: str,
          b: dict[int, float | None]) -> dict:
    common = sorted(set(a) & set(b))
    both = [s for s in common if a[s] is not None and b[s] is not None
            and math.isfinite(a[s]) and math.isfinite(b[s])]
    diff = interval([a[s] - b[s] for s in both])
    lost_a = [s for s in common if a[s] is None and b[s] is not None]
    lost_b = [s for s in common if b[s] is None and a[s] is not None]
    lost_both = [s for s in common if a[s] is None and b[s] is None]
    sentence = verdict(diff, first, second)
    for name, seeds in ((first, lost_a), (second, lost_b), ("both", lost_both)):
        if seeds:
            sentence += (f"; not paired: {name} diverged on seed"
                         f"{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")
    return {"comparison": f"{first} - {second}", "seeds": ",".join(map(str, both)),
            "n": diff.n, "mean_diff": diff.mean, "std_diff": diff.std, "ci_diff": diff.half,
            "first_diverged": len(lost_a), "second_diverged": len(lost_b), "verdict": sentence}


def _cell(row: pd.Series, which: str) -> str:
    mean, std, half = (row[f"{which}_{stat}"] for stat in ("mean", "std", "ci"))
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        text = "diverged"
    else:
        text = f"{100 * mean:.2f}"
        if row["n"] > 1:
            text += f" ± {100 * half:.2f}"
    n = f"n {row['n']}" + (f" + {row['n_diverged']} diverged" if row["n_diverged"] else "")
    if row["n"] > 1:
        n += f", sd {100 * std:.2f}"
    won = f"lr {row['lr']:g}"
    if row["lmbda"] is not None and not pd.isna(row["lmbda"]):
        won += f", λ {row['lmbda']:g}"
    div = (f"; {row['runs_diverged']}/{row['runs']} runs diverged"
           if row["runs_diverged"] else "")
    return f"{text} ({n}; {won}{div})"


CELL_KEY = ("Cells: mean ± half-width of the 95% Student-t interval over seeds; n: seeds that "
            "finished, + those that diverged (left out of the mean); sd: sample standard "
            "deviation; the lr / λ chosen; runs diverged over every configuration of the cell.")


def markdown_tables(table: pd.DataFrame) -> str:
    """Rows: batch sizes; columns: methods side by side (with and without warm-up); one table
    per way of choosing the configuration."""
    if table.empty:
        return "_no finished trials yet_\n"
    out = [CELL_KEY, ""]
    for key, g in table.groupby(GROUP, sort=True):
        ds, model, mode = key
        methods = sorted(g["method"].unique(), key=lambda m: (m.split(" ")[0], "warm" in m, m))
        shown = [("validation", "final", SELECTIONS["validation"][2]),
                 ("test", "best", SELECTIONS["test"][2]),
                 ("test", "final", "the paper's way, chosen on test: final test accuracy")]
        for selection, which, title in shown:
            rows_of = g[g["selection"] == selection]
            if rows_of.empty:
                continue
            if mode == "bt":
                title = title.replace("test accuracy", "linear-eval top-1")
            out += [f"### {ds} / {model} / {mode}: {title} (%)", "",
                    "| batch | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
            for bs, rows in rows_of.groupby("bs", sort=True):
                cells = []
                for method in methods:
                    hit = rows[rows["method"] == method]
                    cells.append(_cell(hit.iloc[0], which) if len(hit) else "")
                out.append(f"| {bs} | " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


def markdown_pairs(pairs: pd.DataFrame) -> str:
    """The paired differences as one table per selection, with the verdict in words."""
    if pairs.empty:
        return ""
    out = ["## Paired differences (matched on seed)", "",
           "TVLARS minus each other method, each at its chosen configuration, over the seeds "
           "both ran and neither diverged; ± is the half-width of the 95% Student-t interval "
           "of the mean difference, in accuracy points.", ""]
    for selection in SELECTIONS:
        g = pairs[pairs["selection"] == selection]
        if g.empty:
            continue
        out += [f"### {SELECTIONS[selection][2]}", "",
                "| data | batch | difference | n | mean | 95% CI | verdict |",
                "|---|---|---|---|---|---|---|"]
        for _, r in g.iterrows():
            mean = "" if math.isnan(r["mean_diff"]) else f"{100 * r['mean_diff']:+.2f}"
            ci = "" if math.isnan(r["ci_diff"]) else (
                f"[{100 * (r['mean_diff'] - r['ci_diff']):+.2f}, "
                f"{100 * (r['mean_diff'] + r['ci_diff']):+.2f}]")
            out.append(f"| {r['ds']} / {r['model']} / {r['mode']} | {r['bs']} | "
                       f"{r['comparison']} | {r['n']} | {mean} | {ci} | {r['verdict']} |")
        out.append("")
    return "\n".join(out)


def headline(table: pd.DataFrame) -> pd.DataFrame:
    """Per cell, the selection the report leads with: validation where there is one."""
    has_val = table.groupby([*GROUP, "bs", "method"])["selection"].transform(
        lambda s: (s == "validation").any())
    return table[(table["selection"] == "validation") | (~has_val & (table["selection"] == "test"))]


# -- plots ---------------------------------------------------------------------------------
def _winners(table: pd.DataFrame) -> dict[tuple, list[str]]:
    """Trial ids of each cell's chosen configuration (on validation where there is one)."""
    return {tuple(row[GROUP + ["bs", "method"]]): row["trial_ids"].split(",")
            for _, row in headline(table).iterrows()}


def plot_curves(table, trials, epochs, out: Path) -> list[Path]:
    """Test accuracy over epochs, one line per method, one figure per batch size."""
    files = []
    winners = _winners(table)
    scored = epochs.dropna(subset=["test_acc"])
    for key, g in headline(table).groupby([*GROUP, "bs"], sort=True):
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in sorted(g["method"]):
            ids = winners[(*key, method)]
            rows = scored[scored["trial_id"].isin(ids)]
            stage = "linear" if key[2] == "bt" else "train"
            rows = rows[rows["stage"] == stage]
            curve = rows.groupby("epoch")["test_acc"].mean()
            if len(curve):
                line, = ax.plot(curve.index + 1, 100 * curve.values, marker="o", ms=3,
                                label=method)
                val = rows.dropna(subset=["val_acc"]).groupby("epoch")["val_acc"].mean()
                if len(val):
                    ax.plot(val.index + 1, 100 * val.values, ls="--", color=line.get_color())
        ax.set(xlabel="epoch", ylabel="accuracy (%): test, validation dashed",
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
    winners = _winners(table)
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


def plot_layers(table: pd.DataFrame, layers: pd.DataFrame, out: Path) -> list[Path]:
    """The paper's layer-wise analysis: each layer's trust ratio over the steps, for the first
    seed of each cell's chosen configuration; one figure per batch size, one panel per method,
    layers coloured from input (dark) to output (light)."""
    if layers.empty:
        return []
    files = []
    winners = _winners(table)
    for key, g in headline(table).groupby([*GROUP, "bs"], sort=True):
        panels = [(m, layers[layers["trial_id"] == winners[(*key, m)][0]])
                  for m in sorted(g["method"])]
        panels = [(m, rows) for m, rows in panels if len(rows)]
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1, 3.8),
                                 sharey=True, squeeze=False, layout="constrained")
        colours = plt.get_cmap("viridis")
        for ax, (method, rows) in zip(axes[0], panels):
            depth = max(int(rows["layer_index"].max()), 1)
            for index, layer in rows.groupby("layer_index"):
                ratio = layer["trust_ratio"].where(layer["trust_ratio"] > 0)
                ax.plot(layer["step"], ratio, color=colours(index / depth), lw=1)
            ax.set(xlabel="step", yscale="log", title=method)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("trust ratio")
        fig.colorbar(plt.cm.ScalarMappable(cmap=colours), ax=axes[0].tolist(),
                     label="layer: input (0) to output (1)")
        fig.suptitle(f"per-layer trust ratios: {key[0]} {key[1]} {key[2]}, batch {key[3]}",
                     fontsize=10)
        files.append(_save(fig, out / f"layers_{key[0]}_{key[1]}_{key[2]}_bs{key[3]}.png",
                           tight=False))
    return files


def plot_pretrain_losses(table, trials, epochs, out: Path) -> list[Path]:
    """Barlow Twins pre-training loss over epochs, one line per method, per batch size."""
    files = []
    winners = _winners(table)
    pre = epochs[(epochs["stage"] == "pretrain") & epochs["cl_loss"].notna()]
    lead = headline(table)
    for key, g in lead[lead["mode"] == "bt"].groupby([*GROUP, "bs"], sort=True):
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


def _save(fig, path: Path, tight: bool = True) -> Path:
    if tight:  # (a figure with layout="constrained" lays itself out)
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- provenance ------------------------------------------------------------------------------
def _counted(values: pd.Series, what: str) -> str:
    """Distinct values with how many trials had each, the most common first."""
    counts = values.dropna().value_counts()
    if counts.empty:
        return "unknown"
    if len(counts) == 1:
        return str(counts.index[0])
    return "; ".join(f"{v} ({n} {what})" for v, n in counts.items())


def _code(row: pd.Series) -> str:
    if pd.isna(row["versions"]) and pd.isna(row["command"]):
        return "not recorded (the trial predates provenance records)"
    if pd.isna(row["git_commit"]) or not row["git_commit"]:
        return "not a git checkout"
    text = f"commit {row['git_commit'][:12]}"
    if row["git_dirty"] is True or row["git_dirty"] == 1:
        text += f" with uncommitted changes (diff sha256 {str(row['git_diff_sha256'])[:12]})"
    return text


def _versions(text: Any) -> str:
    if not isinstance(text, str):
        return "unknown"
    return ", ".join(f"{k} {v or '-'}" for k, v in json.loads(text).items())


def provenance_markdown(store: Store, experiment: str | None, trials: pd.DataFrame) -> str:
    """Which code, packages and machines produced the trials, and the commands that ran them
    (from the trials table and provenance.json); several values are listed with their counts,
    so a grid resumed from other code shows it."""
    if trials.empty:
        return ""
    code = trials.apply(_code, axis=1)
    hosts = {h for cell in trials["hosts"].dropna() for h in str(cell).split(",")}
    gpus = _counted(trials["gpus"], "trials") if trials["gpus"].notna().any() else "none"
    if trials["cuda_version"].notna().any():
        gpus += (f"; CUDA {_counted(trials['cuda_version'], 'trials')}, "
                 f"cuDNN {_counted(trials['cudnn_version'], 'trials')}")
    lines = ["## Provenance", "",
             f"- code: {_counted(code, 'trials')}",
             f"- packages: {_counted(trials['versions'].map(_versions), 'trials')}",
             f"- DDP workers ran on: {', '.join(sorted(hosts)) or 'unknown'}; GPUs: {gpus}",
             f"- trial drivers ran on: {_counted(trials['driver_host'], 'trials')}; commands "
             f"on: {_counted(trials['command_host'], 'trials')}"]
    names = [experiment] if experiment else sorted(trials["experiment"].unique())
    for name in names:
        for i, run in enumerate(store.provenance(name)):
            what = "started" if i == 0 else "resumed" if "trial_id" not in run else "ran"
            lines.append(f"- {name}: {what} {run.get('started_at', '')} on {run.get('host')}: "
                         f"`{run.get('command')}`")
    return "\n".join(lines) + "\n"


def write_report(store: Store, experiment: str | None, out: str | Path | None) -> Path:
    """Write report.md, table.csv, points.csv, paired.csv and the PNGs; returns the folder."""
    folder = Path(out) if out else _default_out(store, experiment)
    folder.mkdir(parents=True, exist_ok=True)
    trials = store.read_trials(experiment)
    epochs = store.read_epochs(experiment)
    finished = trials[trials["status"].isin(ENDED)]
    table = paper_table(finished)
    points = _points(finished)
    pairs = paired_differences(table, finished) if not table.empty else pd.DataFrame()
    table.to_csv(folder / "table.csv", index=False)
    points.to_csv(folder / "points.csv", index=False)
    pairs.to_csv(folder / "paired.csv", index=False)
    counts = trials["status"].value_counts().to_dict()
    lines = [f"# Report: {experiment or 'all experiments'} ({store.uri})", "",
             f"{len(trials)} trials: " + ", ".join(f"{v} {k}" for k, v in counts.items()), "",
             markdown_tables(table), markdown_pairs(pairs)]
    images: list[Path] = []
    if not table.empty:
        images += plot_curves(table, finished, epochs, folder)
        images += plot_heatmaps(finished, folder)
        images += plot_schedules(finished, epochs, folder)
        images += plot_trust_ratios(table, finished, epochs, folder)
        images += plot_layers(table, store.read_layers(experiment), folder)
        images += plot_pretrain_losses(table, finished, epochs, folder)
    provenance = provenance_markdown(store, experiment, trials)
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images] + ["", provenance]
    text = "\n".join(lines).rstrip() + "\n"
    (folder / "report.md").write_text(text)
    print(markdown_tables(table))
    for sentence in pairs.get("verdict", []):
        print(sentence)
    print(provenance)
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
