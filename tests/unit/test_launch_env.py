"""Reading the launcher's environment: torchrun first, then SLURM, else a single process."""

from megamoe.parallel.world import first_host, read_launch_env


def test_torchrun_variables_win():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "8"}
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master_addr, launch.master_port,
            launch.launcher) == (3, 4, 1, "h0", 1234, "torchrun")


def test_slurm_variables():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08,11]",
           "SLURM_JOB_ID": "123456"}
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master_addr, launch.master_port,
            launch.launcher) == (5, 8, 1, "gpu07", 20000 + 123456 % 10000, "slurm")
    assert read_launch_env({**env, "MASTER_PORT": "999", "MASTER_ADDR": "x"}).master_port == 999


def test_single_process():
    launch = read_launch_env({})
    assert (launch.rank, launch.world_size, launch.launcher) == (0, 1, "single")
    assert 0 < launch.master_port < 65536


def test_first_host():
    assert first_host("vm") == "vm"
    assert first_host("node[03-05,9],gpu1") == "node03"
    assert first_host("a,b") == "a"
    assert first_host("n[1,4]") == "n1"
