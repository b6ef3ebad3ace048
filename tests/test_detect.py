"""Detectors on scripted series: when each alert fires, once, and when it recovers."""

import math

import numpy as np
import pytest

from monitor import Thresholds
from monitor.activations import BLOCK, RELU, TANH
from monitor.detect import LayerState
from monitor.stats import UnitSummary


def summary(units=8, positions=100, fired=None, rms=1.0, nonfinite=0, at_bound=None, max_abs=None):
    fired = np.full(units, positions / 2) if fired is None else np.asarray(fired, dtype=float)
    sumsq = np.full(units, rms**2 * positions)
    mx = np.full(units, max_abs if max_abs is not None else 3 * rms)
    nf = np.zeros(units)
    if nonfinite:
        nf[0] = nonfinite
        sumsq[0] = math.nan
        mx[0] = math.nan
    return UnitSummary(positions, fired, mx, -mx, sumsq, nf, None if at_bound is None else np.asarray(at_bound, float))


def run(state, series):
    """Feed summaries; return [(step, kind, recovered)]."""
    out = []
    for step, s in enumerate(series):
        _, alerts = state.update(step, s)
        out += [(step, a.kind, a.recovered) for a in alerts]
    return out


def test_nan_in_series_alerts_at_that_step_and_recovers():
    st = LayerState("l", BLOCK, Thresholds(recovery_samples=1))
    series = [summary(), summary(), summary(nonfinite=3), summary()]
    assert run(st, series) == [(2, "nonfinite", False), (3, "nonfinite", True)]


def test_dead_needs_every_unit_value_to_be_zero_over_the_window():
    th = Thresholds(window=3, dead_fraction=0.5, min_positions=64)
    st = LayerState("l", RELU, th)
    half_dead = [0, 0, 0, 0, 50, 50, 50, 50]
    sparse = [1, 1, 1, 1, 50, 50, 50, 50]  # fires rarely: sparse, not dead
    assert run(st, [summary(fired=sparse)] * 3) == []
    st = LayerState("l", RELU, th)
    assert run(st, [summary(fired=half_dead)]) == [(0, "dead", False)]
    health, _ = st.update(1, summary(fired=half_dead))
    assert health.dead_units == (0, 1, 2, 3) and health.dead_fraction == 0.5


def test_small_batches_are_judged_over_several_samples():
    th = Thresholds(window=5, min_positions=100, dead_fraction=0.5, recovery_samples=1)
    st = LayerState("l", RELU, th)
    alive = summary(fired=[5] * 8, positions=40)
    dead = summary(fired=[0] * 8, positions=40)
    # 40 values per sample: a verdict needs the last 3 samples. The firing at step 0 keeps the
    # layer alive until step 3, when samples 1..3 (120 values) are all silent.
    assert run(st, [alive, dead, dead, dead]) == [(3, "dead", False)]


def test_a_large_batch_alerts_at_the_first_sampled_step_of_death():
    st = LayerState("l", RELU, Thresholds(min_positions=100))
    alive = summary(fired=[50] * 8, positions=128)
    dead = summary(fired=[0] * 8, positions=128)
    assert run(st, [alive, alive, dead]) == [(2, "dead", False)]


def test_not_called_dead_before_enough_evidence():
    st = LayerState("l", RELU, Thresholds(min_positions=500, window=10))
    res = run(st, [summary(fired=[0] * 8, positions=100)] * 6)
    assert res == [(4, "dead", False)]  # 5 samples x 100 values reach 500


def test_saturation_fires_for_bounded_kinds_only():
    th = Thresholds(saturated_positions=0.9, saturated_fraction=0.5)
    pinned = [100] * 6 + [10, 10]
    st = LayerState("t", TANH, th)
    assert run(st, [summary(at_bound=pinned)]) == [(0, "saturated", False)]
    h, _ = st.update(1, summary(at_bound=pinned))
    assert h.saturated_units == tuple(range(6)) and h.saturated_fraction == 0.75


def test_exploding_by_growth_against_own_baseline():
    th = Thresholds(growth_factor=10, baseline_samples=2, recovery_samples=2)
    st = LayerState("b", BLOCK, th)
    rms = [1.0, 1.2, 3.0, 15.0, 20.0, 2.0, 2.0, 2.0]
    res = run(st, [summary(rms=r) for r in rms])
    assert res == [(3, "exploding", False), (6, "exploding", True)]


def test_exploding_absolute_bounds():
    st = LayerState("b", BLOCK, Thresholds(max_rms=100.0, max_abs=1e4))
    assert run(st, [summary(rms=500.0)]) == [(0, "exploding", False)]
    st = LayerState("b", BLOCK, Thresholds(max_rms=100.0, max_abs=1e4))
    assert run(st, [summary(rms=1.0, max_abs=5e4)]) == [(0, "exploding", False)]


@pytest.mark.parametrize(
    "kind, good, bad, alert",
    [
        (RELU, summary(), summary(fired=[0] * 8), "dead"),
        (TANH, summary(at_bound=[0] * 8), summary(at_bound=[100] * 8), "saturated"),
        (BLOCK, summary(), summary(rms=5000.0), "exploding"),
        (BLOCK, summary(), summary(nonfinite=1), "nonfinite"),
    ],
)
def test_conformance_every_detector_fires_once_and_recovers_once(kind, good, bad, alert):
    th = Thresholds(window=1, recovery_samples=2)
    st = LayerState("x", kind, th)
    series = [good, bad, bad, bad, good, good, good]
    res = [r for r in run(st, series) if r[1] == alert]
    assert res == [(1, alert, False), (5, alert, True)]
    st2 = LayerState("x", kind, th)
    _, alerts = st2.update(0, bad)
    a = next(a for a in alerts if a.kind == alert)
    # one readable line: step, layer, what is wrong with its threshold, causes and what to try
    assert "\n" not in a.message and a.message.startswith("step 0 | x | ") and "try" in a.message


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"window": 0}, "`window` to be a positive integer, got 0"),
        ({"dead_fraction": 1.5}, "`dead_fraction` to be a number in (0, 1], got 1.5"),
        ({"max_rms": -1}, "`max_rms` to be a positive finite number, got -1"),
        ({"growth_factor": 1.0}, "`growth_factor` to be greater than 1"),
        ({"saturation_tolerance": 0.7}, "`saturation_tolerance` to be a number in [0, 0.5)"),
    ],
)
def test_threshold_errors_name_the_value(kwargs, needle):
    with pytest.raises(ValueError) as e:
        Thresholds(**kwargs)
    assert needle in str(e.value)


def test_layer_state_round_trips():
    th = Thresholds(window=3)
    a = LayerState("l", RELU, th)
    run(a, [summary(fired=[0, 0, 0, 0, 1, 1, 1, 1])] * 2)
    b = LayerState("l", RELU, th)
    b.load_state_dict(a.state_dict())
    s = summary(fired=[0, 0, 0, 0, 1, 1, 1, 1])
    ha, aa = a.update(9, s)
    hb, ab = b.update(9, s)
    assert ha == hb and aa == ab == []  # alert state restored: no duplicate alert
