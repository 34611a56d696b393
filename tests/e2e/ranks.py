"""Start N ranks as plain processes with torchrun's environment variables, and wait for every one of them.

For tests of bad input: each rank must fail on its own before any collective. Under torchrun the first failing
rank makes torchrun kill the others, which would hide whether they failed by themselves.
"""

import os
import subprocess

from megamoe.parallel.world import free_port


def run_ranks(nproc: int, cmd: list[str], timeout: float = 120, tries: int = 3) -> list[subprocess.CompletedProcess]:
    """Run every rank; start again on another port when the chosen one was taken before rank 0 could bind it
    (free_port() releases it, and an ephemeral connection of another process may grab it meanwhile)."""
    for _ in range(tries):
        results = _run_once(nproc, cmd, timeout)
        if not any("address already in use" in r.stderr.lower() for r in results):
            break
    return results


def _run_once(nproc: int, cmd: list[str], timeout: float) -> list[subprocess.CompletedProcess]:
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return results
