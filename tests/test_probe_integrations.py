"""The probe through the integrations: skorch's ``probe=X_subset`` and Lightning's ``probe="val"``,
with real nets and Trainers; training must be bit for bit the same as without the probe."""

import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from models import WineClassifier
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def wine_arrays():
    from sklearn.datasets import load_wine
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = load_wine(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=42)
    scaler = StandardScaler().fit(X_train)
    return (scaler.transform(X_train).astype(np.float32), y_train.astype(np.int64),
            scaler.transform(X_test).astype(np.float32), y_test.astype(np.int64))


def read(logdir):
    ea = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


class DropWine(WineClassifier):
    """Seed 004's model with dropout after dense0: a probe that drew from the RNG would change training."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.3)

    def forward(self, X):
        return self.output(F.relu(self.dense1(self.drop(F.relu(self.dense0(X))))))


def test_skorch_probe_on_the_test_set_leaves_training_unchanged(wine_arrays, tmp_path):
    pytest.importorskip("skorch")
    from skorch import NeuralNetClassifier

    from integrations.skorch import ActivationMonitor

    X_train, y_train, X_test, y_test = wine_arrays

    def fit(probe: bool):
        torch.manual_seed(0)
        kw = {"probe": (X_test, y_test), "probe_every_n_samples": 1, "probe_labels": "targets"} if probe else {}
        cb = ActivationMonitor(every_n_steps=1, logdir=tmp_path / ("probe" if probe else "base"), on_alert="ignore", **kw)
        net = NeuralNetClassifier(
            DropWine, criterion=nn.CrossEntropyLoss, optimizer=torch.optim.Adam, lr=0.02, max_epochs=4, batch_size=32,
            train_split=None, verbose=0, callbacks=[cb],
        )
        net.fit(X_train, y_train)
        return net, cb

    base, _ = fit(False)
    net, cb = fit(True)
    for k, v in base.module_.state_dict().items():
        assert torch.equal(net.module_.state_dict()[k], v), k
    steps = cb.step_  # 4 epochs x 5 batches; every step sampled, a probe after each
    probe = cb.last_probe
    assert probe.step == steps - 1 and probe.labels == y_test.tolist()
    net.module_.eval()
    with torch.no_grad():  # the last probe ran after the last optimizer step: the final weights
        expected = F.relu(net.module_.dense0(torch.as_tensor(X_test))).numpy()
        loss = float(F.cross_entropy(net.module_(torch.as_tensor(X_test)), torch.as_tensor(y_test)))
    np.testing.assert_allclose(probe.activations["dense0.relu"], expected, rtol=1e-6, atol=1e-6)
    ea = read(cb.run_dir_)
    assert [e.step for e in ea.Images("activation_probe/dense0.relu")] == list(range(steps))
    assert ea.Scalars("probe_loss")[-1].value == pytest.approx(loss, rel=1e-5)  # the net's criterion by default
    assert len(ea.Scalars("probe_drift/dense1.relu")) == steps - 1


def test_skorch_probe_options_are_validated_at_initialize():
    pytest.importorskip("skorch")
    from skorch import NeuralNetClassifier

    from integrations.skorch import ActivationMonitor

    net = NeuralNetClassifier(WineClassifier, callbacks=[ActivationMonitor(probe=np.zeros((4, 13), np.float32), probe_labels=[1])])
    with pytest.raises(ValueError, match=r"one label per probe sample \(4\), got 1"):
        net.initialize()


def test_lightning_probe_val_takes_the_first_validation_batch_and_changes_nothing(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, TensorDataset

    from integrations.lightning import ActivationMonitor

    g = torch.Generator().manual_seed(3)
    x = torch.randn(192, 13, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    train_set, val_set = TensorDataset(x[:128], y[:128]), TensorDataset(x[128:], y[128:])

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = DropWine()

        def forward(self, inputs):
            return self.net(inputs)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    def fit(probe, name):
        L.seed_everything(0, verbose=False)
        model = Module()
        kw = {"probe": probe, "probe_every_n_samples": 1, "probe_labels": "targets"} if probe is not None else {}
        cb = ActivationMonitor(every_n_steps=2, on_alert="ignore", **kw)
        trainer = L.Trainer(
            max_epochs=2, logger=TensorBoardLogger(str(tmp_path), name=name), callbacks=[cb], accelerator="cpu",
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.fit(model, DataLoader(train_set, batch_size=16, shuffle=True), DataLoader(val_set, batch_size=24))
        return model, cb, trainer

    base, _, _ = fit(None, "base")
    model, cb, trainer = fit("val", "val")
    for k, v in base.state_dict().items():  # shuffling and dropout draw from the same RNG as without probes
        assert torch.equal(model.state_dict()[k], v), k
    probe = cb.monitor.last_probe
    assert probe.labels == y[128:152].tolist()  # the first validation batch (the sanity check's)
    assert probe.activations["net.dense0.relu"].shape == (24, 20)
    ea = read(trainer.logger.log_dir)
    steps = [e.step for e in ea.Images("activation_probe/net.dense0.relu")]
    assert steps == list(range(0, trainer.global_step, 2))  # after every sampled step (16 optimizer steps)
    assert ea.Scalars("probe_drift/net.dense1.relu")

    given, cb2, _ = fit((x[128:136], y[128:136]), "given")  # a batch of one's own
    assert cb2.monitor.last_probe.labels == y[128:136].tolist()
    for k, v in base.state_dict().items():
        assert torch.equal(given.state_dict()[k], v), k
