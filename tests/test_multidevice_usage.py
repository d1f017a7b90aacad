"""What a user of `ccnet train` on several devices or processes runs into: a batch the devices do not
divide, a resume under another process count, and the result table of a multi-process run."""

import socket
import subprocess
import sys

import pytest

from ccnet_jax import config as config_lib
from ccnet_jax.train import inputs, loop
from ccnet_jax.train.step import make_mesh
from tests.train_helpers import CLI, REPO, env, tiny_config


def test_batches_the_devices_do_not_divide_say_which_setting_to_pass(tmp_path, data_dir):
    config_path = tiny_config(tmp_path / "c.json", data_dir, tmp_path / "run")
    mesh = make_mesh()
    assert mesh.devices.size == 4, "tests/conftest.py should provide 4 CPU devices"
    with pytest.raises(ValueError, match=r"train.batch_size 6 must be a multiple of the 4 devices; pass "
                                         r"--set train.batch_size=8"):
        loop.train(config_lib.load(config_path, ["train.batch_size=6"]))
    with pytest.raises(ValueError, match=r"eval.batch_size 6 .* or 0 for one image per device"):
        inputs.eval_source(config_lib.load(config_path, ["eval.batch_size=6"]), mesh)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_run_prints_one_table_and_a_one_process_resume_is_refused_cleanly(tmp_path, data_dir):
    config = tiny_config(tmp_path / "c.json", data_dir, tmp_path / "run", steps=1)
    coordinator = f"127.0.0.1:{_free_port()}"
    processes = [
        subprocess.Popen([sys.executable, "-c", CLI, "train", "--config", str(config), "--set", "eval.max_images=2",
                          "--coordinator", coordinator, "--num-processes", "2", "--process-id", str(i)],
                         env=env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        for i in range(2)
    ]
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
        outputs.append(out)
    # Under srun every task's stdout reaches the user: the table once, not once per process.
    assert [out.count("mIoU:") for out in outputs] == [1, 0]

    resumed = subprocess.run([sys.executable, "-c", CLI, "train", "--config", str(config), "--set", "train.steps=2"],
                             env=env(2), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert resumed.returncode == 1
    assert "was saved by 2 process(es)" in resumed.stderr
    assert "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
