"""Statistics maths against numpy references (computed independently of monitor.stats)."""

import math

import numpy as np
import pytest
import torch

from monitor.activations import RELU, SIGMOID, TANH, Kind, saturation_thresholds
from monitor.stats import (
    FIRED,
    MAX,
    NEGMIN,
    NONFINITE,
    PRE_MAX,
    PRE_MIN,
    SUMABS,
    SUMSQ,
    histogram_counts,
    histogram_counts_batched,
    histogram_counts_host,
    histogram_edges,
    histogram_sample,
    reduce_dims,
    rows_for,
    sample_stride,
    summarize,
    unit_stats,
)

GELU_LIKE = Kind("gelu", fires=True)


def reference(x: np.ndarray, unit_axis: int) -> dict:
    """Per-unit statistics with numpy, units on `unit_axis`."""
    u = np.moveaxis(x.astype(np.float64), unit_axis, -1).reshape(-1, x.shape[unit_axis])
    finite = np.isfinite(u)
    return {
        FIRED: (u > 0).sum(0),
        MAX: u.max(0),
        NEGMIN: -u.min(0),
        SUMSQ: (u**2).sum(0),
        NONFINITE: (~finite).sum(0),
        SUMABS: np.abs(u).sum(0),
        PRE_MAX: u.max(0),
        PRE_MIN: u.min(0),
    }


@pytest.mark.parametrize(
    "shape, unit_axis",
    [((64, 20), 1), ((8, 5, 16), 2), ((4, 6, 7, 3), 1), ((4, 6, 9), 1)],
)
def test_unit_stats_match_numpy(shape, unit_axis):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    dims = reduce_dims(x.ndim, unit_axis)
    rows = rows_for(GELU_LIKE)
    got = unit_stats(x, dims, rows, GELU_LIKE).numpy()
    ref = reference(x.numpy(), unit_axis)
    for i, row in enumerate(rows):
        np.testing.assert_allclose(got[i], ref[row], rtol=1e-5, atol=1e-4, err_msg=row)


def test_relu_rows_skip_the_minimum_and_count_firing():
    x = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [3.0, 0.5, 0.0]])
    rows = rows_for(RELU)
    assert NEGMIN not in rows and MAX not in rows and rows[:2] == (PRE_MAX, PRE_MIN)
    s = summarize(unit_stats(x, (0,), rows, RELU).numpy(), rows, positions=3)
    np.testing.assert_array_equal(s.fired, [2, 2, 0])
    np.testing.assert_array_equal(s.max, [3.0, 2.0, 0.0])
    np.testing.assert_array_equal(s.min, [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(s.sumabs, [4.0, 2.5, 0.0])


def test_relu_pre_activation_rows_come_from_the_input_also_in_place():
    """The pre-hook reads the ReLU's input before an in-place ReLU overwrites it."""
    from monitor import Monitor

    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 6)
    with torch.no_grad():
        lin.bias[:3] = -50.0
    x = torch.randn(32, 5)
    z = lin(x).detach()  # the test's own pre-activations
    for inplace in (False, True):
        model = torch.nn.Sequential(lin, torch.nn.ReLU(inplace=inplace))
        mon = Monitor(model, every_n_steps=1, on_alert="ignore", background=False)
        got = {}
        mon._judge._judge = lambda name, kind, step, s, *a, _j=mon._judge._judge: (got.setdefault(name, s), _j(name, kind, step, s, *a))[1]
        with mon, mon.step(0):
            model(x)
        s = got["1"]
        np.testing.assert_allclose(s.pre_max, z.max(0).values.numpy(), rtol=1e-6)
        np.testing.assert_allclose(s.pre_min, z.min(0).values.numpy(), rtol=1e-6)
        np.testing.assert_allclose(s.max, z.clamp(min=0).max(0).values.numpy(), rtol=1e-6)
        np.testing.assert_array_equal(s.fired, (z > 0).sum(0).numpy())


def test_huge_values_do_not_overflow_or_warn():
    """Sums are combined in float64 on the host: no `RuntimeWarning: overflow` leaks out."""
    import warnings

    from monitor.judge import base_numbers

    x = torch.full((64, 4), 3e18)
    rows = rows_for(GELU_LIKE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = summarize(unit_stats(x, (0,), rows, GELU_LIKE).numpy(), rows, positions=64)
        rms, max_abs, nonfinite, _ = base_numbers(GELU_LIKE, s)
    assert nonfinite == 0 and max_abs == pytest.approx(3e18)
    assert rms == float("inf")  # squares beyond float32: +inf, judged as exploding, not as NaN


def test_units_that_held_nonfinite_values_are_flagged_from_their_extrema():
    x = torch.ones(10, 4)
    x[0, 1] = float("nan")
    x[3, 1] = float("inf")
    x[5, 2] = float("-inf")
    rows = rows_for(GELU_LIKE)
    assert "nonfinite" not in rows  # no pass of its own: amax/amin propagate NaN/Inf
    s = summarize(unit_stats(x, (0,), rows, GELU_LIKE).numpy(), rows, positions=10)
    np.testing.assert_array_equal(s.nonfinite, [0, 1, 1, 0])
    # A detector that asks for the row gets the value counts.
    rows = rows_for(GELU_LIKE, ("nonfinite",))
    s = summarize(unit_stats(x, (0,), rows, GELU_LIKE).numpy(), rows, positions=10)
    np.testing.assert_array_equal(s.nonfinite, [0, 2, 1, 0])


def test_relu_units_are_flagged_where_their_output_held_nan_or_inf():
    z = torch.ones(10, 4)
    z[0, 0] = float("nan")  # relu(nan) = nan
    z[1, 1] = float("inf")  # relu(inf) = inf
    z[2, 2] = float("-inf")  # relu(-inf) = 0: the output is finite
    rows = rows_for(RELU)
    s = summarize(unit_stats(z.relu(), (0,), rows, RELU).numpy(), rows, positions=10)
    expected = (~torch.isfinite(z.relu())).any(0).float().numpy()
    np.testing.assert_array_equal(s.nonfinite, expected)
    np.testing.assert_array_equal(expected, [1, 1, 0, 0])
    assert np.isnan(s.fired[:2]).all() and (s.fired[2:] == [9, 10]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_reduced_in_float32(dtype):
    # 300**2 * 64 overflows float16 (max 65504) if squares were summed in the input dtype.
    x = torch.full((64, 3), 300.0).to(dtype)
    rows = rows_for(GELU_LIKE)
    out = unit_stats(x, (0,), rows, GELU_LIKE)
    assert out.dtype == torch.float32
    s = summarize(out.numpy(), rows, positions=64)
    np.testing.assert_allclose(s.sumsq, 64 * 300.0**2, rtol=1e-2)
    assert (s.nonfinite == 0).all()


def test_saturation_counts_values_at_either_bound():
    lo, hi = saturation_thresholds(TANH, 0.01)
    assert (lo, hi) == pytest.approx((-0.98, 0.98))
    x = torch.tensor([[0.99, 0.1, -0.995], [0.999, 0.5, 0.2], [-0.97, 0.98, -1.0]])
    rows = rows_for(TANH)
    s = summarize(unit_stats(x, (0,), rows, TANH, lo, hi).numpy(), rows, positions=3)
    np.testing.assert_array_equal(s.at_bound, [2, 0, 2])  # 0.98 itself is not beyond the threshold


def test_sigmoid_bounds_and_relu6_upper_only():
    assert saturation_thresholds(SIGMOID, 0.01) == pytest.approx((0.01, 0.99))
    from monitor.activations import RELU6

    lo, hi = saturation_thresholds(RELU6, 0.01)
    assert lo is None and hi == pytest.approx(5.94)


def test_histogram_matches_numpy_on_the_same_sample():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 50, generator=g) * 3
    stride = sample_stride(x.numel(), 50)
    counts = histogram_counts(x, stride).numpy()
    edges = np.asarray(histogram_edges())
    sample = x.reshape(-1)[::stride].numpy()
    # bucket i holds (edges[i-1], edges[i]]
    ref = np.bincount(np.searchsorted(edges, sample, side="left"), minlength=len(edges) + 1)
    np.testing.assert_array_equal(counts, ref)


def test_batched_binning_matches_a_reference_also_on_edges_and_across_layers():
    g = torch.Generator().manual_seed(2)
    edges32 = torch.tensor(histogram_edges(), dtype=torch.float32)
    # values exactly on bucket edges, zeros, huge values, NaN/Inf, and ordinary noise
    a = torch.cat([edges32[::7], torch.zeros(5), torch.tensor([1e9, -1e9, float("nan"), float("inf"), -float("inf")]),
                   torch.randn(400, generator=g) * 10])
    b = torch.randn(37, 11, generator=g).relu()
    sa, sb1, sb2 = histogram_sample(a, 1), histogram_sample(b, 3), histogram_sample(b * 2, 5)
    batched = histogram_counts_batched([sa, sb1, sb2], [1, 2]).numpy()

    def reference(values: np.ndarray) -> np.ndarray:
        # bucket i holds (edges[i-1], edges[i]] in float32; NaN is sampled as 0
        e = edges32.numpy()
        ref = np.zeros(len(e) + 1)
        for v in np.nan_to_num(values, nan=0.0, posinf=np.inf, neginf=-np.inf):
            ref[int((e < v).sum())] += 1
        return ref

    np.testing.assert_array_equal(batched[0], reference(a.numpy()))
    np.testing.assert_array_equal(batched[1], reference(np.concatenate([b.numpy().ravel()[::3], (b * 2).numpy().ravel()[::5]])))
    assert batched[1].sum() == sb1.numel() + sb2.numel()
    # the host (numpy) binning used for CPU models agrees with the device kernels
    np.testing.assert_array_equal(histogram_counts_host(sa.numpy()), batched[0])
    np.testing.assert_array_equal(histogram_counts_host(torch.cat([sb1, sb2]).numpy()), batched[1])


def test_sample_stride_is_coprime_with_units_and_bounded():
    for numel, units in [(128 * 256, 256), (64 * 32 * 32 * 32, 32), (1000, 10), (10, 10)]:
        s = sample_stride(numel, units)
        assert math.gcd(s, units) == 1 or s == 1
        assert math.ceil(numel / s) <= 2048
    # Every unit of a (rows, 256) tensor is represented in the sample
    s = sample_stride(128 * 256, 256)
    assert len(set((np.arange(0, 128 * 256, s) % 256).tolist())) == 256
