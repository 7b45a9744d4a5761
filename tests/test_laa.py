"""LAA (otaro.training.laa): the update schedule, and a toy model against a hand-written reference."""

import json

import numpy as np
import pytest
import torch

from otaro.errors import OtaroError
from otaro.training.laa import LAA, LAAConfig, StepPlan, scale_grads

SCRIPT = [2, 3, 2, 3, 8, 2, 8, 3, 3, 3, 3, 3]


def run_plans(laa, path):
    plans = []
    for b in path:
        plan = laa.plan(b)
        plans.append(plan)
        laa.commit(plan)
    return plans


def test_every_step_is_one_update_and_low_bit_steps_average_a_window():
    laa = LAA(LAAConfig(threshold=4, k=4))
    plans = run_plans(laa, SCRIPT)
    assert [p.low for p in plans] == [b <= 4 for b in SCRIPT]
    # the window grows to k, restarts after every high-bit step, and stays at k once full
    assert [p.window for p in plans] == [1, 2, 3, 4, 0, 1, 0, 1, 2, 3, 4, 4]
    assert [p.keep for p in plans] == [0, 1, 2, 3, 0, 0, 0, 0, 1, 2, 3, 3]
    assert [p.grad_factor for p in plans] == [1, 1 / 2, 1 / 3, 1 / 4, 1, 1, 1, 1, 1 / 2, 1 / 3, 1 / 4, 1 / 4]
    assert sum(p.optimizer_steps for p in plans) == len(SCRIPT)
    assert (laa.pending, laa.low_updates, laa.updates, laa.steps) == (4, 10, 12, 12)


def test_no_starvation_over_32_mostly_low_bit_steps():
    """The defect this rule replaces: with k=4 the old LAA made one update per 4 low-bit steps,
    so a path that is mostly low-bit (as BPS's gap score makes it) got ~15 updates in 32 steps."""
    rng = np.random.default_rng(0)
    path = [int(b) for b in rng.choice([2, 3, 4, 4, 2, 3, 8], size=32)]
    laa = LAA(LAAConfig(threshold=4, k=4))
    plans = run_plans(laa, path)
    assert laa.updates == sum(p.optimizer_steps for p in plans) == 32
    low = sum(b <= 4 for b in path)
    assert low > 24 and laa.low_updates == low
    # bounded delay: every low-bit gradient is in its own step's update with weight 1/n >= 1/k
    assert all(p.low and 1 / p.window >= 1 / 4 or not p.low for p in plans)


def test_high_bits_never_mix_with_low_bit_gradients():
    laa = LAA(LAAConfig(threshold=5, k=3))
    for b in [2, 5, 6, 3, 4, 7, 8, 2, 2, 2, 6]:
        plan = laa.plan(b)
        if b > 5:
            assert not plan.low and plan.keep == 0 and plan.grad_factor == 1  # the accumulator is dropped
        else:
            assert plan.low and plan.window == min(laa.pending + 1, 3)
        laa.commit(plan)
        if b > 5:
            assert laa.pending == 0


@pytest.mark.parametrize("cfg", [LAAConfig(enabled=False), LAAConfig(k=1)])
def test_disabled_or_window_of_one_updates_plainly(cfg):
    laa = LAA(cfg)
    plans = run_plans(laa, SCRIPT)
    assert all(p == StepPlan(b, False, 0, 1.0, 0) for p, b in zip(plans, SCRIPT))
    assert (laa.pending, laa.low_updates, laa.updates) == (0, 0, len(SCRIPT))


def test_grad_scale_reduce_and_scale():
    def last(**kw):
        return run_plans(LAA(LAAConfig(k=3, **kw)), [2, 2, 2, 2])[-1]

    assert last().grad_scale == 1 and last().window == 3  # mean of the window
    assert last(reduce="sum").grad_scale == 3  # sum of the window = n * mean
    assert last(scale=0.5).grad_scale == 0.5
    assert last(reduce="sum", scale=2.0).grad_scale == 6.0


def test_state_round_trip_and_stale_plans():
    laa = LAA(LAAConfig(k=4))
    run_plans(laa, SCRIPT[:4])
    state = json.loads(json.dumps(laa.state_dict()))
    other = LAA(LAAConfig(k=4))
    other.load_state_dict(state)
    assert other.state_dict() == laa.state_dict()
    assert [other.plan(b) for b in SCRIPT[4:6]] == [laa.plan(b) for b in SCRIPT[4:6]]
    with pytest.raises(OtaroError, match="same LAA settings"):
        LAA(LAAConfig(k=5)).load_state_dict(state)
    stale = laa.plan(2)
    laa.commit(laa.plan(8))
    with pytest.raises(OtaroError, match="stale"):
        laa.commit(stale)
    with pytest.raises(OtaroError, match="corrupt"):
        LAA(LAAConfig(k=4)).load_state_dict({**state, "pending": 5})
    with pytest.raises(OtaroError, match="missing"):  # a state written by the old delayed-update rule
        LAA(LAAConfig(k=4)).load_state_dict({"config": state["config"], "pending": 1, "flushes": 0, "updates": 1,
                                             "steps": 2})


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


def test_scale_grads_multiplies_drops_and_skips_missing_ones():
    a, b = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    a.grad = torch.full((3,), 6.0)
    scale_grads([a, b], 0.5)
    assert torch.equal(a.grad, torch.full((3,), 3.0)) and b.grad is None
    scale_grads([a, b], torch.tensor(2.0))
    assert torch.equal(a.grad, torch.full((3,), 6.0))
    scale_grads([a], 0)
    assert a.grad is None  # dropped, not zero-filled: no 0 * inf can survive
    with pytest.raises(OtaroError, match="factor"):
        scale_grads([a], -1)


# -- toy model: the plan drives torch SGD/Adam; an explicit numpy reference does the same updates --

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
    """The LAA update rule written out by hand (plain SGD): one update per step; a low-bit step
    updates with the running mean of the window, which a high-bit step restarts."""
    w, mean, n, updates = w0.copy(), None, 0, 0
    for t, b in enumerate(PATH):
        x, y = batch(t)
        g = grad(w, b, x, y)
        if cfg.enabled and cfg.k > 1 and b <= cfg.threshold:
            n = min(n + 1, cfg.k)
            mean = g if n == 1 else ((n - 1) * mean + g) / n
            w = w - LR * cfg.scale * (n if cfg.reduce == "sum" else 1) * mean
        else:
            n, mean = 0, None
            w = w - LR * g
        updates += 1
    return w, updates


def driven(cfg: LAAConfig, w0, opt_cls=torch.optim.SGD, clip: float = 0.0):
    """An optimizer driven by LAA plans exactly as the trainer drives it (grad clip included)."""
    w = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt = opt_cls([w], lr=LR)
    laa = LAA(cfg)
    history = []
    for t, b in enumerate(PATH):
        x, y = (torch.tensor(a) for a in batch(t))
        plan = laa.plan(b)
        scale_grads([w], plan.keep)
        ((x @ q_ste(w, b) - y) ** 2).mean().backward()
        scale_grads([w], plan.grad_factor)
        coef = 1.0
        if clip:
            norm = torch.nn.utils.clip_grad_norm_([w], clip)
            coef = min(1.0, clip / (float(norm) + 1e-6))
        opt.step()
        if plan.low:
            scale_grads([w], 1.0 / (plan.grad_scale * coef))
        else:
            opt.zero_grad(set_to_none=True)
        laa.commit(plan)
        history.append(w.detach().clone().numpy())
    return w.detach().numpy(), laa.updates, history, opt


@pytest.mark.parametrize("cfg", [
    LAAConfig(threshold=4, k=3),
    LAAConfig(threshold=3, k=2, reduce="sum", scale=0.5),
    LAAConfig(threshold=4, k=100, scale=2.0),
    LAAConfig(threshold=4, k=1),
    LAAConfig(enabled=False),
])
def test_toy_model_matches_the_hand_written_reference(cfg):
    w0 = np.array([0.2, -0.1, 0.05])
    got, updates, history, _ = driven(cfg, w0)
    want, want_updates = reference(cfg, w0)
    # float64 on both sides: the only differences are summation order and float rounding,
    # ~1e-15 over 20 steps of O(1) values; a schedule mistake moves w by ~LR * |grad| ~ 1e-2.
    # 1e-6 sits far from both (a rounding-grid flip from a 1e-15 difference is vanishingly rare).
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert updates == want_updates == len(PATH)
    # every step moved the weights: no step is left without an update
    assert all(np.abs(a - b).max() > 0 for a, b in zip([w0] + history[:-1], history))
    plain, _ = reference(LAAConfig(enabled=False), w0)
    if cfg.enabled and cfg.k > 1:
        assert np.abs(got - plain).max() > 1e-3  # the test can tell LAA from plain SGD


def test_clipping_is_undone_on_the_accumulator():
    """Clipping scales the update, not the running mean the next low-bit step builds on: with
    a clip too large to bind the result is the unclipped run, and a binding clip still gives
    every step an update."""
    cfg, w0 = LAAConfig(threshold=4, k=3), np.array([0.2, -0.1, 0.05])
    loose, _, _, _ = driven(cfg, w0, clip=1e9)
    np.testing.assert_allclose(loose, reference(cfg, w0)[0], rtol=0, atol=1e-6)
    tight, updates, history, _ = driven(cfg, w0, clip=1e-3)
    assert updates == len(PATH) and np.abs(tight - loose).max() > 1e-3


def test_adam_state_advances_once_per_step():
    _, updates, _, opt = driven(LAAConfig(threshold=4, k=4), np.zeros(3), opt_cls=torch.optim.Adam)
    (state,) = opt.state.values()
    assert updates == int(state["step"]) == len(PATH)  # 20 training steps, 20 Adam steps


def test_loss_scaled_backward_keeps_the_accumulator_in_the_right_units():
    """fp16 training (GradScaler): the backward adds *scaled* gradients, the scaler's step
    unscales p.grad in place, and the scale changes over the run. The trainer puts the
    accumulator into the backward's units (keep * scale) first; the result must be the unscaled
    rule's. (CPU GradScaler stands in for the GPU one: same unscale-in-place contract.)"""
    cfg, w0 = LAAConfig(threshold=4, k=3), np.array([0.2, -0.1, 0.05])
    w = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    laa = LAA(cfg)
    for t, b in enumerate(PATH):
        x, y = (torch.tensor(a) for a in batch(t))
        plan = laa.plan(b)
        scale_grads([w], plan.keep * scaler.get_scale())
        scaler.scale(((x @ q_ste(w, b) - y) ** 2).mean()).backward()
        scale_grads([w], plan.grad_factor)
        scaler.step(opt)
        scaler.update()
        if plan.low:
            scale_grads([w], 1.0 / plan.grad_scale)
        else:
            opt.zero_grad(set_to_none=True)
        laa.commit(plan)
    assert scaler.get_scale() > 2.0**10  # the scale really changed between steps
    # powers of two scale and unscale exactly: only float64 summation-order rounding remains
    np.testing.assert_allclose(w.detach().numpy(), reference(cfg, w0)[0], rtol=0, atol=1e-12)
