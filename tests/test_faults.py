"""The store survives bad names, damaged files, interrupts, concurrent runs and full disks.

Every test works in a temporary folder that also holds a file *beside* the store, and checks
that it survives. The Ray tests are few and tiny (synthetic data, the small CNN, a few hundred
images, 2-3 epochs); runs resumed in this process share one local Ray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tvlars_ray.config import TrialConfig
from tvlars_ray.run import main
from tvlars_ray.store import (
    LOCK_FILE,
    MARKER,
    DamagedFileWarning,
    Lock,
    Store,
    StoreError,
    StoreWriteError,
    lost_epochs,
)
from tvlars_ray.trial import rerun

ROOT = Path(__file__).resolve().parent.parent
# One DDP worker a trial: these tests are about the store, signals and resumes, not ranks
# (tests/test_train.py has those); a grid's two trials then run side by side on 2 CPUs.
TINY = {"ds": "synthetic", "model": "cnn", "stem": "cifar", "train_subset": 256,
        "test_subset": 64, "epochs": 3, "bs": 32, "num_workers": 1, "cpus_per_worker": 1}
BAD_NAMES = ["..", ".", "../x", "/tmp/elsewhere", "a/b", "", ".hidden", "x" * 101, "a b"]


@pytest.fixture
def place(tmp_path):
    """A folder holding the store and, beside it, a file no command may touch."""
    beside = tmp_path / "beside.txt"
    beside.write_text("keep me")
    yield tmp_path
    assert beside.read_text() == "keep me", "a file beside the store was touched"


def _metrics(epoch: int, acc: float = 0.5) -> dict:
    return {"epoch": epoch, "step": 10 * (epoch + 1), "train_loss": 1.0, "train_acc": acc,
            "test_loss": 1.0, "test_acc": acc, "diverged": False}


def _fill(st: Store, experiment: str, trials: int = 2, epochs: int = 3) -> TrialConfig:
    cfg = TrialConfig(ds="synthetic", model="cnn", epochs=epochs)
    for t in range(trials):
        for e in range(epochs):
            st.write_epoch(experiment, f"t{t}", cfg, _metrics(e, 0.1 * (e + 1)))
        st.write_trial(experiment, f"t{t}", cfg, "completed")
    return cfg


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a copy cut short


# -- 1. names --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_name_that_is_not_one_plain_folder_is_refused_everywhere(place, name, capsys,
                                                                  no_ray):
    import ray

    store = place / "store"
    _fill(Store(str(store)), "kept")
    for argv in (["grid", "--overwrite"], ["grid", "--resume"], ["optuna", "--overwrite"],
                 ["trial", "--local", "--ds", "synthetic"], ["status"], ["report"], ["export"],
                 ["check"]):
        assert main([*argv, "--store", str(store), "--experiment", name]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "is not allowed" in err, err
    assert not ray.is_initialized()
    assert sorted(p.name for p in place.iterdir()) == ["beside.txt", "store"]
    assert Store(str(store)).experiments() == ["kept"]
    with pytest.raises(StoreError):
        Store(str(store)).path(name)


def test_a_space_naming_an_experiment_outside_the_store_is_refused(place, capsys):
    space = place / "evil.yaml"
    space.write_text(yaml.safe_dump({"experiment": "../evil", "fixed": TINY}))
    store = place / "store"
    assert main(["grid", "--space", str(space), "--store", str(store), "--overwrite"]) == 2
    assert "is not allowed" in capsys.readouterr().err
    assert not (place / "evil").exists()


def test_overwrite_deletes_only_what_this_tool_created(place, capsys):
    store = place / "store"
    st = Store(str(store))
    _fill(st, "mine")  # made by this tool: holds the marker
    assert (store / "mine" / MARKER).is_file()
    old = store / "old"  # an experiment of an older version: no marker
    (old / "trials").mkdir(parents=True)
    (old / "trials" / "x.parquet").write_bytes(b"precious")
    (store / "linked").symlink_to(store / "mine")
    for name, hint in (("old", f"rm -r {old}"), ("linked", "remove the link by hand")):
        code = main(["grid", "--store", str(store), "--experiment", name, "--overwrite"])
        err = capsys.readouterr().err
        assert code == 2 and "will not" in err and hint in err, err
        assert "\n" not in err.strip(), err
    assert (old / "trials" / "x.parquet").read_bytes() == b"precious"
    with pytest.raises(StoreError, match=r"delete it by hand \(rm -r"):
        st.delete("old")
    # the tool's own experiment is emptied, its marker kept; nothing else goes
    st.delete("mine")
    assert [p.name for p in (store / "mine").iterdir()] == [MARKER]
    assert sorted(p.name for p in store.iterdir()) == ["linked", "mine", "old"]


# -- 2. readers never create -----------------------------------------------------------------
def test_readers_never_create_a_store_or_an_experiment(place, capsys):
    missing = place / "no" / "such" / "store"
    for argv in (["status"], ["report"], ["export", "--out", str(place / "runs")], ["check"]):
        assert main([*argv, "--store", str(missing)]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: no store at") and "\n" not in err.strip(), err
    assert sorted(p.name for p in place.iterdir()) == ["beside.txt"]

    store = place / "store"
    _fill(Store(str(store)), "real")
    for argv in (["status"], ["report"], ["export", "--out", str(place / "runs")]):
        assert main([*argv, "--store", str(store), "--experiment", "ghost"]) == 2
        assert "no experiment 'ghost'" in capsys.readouterr().err
    assert sorted(p.name for p in store.iterdir()) == ["real"]
    # report --out creates its own folder and nothing else; a report is not an experiment
    out = place / "reports" / "real"
    assert main(["report", "--store", str(store), "--experiment", "real", "--out", str(out)]) == 0
    assert (out / "report.md").exists()
    assert main(["report", "--store", str(store)]) == 0  # all experiments: <store>/report
    assert Store(str(store)).experiments() == ["real"]
    capsys.readouterr()
    assert main(["status", "--store", str(store)]) == 0
    assert "experiment report" not in capsys.readouterr().out


# -- 3. damaged files ------------------------------------------------------------------------
def test_damaged_files_are_skipped_named_counted_then_repaired(place, capsys):
    store = place / "store"
    st = Store(str(store))
    cfg = _fill(st, "exp", trials=3)
    epoch_file = store / "exp" / "epochs" / "t0" / "train-00001.parquet"
    good = pd.read_parquet(epoch_file)
    _truncate(epoch_file)
    (store / "exp" / "trials" / "t1.parquet").write_bytes(b"not parquet at all")
    (store / "exp" / "epochs" / "t2" / ".tmp-dead-train-00003.parquet").write_bytes(b"PAR1")

    with pytest.warns(DamagedFileWarning, match="train-00001.parquet"):
        epochs = Store(str(store)).read_epochs("exp")
    assert len(epochs) == 8  # 9 stored, one damaged
    with pytest.warns(DamagedFileWarning, match="t1.parquet"):
        assert sorted(Store(str(store)).read_trials("exp")["trial_id"]) == ["t0", "t2"]

    assert main(["status", "--store", str(store)]) == 0
    captured = capsys.readouterr()
    assert "warning: skipped damaged file" in captured.err
    assert str(epoch_file) in captured.err and "2 damaged files skipped" in captured.out
    assert main(["report", "--store", str(store), "--experiment", "exp"]) == 0
    assert main(["export", "--store", str(store), "--out", str(place / "runs")]) == 0
    capsys.readouterr()

    assert main(["check", "--store", str(store)]) == 1
    out = capsys.readouterr().out
    assert f"damaged: {epoch_file}" in out and "t1.parquet" in out
    assert "trial t0 lacks epochs it ran: train 1" in out
    assert "trial t1 has epochs but no readable row" in out and ".tmp-dead" in out

    assert main(["check", "--store", str(store), "--repair"]) == 0
    out = capsys.readouterr().out
    assert "moved aside" in out and "--resume" in out
    assert not epoch_file.exists()
    aside = list((store / "exp" / "damaged").rglob("*.parquet"))
    assert sorted(p.name for p in aside) == [".tmp-dead-train-00003.parquet", "t1.parquet",
                                             "train-00001.parquet"]
    # t1's row is rebuilt from its epochs; t0 waits for --resume to run epoch 1 again
    trials = Store(str(store)).read_trials("exp").set_index("trial_id")
    assert trials.loc["t1", "status"] == "completed" and trials.loc["t1", "epochs_done"] == 3
    assert trials.loc["t0", "status"] == "stopped" and "lost 1 epochs" in trials.loc[
        "t0", "error"]
    plan = rerun(st, "exp", "t0", cfg)
    assert not plan.done and plan.fill == [("train", 1)]
    assert rerun(st, "exp", "t1", cfg).done and rerun(st, "exp", "t2", cfg).done
    assert main(["check", "--store", str(store), "--experiment", "exp"]) == 1  # still lost
    assert "train 1" in capsys.readouterr().out
    # putting the epoch back (what --resume does) leaves nothing to refill
    st.write_epoch("exp", "t0", cfg, {k: good[k].iloc[0] for k in ("epoch", "test_acc")})
    assert rerun(st, "exp", "t0", cfg).done


def test_a_damaged_layer_file_takes_its_epoch_aside_for_the_refill(place, capsys):
    """An epoch is its row and its per-layer history: --repair moves both aside, so the
    refill --resume runs writes both again (an epoch row alone would leave a hole in the
    layer plots for good)."""
    store = place / "store"
    st = Store(str(store))
    cfg = _fill(st, "exp", trials=1)
    for epoch in range(3):
        st.write_layers("exp", "t0", "train", epoch, {
            "step": [epoch + 1], "layer": ["conv.weight"], "layer_index": [0], "numel": [9],
            "trust_ratio": [0.5], "weight_norm": [1.0], "update_norm": [2.0], "lr_now": [0.1]})
    layer_file = store / "exp" / "layers" / "t0" / "train-00001.parquet"
    _truncate(layer_file)
    assert main(["check", "--store", str(store), "--repair"]) == 0
    capsys.readouterr()
    assert not layer_file.exists()
    assert not (store / "exp" / "epochs" / "t0" / "train-00001.parquet").exists()
    aside = sorted(p.relative_to(store / "exp" / "damaged").parts[1:]
                   for p in (store / "exp" / "damaged").rglob("*.parquet"))
    assert aside == [("epochs", "t0", "train-00001.parquet"),
                     ("layers", "t0", "train-00001.parquet")]
    assert rerun(st, "exp", "t0", cfg).fill == [("train", 1)]
    assert list(st.read_layers("exp")["epoch"]) == [0, 2]


def test_lost_epochs_tell_a_gap_from_a_trial_cut_short():
    cfg = TrialConfig(ds="synthetic", epochs=5)
    stored = pd.DataFrame({"stage": ["train"] * 3, "epoch": [0, 2, 3],
                           "diverged": [False] * 3})
    assert lost_epochs(cfg, stored, "stopped") == [("train", 1)]
    assert lost_epochs(cfg, stored, "completed") == [("train", 1), ("train", 4)]
    assert lost_epochs(cfg, stored, "stopped", [("train", 4)]) == [("train", 1), ("train", 4)]
    boom = stored.assign(diverged=[False, False, True])
    assert lost_epochs(cfg, boom, "diverged") == [("train", 1)]
    bt = TrialConfig(ds="synthetic", mode="bt", cl_epochs=2, epochs=2)
    rows = pd.DataFrame({"stage": ["pretrain", "linear"], "epoch": [0, 1],
                         "diverged": [False, False]})
    assert lost_epochs(bt, rows, "completed") == [("pretrain", 1), ("linear", 0)]


# -- 5. settings -----------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "# nothing but a comment\n\n# and another\n"])
def test_an_empty_space_file_is_refused(place, text, capsys):
    space = place / "empty.yaml"
    space.write_text(text)
    assert main(["grid", "--space", str(space), "--dry-run"]) == 2
    assert "the space is empty" in capsys.readouterr().err


# -- 7. concurrent runs ----------------------------------------------------------------------
HOLD = """
import sys, time
from tvlars_ray.store import Lock, Store
Lock(Store(sys.argv[1]), sys.argv[2], sys.argv[3], shared=sys.argv[3] == "trial").acquire()
print("held", flush=True)
time.sleep(120)
"""


def _holder(store: Path, experiment: str, command: str = "grid") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(store), experiment, command],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_running_experiment_is_refused_and_a_dead_lock_taken_over(place, capsys, no_ray):
    import ray

    store = place / "store"
    st = Store(str(store))
    _fill(st, "exp")
    owner = _holder(store, "exp")
    try:
        for argv in (["grid", "--resume"], ["grid", "--overwrite"],
                     ["optuna", "--space", "optuna-tvlars", "--resume"]):
            assert main([*argv, "--store", str(store), "--experiment", "exp"]) == 2
            err = capsys.readouterr().err
            assert f"pid {owner.pid} on host" in err and "being run by `grid`" in err, err
        assert st.holder("exp")["pid"] == owner.pid
        assert main(["status", "--store", str(store)]) == 0
        assert f"run by `grid` (pid {owner.pid}" in capsys.readouterr().out
        assert not ray.is_initialized()
    finally:
        owner.kill()  # SIGKILL: no chance to let go
        owner.wait()
    assert st.holder("exp") is None  # the OS released it with the process
    lock = Lock(st, "exp", "grid").acquire()
    try:
        assert lock.taken_over["pid"] == owner.pid  # and the next run says whose it took
    finally:
        lock.release()
    # `trial` commands share an experiment; a grid is refused while one runs
    sharer = _holder(store, "exp", "trial")
    try:
        with Lock(st, "exp", "trial", shared=True):
            pass
        with pytest.raises(StoreError, match="in use by another run"):
            Lock(st, "exp", "grid").acquire()
    finally:
        sharer.kill()
        sharer.wait()


def test_an_object_store_lock_is_taken_over_when_its_owner_is_gone(place, monkeypatch):
    """On S3 / GCS there is no OS lock: the file, the pid (same host) and a heartbeat."""
    import pyarrow.fs as pafs

    st = Store(str(place / "store"))
    _fill(st, "exp")
    st.fs = pafs.SubTreeFileSystem("/", pafs.LocalFileSystem())  # a non-local filesystem
    st.root = st.root.lstrip("/")
    assert not st.is_local
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)
    lock = Lock(st, "exp", "grid")
    st.write_json("exp", LOCK_FILE, {**lock.me(), "pid": int(dead.stdout)})
    lock.acquire()  # its process is gone
    assert lock.taken_over["pid"] == int(dead.stdout)
    with pytest.raises(StoreError, match=f"pid {os.getpid()}"):
        Lock(st, "exp", "optuna").acquire()  # this process is alive
    lock.release()
    assert not (place / "store" / "exp" / LOCK_FILE).exists()
    elsewhere = {**lock.me(), "host": "another-host", "heartbeat_at": "2000-01-01T00:00:00+00:00"}
    st.write_json("exp", LOCK_FILE, elsewhere)
    with Lock(st, "exp", "grid") as taken:  # not refreshed for years: stale
        assert taken.taken_over["host"] == "another-host"
    st.write_json("exp", LOCK_FILE, {**elsewhere, "heartbeat_at": lock.me()["heartbeat_at"]})
    with pytest.raises(StoreError, match="another-host"):
        Lock(st, "exp", "grid").acquire()


# -- 8. unwritable or full store -------------------------------------------------------------
def _mount_tmpfs(path: Path, size: str, read_only: bool = False) -> None:
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"this machine refuses to mount a tmpfs ({done.stderr.strip()}): "
                    f"run as root to test a full or read-only store")


@pytest.fixture
def small_disk(place):
    """A 16 MB filesystem of its own; unmounted afterwards."""
    disk = place / "disk"
    _mount_tmpfs(disk, "16m")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill_up(disk: Path) -> Path:
    """Write until the filesystem is full; returns the filler file."""
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass
    return filler


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob(".tmp-*") if p.is_file()]


def test_a_read_only_store_is_refused_before_anything_starts(place, capsys, no_ray):
    import ray

    store = place / "ro"
    _mount_tmpfs(store, "1m", read_only=True)
    try:
        code = main(["grid", "--store", str(store), "--set", "ds=synthetic"])
        err = capsys.readouterr().err
        assert code == 2 and "cannot write to the store" in err and "Read-only" in err, err
        assert not ray.is_initialized()
        with pytest.raises(StoreWriteError, match="Read-only"):
            Store(str(store)).write_trial("e", "t", TrialConfig(ds="synthetic"), "running")
    finally:
        subprocess.run(["umount", "-l", str(store)], check=False)


def test_a_full_disk_leaves_no_half_written_file(small_disk):
    st = Store(str(small_disk / "store"))
    cfg = _fill(st, "exp", trials=1)
    before = st.read_epochs("exp")
    _fill_up(small_disk)
    with pytest.raises(StoreWriteError, match="No space left"):
        for epoch in range(3, 100):
            st.write_epoch("exp", "t0", cfg, _metrics(epoch))
    with pytest.raises(StoreWriteError):
        st.write_trial("exp", "t0", cfg, "completed")
    assert not _temporaries(small_disk)
    after = Store(str(small_disk / "store")).read_epochs("exp")
    assert len(after) >= len(before) and after["epoch"].is_unique


def test_a_full_disk_fails_the_trial_clearly_and_resume_finishes_it(ray_session, small_disk,
                                                                  capsys):
    import threading

    store = small_disk / "store"
    st = Store(str(store))
    flags = [f"--{k}={v}" for k, v in {**TINY, "epochs": 4}.items()]
    argv = ["trial", *flags, "--opt=sgd", "--lr=0.05", "--max_failures=0", "--store",
            str(store), "--experiment", "full"]
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("rc", main(argv)))
    runner.start()
    deadline = time.time() + 180
    while runner.is_alive() and time.time() < deadline:
        if st.is_experiment("full") and len(st.read_epochs("full")) >= 1:
            break
        time.sleep(0.2)
    filler = _fill_up(small_disk)
    runner.join(timeout=180)
    assert not runner.is_alive(), "the trial hung on a full disk"
    out = capsys.readouterr().out
    assert outcome["rc"] == 1 and "No space left on device" in out, out[-3000:]
    assert not _temporaries(small_disk)
    stored = st.read_epochs("full")  # what was written is whole
    assert 1 <= len(stored) < 4 and stored["epoch"].is_unique

    filler.unlink()  # space again: check finds the trial cut off, resume finishes it
    assert main(["check", "--store", str(store)]) == 1
    trial_id = st.read_trials("full")["trial_id"].iloc[0]
    assert f"trial {trial_id} is marked running but its driver is gone" in capsys.readouterr(
        ).out
    assert main(["check", "--store", str(store), "--repair"]) == 0
    assert main(["trial", "--store", str(store), "--experiment", "full", "--resume",
                 trial_id]) == 0
    row = st.read_trials("full").iloc[0]
    assert row["status"] == "completed" and row["epochs_done"] == 4
    assert list(st.read_epochs("full")["epoch"]) == [0, 1, 2, 3]


def _tagged_processes(tag: str) -> list[str]:
    """Processes started with our tag in their environment (Ray's included)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"TVLARS_FAULT_TAG={tag}".encode() in (entry / "environ").read_bytes():
                    found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ")
                                 .decode()[:120])
            except OSError:
                continue
    return found


def _wait_gone(tag: str, seconds: float = 20.0) -> list[str]:
    deadline = time.time() + seconds
    while (left := _tagged_processes(tag)) and time.time() < deadline:
        time.sleep(0.5)
    return left


def _start(argv: list[str], tag: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TVLARS_FAULT_TAG": tag,
           "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "tvlars_ray.run", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_epochs(st: Store, experiment: str, n: int, proc: subprocess.Popen,
                     seconds: float = 240.0) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        if st.root_exists() and st.is_experiment(experiment) and len(
                st.read_epochs(experiment)) >= n:
            return
        time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"no {n} epochs stored in time: {proc.communicate()[0][-3000:]}")


def _interrupt(proc: subprocess.Popen, sig: int) -> tuple[str, float]:
    sent = time.monotonic()
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=90)
    return out, time.monotonic() - sent


# -- 6. interrupts and a kill, with 2 and 7 on a live run; 3 with real epochs -----------------
def _stored_state(st: Store, experiment: str) -> tuple[set, pd.DataFrame]:
    """The trials completed so far and the epochs stored."""
    trials = st.read_trials(experiment)
    return set(trials.loc[trials.status == "completed", "trial_id"]), st.read_epochs(experiment)


def test_a_killed_grid_resumes_every_epoch_once(ray_session, place, capsys):
    """A grid killed (SIGKILL) with one trial finished and the other part-way, a second run
    refused while it runs and a plain rerun refused after, and a --resume that finishes it:
    every epoch once, what finished not run again, and a damaged epoch refilled. One trial
    at a time (--max-concurrent 1) until the resume, so the kill lands between them. The
    grid joins this module's Ray, as a driver joins a cluster: the kill ends the driver's
    job (its trials' processes, its placement groups), not the cluster. (Ctrl-C and SIGTERM,
    which stop a run gracefully, are the study's and the trial's tests below, each on a Ray
    of its own that must not outlive it: grid and optuna stop through the same sweep code.)"""
    space = place / "stopme.yaml"
    space.write_text(yaml.safe_dump({"fixed": TINY, "grid": {"opt": {
        "sgd": {"lr": 0.05}, "lars": {"lr": 4.0}}}}))
    store = place / "store"
    st = Store(str(store))
    tag = uuid.uuid4().hex
    grid = ["grid", "--space", str(space), "--store", str(store), "--quiet", "--no-report",
            "--address", ray_session.get_runtime_context().gcs_address]
    proc = _start([*grid, "--max-concurrent", "1"], tag)
    _wait_for_epochs(st, "stopme", 1, proc)
    # a second run on the running experiment is refused, naming its owner
    assert main([*grid, "--resume"]) == 2
    assert f"being run by `grid` (pid {proc.pid}" in capsys.readouterr().err

    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done, epochs = _stored_state(st, "stopme")
        if done and len(epochs[~epochs.trial_id.isin(done)]) >= 1:
            break
        time.sleep(0.3)
    else:
        proc.kill()
        raise AssertionError(f"no trial finished in time: {proc.communicate()[0][-3000:]}")
    proc.kill()  # SIGKILL: nothing recorded, nothing let go
    proc.communicate()
    killed_at = pd.Timestamp.now(tz="UTC")
    done, epochs = _stored_state(st, "stopme")
    first_done = epochs[epochs.trial_id.isin(done)]
    assert main(grid) == 2  # a plain rerun does not overwrite what is there
    capsys.readouterr()

    # a damaged epoch of the finished trial: check lists it, --repair moves it aside
    victim = store / "stopme" / "epochs" / sorted(done)[0] / "train-00001.parquet"
    original = pd.read_parquet(victim)
    _truncate(victim)
    assert main(["check", "--store", str(store)]) == 1
    assert f"damaged: {victim}" in capsys.readouterr().out
    assert main(["check", "--store", str(store), "--repair"]) == 0

    assert main([*grid, "--resume"]) == 0  # both trials side by side now
    trials = st.read_trials("stopme")
    assert len(trials) == 2 and set(trials["status"]) == {"completed"}
    assert (trials["epochs_done"] == 3).all()
    epochs = st.read_epochs("stopme")
    assert len(epochs) == 6 and not epochs.duplicated(["trial_id", "stage", "epoch"]).any()
    # the trial finished before the kill was not run again: only its lost epoch was
    again = epochs[epochs.trial_id.isin(done)].set_index(["trial_id", "epoch"])["recorded_at"]
    before = first_done.set_index(["trial_id", "epoch"])["recorded_at"]
    kept = [key for key in before.index if key[1] != 1]
    assert (again[kept] == before[kept]).all() and (again[kept] < killed_at).all()
    refilled = pd.read_parquet(victim)
    assert (again[kept] < refilled["recorded_at"].iloc[0]).all()
    metrics = ["train_loss", "train_acc", "test_loss", "test_acc", "step"]
    pd.testing.assert_frame_equal(refilled[metrics], original[metrics])  # deterministic
    assert main(["check", "--store", str(store)]) == 0


def test_interrupted_trial_is_recorded_stopped_then_resumed(ray_session, place, capsys):
    store = place / "store"
    st = Store(str(store))
    tag = uuid.uuid4().hex
    # epochs long enough (1024 images, about 2 s each here) that the signal lands mid-trial,
    # and few, so the resume that runs the rest is short: trial start-ups are most of the time
    flags = [f"--{k}={v}" for k, v in TINY.items()] + ["--opt=sgd", "--lr=0.05", "--epochs=4",
                                                      "--train_subset=1024"]
    proc = _start(["trial", *flags, "--store", str(store), "--experiment", "one"], tag)
    _wait_for_epochs(st, "one", 1, proc)
    out, took = _interrupt(proc, signal.SIGTERM)
    assert proc.returncode == 130, out[-3000:]
    assert took < 30, f"stopping took {took:.0f} s"
    row = st.read_trials("one").iloc[0]
    assert row["status"] == "stopped", out[-3000:]
    hint = f"--store {store} --experiment one --resume {row['trial_id']}"
    assert hint in out
    assert _wait_gone(tag) == [], "Ray processes outlived the command"

    assert main(["trial", *hint.split()]) == 0
    row = st.read_trials("one").iloc[0]
    assert row["status"] == "completed" and row["epochs_done"] == 4
    epochs = st.read_epochs("one")
    assert list(epochs["epoch"]) == list(range(4))


def test_interrupted_study_stops_with_every_trial_recorded(place):
    space = place / "study.yaml"
    space.write_text(yaml.safe_dump({"fixed": {**TINY, "opt": "sgd"},
                                     "search": {"lr": {"loguniform": [0.01, 0.1]}}}))
    store = place / "store"
    st = Store(str(store))
    tag = uuid.uuid4().hex
    proc = _start(["optuna", "--space", str(space), "--store", str(store), "--quiet",
                   "--num-samples", "2"], tag)
    _wait_for_epochs(st, "study", 1, proc)
    out, took = _interrupt(proc, signal.SIGINT)  # Ctrl-C
    assert proc.returncode == 130, out[-3000:]
    assert took < 30, f"stopping took {took:.0f} s"
    assert "optuna --space" in out and "--num-samples 2" in out and "--resume" in out
    assert "running" not in set(st.read_trials("study")["status"])
    assert _wait_gone(tag) == [], "Ray processes outlived the command"
    assert json.loads((store / "study" / LOCK_FILE).read_text() or "{}") == {}
