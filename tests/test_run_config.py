"""A run records where it came from: ``run_config`` (plain loops), Lightning ``hparams``, skorch
net parameters per fit (a real ``GridSearchCV``). Read back with TensorBoard's own reader."""

from __future__ import annotations

import glob
import json
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from monitor import Monitor
from monitor.runconfig import normalize_config
from tests.models import WineClassifier, mlp

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def configs_in(run_dir: str) -> list[tuple[int, dict]]:
    """(step, config) of every run_config text event under run_dir, read with TensorBoard's reader."""
    acc = EventAccumulator(run_dir, size_guidance={"tensors": 0})
    acc.Reload()
    if "run_config/text_summary" not in acc.Tags()["tensors"]:
        return []
    return [
        (e.step, json.loads(e.tensor_proto.string_val[0].decode())) for e in acc.Tensors("run_config/text_summary")
    ]


class _Opaque:
    pass


def test_values_become_json_that_compares_equal_across_runs():
    cfg = {
        "lr": np.float32(0.5),
        "epochs": np.int64(3),
        "t": torch.tensor(2.0),
        "opt": torch.optim.AdamW,
        "act": torch.relu,
        "betas": (0.9, 0.99),
        "tags": {"b", "a"},
        "nested": {"x": [1, {"y": float("inf")}]},
        "obj": _Opaque(),
        "none": None,
        "flag": True,
    }
    out = normalize_config(cfg)
    assert out == {
        "lr": 0.5,
        "epochs": 3,
        "t": 2.0,
        "opt": "AdamW",
        "act": "relu",
        "betas": [0.9, 0.99],
        "tags": ["a", "b"],
        "nested": {"x": [1, {"y": "inf"}]},
        "obj": f"<{_Opaque.__module__}._Opaque>",
        "none": None,
        "flag": True,
    }
    assert json.loads(json.dumps(out)) == out
    assert normalize_config({"obj": _Opaque()}) == normalize_config({"obj": _Opaque()})  # no memory addresses


@pytest.mark.parametrize(
    ("bad", "message"),
    [([("lr", 0.1)], "Expected `run_config` to be None or a mapping"), ({1: "a"}, "Expected `run_config` to have str keys, got 1")],
)
def test_bad_run_config_is_refused_at_construction(bad, message):
    with pytest.raises(TypeError, match=message):
        Monitor(mlp(), run_config=bad)


def test_plain_loop_writes_the_config_once_at_the_first_record(tmp_path):
    model = mlp()
    with Monitor(model, every_n_steps=2, logdir=tmp_path / "a", run_config={"lr": 0.1, "seed": 7}) as mon:
        for step in range(3, 9):
            with mon.step(step):
                model(torch.randn(16, 13))
    assert configs_in(str(tmp_path / "a")) == [(4, {"lr": 0.1, "seed": 7})]
    with Monitor(model, every_n_steps=2, logdir=tmp_path / "b") as mon:  # nothing given: nothing written
        with mon.step(0):
            model(torch.randn(16, 13))
    assert configs_in(str(tmp_path / "b")) == []


def test_skorch_grid_search_runs_say_which_learning_rate_made_them(tmp_path):
    pytest.importorskip("skorch")
    from sklearn.datasets import load_wine
    from sklearn.model_selection import GridSearchCV
    from sklearn.preprocessing import StandardScaler
    from skorch import NeuralNetClassifier

    from integrations.skorch import ActivationMonitor

    X, y = load_wine(return_X_y=True)
    X = StandardScaler().fit_transform(X).astype(np.float32)
    net = NeuralNetClassifier(
        WineClassifier,
        module__num_units=12,
        criterion=nn.CrossEntropyLoss,
        max_epochs=2,
        batch_size=32,
        train_split=None,
        verbose=0,
        callbacks=[ActivationMonitor(every_n_steps=2, logdir=str(tmp_path), run_config={"study": "wine"})],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        GridSearchCV(net, {"lr": [0.01, 0.3]}, cv=2, refit=False).fit(X, y)
    runs = sorted(glob.glob(os.path.join(tmp_path, "run-*")))
    assert len(runs) == 4  # 2 learning rates x 2 folds
    found = [configs_in(r) for r in runs]
    assert all(len(f) == 1 for f in found)
    cfgs = [f[0][1] for f in found]
    assert sorted(c["lr"] for c in cfgs) == [0.01, 0.01, 0.3, 0.3]
    for c in cfgs:
        assert c["study"] == "wine" and c["module"] == "WineClassifier" and c["module__num_units"] == 12
        assert c["criterion"] == "CrossEntropyLoss" and c["max_epochs"] == 2
        assert not any(k.startswith("callbacks") or k.startswith("_") for k in c)


def test_lightning_records_the_modules_hparams(tmp_path):
    pytest.importorskip("lightning")
    import lightning.pytorch as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, TensorDataset

    from integrations.lightning import ActivationMonitor

    class Net(L.LightningModule):
        def __init__(self, hidden: int = 16, lr: float = 0.05):
            super().__init__()
            self.save_hyperparameters()
            self.net = mlp(width=hidden)

        def training_step(self, batch, batch_idx):
            x, t = batch
            return nn.functional.cross_entropy(self.net(x), t)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    data = DataLoader(TensorDataset(torch.randn(64, 13), torch.randint(0, 3, (64,))), batch_size=16)
    logger = TensorBoardLogger(str(tmp_path), name="exp")
    trainer = L.Trainer(
        max_steps=4,
        logger=logger,
        callbacks=[ActivationMonitor(every_n_steps=2, run_config={"note": "baseline", "lr": 0.07})],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Net(hidden=24, lr=0.05), data)
    found = configs_in(logger.log_dir)
    assert found == [(0, {"hidden": 24, "lr": 0.07, "note": "baseline"})]  # run_config= wins over hparams
