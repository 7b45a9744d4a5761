"""LAA (otaro.training.laa): the update schedule, and a toy model against a hand-written reference."""

import json

import numpy as np
import pytest
import torch

from otaro.errors import OtaroError
from otaro.training.laa import LAA, LAAConfig, StepPlan, apply_flush

SCRIPT = [2, 3, 2, 3, 8, 2, 8, 3, 3, 3, 3, 3]


def run_plans(laa, path):
    plans = []
    for b in path:
        plan = laa.plan(b)
        plans.append(plan)
        laa.commit(plan)
    return plans


def test_one_delayed_update_per_k_low_bit_steps_and_flush_before_high_bits():
    laa = LAA(LAAConfig(threshold=4, k=4))
    plans = run_plans(laa, SCRIPT)
    kinds = [(p.flush_before, p.accumulate, p.step_after) for p in plans]
    acc, kth, high, flush_high = (False, True, False), (False, True, True), (False, False, True), (True, False, True)
    assert kinds == [acc, acc, acc, kth, high, acc, flush_high, acc, acc, acc, kth, acc]
    assert [p.divisor for p in plans] == [1, 1, 1, 4, 1, 1, 1, 1, 1, 1, 4, 1]  # the 1-gradient flush: mean of one
    assert [p.flush_count for p in plans] == [0, 0, 0, 4, 0, 0, 1, 0, 0, 0, 4, 0]
    assert sum(p.optimizer_steps for p in plans) == 5  # flushes at steps 4, 7, 11 + high-bit steps 5, 7
    assert (laa.pending, laa.flushes, laa.updates, laa.steps) == (1, 3, 5, 12)
    end = laa.flush_plan()
    assert end.flush_before and end.bits is None and end.divisor == 1 and not end.step_after
    laa.commit(end)
    assert (laa.pending, laa.flushes, laa.updates, laa.steps) == (0, 4, 6, 12)
    assert not laa.flush_plan().flush_before


def test_high_bits_never_mix_with_pending_low_bit_gradients():
    laa = LAA(LAAConfig(threshold=5, k=3))
    for b in [2, 5, 6, 3, 4, 7, 8, 2, 2, 2, 6]:
        plan = laa.plan(b)
        if b > 5:
            assert not plan.accumulate and plan.step_after
            assert plan.flush_before == (laa.pending > 0)
        else:
            assert plan.accumulate and not plan.flush_before
        laa.commit(plan)
        if b > 5:
            assert laa.pending == 0


def test_disabled_updates_every_step():
    laa = LAA(LAAConfig(enabled=False))
    plans = run_plans(laa, SCRIPT)
    assert all(p == StepPlan(b, False, False, True, 1.0, 0, 0) for p, b in zip(plans, SCRIPT))
    assert (laa.pending, laa.flushes, laa.updates) == (0, 0, len(SCRIPT))


def test_divisor_reduce_and_scale():
    def flush_divisor(**kw):
        laa = LAA(LAAConfig(k=3, **kw))
        return run_plans(laa, [2, 2, 2])[-1].divisor

    assert flush_divisor() == 3
    assert flush_divisor(reduce="sum") == 1
    assert flush_divisor(scale=0.5) == 6  # grad / 6 == 0.5 * mean
    assert flush_divisor(reduce="sum", scale=2.0) == 0.5  # grad / 0.5 == 2 * sum


def test_state_round_trip_and_stale_plans():
    laa = LAA(LAAConfig(k=4))
    run_plans(laa, SCRIPT[:6])
    state = json.loads(json.dumps(laa.state_dict()))
    other = LAA(LAAConfig(k=4))
    other.load_state_dict(state)
    assert other.state_dict() == laa.state_dict()
    assert [other.plan(b) for b in SCRIPT[6:7]] == [laa.plan(b) for b in SCRIPT[6:7]]
    with pytest.raises(OtaroError, match="same LAA settings"):
        LAA(LAAConfig(k=5)).load_state_dict(state)
    stale = laa.plan(2)
    laa.commit(laa.plan(2))
    with pytest.raises(OtaroError, match="stale"):
        laa.commit(stale)
    with pytest.raises(OtaroError, match="corrupt"):
        LAA(LAAConfig(k=4)).load_state_dict({**state, "pending": 4})


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": 1}, "threshold"),
    ({"threshold": 9}, "threshold"),
    ({"k": 0}, "k"),
    ({"k": 2.0}, "k"),
    ({"reduce": "max"}, "mean, sum"),
    ({"scale": 0}, "scale"),
    ({"scale": float("nan")}, "scale"),
    ({"enabled": "yes"}, "enabled"),
])
def test_bad_configs_raise(kwargs, message):
    with pytest.raises(OtaroError, match=message) as e:
        LAAConfig(**kwargs)
    assert isinstance(e.value, ValueError)
    with pytest.raises(OtaroError):
        LAA().plan(9)


def test_apply_flush_divides_grads_and_skips_missing_ones():
    a, b = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    a.grad = torch.full((3,), 6.0)
    apply_flush([a, b], 3)
    assert torch.equal(a.grad, torch.full((3,), 2.0)) and b.grad is None
    with pytest.raises(OtaroError, match="divisor"):
        apply_flush([a], 0)


# -- toy model: the plan drives torch SGD; an explicit numpy reference does the same updates -------

PATH = [8, 2, 3, 2, 8, 2, 3, 4, 2, 3, 6, 3, 3, 2, 2, 4, 2, 7, 8, 2]
LR = 0.1


def q(w, bits):
    """Stand-in quantizer: round onto a grid of step 2**(1-bits) (only the schedule matters here)."""
    step = 2.0 ** (1 - bits)
    return np.round(w / step) * step


def q_ste(w, bits):
    step = 2.0 ** (1 - bits)
    return w + (torch.round(w / step) * step - w).detach()


def batch(t):
    g = np.random.default_rng(t)
    x = g.normal(size=(4, 3))
    y = x @ np.array([0.7, -1.3, 0.4]) + 0.01 * g.normal(size=4)
    return x, y


def grad(w, bits, x, y):
    """d/dw of mean((x @ Q(w) - y)^2) with the straight-through estimator."""
    r = x @ q(w, bits) - y
    return 2.0 * x.T @ r / len(y)


def reference(cfg: LAAConfig, w0):
    """The LAA update rule written out by hand (plain SGD)."""
    w, pending, updates = w0.copy(), [], 0

    def flush():
        nonlocal w, pending, updates
        updates += 1
        g = np.sum(pending, axis=0)
        g = g / len(pending) if cfg.reduce == "mean" else g
        w = w - LR * cfg.scale * g
        pending = []

    for t, b in enumerate(PATH):
        x, y = batch(t)
        if cfg.enabled and b <= cfg.threshold:
            pending.append(grad(w, b, x, y))  # gradient at the weights of the last update
            if len(pending) == cfg.k:
                flush()
        else:
            if pending:
                flush()  # before the high-bit step, which then sees the flushed weights
            w = w - LR * grad(w, b, x, y)
            updates += 1
    if pending:
        flush()
    return w, updates


def driven(cfg: LAAConfig, w0):
    """torch.optim.SGD driven by LAA plans, as the trainer does."""
    w = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=LR)
    laa = LAA(cfg)
    for t, b in enumerate(PATH):
        x, y = (torch.tensor(a) for a in batch(t))
        plan = laa.plan(b)
        if plan.flush_before:
            apply_flush([w], plan.divisor)
            opt.step()
            opt.zero_grad()
        loss = ((x @ q_ste(w, b) - y) ** 2).mean()
        loss.backward()
        if plan.step_after:
            if plan.flush_after:
                apply_flush([w], plan.divisor)
            opt.step()
            opt.zero_grad()
        laa.commit(plan)
    end = laa.flush_plan()
    if end.flush_before:
        apply_flush([w], end.divisor)
        opt.step()
        opt.zero_grad()
    laa.commit(end)
    assert laa.pending == 0
    return w.detach().numpy(), laa.updates


@pytest.mark.parametrize("cfg", [
    LAAConfig(threshold=4, k=3),
    LAAConfig(threshold=3, k=2, reduce="sum", scale=0.5),
    LAAConfig(threshold=4, k=100, scale=2.0),
    LAAConfig(threshold=4, k=1),
    LAAConfig(enabled=False),
])
def test_toy_model_matches_the_hand_written_reference(cfg):
    w0 = np.array([0.2, -0.1, 0.05])
    got, updates = driven(cfg, w0)
    want, want_updates = reference(cfg, w0)
    # float64 on both sides: the only differences are summation order and float rounding,
    # ~1e-15 over 20 steps of O(1) values; a schedule mistake moves w by ~LR * |grad| ~ 1e-2.
    # 1e-6 sits far from both (a rounding-grid flip from a 1e-15 difference is vanishingly rare).
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert updates == want_updates
    plain, _ = reference(LAAConfig(enabled=False), w0)
    if cfg.enabled and cfg.k > 1:
        assert np.abs(got - plain).max() > 1e-3  # the test can tell LAA from plain SGD


def test_adam_state_advances_once_per_flush():
    cfg = LAAConfig(threshold=4, k=4)
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = torch.optim.Adam([w], lr=0.01)
    laa = LAA(cfg)
    steps = 0
    for t, b in enumerate(SCRIPT):
        x, y = (torch.tensor(a) for a in batch(t))
        plan = laa.plan(b)
        if plan.flush_before:
            apply_flush([w], plan.divisor)
            opt.step(), opt.zero_grad()
            steps += 1
        ((x @ q_ste(w, b) - y) ** 2).mean().backward()
        if plan.step_after:
            if plan.flush_after:
                apply_flush([w], plan.divisor)
            opt.step(), opt.zero_grad()
            steps += 1
        laa.commit(plan)
    assert steps == laa.updates == 5
    assert int(opt.state[w]["step"]) == 5  # 12 training steps, 5 optimizer steps (3 are flushes)
