"""Bit-width paths (otaro.training.bps): coverage, the top guard, exploitation, determinism, resume."""

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otaro.errors import OtaroError
from otaro.formats import ALL_BITS, TOP_BITS
from otaro.training.bps import PATHS, BPSConfig, BPSPath, make_path


def _bits_for(cls):
    return (4,) if cls.single_bit else ALL_BITS


def flat(b, t):
    return 2.0


def bad3(b, t):
    """Bit-width 3 is far worse than the rest (a stand-in for a precision that needs training)."""
    return 6.0 if b == 3 else 2.0


def drive(path, steps, loss=flat):
    for t in range(steps):
        b = path.next_bits()
        path.observe(b, loss(b, t))
    return path.history


def top_windows_ok(history, top, window):
    return all(top in history[i:i + window] for i in range(len(history) - window + 1))


# -- every registered path --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PATHS))
def test_every_path_visits_every_bit_width(name):
    cls = PATHS[name]
    for loss in (flat, bad3):
        path = make_path(name, _bits_for(cls), seed=3)
        history = drive(path, 200, loss)
        assert set(history) == set(path.bits), (name, Counter(history))
        # each path has a hard bound: bps and round-robin visit all within the first segment
        if name in ("bps", "round-robin", "fixed"):
            assert set(history[:len(path.bits)]) == set(path.bits)


@pytest.mark.parametrize("name", sorted(PATHS))
def test_every_path_resumes_the_same_path_through_json(name):
    cls = PATHS[name]
    loss = lambda b, t: 2.0 + 0.3 * (8 - b) + 0.01 * (t % 7)
    ref = make_path(name, _bits_for(cls), seed=11)
    drive(ref, 100, loss)

    first = make_path(name, _bits_for(cls), seed=11)
    drive(first, 50, loss)
    state = json.loads(json.dumps(first.state_dict()))
    second = make_path(name, _bits_for(cls), seed=11)
    second.load_state_dict(state)
    for t in range(50, 100):
        b = second.next_bits()
        second.observe(b, loss(b, t))
    assert second.history == ref.history
    assert second.state_dict() == json.loads(json.dumps(ref.state_dict()))
    json.dumps(second.describe())  # logs are JSON-able


def test_bps_resume_mid_segment_both_explore_rules():
    for explore in ("ucb", "epsilon"):
        knobs = {"explore": explore, "epsilon": 0.3, "segment_len": 16}
        ref = make_path("bps", ALL_BITS, 5, **knobs)
        drive(ref, 100, bad3)
        a = make_path("bps", ALL_BITS, 5, **knobs)
        drive(a, 50, bad3)  # 50 is not a multiple of 16: a segment is pending
        assert a.state_dict()["pending"]
        b = make_path("bps", ALL_BITS, 5, **knobs)
        b.load_state_dict(json.loads(json.dumps(a.state_dict())))
        for t in range(50, 100):
            bits = b.next_bits()
            b.observe(bits, bad3(bits, t))
        assert b.history == ref.history, explore


# -- BPS ----------------------------------------------------------------------------------------


def test_cold_start_is_a_round_robin_top_first():
    path = make_path("bps", ALL_BITS, 0)
    drive(path, 7, bad3)
    assert path.history == [TOP_BITS] + [b for b in ALL_BITS if b != TOP_BITS]


@pytest.mark.parametrize("knobs", [
    {},
    {"explore": "epsilon"},
    {"explore": "epsilon", "epsilon": 1.0},
    {"segment_len": 5, "top_every": 3},
    {"segment_len": 32, "top_every": 9, "score": "loss"},
    {"segment_len": 1, "top_every": 2, "explore": "epsilon", "epsilon": 0.0},
])
def test_top_precision_in_every_window_of_top_every_steps(knobs):
    # The top has the lowest loss, so the score never asks for it: only the guard does.
    loss = lambda b, t: 10.0 - b
    path = make_path("bps", ALL_BITS, 1, **knobs)
    history = drive(path, 300, loss)
    window = knobs.get("top_every", knobs.get("segment_len", 16))
    assert top_windows_ok(history, TOP_BITS, window)
    assert not top_windows_ok(history, TOP_BITS, window - 1) or window == 2


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sets(st.sampled_from(ALL_BITS), min_size=2).map(sorted),
    segment_len=st.integers(1, 20),
    top_every=st.one_of(st.none(), st.integers(2, 12)),
    explore=st.sampled_from(["ucb", "epsilon"]),
    score=st.sampled_from(["gap", "loss"]),
    losses=st.lists(st.floats(0, 20), min_size=7, max_size=7),
    seed=st.integers(0, 1000),
)
def test_bps_invariants(bits, segment_len, top_every, explore, score, losses, seed):
    path = make_path("bps", bits, seed, segment_len=segment_len, top_every=top_every, explore=explore, score=score)
    history = drive(path, 120, lambda b, t: losses[b - 2])
    assert set(history) <= set(bits)
    window = top_every or max(segment_len, 2)
    n = len(bits)
    cold = n + -(-(n - 1) // (window - 1))  # the cold start, with the top guard's interruptions
    assert set(history[:cold]) == set(bits)
    assert top_windows_ok(history, max(bits), window)
    assert sum(path.visits.values()) == 120
    norm = [s for s in path.scores().values() if s is not None]
    assert norm and all(0.0 <= s <= 1.0 for s in norm)


@pytest.mark.parametrize("knobs", [{}, {"score": "loss"}, {"explore": "epsilon"}])
def test_bps_exploits_the_worst_bit_width_and_still_explores(knobs):
    steps = 400
    counts = Counter(drive(make_path("bps", ALL_BITS, 0, **knobs), steps, bad3))
    uniform = steps / len(ALL_BITS)  # what round-robin gives every bit-width
    rr = Counter(drive(make_path("round-robin", ALL_BITS, 0), steps, bad3))
    assert abs(rr[3] - uniform) <= 1
    assert counts[3] > 1.5 * uniform, counts
    assert all(counts[b] >= 2 for b in ALL_BITS), counts
    assert counts[TOP_BITS] >= steps // 16


@pytest.mark.parametrize("explore", ["ucb", "epsilon"])
def test_bps_gap_with_equal_losses_is_near_uniform(explore):
    steps = 700
    path = make_path("bps", ALL_BITS, 0, explore=explore, score="gap")
    counts = Counter(drive(path, steps, flat))
    # the top gets its guard share (one slot per window); the lower bit-widths share the rest
    top, lower = max(ALL_BITS), ALL_BITS[:-1]
    assert counts[top] >= steps // path.config.top_window
    uniform = (steps - counts[top]) / len(lower)
    assert all(abs(counts[b] - uniform) <= 0.1 * uniform for b in lower), counts


def test_gap_score_is_time_aligned_and_top_scores_zero():
    path = BPSPath(BPSConfig(bits=(2, 4, 8), ema=0.5))
    path.observe(8, 3.0)
    path.observe(2, 5.0)  # gap sample 5 - 3 = 2
    path.observe(8, 1.0)  # top EMA -> 2.0
    path.observe(2, 3.0)  # gap sample 3 - 2 = 1 -> gap EMA 0.5 * 2 + 0.5 * 1 = 1.5
    path.observe(4, 2.5)  # gap 0.5
    assert path.raw_scores() == {2: 1.5, 4: 0.5, 8: 0.0}
    # the top is not an exploitation candidate with the gap score: normalised over 2 and 4 only
    assert path.scores() == {2: 1.0, 4: 0.0, 8: None}
    loss = BPSPath(BPSConfig(bits=(2, 4, 8), ema=0.5, score="loss"))
    for b, l in [(8, 3.0), (2, 5.0), (8, 1.0), (2, 3.0), (4, 2.5)]:
        loss.observe(b, l)
    assert loss.raw_scores() == {2: 4.0, 4: 2.5, 8: 2.0}


def test_equal_scores_normalise_to_zero_and_nonfinite_losses_are_skipped():
    path = make_path("bps", (2, 8), 0)
    assert path.scores() == {2: None, 8: None}
    path.observe(2, 1.0)
    path.observe(8, 1.0)
    path.observe(8, float("nan"))
    assert path.scores() == {2: 0.0, 8: None}
    assert path.visits == {2: 1, 8: 2} and path.describe()["skipped"] == 1


def test_ties_go_to_lower_bits_and_ucb_spreads_a_segment():
    path = make_path("bps", (2, 3, 4), 0, segment_len=6, top_every=6)
    drive(path, 6)  # cold start 4, 2, 3, then equal scores: UCB alternates over the lower bits
    assert path.history == [4, 2, 3, 2, 3, 2]


def test_same_seed_same_path_different_seed_different_path():
    def hist(seed, name="bps", **knobs):
        return drive(make_path(name, ALL_BITS, seed, **knobs), 200, bad3)

    assert hist(4, explore="epsilon", epsilon=0.5) == hist(4, explore="epsilon", epsilon=0.5)
    assert hist(4, explore="epsilon", epsilon=0.5) != hist(5, explore="epsilon", epsilon=0.5)
    assert hist(4, "random") == hist(4, "random") != hist(5, "random")
    assert hist(4) == hist(99)  # UCB draws no random numbers


def test_describe_has_config_counts_and_scores():
    path = make_path("bps", "2-8", 0)
    drive(path, 20, bad3)
    d = json.loads(json.dumps(path.describe()))
    assert d["path"] == "bps" and d["config"]["segment_len"] == 16 and d["config"]["bits"] == list(ALL_BITS)
    assert sum(d["visits"].values()) == 20 and d["scores"]["3"] == 1.0 and d["steps"] == 20


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": (4,)}, "at least two distinct"),
    ({"bits": (4, 4)}, "at least two distinct"),
    ({"bits": (1, 2)}, "not supported"),
    ({"bits": (2, 9)}, "not supported"),
    ({"bits": ALL_BITS, "segment_len": 0}, "segment_len"),
    ({"bits": ALL_BITS, "segment_len": 2.5}, "segment_len"),
    ({"bits": ALL_BITS, "explore": "greedy"}, "ucb, epsilon"),
    ({"bits": ALL_BITS, "score": "accuracy"}, "gap, loss"),
    ({"bits": ALL_BITS, "epsilon": 1.5}, "epsilon"),
    ({"bits": ALL_BITS, "epsilon": -0.1}, "epsilon"),
    ({"bits": ALL_BITS, "ema": 1.0}, "ema"),
    ({"bits": ALL_BITS, "ema": 0}, "ema"),
    ({"bits": ALL_BITS, "ucb_c": -1}, "ucb_c"),
    ({"bits": ALL_BITS, "ucb_c": float("inf")}, "ucb_c"),
    ({"bits": ALL_BITS, "top_every": 1}, "top_every"),
    ({"bits": ALL_BITS, "seed": -1}, "seed"),
])
def test_bad_bps_configs_raise_with_a_useful_message(kwargs, message):
    with pytest.raises(OtaroError, match=message) as e:
        BPSConfig(**kwargs)
    assert isinstance(e.value, ValueError)


def test_factory_and_path_errors():
    with pytest.raises(OtaroError, match="bps, round-robin, random, fixed"):
        make_path("greedy", ALL_BITS)
    with pytest.raises(OtaroError, match="segment_lenght"):
        make_path("bps", ALL_BITS, 0, segment_lenght=8)
    with pytest.raises(OtaroError, match="one bit-width"):
        make_path("fixed", ALL_BITS)
    # knobs of other paths are ignored (the trainer passes every path setting)
    assert make_path("round-robin", ALL_BITS, 0, segment_len=8, explore="ucb").history == []
    path = make_path("bps", (2, 4, 8), 0)
    with pytest.raises(OtaroError, match="not on this path"):
        path.observe(3, 1.0)
    with pytest.raises(OtaroError, match="configured"):
        path.load_state_dict(make_path("bps", (2, 4, 8), 0, segment_len=8).state_dict())
    with pytest.raises(OtaroError, match="'round-robin', not 'bps'"):
        path.load_state_dict(make_path("round-robin", (2, 4, 8), 0).state_dict())
    state = path.state_dict()
    state["pending"] = [3]
    with pytest.raises(OtaroError, match="corrupt"):
        path.load_state_dict(state)
