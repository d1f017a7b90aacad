"""Two processes joined by jax.distributed.initialize on localhost take the same step as one."""

import socket
import subprocess
import sys

import numpy as np

from tests.train_helpers import REPO, env

SCRIPT = str(REPO / "tests" / "distributed_step.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
