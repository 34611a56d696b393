"""--profile-record-shapes: input shapes reach the trace only when asked (on CPU they distort chunked ops' times),
for training steps (StepProfiler) and for evaluation and generation (maybe_profile) alike."""

import argparse
import json

import pytest
import torch

from megamoe.inference.profiling import maybe_profile
from megamoe.training.profiling import ProfileConfig, StepProfiler


def _config(tmp_path, record_shapes: bool) -> ProfileConfig:
    parser = argparse.ArgumentParser()
    ProfileConfig.add_arguments(parser)
    argv = ["--profile", "--profile-step-start", "1", "--profile-step-end", "1", "--profile-dir", str(tmp_path)]
    args = parser.parse_args(argv + (["--profile-record-shapes"] if record_shapes else []))
    args.tensorboard_dir = args.log_dir = args.save = None
    config = ProfileConfig.from_args(args)
    assert config.record_shapes == record_shapes
    return config


def _mm():
    torch.mm(torch.ones(3, 5), torch.ones(5, 7))


def _training(config: ProfileConfig) -> None:
    profiler = StepProfiler(config, rank=0)
    profiler.begin(1)
    _mm()
    profiler.end(1)


def _inference(config: ProfileConfig) -> None:
    with maybe_profile(True, config.output_dir, 0, config.record_shapes):
        _mm()


def _mm_args(tmp_path, record_shapes: bool, run) -> list[dict]:
    config = _config(tmp_path, record_shapes)
    run(config)
    events = json.load(open(tmp_path / "rank0.pt.trace.json"))["traceEvents"]
    return [e.get("args", {}) for e in events if e.get("name") == "aten::mm"]


@pytest.mark.parametrize("run", [_training, _inference], ids=["training", "inference"])
def test_shapes_are_recorded_only_when_asked(tmp_path, run):
    plain = _mm_args(tmp_path / "plain", False, run)
    shaped = _mm_args(tmp_path / "shaped", True, run)
    assert plain and shaped
    assert all("Input Dims" not in a for a in plain)
    assert any(a.get("Input Dims") == [[3, 5], [5, 7]] for a in shaped)
