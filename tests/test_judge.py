"""The judge and each detector on scripted series: when an alert fires (once), when it recovers,
what is reported before the evidence is complete, hysteresis, and NaN never being recovery."""

import math

import numpy as np
import pytest
import torch

from monitor import Detector, Thresholds, Verdict
from monitor.activations import BLOCK, RELU, SMOOTH_RELU, TANH
from monitor.detectors import builtin_detectors
from monitor.judge import Judge
from monitor.stats import MAX, UnitSummary

GELU = SMOOTH_RELU["gelu"]


def summary(units=8, positions=100, fired=None, rms=1.0, nonfinite=0, at_bound=None, max_abs=None,
            pre_max=None, pre_min=None, mean_abs=None):
    """A UnitSummary as the stats layer would produce it (per-unit sums over `positions` values)."""
    fired = np.full(units, positions / 2) if fired is None else np.asarray(fired, dtype=float)
    sumsq = np.full(units, rms**2 * positions)
    mx = np.full(units, max_abs if max_abs is not None else 3 * rms)
    nf = np.zeros(units)
    mean_abs = np.full(units, 0.8 * rms) if mean_abs is None else np.asarray(mean_abs, float)
    sumabs = mean_abs * positions
    if nonfinite:
        nf[:] = nonfinite / units
        sumsq[:] = math.nan
        mx[:] = math.nan
        sumabs[:] = math.nan
        fired = np.full(units, math.nan)
    return UnitSummary(
        positions, fired, mx, -mx, sumsq, nf, None if at_bound is None else np.asarray(at_bound, float), sumabs,
        None if pre_max is None else np.asarray(pre_max, float), None if pre_min is None else np.asarray(pre_min, float),
    )


def run(judge, kind, series, name="l"):
    """Feed summaries; return [(step, kind, recovered)]."""
    out = []
    for step, s in enumerate(series):
        _, alerts = judge.judge(name, kind, step, s)
        out += [(step, a.kind, a.recovered) for a in alerts]
    return out


def J(**kw):
    return Judge(Thresholds(**kw), builtin_detectors())


def test_nan_in_series_alerts_at_that_step_and_recovers():
    series = [summary(), summary(), summary(nonfinite=3), summary()]
    assert run(J(recovery_samples=1), BLOCK, series) == [(2, "nonfinite", False), (3, "nonfinite", True)]


def test_nan_is_never_recovery():
    """A layer that went bad and then turns all-NaN must not be told it recovered."""
    j = J(recovery_samples=1, saturated_positions=0.9)
    pinned = summary(at_bound=[100] * 8, rms=1.0)
    nan = summary(at_bound=[0] * 8, nonfinite=800)
    res = run(j, TANH, [pinned, nan, nan, nan])
    assert res == [(0, "saturated", False), (1, "nonfinite", False)]
    j = J(recovery_samples=1)
    res = run(j, BLOCK, [summary(rms=1.0), summary(rms=5000.0), summary(nonfinite=8), summary(nonfinite=8)])
    assert res == [(1, "exploding", False), (2, "nonfinite", False)]
    h, _ = j.judge("l", BLOCK, 9, summary(nonfinite=8))
    assert math.isnan(h.rms) and h.nonfinite == 8


def test_dead_needs_every_unit_value_to_be_zero_over_the_evidence():
    th = dict(dead_fraction=0.5, min_positions=64)
    half_dead = [0, 0, 0, 0, 50, 50, 50, 50]
    sparse = [1, 1, 1, 1, 50, 50, 50, 50]  # fires rarely: sparse, not dead
    assert run(J(**th), RELU, [summary(fired=sparse)] * 3) == []
    j = J(**th)
    assert run(j, RELU, [summary(fired=half_dead)]) == [(0, "dead", False)]
    health, _ = j.judge("l", RELU, 1, summary(fired=half_dead))
    assert health.dead_units == (0, 1, 2, 3) and health.dead_fraction == 0.5


def test_small_batches_are_judged_over_several_samples():
    j = J(min_positions=100, dead_fraction=0.5, recovery_samples=1)
    alive = summary(fired=[5] * 8, positions=40)
    dead = summary(fired=[0] * 8, positions=40)
    # 40 values per sample: a count verdict needs the last 3 samples. The firing at step 0 keeps
    # the layer alive until step 3, when samples 1..3 (120 values) are all silent.
    assert run(j, RELU, [alive, dead, dead, dead]) == [(3, "dead", False)]


def test_numbers_are_reported_from_the_first_step_over_the_evidence_seen():
    """Never a false "healthy": 2 of 10 units silent on 64 values is 0.2 dead, not 0.0."""
    j = J(min_positions=100)
    h, alerts = j.judge("l", RELU, 0, summary(units=10, positions=64, fired=[0, 0] + [30] * 8))
    assert h.dead_fraction == pytest.approx(0.2) and h.dead_units == (0, 1)
    assert (h.evidence_values, h.evidence_steps) == (64, 1) and alerts == []
    h, _ = j.judge("l", RELU, 1, summary(units=10, positions=64, fired=[0, 0] + [30] * 8))
    assert (h.evidence_values, h.evidence_steps) == (128, 2)


def test_a_unit_far_below_zero_is_dead_at_once_even_on_two_values():
    """The pre-activation margin: batch 2, evidence incomplete, but the units sit 100 spreads below zero."""
    j = J(min_positions=100, dead_margin=4.0)
    killed = summary(units=8, positions=2, fired=[0] * 6 + [1, 2],
                     pre_max=[-100.0] * 6 + [0.5, 1.0], pre_min=[-101.0] * 6 + [-0.5, 0.0])
    h, alerts = j.judge("l", RELU, 0, killed)
    assert [(a.kind, a.value) for a in alerts] == [("dead", 0.75)]
    assert h.dead_fraction == 0.75 and h.dead_margin == pytest.approx(100.0) and h.evidence_values == 2
    assert "6 sit far below zero" in alerts[0].message
    # silent on two values but close to zero: reported, not alerted (evidence incomplete)
    j = J(min_positions=100, dead_margin=4.0)
    shy = summary(units=8, positions=2, fired=[0] * 6 + [1, 2],
                  pre_max=[-0.3] * 6 + [0.5, 1.0], pre_min=[-1.3] * 6 + [-0.5, 0.0])
    h, alerts = j.judge("l", RELU, 0, shy)
    assert alerts == [] and h.dead_fraction == 0.75 and h.dead_margin == pytest.approx(0.3)


def test_the_dead_margin_spread_is_the_median_of_the_finite_spreads_only():
    """Units whose pre-activation spread is Inf/NaN (an exploding layer) do not set the scale: the
    median over the other units does. Counted in, the (lower) median here would be Inf, and no unit
    would be dead for certain."""
    j = J(min_positions=100, dead_margin=4.0)
    pre_max = [-100.0] * 3 + [math.inf] * 4 + [math.nan]
    pre_min = [-101.0] * 3 + [0.0] * 4 + [math.nan]
    s = summary(units=8, positions=2, fired=[0] * 3 + [2] * 5, pre_max=pre_max, pre_min=pre_min)
    h, _ = j.judge("l", RELU, 0, s)
    finite = [a - b for a, b in zip(pre_max, pre_min) if math.isfinite(a - b)]
    assert finite == [1.0] * 3
    assert h.dead_fraction == 3 / 8 and h.dead_margin == pytest.approx(100.0 / sorted(finite)[1])
    assert h.metrics["dead_units"] == (0, 1, 2)


def test_a_large_batch_alerts_at_the_first_sampled_step_of_death():
    alive = summary(fired=[50] * 8, positions=128)
    dead = summary(fired=[0] * 8, positions=128)
    assert run(J(min_positions=100), RELU, [alive, alive, dead]) == [(2, "dead", False)]


def test_not_called_dead_before_enough_evidence():
    res = run(J(min_positions=500, window=10), RELU, [summary(fired=[0] * 8, positions=100)] * 6)
    assert res == [(4, "dead", False)]  # 5 samples x 100 values reach 500


def test_the_window_caps_the_steps_evidence_may_span():
    """Batch size 1: with window=20, 20 sampled steps of one value each are complete evidence."""
    res = run(J(min_positions=100, window=20), RELU, [summary(fired=[0] * 8, positions=1)] * 25)
    assert res == [(19, "dead", False)]


def test_hysteresis_no_flapping_at_the_threshold():
    """128/256 vs 127/256 dead, alternating: one alert, no recovery (it must fall below 0.8 x 50%)."""
    j = J(min_positions=100, recovery_samples=2)
    fired_a = [0] * 128 + [50] * 128
    fired_b = [0] * 127 + [50] * 129
    series = [summary(units=256, fired=fired_a if i % 2 == 0 else fired_b) for i in range(240)]
    assert run(j, RELU, series) == [(0, "dead", False)]
    healthy = summary(units=256, fired=[0] * 90 + [50] * 166)  # 35% < 40%
    assert run(j, RELU, [healthy] * 2) == [(1, "dead", True)]


def test_saturation_fires_for_bounded_kinds_only():
    th = dict(saturated_positions=0.9, saturated_fraction=0.5)
    pinned = [100] * 6 + [10, 10]
    j = J(**th)
    assert run(j, TANH, [summary(at_bound=pinned)]) == [(0, "saturated", False)]
    h, _ = j.judge("l", TANH, 1, summary(at_bound=pinned))
    assert h.saturated_units == tuple(range(6)) and h.saturated_fraction == 0.75
    h, _ = J(**th).judge("l", BLOCK, 0, summary())
    assert h.saturated_fraction is None and h.dead_fraction is None and h.dormant_fraction is None


def test_dormant_units_relative_to_their_layer():
    j = J(dormant_tau=0.1, dormant_fraction=0.5)
    shrunk = summary(mean_abs=[1e-3] * 6 + [0.5, 0.6])
    assert run(j, GELU, [summary(), shrunk]) == [(1, "dormant", False)]
    h, _ = j.judge("l", GELU, 2, shrunk)
    assert h.dormant_units == tuple(range(6)) and h.dormant_fraction == 0.75
    # all units shrunk together: not dormant by the relative definition
    assert run(J(), GELU, [summary(mean_abs=[1e-3] * 8)]) == []
    # a dead ReLU unit is dead, not dormant
    h, _ = J().judge("l", RELU, 0, summary(fired=[0] * 6 + [50, 50], mean_abs=[0] * 6 + [0.5, 0.5]))
    assert h.dead_fraction == 0.75 and h.dormant_fraction == 0.0


def test_exploding_by_growth_against_own_baseline():
    j = J(growth_factor=10, baseline_samples=2, recovery_samples=2)
    rms = [1.0, 1.2, 3.0, 15.0, 20.0, 2.0, 2.0, 2.0]
    assert run(j, BLOCK, [summary(rms=r) for r in rms]) == [(3, "exploding", False), (6, "exploding", True)]


def test_exploding_absolute_bounds():
    assert run(J(max_rms=100.0, max_abs=1e4), BLOCK, [summary(rms=500.0)]) == [(0, "exploding", False)]
    assert run(J(max_rms=100.0, max_abs=1e4), BLOCK, [summary(rms=1.0, max_abs=5e4)]) == [(0, "exploding", False)]


@pytest.mark.parametrize(
    "kind, good, bad, alert",
    [
        (RELU, summary(), summary(fired=[0] * 8), "dead"),
        (TANH, summary(at_bound=[0] * 8), summary(at_bound=[100] * 8), "saturated"),
        (GELU, summary(), summary(mean_abs=[1e-4] * 6 + [1, 1]), "dormant"),
        (BLOCK, summary(), summary(rms=5000.0), "exploding"),
        (BLOCK, summary(), summary(nonfinite=1), "nonfinite"),
    ],
)
def test_conformance_every_detector_fires_once_and_recovers_once(kind, good, bad, alert):
    j = J(window=1, recovery_samples=2)
    series = [good, bad, bad, bad, good, good, good]
    res = [r for r in run(j, kind, series) if r[1] == alert]
    assert res == [(1, alert, False), (5, alert, True)]
    _, alerts = J(window=1).judge("x", kind, 0, bad)
    a = next(a for a in alerts if a.kind == alert)
    # one readable line: step, layer, what is wrong with its threshold, causes and what to try
    assert "\n" not in a.message and a.message.startswith("step 0 | x | ") and "try" in a.message


def test_every_builtin_detector_declares_its_interface():
    from monitor.stats import ALL_ROWS

    names = [d.name for d in builtin_detectors()]
    assert names == [
        "dead", "saturated", "dormant", "exploding", "nonfinite", "vanishing_gradient", "exploding_gradient", "collapse",
        "attention_entropy", "attention_sink", "gate_saturated", "hidden_saturated",
    ]
    for d in builtin_detectors():
        assert d.causes and "try" in d.causes
        assert set(d.reads) <= ALL_ROWS and set(d.windowed) <= ALL_ROWS
        assert all(f.isidentifier() for f in d.fields)


class Quiet(Detector):
    name = "quiet"
    fields = ("peak",)
    reads = (MAX,)
    causes = "its largest output stays below 0.1: try a larger init"

    def evaluate(self, layer, memory):
        peak = float(np.nanmax(layer.summary.max))
        memory["seen"] = memory.get("seen", 0) + 1
        return Verdict(peak < 0.1, peak, 0.1, f"quiet: peak {peak:.3g}", {"peak": peak})


def test_a_user_detector_plugs_in_and_keeps_memory():
    j = Judge(Thresholds(recovery_samples=1), [*builtin_detectors(), Quiet()])
    h, alerts = j.judge("l", BLOCK, 0, summary(max_abs=0.05))
    assert h.peak == pytest.approx(0.05) and h.scalars()["peak"] == pytest.approx(0.05)
    assert [a.kind for a in alerts] == ["quiet"] and "try a larger init" in alerts[0].message
    _, alerts = j.judge("l", BLOCK, 1, summary(max_abs=1.0))
    assert [(a.kind, a.recovered) for a in alerts] == [("quiet", True)]
    state = j.state_dict()
    assert state["l"]["detectors"]["quiet"] == {"seen": 2}


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"window": 0}, "`window` to be a positive integer, got 0"),
        ({"dead_fraction": 1.5}, "`dead_fraction` to be a number in (0, 1], got 1.5"),
        ({"max_rms": -1}, "`max_rms` to be a positive finite number, got -1"),
        ({"growth_factor": 1.0}, "`growth_factor` to be greater than 1"),
        ({"saturation_tolerance": 0.7}, "`saturation_tolerance` to be a number in [0, 0.5)"),
        ({"dormant_tau": 1.5}, "`dormant_tau` to be a number in (0, 1)"),
        ({"release": 0}, "`release` to be a number in (0, 1], got 0"),
    ],
)
def test_threshold_errors_name_the_value(kwargs, needle):
    with pytest.raises(ValueError) as e:
        Thresholds(**kwargs)
    assert needle in str(e.value)


def test_judge_state_round_trips_through_torch_save(tmp_path):
    th = Thresholds(min_positions=300)
    a = J(min_positions=300)
    half = summary(fired=[0, 0, 0, 0, 1, 1, 1, 1])
    run(a, RELU, [half] * 3)  # alert at step 2 (300 values)
    torch.save(a.state_dict(), tmp_path / "s.pt")
    b = Judge(th, builtin_detectors())
    b.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    ha, aa = a.judge("l", RELU, 9, half)
    hb, ab = b.judge("l", RELU, 9, half)
    assert ha == hb and aa == ab == []  # evidence and alert state restored: no duplicate alert


def test_version_1_layer_state_loads():
    v1 = {"window": [{"positions": 100, "fired": torch.zeros(8, dtype=torch.float64), "at_bound": None}],
          "baseline_values": [1.0, 1.1], "active": {"dead": 0}}
    j = J()
    j.load_state_dict({"l": v1})
    h, alerts = j.judge("l", RELU, 5, summary(fired=[0] * 8))
    assert alerts == [] and h.dead_fraction == 1.0  # still dead, no second alert
    assert j.layers["l"].detectors["exploding"]["baseline_values"][:2] == [1.0, 1.1]
