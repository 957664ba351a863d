import pandas as pd

from tvlars_ray.config import TrialConfig
from tvlars_ray.report import export_reference, paper_table, write_report
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
    tv = table[(table.method == "TVLARS") & (table.bs == 512)].iloc[0]
    assert tv["lmbda"] == 1e-4 and tv["lr"] == 1.0 and tv["seeds"] == 2
    assert abs(tv["best_acc"] - 0.695) < 1e-9 and abs(tv["best_std"] - 0.005) < 1e-9
    lars = table[(table.method == "LARS") & (table.bs == 1024)].iloc[0]
    assert lars["lr"] == 1.0 and lars["diverged"] == 2 and lars["trials"] == 4
    assert set(table["method"]) == {"LARS", "TVLARS", "LAMB + warm-up"}

    out = write_report(store, "study", tmp_path / "report")
    text = (out / "report.md").read_text()
    assert "| batch | LAMB + warm-up | LARS | TVLARS |" in text
    assert "69.50 ± 0.50 (lr 1, λ 0.0001)" in text
    assert "2/4 diverged" in text
    pngs = {p.name for p in out.glob("*.png")}
    assert "schedules.png" in pngs and "trust_ratios.png" in pngs
    assert any(n.startswith("curves_cifar10_resnet18_clf_bs512") for n in pngs)
    assert "heatmap_cifar10_resnet18_clf_bs512_none.png" in pngs  # two lambdas at one lr
    csv = pd.read_csv(out / "table.csv")
    assert len(csv) == 6


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
    assert "| 512 | 35.00 (lr 0.01) | 45.00 (lr 0.01, λ 0.001) |" in text
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
