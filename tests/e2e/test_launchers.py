"""The layout check under real launches (torchrun; srun when a SLURM is up): init_distributed, ParallelMesh and
comm on separate processes."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.e2e.ranks import run_ranks

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_layout_check_passes_under_torchrun():
    proc = subprocess.run([*TORCHRUN, "--nproc-per-node", "4", "-m", "megamoe.parallel.check", "--tp", "2",
                           "--ep", "4", "--etp", "1"], capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "layout check passed: 4 ranks, backend gloo, device cpu" in proc.stdout
    assert "tp_ep_pp" in proc.stdout and "all_reduce" in proc.stdout


def test_invalid_layout_fails_on_every_rank_without_collectives():
    results = run_ranks(2, [sys.executable, "-m", "megamoe.parallel.check", "--tp", "2", "--ep", "2",
                            "--expert-tensor-parallel-size", "2"])
    for rank, proc in enumerate(results):
        assert proc.returncode == 2
        assert f"rank {rank}: error: invalid parallel layout" in proc.stderr
        assert "--expert-model-parallel-size" in proc.stderr


def _slurm_is_up():
    if shutil.which("srun") is None or shutil.which("sinfo") is None:
        return False
    try:
        probe = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=5)
    except subprocess.TimeoutExpired:  # installed, but no controller answering
        return False
    return probe.returncode == 0 and "idle" in probe.stdout


SLURM_UP = _slurm_is_up()  # probed once per session


@pytest.mark.skipif(not SLURM_UP, reason="no idle SLURM node (shared/tools/slurm-local.sh up starts one)")
def test_layout_check_passes_under_srun():
    proc = subprocess.run(["srun", "-n", "4", sys.executable, "-m", "megamoe.parallel.check", "--tp", "2", "--ep", "2"],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "layout check passed: 4 ranks, backend gloo, device cpu" in proc.stdout


@pytest.mark.skipif(not SLURM_UP, reason="no idle SLURM node (shared/tools/slurm-local.sh up starts one)")
def test_sbatch_example_trains(tmp_path):
    proc = subprocess.run(["sbatch", "--wait", f"--output={tmp_path}/job.out", "--export=ALL,TRAIN_ITERS=3",
                           "examples/slurm/train_tiny.sbatch", "--log-dir", str(tmp_path / "logs")],
                          capture_output=True, text=True, timeout=600, env={**ENV, "PYTHON": sys.executable})
    assert proc.returncode == 0, (tmp_path / "job.out").read_text()[-3000:]
    assert "iteration        3/       3" in (tmp_path / "job.out").read_text()
