"""StepProfiler: input shapes reach the trace only with --profile-record-shapes (they distort CPU timings)."""

import argparse
import json

import torch

from megamoe.training.profiling import ProfileConfig, StepProfiler


def _trace_args(tmp_path, record_shapes: bool) -> list[dict]:
    parser = argparse.ArgumentParser()
    ProfileConfig.add_arguments(parser)
    argv = ["--profile", "--profile-step-start", "1", "--profile-step-end", "1", "--profile-dir", str(tmp_path)]
    args = parser.parse_args(argv + (["--profile-record-shapes"] if record_shapes else []))
    args.tensorboard_dir = args.log_dir = args.save = None
    config = ProfileConfig.from_args(args)
    assert config.record_shapes == record_shapes
    profiler = StepProfiler(config, rank=0)
    profiler.begin(1)
    torch.mm(torch.ones(3, 5), torch.ones(5, 7))
    profiler.end(1)
    events = json.load(open(tmp_path / "rank0.pt.trace.json"))["traceEvents"]
    return [e.get("args", {}) for e in events if e.get("name") == "aten::mm"]


def test_shapes_are_recorded_only_when_asked(tmp_path):
    plain = _trace_args(tmp_path / "plain", record_shapes=False)
    shaped = _trace_args(tmp_path / "shaped", record_shapes=True)
    assert plain and shaped
    assert all("Input Dims" not in a for a in plain)
    assert any(a.get("Input Dims") == [[3, 5], [5, 7]] for a in shaped)
