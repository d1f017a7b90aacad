"""The benchmarks' profile reader: what it counts in a trace, and what it leaves out."""

import collections
import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from ccnet_jax.trace_times import busiest_lines, busy_in_trace, busy_times


def _meta(pid, name, tid=None):
    if tid is None:
        return {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}
    return {"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}}


def _event(pid, tid, name, ts, dur):
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}


def test_a_gpu_trace_counts_its_streams_once_and_nothing_else():
    # The layout of a jax GPU trace: host threads (argument parsing, thunk launches named after
    # HLO ops), and a device timeline with stream lines beside lines derived from them.
    events = [
        _meta(1, "/host:CPU"), _meta(1, "python", tid=10),
        _meta(2, "/device:GPU:0"), _meta(2, "Stream #13(Compute)", tid=20), _meta(2, "Stream #14(Compute)", tid=21),
        _meta(2, "XLA Ops", tid=22), _meta(2, "XLA Modules", tid=23), _meta(2, "Launch Stats", tid=24),
        _event(1, 10, "ParseArguments", 0, 2300.0),
        _event(1, 10, "cudnn-conv.7", 5, 3100.0),
        _event(2, 20, "sm90_xmma_fprop_implicit_gemm", 100, 2500.0),
        _event(2, 21, "sm90_xmma_fprop_implicit_gemm", 100, 2500.0),  # the same launch, listed twice
        _event(2, 20, "input_reduce_select_fusion.3", 3000, 700.0),
        _event(2, 21, "input_reduce_select_fusion.4", 4000, 700.0),
        _event(2, 22, "cudnn-conv.7", 100, 2500.0),
        _event(2, 23, "jit_train_step", 0, 5000.0),
        _event(2, 24, "sm90_xmma_fprop_implicit_gemm", 90, 10.0),
    ]
    busy = busy_in_trace(events)
    assert busy == {"sm90_xmma_fprop_implicit_gemm": 2.5, "input_reduce_select_fusion": 1.4}


def test_a_cpu_trace_counts_xla_ops_without_host_wrappers():
    events = [
        _meta(1, "/host:CPU"), _meta(1, "tf_XLAEigen", tid=10),
        _event(1, 10, "PjRtCpuClient::Execute", 0, 900.0),
        _event(1, 10, "$core.py:123 __call__", 0, 950.0),
        _event(1, 10, "dot.2", 10, 400.0),
        _event(1, 10, "dot.5", 500, 100.0),
        _event(1, 10, "sine", 600, 50.0),
    ]
    assert busy_in_trace(events) == {"dot": 0.5, "sine": 0.05}


def test_a_real_cpu_trace_has_the_programs_ops_and_can_be_kept(tmp_path):
    f = jax.jit(lambda x: jnp.sin(x) @ x)
    x = jnp.ones((256, 256))
    jax.block_until_ready(f(x))
    busy = busy_times(lambda: f(x), keep_trace=tmp_path / "kept.trace.json.gz")
    assert sum(busy.values()) > 0
    kept = json.load(gzip.open(tmp_path / "kept.trace.json.gz"))
    assert busy_in_trace(kept["traceEvents"]) == busy
    assert any("dot" in name or "sin" in name or "fusion" in name for name in busy), list(busy)


@pytest.mark.parametrize("line", ["XLA Ops", "Steps", "Async XLA Ops"])
def test_derived_device_lines_alone_count_nothing(line):
    events = [_meta(2, "/device:GPU:0"), _meta(2, line, tid=5), _event(2, 5, "fusion.1", 0, 100.0)]
    assert busy_in_trace(events) == {}


def test_the_busiest_lines_come_first_with_their_share():
    busy = collections.Counter({"criss_cross_bwd_dkq_row": 0.6, "loop_add_fusion": 0.1, "criss_cross_fwd_row": 0.3})
    lines = busiest_lines(busy, 2)
    assert len(lines) == 2
    assert lines[0].split() == ["criss_cross_bwd_dkq_row", "0.600", "ms", "60.0%"]
    assert lines[1].split() == ["criss_cross_fwd_row", "0.300", "ms", "30.0%"]
