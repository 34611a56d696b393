"""Learning-rate and weight-decay schedules against values computed by hand."""

import math

import pytest

from megamoe.optim.lr_scheduler import ScheduleConfig, learning_rate, weight_decay


def lr_at(step, **kw):
    return learning_rate(ScheduleConfig(**{"lr": 1.0, "min_lr": 0.1, "decay_iters": 100, **kw}), step)


def test_warmup_then_linear():
    assert lr_at(0, warmup_iters=10, warmup_init=0.5) == 0.5
    assert lr_at(5, warmup_iters=10) == pytest.approx(0.5)
    assert lr_at(10, warmup_iters=10) == pytest.approx(1.0)
    assert lr_at(55, warmup_iters=10) == pytest.approx(0.1 + 0.5 * 0.9)   # halfway through 90 decay steps
    assert lr_at(100, warmup_iters=10) == pytest.approx(0.1) and lr_at(150, warmup_iters=10) == 0.1


def test_warmup_fraction():
    assert lr_at(5, warmup_fraction=0.1) == pytest.approx(0.5)  # 10 warm-up iterations of 100


def test_cosine():
    assert lr_at(50, decay_style="cosine") == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(25, decay_style="cosine") == pytest.approx(0.1 + 0.9 * (math.cos(math.pi / 4) + 1) / 2)


def test_constant_and_inverse_square_root():
    assert lr_at(70, decay_style="constant") == 1.0
    assert lr_at(16, decay_style="inverse-square-root", warmup_iters=4) == pytest.approx(2 / 4)
    assert lr_at(99, decay_style="inverse-square-root", warmup_iters=1) == pytest.approx(0.1005, abs=1e-4)


@pytest.mark.parametrize("style, coeff", [("linear", 0.5), ("cosine", 0.5), ("exponential", 2 * 0.5 ** 0.5 - 1),
                                          ("minus_sqrt", 1 - math.sqrt(0.5))])
def test_wsd(style, coeff):
    kw = dict(decay_style="WSD", wsd_decay_style=style, wsd_decay_iters=20)
    assert lr_at(80, **kw) == 1.0                            # stable until 100 - 20
    assert lr_at(90, **kw) == pytest.approx(0.1 + 0.9 * coeff)  # halfway through the decay


def test_weight_decay_schedules():
    c = dict(lr=1.0, decay_iters=100, start_weight_decay=0.0, end_weight_decay=0.1, wd_incr_iters=50)
    assert weight_decay(ScheduleConfig(**c, weight_decay_incr_style="linear"), 25) == pytest.approx(0.05)
    assert weight_decay(ScheduleConfig(**c, weight_decay_incr_style="cosine"), 25) == pytest.approx(0.05)
    assert weight_decay(ScheduleConfig(**c, weight_decay_incr_style="cosine"), 10) == pytest.approx(
        0.1 * (math.cos(math.pi * 0.8) + 1) / 2)
    assert weight_decay(ScheduleConfig(**c, weight_decay_incr_style="linear"), 60) == 0.1


@pytest.mark.parametrize("kw, needle", [
    (dict(warmup_iters=100), "warm-up (100 iterations) must be shorter than --lr-decay-iters (100)"),
    (dict(decay_style="step"), "--lr-decay-style must be one of"),
    (dict(decay_style="WSD"), "--lr-decay-style WSD needs --lr-wsd-decay-iters"),
    (dict(warmup_iters=5, warmup_fraction=0.1), "not both"),
    (dict(min_lr=2.0), "--min-lr 2.0 is larger than --lr 1.0"),
    (dict(start_weight_decay=0.0, end_weight_decay=0.1), "constant needs --start-weight-decay == --end-weight-decay"),
])
def test_invalid_schedules(kw, needle):
    with pytest.raises(ValueError) as info:
        ScheduleConfig(**{"lr": 1.0, "decay_iters": 100, **kw})
    assert needle in str(info.value)
