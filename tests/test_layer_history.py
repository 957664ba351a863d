"""The per-layer history: gathered on the device by a step hook, read once, stored once."""

import pandas as pd
import pytest
import torch
from torch import nn

from tvlars_ray.config import TrialConfig
from tvlars_ray.layer_history import LayerHistory
from tvlars_ray.optim import LAMB, LARS, TVLARS
from tvlars_ray.store import LAYER_SCHEMA, Store, read_layers


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5)).double()


def _steps(model, optimizer, history, steps, wd):
    """Run ``steps`` steps; return what each due step should have recorded, taken directly."""
    expected = {}
    for step in range(1, steps + 1):
        x = torch.randn(8, 3, 8, 8, dtype=torch.float64)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        adapted = [(n, p) for n, p in model.named_parameters() if p.ndim > 1]
        before = {n: (p.detach().norm().item(), (p.grad + wd * p).detach().norm().item())
                  for n, p in adapted}
        optimizer.step()
        expected[step] = (before, optimizer.last_trust_ratios.tolist())
    return expected


@pytest.mark.parametrize("every", [2, None])
def test_due_steps_are_recorded_with_names_and_norms(every):
    model = _model()
    optimizer = TVLARS(model.parameters(), lr=0.5, weight_decay=1e-3, lmbda=0.01)
    history = LayerHistory(optimizer, model, every)
    history.start_epoch(10)  # a stage that has taken 10 steps already
    expected = _steps(model, optimizer, history, 5, 1e-3)
    rows = pd.DataFrame(history.take())
    due = [2, 4] if every else [5]
    assert sorted(rows["step"].unique()) == [10 + s for s in due]
    assert list(rows["layer"].unique()) == ["0.weight", "4.weight"]  # 1-D tensors not adapted
    assert list(rows["numel"].unique()) == [4 * 3 * 3 * 3, 5 * 4 * 6 * 6]
    for s in due:
        got = rows[rows["step"] == 10 + s].sort_values("layer_index")
        norms, ratios = expected[s]
        assert got["trust_ratio"].tolist() == pytest.approx(ratios, rel=1e-12)
        assert got["weight_norm"].tolist() == pytest.approx(
            [norms[n][0] for n in got["layer"]], rel=1e-12)
        assert got["update_norm"].tolist() == pytest.approx(
            [norms[n][1] for n in got["layer"]], rel=1e-12)
    assert (rows["lr_now"] == 0.5).all()
    assert history.take() is None  # read once: nothing is left of the epoch
    history.close()
    _steps(model, optimizer, history, 2, 1e-3)
    assert history.pending == [], "a closed history records nothing"


def test_lamb_adapts_every_tensor_and_sgd_has_no_history():
    model = _model()
    optimizer = LAMB(model.parameters(), lr=0.01)
    history = LayerHistory(optimizer, model, 1)
    history.start_epoch(0)
    model(torch.randn(2, 3, 8, 8, dtype=torch.float64)).sum().backward()
    optimizer.step()
    rows = pd.DataFrame(history.take())
    assert list(rows["layer"]) == [n for n, _ in model.named_parameters()]
    assert LayerHistory.applies(LARS(model.parameters(), lr=1.0))
    assert not LayerHistory.applies(torch.optim.SGD(model.parameters(), lr=0.1))


def test_store_keeps_each_step_and_layer_once(tmp_path):
    store = Store(str(tmp_path))
    model = _model()
    optimizer = LARS(model.parameters(), lr=1.0)
    history = LayerHistory(optimizer, model, 1)
    for epoch in range(2):
        history.start_epoch(3 * epoch)
        _steps(model, optimizer, history, 3, 0.0)
        store.write_layers("e", "t", "train", epoch, history.take())
    history.start_epoch(3)  # epoch 1 again, as after a worker restart
    _steps(model, optimizer, history, 3, 0.0)
    store.write_layers("e", "t", "train", 1, history.take())
    layers = read_layers(str(tmp_path), "e")
    assert list(layers.columns) == LAYER_SCHEMA.names
    assert len(layers) == 6 * 2 and not layers.duplicated(["trial_id", "step", "layer"]).any()
    assert list(layers.groupby("epoch")["step"].unique().map(list)) == [[1, 2, 3], [4, 5, 6]]
    assert sorted(p.name for p in (tmp_path / "e" / "layers" / "t").iterdir()) == [
        "train-00000.parquet", "train-00001.parquet"]


def test_layer_every_is_a_setting_that_does_not_split_a_grid():
    a = TrialConfig(ds="synthetic", opt="lars", layer_every=5)
    assert a.science_key == TrialConfig(ds="synthetic", opt="lars").science_key
    with pytest.raises(ValueError, match="layer_every must be at least 1"):
        TrialConfig(ds="synthetic", layer_every=0)
