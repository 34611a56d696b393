"""--profile for evaluation and generation: a torch.profiler trace per rank and a summary in the spirit of the
published fairseq MoE inference analysis: the ops that cost the most CPU (and device) time, the number of host
syncs (item / tolist / nonzero: each waits for the device), and per MoE layer the time spent in its collectives
(comm.<op>.<axis> scopes of megamoe.parallel.comm inside each moe.layer<n> scope).

    {dir}/rank<r>.pt.trace.json    Perfetto, chrome://tracing or TensorBoard
    {dir}/rank<r>.summary.txt
"""

from __future__ import annotations

import collections
import contextlib
import os
import re

import torch

HOST_SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero")


def summarize(profile: torch.profiler.profile, rows: int = 25) -> str:
    """The summary text of a finished profile."""
    device = torch.cuda.is_available()
    table = profile.key_averages().table(sort_by="self_cuda_time_total" if device else "self_cpu_time_total",
                                         row_limit=rows)
    syncs = sum(e.count for e in profile.key_averages() if e.key in HOST_SYNC_OPS)
    per_layer: dict[tuple[int, str], list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for event in profile.events():
        if not event.name.startswith("comm."):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("moe.layer"):
            parent = parent.cpu_parent
        if parent is not None:
            entry = per_layer[int(re.sub(r"\D", "", parent.name)), event.name]
            entry[0] += 1
            entry[1] += event.cpu_time_total / 1e3
    lines = [table, f"host syncs (item/tolist/nonzero): {syncs}", "collectives per MoE layer (calls, ms):"]
    lines += [f"  layer {layer:3d}  {name:32s} {calls:6d} {ms:10.2f}"
              for (layer, name), (calls, ms) in sorted(per_layer.items())]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def maybe_profile(enabled: bool, output_dir: str, rank: int, record_shapes: bool = False):
    """Profile the enclosed work on this rank when enabled; write the trace and the summary at the end.
    record_shapes: --profile-record-shapes (off by default: on CPU it distorts the times of chunked ops)."""
    if not enabled:
        yield None
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=record_shapes) as profile:
        yield profile
    os.makedirs(output_dir, exist_ok=True)
    prefix = os.path.join(output_dir, f"rank{rank}")
    profile.export_chrome_trace(prefix + ".pt.trace.json")
    with open(prefix + ".summary.txt", "w") as f:
        f.write(summarize(profile))
