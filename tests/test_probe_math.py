"""The probe's pure functions against ground truth computed independently (numpy, textbook formulas)."""

import numpy as np
import pytest
import torch

from monitor.probemath import NO_FAVOURITE, drift, drift_on_device, favourites, linear_cka, row_order, top_k


def hsic_cka(x, y):
    """CKA by its definition: HSIC with the centring matrix H (Kornblith et al. 2019, eq. 3)."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, m = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h) / (n - 1) ** 2

    return hsic(k, m) / np.sqrt(hsic(k, k) * hsic(m, m))


@pytest.mark.parametrize("n, p, q", [(12, 40, 30), (50, 8, 5), (20, 20, 7)])  # both branches (n <= p and n > p)
def test_linear_cka_matches_its_definition(n, p, q):
    rng = np.random.default_rng(n + p + q)
    x = rng.normal(size=(n, p))
    y = x[:, :q] @ rng.normal(size=(q, q)) + 0.5 * rng.normal(size=(n, q))
    assert linear_cka(x, y) == pytest.approx(hsic_cka(x, y), rel=1e-10)
    assert linear_cka(x, x) == pytest.approx(1.0)


def test_drift_is_zero_under_rotation_and_scale_and_grows_with_change():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 16))
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    assert drift(x, 3.0 * x @ q + 7.0) == pytest.approx(0.0, abs=1e-12)  # rotated, scaled, shifted: did not move
    small = drift(x, x + 0.05 * rng.normal(size=x.shape))
    large = drift(x, x + 1.0 * rng.normal(size=x.shape))
    unrelated = drift(x, rng.normal(size=x.shape))
    assert 0 < small < large < unrelated <= 1


def test_drift_conventions_for_constant_and_nonfinite_representations():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(10, 4))
    dead = np.zeros((10, 4))
    assert drift(dead, dead) == 0.0  # a dead layer did not move
    assert drift(x, dead) == 1.0 and drift(dead, x) == 1.0
    bad = x.copy()
    bad[0, 0] = np.nan
    assert np.isnan(drift(x, bad))
    assert np.isnan(linear_cka(x, dead))
    with pytest.raises(ValueError, match="same number of samples"):
        linear_cka(x, x[:5])


def test_top_k_matches_argsort_with_ties_and_nan():
    rng = np.random.default_rng(2)
    m = rng.normal(size=(40, 6)).round(1)  # rounding makes ties
    m[5, 2] = np.nan
    for unit in range(6):
        col = m[:, unit]
        expected = sorted(range(40), key=lambda i: (-(col[i] if not np.isnan(col[i]) else -np.inf), i))[:7]
        idx, vals = top_k(m, unit, 7)
        assert idx.tolist() == expected
        np.testing.assert_array_equal(vals, col[expected])
    assert top_k(m, 0, 100)[0].size == 40 and top_k(m, 0, 0)[0].size == 0


def test_favourites_are_the_argmax_or_none_for_constant_units():
    rng = np.random.default_rng(3)
    m = rng.normal(size=(25, 5))
    m[:, 1] = 0.0  # a dead ReLU unit
    m[:, 3] = 2.5
    fav = favourites(m)
    expected = np.argmax(m, axis=0)
    expected[[1, 3]] = NO_FAVOURITE
    np.testing.assert_array_equal(fav, expected)


def test_row_order_groups_labels_stably():
    labels = ["b", "a", "b", "c", "a", "b"]
    order = row_order(labels, 6)
    assert [labels[i] for i in order] == ["a", "a", "b", "b", "b", "c"]
    assert order.tolist() == [1, 4, 0, 2, 5, 3]  # within a label, the probe's order
    assert row_order(None, 4).tolist() == [0, 1, 2, 3]
    assert [str(x) for x in np.array([2, "x", 1], dtype=object)[row_order([2, "x", 1], 3)]] == ["1", "2", "x"]


def drift_by_definition(a, b):
    """1 - CKA by its definition, with the documented conventions: NaN/Inf give NaN; a representation
    constant over the samples both times did not move (0), constant only once moved completely (1)."""
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    flat_a, flat_b = not np.ptp(a, axis=0).any(), not np.ptp(b, axis=0).any()
    if flat_a or flat_b:
        return 0.0 if flat_a and flat_b else 1.0
    return 1 - hsic_cka(a, b)


def test_drift_on_the_host_and_on_the_device_match_the_definition():
    rng = np.random.default_rng(4)
    cases = []
    for n, p, q in ((12, 40, 30), (50, 8, 5), (20, 20, 20)):
        x = rng.normal(size=(n, p))
        cases += [(x, x[:, :q] + 0.3 * rng.normal(size=(n, q))), (x, rng.normal(size=(n, q)))]
    dead = np.zeros((10, 4))
    live = rng.normal(size=(10, 4))
    bad = live.copy()
    bad[2, 1] = np.inf
    cases += [(dead, dead), (live, dead), (dead, live), (live, bad), (live, 2 * live)]
    for a, b in cases:
        got = float(drift_on_device(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)))
        expected = drift_by_definition(a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64))
        host = drift(a.astype(np.float32), b.astype(np.float32))
        if np.isnan(expected):
            assert np.isnan(got) and np.isnan(host)
        else:
            assert got == pytest.approx(expected, abs=1e-6)  # float32 products on a CPU
            assert host == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("scale", [1e-30, 1e-12, 1e12, 1e20])
def test_drift_on_the_device_ignores_the_scale_of_finite_values(scale):
    """CKA does not see a matrix's scale: finite but huge (or tiny) activations are not NaN (float32
    products overflowed at ~1e19) and a rescaled copy has no drift."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 10)).astype(np.float32)
    y = x + 0.1 * rng.standard_normal((50, 10)).astype(np.float32)
    assert float(drift_on_device(torch.tensor(x), torch.tensor(x * scale))) < 1e-6
    assert float(drift_on_device(torch.tensor(x), torch.tensor(y * scale))) == pytest.approx(drift(x, y), abs=1e-5)
