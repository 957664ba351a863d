import pandas as pd
import pytest

from tvlars_ray.config import TrialConfig
from tvlars_ray.report import (
    export_reference,
    paired_differences,
    paper_table,
    provenance_markdown,
    write_report,
)
from tvlars_ray.store import Store


def _fill(store: Store) -> None:
    """A small study: LARS and TVLARS without warm-up, LAMB with, two seeds, one divergence."""
    base = dict(ds="cifar10", model="resnet18", epochs=3, wd=5e-4)
    plan = []
    for bs in (512, 1024):
        for seed in (0, 1):
            plan.append(dict(opt="lars", lr=1.0, bs=bs, seed=seed, accs=[0.3, 0.5, 0.6]))
            plan.append(dict(opt="lars", lr=2.0, bs=bs, seed=seed, accs=None))  # diverges
            for lmbda, top in ((1e-4, 0.7), (1e-3, 0.66)):
                accs = [0.4, top - 0.01 * seed, top - 0.02]
                plan.append(dict(opt="tvlars", lr=1.0, lmbda=lmbda, bs=bs, seed=seed, accs=accs))
            plan.append(dict(opt="lamb", lr=0.1, bs=bs, seed=seed, sd="lars-warm",
                             accs=[0.2, 0.4, 0.55]))
    for i, spec in enumerate(plan):
        accs = spec.pop("accs")
        cfg = TrialConfig.from_dict({**base, **spec})
        tid = f"t{i:02d}"
        if accs is None:
            store.write_epoch("study", tid, cfg, {"epoch": 0, "step": 10,
                                                  "train_loss": float("nan"), "diverged": True})
            store.write_trial("study", tid, cfg, "diverged")
            continue
        for epoch, acc in enumerate(accs):
            store.write_epoch("study", tid, cfg, {
                "epoch": epoch, "step": 10 * (epoch + 1), "train_loss": 1.0, "train_acc": acc,
                "test_loss": 1.2, "test_acc": acc, "lr_now": cfg.lr, "diverged": False,
                "trust_ratio_mean": 0.01, "trust_ratio_min": 0.001, "trust_ratio_max": 0.05,
                "phi": 0.9 if cfg.opt == "tvlars" else None})
        store.write_trial("study", tid, cfg, "completed")


def test_report_renders_tables_and_plots(tmp_path):
    store = Store(str(tmp_path / "store"))
    _fill(store)
    table = paper_table(store.read_trials("study"))
    assert set(table["selection"]) == {"test"}  # no validation split in these trials
    tv = table[(table.method == "TVLARS") & (table.bs == 512)].iloc[0]
    assert tv["lmbda"] == 1e-4 and tv["lr"] == 1.0 and tv["n"] == 2
    # mean, sample std (ddof 1) and the 95% t half-width with 1 degree of freedom
    assert abs(tv["best_mean"] - 0.695) < 1e-9 and abs(tv["best_std"] - 0.005 * 2 ** 0.5) < 1e-9
    assert abs(tv["best_ci"] - 12.7062 * 0.005) < 1e-5
    lars = table[(table.method == "LARS") & (table.bs == 1024)].iloc[0]
    assert lars["lr"] == 1.0 and lars["runs_diverged"] == 2 and lars["runs"] == 4
    assert set(table["method"]) == {"LARS", "TVLARS", "LAMB + warm-up"}

    out = write_report(store, "study", tmp_path / "report")
    text = (out / "report.md").read_text()
    assert "| batch | LAMB + warm-up | LARS | TVLARS |" in text
    assert "69.50 ± 6.35 (n 2, sd 0.71; lr 1, λ 0.0001)" in text
    assert "2/4 runs diverged" in text
    pngs = {p.name for p in out.glob("*.png")}
    assert "schedules.png" in pngs and "trust_ratios.png" in pngs
    assert any(n.startswith("curves_cifar10_resnet18_clf_bs512") for n in pngs)
    assert "heatmap_cifar10_resnet18_clf_bs512_none.png" in pngs  # two lambdas at one lr
    csv = pd.read_csv(out / "table.csv")
    assert len(csv) == 6
    assert len(pd.read_csv(out / "paired.csv")) == 4  # TVLARS - LARS, - LAMB; two batch sizes


def test_heatmap_when_lr_and_lambda_vary(tmp_path):
    store = Store(str(tmp_path / "s"))
    for i, (lr, lmbda) in enumerate([(1, 1e-4), (2, 1e-4), (1, 1e-3), (2, 1e-3)]):
        cfg = TrialConfig(ds="synthetic", opt="tvlars", lr=lr, lmbda=lmbda, epochs=1)
        store.write_epoch("h", f"t{i}", cfg, {"epoch": 0, "test_acc": 0.1 * (i + 1),
                                              "diverged": False})
        store.write_trial("h", f"t{i}", cfg, "completed")
    out = write_report(store, "h", tmp_path / "r")
    assert (out / "heatmap_synthetic_resnet18_clf_bs32_none.png").stat().st_size > 1000


def test_reference_export_reads_back(tmp_path):
    store = Store(str(tmp_path / "store"))
    _fill(store)
    written = export_reference(store, "study", tmp_path / "runs")
    names = {p.relative_to(tmp_path / "runs").as_posix() for p in written}
    assert "cifar10_resnet18/lars/512_1.0_None_s0.parquet" in names
    assert "cifar10_resnet18/tvlars_0.0001/1024_1.0_None_s1.parquet" in names
    assert "cifar10_resnet18/lamb/512_0.1_lars-warm_s0.parquet" in names
    frame = pd.read_parquet(tmp_path / "runs/cifar10_resnet18/tvlars_0.001/512_1.0_None_s0.parquet")
    assert list(frame.columns) == ["train_loss", "train_acc", "test_loss", "test_acc"]
    assert list(frame["test_acc"].round(6)) == [40.0, 66.0, 64.0]


def test_barlow_twins_table_and_pretraining_curves(tmp_path):
    store = Store(str(tmp_path / "s"))
    for i, (opt, sd) in enumerate([("lars", "lars-warm"), ("tvlars", "none")]):
        cfg = TrialConfig(mode="bt", ds="cifar10", opt=opt, sd=sd, bs=512, cl_epochs=2, epochs=2)
        for epoch in range(2):
            store.write_epoch("bt", f"t{i}", cfg, {"stage": "pretrain", "epoch": epoch,
                                                   "cl_loss": 100.0 / (epoch + 1),
                                                   "diverged": False})
            store.write_epoch("bt", f"t{i}", cfg, {"stage": "linear", "epoch": epoch,
                                                   "test_acc": 0.3 + 0.1 * i + 0.05 * epoch,
                                                   "test_acc5": 0.8, "diverged": False})
        store.write_trial("bt", f"t{i}", cfg, "completed")
    out = write_report(store, "bt", tmp_path / "r")
    text = (out / "report.md").read_text()
    assert "linear-eval top-1" in text and "| batch | LARS + warm-up | TVLARS |" in text
    assert "| 512 | 35.00 (n 1; lr 0.01) | 45.00 (n 1; lr 0.01, λ 0.001) |" in text
    assert (out / "pretrain_cifar10_resnet18_bs512.png").exists()


def test_provenance_section_names_the_code_packages_and_machines(tmp_path, capsys):
    """Trials resumed from other code show both commits, with their counts."""
    store = Store(str(tmp_path / "s"))
    versions = '{"python": "3.11.9", "ray": "2.60.0", "torch": "2.14.1"}'
    runs = [("a" * 40, False, None), ("a" * 40, False, None), ("b" * 40, True, "c" * 64)]
    for i, (commit, dirty, diff) in enumerate(runs):
        cfg = TrialConfig(ds="synthetic", lr=0.1 * (i + 1), epochs=1)
        store.write_epoch("p", f"t{i}", cfg, {"epoch": 0, "test_acc": 0.5, "diverged": False,
                                              "hosts": f"node{i % 2}",
                                              "gpus": "2 x NVIDIA H200", "cuda_version": "13.0",
                                              "cudnn_version": "91000"})
        store.write_trial("p", f"t{i}", cfg, "completed", here=True, provenance={
            "git_commit": commit, "git_dirty": dirty, "git_diff_sha256": diff,
            "versions": versions, "command": "python -m tvlars_ray.run grid",
            "command_host": "head"})
    store.add_provenance("p", {"command": "python -m tvlars_ray.run grid", "host": "head",
                               "started_at": "2026-11-29T00:00:00+00:00"})
    store.add_provenance("p", {"command": "python -m tvlars_ray.run grid --resume",
                               "host": "head", "started_at": "2026-11-30T00:00:00+00:00"})
    out = write_report(store, "p", tmp_path / "r")
    text = (out / "report.md").read_text()
    section = text.split("## Provenance", 1)[1]
    assert f"commit {'a' * 12} (2 trials)" in section
    assert f"commit {'b' * 12} with uncommitted changes (diff sha256 {'c' * 12}) (1 trials)" \
        in section
    assert "python 3.11.9, ray 2.60.0, torch 2.14.1" in section
    assert "DDP workers ran on: node0, node1; GPUs: 2 x NVIDIA H200; CUDA 13.0, cuDNN 91000" \
        in section
    assert "commands on: head" in section
    assert "p: started 2026-11-29T00:00:00+00:00 on head: `python -m tvlars_ray.run grid`" \
        in section and "resumed 2026-11-30" in section
    assert "## Provenance" in capsys.readouterr().out  # the report command prints it too
def _paired_store(store: Store) -> None:
    """Three seeds at batch 512, one epoch each, with a validation split; see the test."""
    plan = [  # (opt, sd, lr, lmbda, final test acc per seed (None: diverged), val acc per seed)
        ("lars", "none", 1.0, None, [0.60, 0.62, 0.61], [0.58, 0.60, 0.59]),
        ("lars", "none", 2.0, None, [0.70, 0.71, None], [0.80, 0.80, None]),
        ("tvlars", "none", 1.0, 1e-4, [0.65, 0.66, 0.67], [0.70, 0.70, 0.70]),
        ("tvlars", "none", 1.0, 1e-3, [0.68, 0.69, 0.70], [0.60, 0.60, 0.60]),
        ("lamb", "lars-warm", 0.1, None, [0.64, 0.61, 0.68], [0.60, 0.60, 0.60]),
        ("lars", "lars-warm", 1.0, None, [0.60, 0.605, None], [0.60, 0.60, None]),
    ]
    i = 0
    for opt, sd, lr, lmbda, tests, vals in plan:
        for seed, (test, val) in enumerate(zip(tests, vals)):
            cfg = TrialConfig(ds="cifar10", opt=opt, sd=sd, lr=lr, lmbda=lmbda or 1e-3, bs=512,
                              seed=seed, epochs=1)
            tid, i = f"p{i:02d}", i + 1
            if test is None:
                store.write_epoch("p", tid, cfg, {"epoch": 0, "train_loss": float("nan"),
                                                  "diverged": True})
                store.write_trial("p", tid, cfg, "diverged")
                continue
            store.write_epoch("p", tid, cfg, {"epoch": 0, "train_loss": 1.0, "test_acc": test,
                                              "val_acc": val, "val_loss": 1.0,
                                              "diverged": False})
            store.write_trial("p", tid, cfg, "completed")


def test_selection_on_validation_beside_the_papers_way(tmp_path):
    store = Store(str(tmp_path / "s"))
    _paired_store(store)
    table = paper_table(store.read_trials("p"))
    pick = {(r.method, r.selection): r for r in table.itertuples()}
    # validation picks lambda 1e-4 (val 0.70), the test set picks 1e-3 (test 0.69)
    assert pick["TVLARS", "validation"].lmbda == 1e-4
    assert pick["TVLARS", "validation"].final_mean == pytest.approx(0.66)
    assert pick["TVLARS", "test"].lmbda == 1e-3
    assert pick["TVLARS", "test"].best_mean == pytest.approx(0.69)
    # LARS lr 2 scores higher on both, but one of its seeds diverged: lr 1 is chosen
    assert pick["LARS", "validation"].lr == 1.0 and pick["LARS", "test"].lr == 1.0
    assert pick["LARS", "test"].runs_diverged == 1 and pick["LARS", "test"].runs == 6
    # every configuration of LARS + warm-up diverged once: it is chosen, its seed counted
    warm = pick["LARS + warm-up", "validation"]
    assert (warm.n, warm.n_diverged) == (2, 1)
    text = (write_report(store, "p", tmp_path / "r") / "report.md").read_text()
    assert "chosen on validation: final test accuracy (%)" in text
    assert "the paper's way, chosen on test: best test accuracy (%)" in text
    assert "66.00 ± 2.48 (n 3, sd 1.00; lr 1, λ 0.0001)" in text
    assert "61.00 ± 2.48 (n 3, sd 1.00; lr 1; 1/6 runs diverged)" in text
    assert "60.25 ± 3.18 (n 2 + 1 diverged, sd 0.35; lr 1; 1/3 runs diverged)" in text


def test_paired_differences_on_a_hand_made_store(tmp_path):
    store = Store(str(tmp_path / "s"))
    _paired_store(store)
    trials = store.read_trials("p")
    pairs = paired_differences(paper_table(trials), trials)
    got = {(r.selection, r.comparison): r for r in pairs.itertuples()}
    assert len(got) == 6  # TVLARS minus three baselines, two selections
    lars = got["validation", "TVLARS - LARS"]  # [0.65 0.66 0.67] - [0.60 0.62 0.61]
    assert (lars.n, lars.seeds) == (3, "0,1,2")
    assert lars.mean_diff == pytest.approx(0.05) and lars.std_diff == pytest.approx(0.01)
    assert lars.ci_diff == pytest.approx(4.302653 * 0.01 / 3 ** 0.5, rel=1e-6)
    assert lars.verdict == "TVLARS ahead of LARS by 5.00 ± 2.48 points over 3 seeds"
    lamb = got["validation", "TVLARS - LAMB + warm-up"]  # +0.01, +0.05, -0.01
    assert lamb.mean_diff == pytest.approx(0.05 / 3)
    assert lamb.verdict.startswith("TVLARS vs LAMB + warm-up: no difference detectable over 3")
    warm = got["validation", "TVLARS - LARS + warm-up"]  # seed 2 diverged for the baseline
    assert (warm.n, warm.second_diverged, warm.first_diverged) == (2, 1, 0)
    assert warm.verdict == ("TVLARS ahead of LARS + warm-up by 5.25 ± 3.18 points over 2 seeds; "
                            "not paired: LARS + warm-up diverged on seed 2")
    # the paper's way pairs the test-chosen lambda 1e-3: [0.68 0.69 0.70] - [0.60 0.62 0.61]
    assert got["test", "TVLARS - LARS"].mean_diff == pytest.approx(0.08)
    out = write_report(store, "p", tmp_path / "r")
    assert "TVLARS ahead of LARS by 5.00 ± 2.48 points over 3 seeds" in (
        out / "report.md").read_text()
    assert len(pd.read_csv(out / "paired.csv")) == 6


def test_layer_plot_for_the_chosen_trials(tmp_path):
    store = Store(str(tmp_path / "s"))
    _fill(store)
    trials = store.read_trials("study")
    for tid in trials.loc[trials["opt"] != "sgd", "trial_id"]:
        steps = [10, 20, 30]
        columns = {"step": [], "layer": [], "layer_index": [], "numel": [], "trust_ratio": [],
                   "weight_norm": [], "update_norm": [], "lr_now": []}
        for step in steps:
            for i in range(4):
                for key, value in (("step", step), ("layer", f"conv{i}.weight"),
                                   ("layer_index", i), ("numel", 100), ("lr_now", 1.0),
                                   ("trust_ratio", 1e-3 * (i + 1) / step ** 0.5),
                                   ("weight_norm", 1.0), ("update_norm", 2.0)):
                    columns[key].append(value)
        store.write_layers("study", tid, "train", 2, columns)
    out = write_report(store, "study", tmp_path / "r")
    for bs in (512, 1024):
        png = out / f"layers_cifar10_resnet18_clf_bs{bs}.png"
        assert png.stat().st_size > 5000
        assert f"![{png.stem}]({png.name})" in (out / "report.md").read_text()


def test_a_pair_names_every_seed_it_could_not_pair():
    from tvlars_ray.report import _pair

    got = _pair("TVLARS", {0: 0.5, 1: None, 2: 0.6, 3: None}, "LARS",
                {0: 0.4, 1: None, 2: None, 3: 0.3})
    assert got["n"] == 1 and got["seeds"] == "0"
    assert got["verdict"] == ("TVLARS vs LARS: +10.00 points on 1 seed (no interval from one "
                              "seed); not paired: TVLARS diverged on seed 3; not paired: LARS "
                              "diverged on seed 2; not paired: both diverged on seed 1")


def test_trials_without_provenance_are_said_to_have_none(tmp_path):
    """Trials stored before provenance was recorded: 'not recorded', not 'not a git checkout'."""
    columns = ["experiment", "git_commit", "git_dirty", "git_diff_sha256", "versions", "command",
               "hosts", "gpus", "cuda_version", "cudnn_version", "driver_host", "command_host"]
    trials = pd.DataFrame([dict.fromkeys(columns) | {"experiment": "old"}])
    text = provenance_markdown(Store(str(tmp_path)), "old", trials)
    assert "code: not recorded" in text and "git checkout" not in text
