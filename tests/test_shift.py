"""adapters/shift.py: the unfamiliarity p-value (full conformal over both tails of both scores) and the streaming
shift monitor (conformal test martingale), against brute-force definitions and on repeated in-distribution draws."""

from __future__ import annotations

import math

import numpy as np
import pytest

from adapters.shift import MonitorConfig, Reference, ShiftMonitor


def _brute_p(cal: np.ndarray, x: np.ndarray) -> float:
    """The definition, written out: the bag is the calibration pairs and x; each point's A is its smallest rank
    over the four tails (e high, e low, h high, h low), counting points at least as extreme, itself included; ties
    of the smallest rank are broken by the second smallest."""
    bag = np.vstack([cal, x[None]])
    tails = [bag[:, 0], -bag[:, 0], bag[:, 1], -bag[:, 1]]
    a = [tuple(sorted(int((t >= t[j]).sum()) for t in tails)[:2]) for j in range(len(bag))]
    return sum(aj <= a[-1] for aj in a) / len(bag)


def _id_scores(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """In-distribution (epistemic, entropy) pairs, correlated like the real ones."""
    h = rng.beta(4, 3, n)
    return 0.02 * h * rng.gamma(2.0, 1.0, n), h


@pytest.mark.parametrize("seed", range(4))
def test_p_value_equals_the_definition(seed):
    rng = np.random.default_rng(seed)
    e, h = _id_scores(rng, 30)
    e[:5] = 0.0  # ties, as a deterministic adapter's MI
    ref = Reference(e, h)
    xs = np.array(
        [[0.0, 0.5], [0.5, 0.5], [0.01, 0.01], [0.01, 0.99], [e[3], h[3]], [float(np.median(e)), 0.57]]
    )
    got = ref.p_values(xs[:, 0], xs[:, 1])
    want = [_brute_p(np.c_[e, h], x) for x in xs]
    assert got == pytest.approx(want, abs=1e-12)
    assert ref.p_value(*xs[1]) == pytest.approx(want[1])
    assert got.min() >= 1 / 31 and got.max() <= 1.0
    assert got[1] <= 4 / 31  # MI far above every calibration item: among the most extreme points of the bag
    # leave-one-out: each calibration item against the other 29
    loo = ref.leave_one_out()
    for i in (0, 7, 29):
        keep = np.arange(30) != i
        assert loo[i] == pytest.approx(_brute_p(np.c_[e[keep], h[keep]], np.array([e[i], h[i]])))


def test_in_distribution_false_alarms_stay_below_alpha_over_repeated_draws():
    """Validity: over fresh calibration sets and held-out items from the same distribution, P(p ≤ α) ≤ α (the
    rank-minimum is exactly calibrated, so it is close to α, not far below as Bonferroni would be)."""
    rng = np.random.default_rng(0)
    alphas = np.array([0.01, 0.05, 0.1, 0.2])
    hits, total = np.zeros(len(alphas)), 0
    for _ in range(200):
        ref = Reference(*_id_scores(rng, 150))
        p = ref.p_values(*_id_scores(rng, 200))
        hits += (p[:, None] <= alphas).sum(0)
        total += len(p)
    rate = hits / total
    sd = np.sqrt(alphas * (1 - alphas) / 200)  # the draws of the calibration set dominate the variance
    assert (rate <= alphas + 3 * sd).all(), rate
    assert rate[1] >= 0.035  # not wastefully conservative at the default level 0.05


def test_shifted_inputs_are_flagged_in_either_tail():
    rng = np.random.default_rng(1)
    ref = Reference(*_id_scores(rng, 300))
    task_shift = ref.p_values(np.full(50, 0.2), rng.uniform(0.1, 0.3, 50))  # MI up, entropy down
    domain_shift = ref.p_values(np.zeros(50), np.full(50, 0.9999))  # entropy up, MI at its floor
    assert (task_shift < 0.05).all() and (domain_shift < 0.05).all()


def test_reference_round_trips_through_the_record_and_refuses_bad_input():
    rng = np.random.default_rng(2)
    ref = Reference(*_id_scores(rng, 40), signals=("epistemic_mean", "entropy_mean"))
    rec = ref.to_record()
    assert rec["n"] == 40 and rec["signals"] == ["epistemic_mean", "entropy_mean"]
    assert [r[1] for r in rec["scores"]] == sorted(r[1] for r in rec["scores"])  # sorted by entropy
    back = Reference.from_record(rec)
    assert back is not None and back.signals == ("epistemic_mean", "entropy_mean")
    x = (0.004, 0.6)
    assert back.p_value(*x) == pytest.approx(ref.p_value(*x))
    assert Reference.from_record(None) is None and Reference.from_record({"scores": []}) is None
    with pytest.raises(ValueError, match="pairs"):
        Reference(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="finite"):
        Reference(np.array([np.nan]), np.array([0.5]))
    with pytest.raises(ValueError, match="shape"):
        Reference.from_record({"scores": [[1.0, 2.0, 3.0]]})


# ---- monitor ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"alpha": 0}, "alpha=0"),
        ({"alpha": 1.5}, "alpha=1.5"),
        ({"unfamiliar_alpha": -0.1}, "unfamiliar_alpha"),
        ({"period": 5}, "period=5"),
        ({"window": 0}, "window=0"),
        ({"bins": 2.5}, "bins=2.5"),
        ({"jump": 1.0}, "jump=1.0"),
    ],
)
def test_monitor_refuses_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        MonitorConfig(**kw)


def test_monitor_refuses_a_missing_reference_and_non_finite_scores():
    with pytest.raises(TypeError, match="Reference"):
        ShiftMonitor(None)  # type: ignore[arg-type]
    m = ShiftMonitor(Reference(np.zeros(5), np.linspace(0.1, 0.9, 5)))
    with pytest.raises(ValueError, match="confidence=nan"):
        m.observe(0.0, 0.5, float("nan"))
    assert m.state().observed == 0  # nothing was counted


def test_monitor_false_alarms_on_in_distribution_streams_stay_below_alpha():
    """Ville: P(the martingale ever reaches 1/α in a period) ≤ α when calibration and stream are exchangeable."""
    rng = np.random.default_rng(3)
    alpha, streams, alarms = 0.1, 120, 0
    for _ in range(streams):
        e, h = _id_scores(rng, 100 + 300)
        m = ShiftMonitor(Reference(e[:100], h[:100]), MonitorConfig(alpha=alpha, period=300))
        for i in range(100, 400):
            st = m.observe(e[i], h[i], 0.7)
        alarms += st.alarm
    assert alarms / streams <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / streams)


def test_monitor_online_p_values_are_uniform_in_distribution():
    """The smoothed online p-values the martingale bets on: uniform on [0, 1] (their mean and histogram)."""
    rng = np.random.default_rng(4)
    e, h = _id_scores(rng, 2100)
    m = ShiftMonitor(Reference(e[:100], h[:100]), MonitorConfig(period=2000))
    ps = np.array([m.observe(e[i], h[i], 0.7).online_p for i in range(100, 2100)])
    assert abs(ps.mean() - 0.5) < 0.03
    counts = np.histogram(ps, bins=5, range=(0, 1))[0]
    assert (abs(counts - 400) < 80).all(), counts


def test_monitor_alarms_soon_after_a_shift_and_reports_its_state():
    rng = np.random.default_rng(5)
    e, h = _id_scores(rng, 500)
    m = ShiftMonitor(Reference(e[:200], h[:200]), MonitorConfig(alpha=0.01, window=50, bins=4))
    for i in range(200, 500):
        st = m.observe(e[i], h[i], 0.6)
    assert not st.alarm and st.observed == 300
    for _ in range(100):  # task shift: MI far above, entropy low, the adapter confident
        st = m.observe(0.3, 0.1, 0.95)
        if st.alarm:
            break
    assert st.alarm and st.alarm_at is not None and st.alarm_at <= 300 + 20
    assert (
        st.statistic >= st.threshold == pytest.approx(5 / 0.01)
    )  # five components: extremeness and four tails
    assert st.alarm_by is not None and dict(st.components)[st.alarm_by] >= st.threshold
    assert sum(st.histogram) == st.observed and len(st.histogram) == 4
    assert st.unfamiliar >= st.alarm_at - 300  # every shifted request had p < 0.05
    assert st.recent == 50 and st.accuracy_estimate == pytest.approx(
        (0.95 * (st.alarm_at - 300) + 0.6 * (50 - (st.alarm_at - 300))) / 50
    )
    m.reset()
    st = m.state()
    assert (
        st.observed,
        st.alarm,
        st.statistic,
        st.periods,
        st.accuracy_estimate,
        st.online_p,
        st.alarm_by,
    ) == (
        0,
        False,
        1.0,
        1,
        None,
        None,
        None,
    )
    assert all(v == 1.0 for _, v in st.components)


def test_monitor_catches_a_shift_of_one_score_s_bulk_that_no_single_request_shows():
    """A shift that doubles the epistemic score without making any request extreme (BoolQ on DALorRA in
    bench/results/shift.md): the per-request A stays unremarkable, so the extremeness martingale alone stays
    low, while the epistemic-high component raises the alarm."""
    rng = np.random.default_rng(8)
    e, h = _id_scores(rng, 400)
    m = ShiftMonitor(Reference(e[:250], h[:250]), MonitorConfig(alpha=0.01))
    for i in range(250, 400):
        st = m.observe(e[i], h[i], 0.6)
    assert not st.alarm
    ref_e = np.sort(e[:250])
    for _ in range(
        300
    ):  # epistemic scores drawn from the calibration's 75th–97th percentiles: none beyond them
        st = m.observe(float(ref_e[rng.integers(188, 243)]), float(rng.beta(4, 3)), 0.6)
        if st.alarm:
            break
    assert st.alarm and st.alarm_by == "epistemic_high", st.components
    assert dict(st.components)["extremeness"] < 0.01 * st.threshold


def test_monitor_drops_tails_without_information_and_keeps_its_guarantee():
    """A deterministic adapter's MI is 0 on every calibration item: its two tails would only add noise and cost
    Bonferroni shares, so they get no component and the threshold is 3/α."""
    rng = np.random.default_rng(9)
    _, h = _id_scores(rng, 300)
    m = ShiftMonitor(Reference(np.zeros(200), h[:200]), MonitorConfig(alpha=0.05))
    assert m.components == ("extremeness", "entropy_high", "entropy_low")
    for i in range(200, 300):
        st = m.observe(0.0, h[i], 0.6)
    assert st.threshold == pytest.approx(3 / 0.05) and len(st.components) == 3


def test_monitor_restarts_after_its_period():
    rng = np.random.default_rng(6)
    e, h = _id_scores(rng, 60)
    m = ShiftMonitor(Reference(e[:20], h[:20]), MonitorConfig(period=15))
    for i in range(20, 50):
        st = m.observe(e[i], h[i], 0.5)
    assert (st.periods, st.observed) == (1, 15)
    assert m._size == 20 + 15  # the bag holds the calibration items and this period's requests only


def test_unfamiliarity_passed_in_is_used_for_the_counts():
    m = ShiftMonitor(Reference(np.zeros(10), np.linspace(0, 1, 10)), MonitorConfig(unfamiliar_alpha=0.05))
    st = m.observe(0.0, 0.5, 0.8, unfamiliarity=0.01)
    assert st.unfamiliar == 1 and st.histogram[0] == 1
    st = m.observe(0.0, 0.5, 0.8, unfamiliarity=0.99)
    assert st.unfamiliar == 1 and st.histogram[-1] == 1


def test_shift_benchmark_analysis_runs_on_cached_scores(tmp_path, monkeypatch):
    """bench/shift.py's analysis end to end on made-up cached logits (no model): every target is reported with a
    value, a goal and whether it is met, and the tables carry K beside every row."""
    import argparse

    import bench.common
    import bench.shift as sh

    monkeypatch.chdir(tmp_path)  # the adapters' cached logits live under ./runs
    got = {}
    monkeypatch.setattr(bench.common, "write", lambda name, data, table: got.update(data=data, table=table))
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)  # no live targets from the repository's results
    a = argparse.Namespace(
        calib_items=120,
        shift_items=30,
        sets=["winogrande", "mmlu", "boolq", "arc_easy_2choice"],
        samples=4,
        target_error=0.3,
        test_limit=None,
        score_command=[],
        delta=0.1,
        alpha_u=0.05,
        seeds=[0],
        methods=["lora", "dalorra"],
        monitor_streams=2,
    )
    rng = np.random.default_rng(0)
    for method, S in (("lora", 1), ("dalorra", 4)):
        out = sh.adapter_dir(method, 0)
        out.parent.mkdir(parents=True, exist_ok=True)
        for name, items in sh.item_sets(0, a):
            y = np.array([it.label for it in items])
            lg = rng.normal(0, 1, (1, len(items), 5)) + rng.normal(0, 0.3 * (S > 1), (S, len(items), 5))
            lg[:, np.arange(len(items)), y] += 2.0 * (rng.uniform(size=len(items)) < 0.7)
            for b, it in enumerate(items):
                lg[:, b, len(it.choices) :] = -np.inf
            np.save(str(out) + f".{name}_logits.npy", lg)
    sh.analyse(a)
    targets = got["data"]["targets"]
    assert {n.split("_")[0] for n in targets} <= {"mixed", "false", "coverage"}
    assert all({"value", "goal", "met"} <= set(t) for t in targets.values())
    assert "mixed_shifted_answered_dalorra_minus_lora_at_equal_id_coverage" in targets
    assert all("K" in r for r in got["data"]["sets"] + got["data"]["mixtures"])
    assert "## Mixed traffic" in got["table"]
    # the K lever only ever removes answers, and only where K is one the calibration split never had
    lever = got["data"]["k_lever"]
    assert {r["method"] for r in lever} == {"lora+ts", "dalorra+ts"}
    for r in got["data"]["sets"]:
        assert r["coverage_full_k"] <= r["coverage_full"]
        cal_k = next(q["calibration_K"] for q in lever if q["method"] == r["method"])
        if set(r["K"]) <= set(cal_k):
            assert r["coverage_full_k"] == r["coverage_full"]
    assert "## A lever, not shipped" in got["table"]


def test_accuracy_estimate_is_average_thresholded_confidence_and_survives_a_miscalibrated_adapter():
    """ATC on negative entropy: the threshold is fitted on the calibration items so that there the share with
    entropy below it equals their accuracy; on fresh in-distribution traffic of an underconfident adapter it
    estimates accuracy where the mean confidence is far off. The threshold travels in the record, a bad one is
    refused, and a record without it falls back to the mean confidence."""
    from adapters.decision import fit_policy
    from adapters.shift import atc_threshold

    rng = np.random.default_rng(11)

    def draw(n):  # an underconfident adapter: right with probability q, but says q / 2 + 0.15
        q = rng.uniform(0.3, 1.0, n)
        h = 1.0 - q + rng.normal(0, 0.05, n)  # its normalised entropy falls as q rises
        return 0.5 * q + 0.15, h, rng.uniform(size=n) < q

    conf, h, correct = draw(400)
    t = atc_threshold(h, correct)
    assert abs((h < t).mean() - correct.mean()) <= 1 / 400
    e = 0.02 * rng.gamma(2.0, 1.0, 400)
    rec = fit_policy(conf, e, h, correct, 0.3)["reference"]
    assert rec["accuracy_threshold"] == pytest.approx(t, rel=1e-7)
    ref = Reference.from_record(rec)
    assert ref.accuracy_threshold == pytest.approx(t, rel=1e-7)
    m = ShiftMonitor(ref, MonitorConfig(window=400))
    c2, h2, y2 = draw(400)
    e2 = 0.02 * rng.gamma(2.0, 1.0, 400)
    for i in range(400):
        st = m.observe(e2[i], h2[i], c2[i])
    assert st.accuracy_estimate_method == "average thresholded confidence"
    assert st.accuracy_estimate == pytest.approx((h2 < t).mean())
    assert abs(st.accuracy_estimate - y2.mean()) < 0.06  # ATC: right in distribution
    assert abs(c2.mean() - y2.mean()) > 0.1  # the mean confidence is not
    old = ShiftMonitor(Reference(e, h), MonitorConfig(window=400))  # a record without the threshold
    for i in range(400):
        st = old.observe(e2[i], h2[i], c2[i])
    assert st.accuracy_estimate_method == "mean calibrated confidence"
    assert st.accuracy_estimate == pytest.approx(c2.mean())
    with pytest.raises(ValueError, match="accuracy_threshold"):
        Reference.from_record({**rec, "accuracy_threshold": "high"})


def test_live_benchmark_measures_the_estimate_over_every_full_window():
    """bench/shift_live.py's bias measure: at each request from the window-th on, the estimate minus the true
    accuracy of the same last `window` requests; the mean over those windows, and nothing before a window is full."""
    from bench.shift_live import window_gaps

    rows = [{"correct": i % 2 == 0, "accuracy_estimate": 0.6} for i in range(10)]
    g = window_gaps(rows, 4)
    assert g["windows"] == 7
    assert g["mean"] == pytest.approx(0.1) and g["mean_abs"] == pytest.approx(0.1)
    rows[-1]["accuracy_estimate"] = 0.3  # the last window's estimate under the truth by 0.2
    g = window_gaps(rows, 4)
    assert g["min"] == pytest.approx(-0.2) and g["mean"] == pytest.approx((6 * 0.1 - 0.2) / 7)
    assert window_gaps(rows[:3], 4)["windows"] == 0
