"""The seed-004 Wine example with the test set as probe (examples/wine_skorch.py)."""

import io
import os
import runpy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_wine_example_probes_the_test_set_and_draws_the_film(tmp_path, capsys):
    pytest.importorskip("skorch")
    main = runpy.run_path(os.path.join(ROOT, "examples", "wine_skorch.py"), run_name="example")["main"]
    film = tmp_path / "probe_wine.png"
    # 16 epochs of one batch, sampled every 5: probes after steps 0, 5, 10 and 15, the last step.
    out = main(["--seed", "1", "--epochs", "16", "--logdir", str(tmp_path / "runs"), "--probe-png", str(film)])
    probe = out["probe"]
    assert probe.step == 15 and len(probe.labels) == 36 and probe.labels[0].startswith("class ")
    net = out["net"]
    from sklearn.datasets import load_wine
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = load_wine(return_X_y=True)
    X_train, X_test, _, y_test = train_test_split(X.astype(np.float32), y, test_size=0.2, random_state=42)
    X_test = torch.as_tensor(StandardScaler().fit(X_train).transform(X_test).astype(np.float32))
    module = net.module_.eval()
    with torch.no_grad():  # ground truth: the final weights (the last probe ran after the last step)
        h0 = F.relu(module.dense0(X_test))
        h1 = F.relu(module.dense1(h0))
    np.testing.assert_allclose(probe.activations["dense0.relu"], h0.numpy(), rtol=1e-6, atol=1e-6)
    silent = np.flatnonzero((h1 <= 0).all(dim=0).numpy()).tolist()
    assert out["silent_on_test_set"]["dense1.relu"] == silent and silent  # seed 1: units of dense1 die
    assert probe.labels == [f"class {c}" for c in y_test]

    ea = EventAccumulator(out["run_dir"], size_guidance={"images": 0})
    ea.Reload()
    events = ea.Images("activation_probe/dense1.relu")
    assert [e.step for e in events] == [0, 5, 10, 15]
    picture = np.asarray(Image.open(film).convert("RGB"))
    chosen = [events[0], events[2], events[3]]  # first, middle, last
    x = 0
    for e in chosen:  # the film is the monitor's own images, pixel for pixel
        im = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
        np.testing.assert_array_equal(picture[: im.shape[0], x : x + im.shape[1]], im)
        x += im.shape[1] + 12
    assert "units silent on all 36 test samples" in capsys.readouterr().out
