"""An error on one process of a multi-process run (jax.distributed) stops every process at the same batch.

Without that, the others waited in the next collective for the failed process, which itself waited in
jax.distributed's shutdown barrier: after 5 minutes all were aborted (SIGABRT) with a message that does
not name the error.
"""

import re
import socket
import subprocess
import sys
import time

import pytest

from tests.train_helpers import REPO, env

SCRIPT = str(REPO / "tests" / "distributed_failure.py")
TIMEOUT_S = 90  # a few seconds with the agreement; over 300 (jax's shutdown timeout) without


def _two_processes(mode: str) -> list[tuple[int, str, str]]:
    """(return code, stdout, stderr) of processes 0 and 1 of tests/distributed_failure.py MODE."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{s.getsockname()[1]}"
    processes = [subprocess.Popen([sys.executable, SCRIPT, coordinator, str(i), mode], env=env(2), cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        outputs = [process.communicate(timeout=max(1.0, deadline - time.monotonic())) for process in processes]
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        tails = "\n".join(f"process {i}: {out[-1000:]}{err[-2000:]}"
                          for i, (out, err) in enumerate(process.communicate() for process in processes))
        pytest.fail(f"{mode}: the processes still ran after {TIMEOUT_S} s\n{tails}")
    return [(process.returncode, out, err) for process, (out, err) in zip(processes, outputs)]


def _batches(stdout: str) -> list[int]:
    """The batches a process finished ("batch N" lines; gloo prints on stdout too)."""
    return [int(n) for n in re.findall(r"^batch (\d+)$", stdout, re.MULTILINE)]


@pytest.mark.parametrize("mode, where, healthy_batches", [
    pytest.param("eval-read", "reading its share of a batch: OSError: image file 10.png is truncated", 1,
                 marks=pytest.mark.slow),
    pytest.param("eval-write", "handling evaluation batch 2/4: OSError: [Errno 28] No space left on device", 2,
                 marks=pytest.mark.slow),
    ("train-read", "reading its share of a batch: OSError: image file", 1),
])
def test_one_failing_process_stops_every_process_after_the_same_batch(mode, where, healthy_batches):
    (code0, out0, err0), (code1, out1, err1) = _two_processes(mode)
    # The failed process shows its own error; the other one names it, and which process had it.
    assert code1 == 1 and "Traceback" in err1 and "OSError: " in err1, err1[-3000:]
    assert _batches(out1) == [1], out1
    assert code0 == 1, err0[-3000:]
    assert f"ProcessFailed: process 1 of 2 failed {where}" in err0, err0[-3000:]
    assert _batches(out0) == list(range(1, healthy_batches + 1)), out0
