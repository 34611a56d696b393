"""Joining the torch.distributed world from what torchrun or SLURM's srun put in the environment.

megamoe never launches processes itself: torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or srun
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST, SLURM_JOB_ID) start one process per rank, and this
module reads their variables. A plain `python` run is a world of one.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

from megamoe.parallel.mesh import DEFAULT_TIMEOUT


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the launched world, and how to reach rank 0."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list: 'vm' -> 'vm', 'node[03-05,9],gpu1' -> 'node03'."""
    match = re.match(r"([^,\[]*)(\[([^\]]*)\])?", nodelist.strip())
    prefix, ranges = match.group(1), match.group(3)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def exit_process(code: int) -> None:
    """End a job's process with `code`, skipping the interpreter's finalization.

    Gloo's worker threads destroy finished collectives' work objects on their own time. One that drops the last
    reference to a Python tensor while the interpreter finalizes takes the GIL from a dying interpreter, and the
    process aborts ("terminate called without an active exception"; a core dump showed AsyncBarrierWork's
    destructor in ProcessGroupGloo::runLoop, the case of pytorch/pytorch#179291). By the time a job's main returns,
    it has closed what it writes, so nothing is left for finalization to do."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for single-process runs and local test worlds)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """torchrun's variables if present, else SLURM's, else a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else 20000 + int(env.get("SLURM_JOB_ID", 0)) % 10000
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                         env.get("MASTER_ADDR") or first_host(nodelist), port, "slurm")
    return LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single")


def default_backend() -> str:
    """NCCL when CUDA is usable, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init_distributed(backend: str | None = None, timeout: timedelta = DEFAULT_TIMEOUT,
                     environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Initialize torch.distributed from the launcher's environment (no-op if already initialized).

    Args:
        backend: "gloo" or "nccl"; default: NCCL when CUDA is usable, else gloo.
        timeout: the world group's collective timeout.
    """
    launch = read_launch_env(environ)
    if dist.is_initialized():
        return launch
    backend = backend or default_backend()
    device_id = None
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank)
        device_id = torch.device("cuda", launch.local_rank)
    dist.init_process_group(backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                            rank=launch.rank, world_size=launch.world_size, timeout=timeout, device_id=device_id)
    return launch
