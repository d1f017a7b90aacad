"""Two processes joined by jax.distributed.initialize on localhost take the same step as one."""

import os
import socket
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from ccnet_jax.data import prepare
from ccnet_jax.train.checkpoint import Checkpoints
from ccnet_jax.train.distributed import initialize, launcher_tasks
from tests.train_helpers import CLI, REPO, env, tiny_config

SCRIPT = str(REPO / "tests" / "distributed_step.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    single = tmp_path / "one.npz"
    subprocess.run([sys.executable, SCRIPT, str(single)], env=env(2), check=True, timeout=300,
                   capture_output=True)
    double = tmp_path / "two.npz"
    coordinator = f"127.0.0.1:{_free_port()}"
    processes = [
        subprocess.Popen([sys.executable, SCRIPT, str(double), coordinator, "2", str(i)], env=env(1),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
    one, two = np.load(single), np.load(double)
    assert set(one.files) == set(two.files)
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-6)
    for name in one.files:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-6)


def test_launcher_environments_are_read_and_partial_ones_explained():
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
             "SLURM_LOCALID": "0"}
    assert launcher_tasks(slurm) == ("SLURM", 2)
    assert launcher_tasks({**slurm, "SLURM_NTASKS": "1"}) is None  # one task: nothing to join
    assert launcher_tasks({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3"}) == ("Open MPI", 4)
    assert launcher_tasks({}) is None
    ompi = {"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "0"}
    assert launcher_tasks({**slurm, "SLURM_NTASKS": "1", **ompi}) == ("Open MPI", 8)  # mpirun in `sbatch -n1`
    no_step = {k: v for k, v in slurm.items() if k != "SLURM_STEP_NODELIST"}
    assert launcher_tasks({**no_step, **ompi}) == ("Open MPI", 8)  # mpirun in an allocation, no srun step
    partial = {k: v for k, v in slurm.items() if k != "SLURM_PROCID"}
    with pytest.raises(ValueError, match="SLURM_PROCID is not set: run every task inside an srun step"):
        launcher_tasks(partial)
    with pytest.raises(ValueError, match="exclude each other"):
        initialize("127.0.0.1:1", 2, 0, mode="auto")
    with pytest.raises(ValueError, match="need --coordinator"):
        initialize(None, 2, 0)


@pytest.mark.slow
def test_train_joins_a_slurm_job_by_itself(tmp_path):
    data = tmp_path / "data"
    prepare("long_range", data, None, "tiny")
    config = tiny_config(tmp_path / "c.json", data, tmp_path / "run", steps=2)
    port = _free_port_in(61440, 65535)  # where jax's SLURM support puts the coordinator for this job id
    slurm = {"SLURM_JOB_ID": str(port - 61440), "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
             "SLURM_LOCALID": "0"}
    processes = [
        subprocess.Popen([sys.executable, "-c", CLI, "train", "--config", str(config), "--no-eval"],
                         env={**env(2), **slurm, "SLURM_PROCID": str(i)}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=REPO)
        for i in range(2)
    ]
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
    checkpoints = Checkpoints(tmp_path / "run" / "checkpoints", read_only=True)
    position = checkpoints.manager.restore(2, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    assert position["process_count"] == 2 and len(position["processes"]) == 2

    partial = {**env(2), **slurm}  # no SLURM_PROCID: one line, no traceback
    result = subprocess.run([sys.executable, "-c", CLI, "train", "--config", str(config)], env=partial,
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "SLURM_PROCID is not set" in result.stderr


def _free_port_in(low: int, high: int) -> int:
    for port in range(low + (os.getpid() % 1000), high):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high})")
