"""Batch-size ramp-up against Megatron's rule worked by hand."""

import pytest

from megamoe.training.rampup import BatchSizeRampup


def test_global_batch_grows_by_the_increment_every_ramp_slice():
    rampup = BatchSizeRampup(start=16, increment=16, samples=96)  # 3 increments: one every 32 samples
    sizes = [rampup.global_batch_size(consumed, 64) for consumed in (0, 31, 32, 63, 64, 96, 97)]
    assert sizes == [16, 16, 32, 32, 48, 64, 64]


def test_iterations_cover_the_training_samples():
    rampup = BatchSizeRampup(start=16, increment=16, samples=96)
    # steps of 16, 16 (32 consumed), 32 (64), 48 (112 > 96), then 64s: 112 + 3 x 64 = 304 >= 300
    assert rampup.iterations(300, 64) == 4 + 3
    assert rampup.iterations(10, 64) == 1


@pytest.mark.parametrize("rampup, message", [
    (BatchSizeRampup(12, 16, 96), "must be a non-negative multiple of the increment"),
    (BatchSizeRampup(16, 8, 96), "the increment 8 is not divisible"),
    (BatchSizeRampup(128, 16, 96), "must be a non-negative multiple"),
])
def test_bad_rampups_name_the_flag(rampup, message):
    problems = rampup.problems(64, 16)
    assert problems and all("--rampup-batch-size" in p for p in problems)
    assert any(message in p for p in problems)
