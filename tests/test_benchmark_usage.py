"""The benchmarks as a user runs them on a CPU (`ccnet benchmark ...` and the scripts of experiments/):
a mistaken argument is refused at once, by name, before the minutes of compiling and timing; what
is asked for is what runs; each table names the machine."""

import os
import sys

import pytest

from ccnet_jax.cli import main
from tests.experiment_scripts import EXPERIMENTS, load_experiment

sys.path.insert(0, str(EXPERIMENTS))
from bench_common import cpu_name  # noqa: E402


@pytest.mark.parametrize("args, message", [
    # The shape keeps the old code's run short: it timed the shape and printed "failed" rows.
    (["--iters", "0"], "argument --iters: 0 is not >= 1"),
    (["--calls", "-1"], "argument --calls: -1 is not >= 1"),
    (["--shapes", "1x5x6x2x3"], "'1x5x6x2x3': expected five positive integers B,H,W,CQK,CV"),
])
def test_bench_attention_refuses_bad_counts_and_shapes_up_front(capsys, args, message):
    args = ["--shapes", "1,5,6,2,3", "--dtypes", "float32", *args]
    assert main(["benchmark", "attention", *args]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "fwd ms" not in captured.out


def test_bench_attention_quick_keeps_the_shape_asked_for_and_names_the_cpu(capsys):
    # --quick used to replace --shapes, --iters and --calls by its own without a word.
    args = ["--quick", "--shapes", "1,5,6,2,3", "--iters", "3", "--dtypes", "float32"]
    assert main(["benchmark", "attention", *args]) == 0
    out = capsys.readouterr().out
    device = out.splitlines()[0]
    assert device.startswith(f"device: {cpu_name()} (") and "cores) (cpu)" in device
    assert "median of 3 rounds of 2 back-to-back calls" in device
    rows = [line for line in out.splitlines() if line.startswith("(")]
    assert rows and all(row.startswith("(1, 5, 6, 2, 3)") for row in rows)


@pytest.mark.parametrize("args, message", [
    (["--quick", "--steps", "0"], "argument --steps: 0 is not >= 1"),
    (["--quick", "--rounds", "-1"], "argument --rounds: -1 is not >= 1"),
    (["--quick", "--calls", "0"], "argument --calls: 0 is not >= 1"),
    (["--quick", "--batch", "0"], "argument --batch: 0 is not >= 1"),
    (["--quick", "--inference-size", "0", "5"], "argument --inference-size: 0 is not >= 1"),
    (["--depth", "42"], "argument --depth: invalid choice: 42 (choose from 50, 101, 152)"),
    (["--quick", "--depth", "101"], "--quick times its own narrow network, whatever --depth says"),
    (["--quick", "--implementations", "triton"], "--implementations triton: this cpu device (cpu) runs only xla"),
    # The suite's four host devices: the training step shards its batch over them.
    (["--quick", "--batch", "3"], "--batch 3: the training step splits its batch over the 4 devices here"),
])
def test_bench_model_refuses_what_it_cannot_run_up_front(capsys, args, message):
    assert main(["benchmark", "model", "--tables", "train", "--dtypes", "float32", *args]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "step ms" not in captured.out


@pytest.mark.slow
def test_bench_model_quick_keeps_the_size_asked_for_and_names_the_cpu(capsys):
    args = ["--quick", "--tables", "inference", "--dtypes", "float32", "--inference-size", "33", "41", "--calls", "1"]
    assert main(["benchmark", "model", *args]) == 0
    heading = capsys.readouterr().out.splitlines()[0]
    assert heading.startswith(f"device: {cpu_name()} (")
    assert "whole-image inference, batch 1, 33x41; median of 1 synchronised calls" in heading


@pytest.mark.parametrize("args, message", [
    (["--images", "0"], "argument --images: 0 is not >= 1"),
    (["--workers", "0", "-1"], "argument --workers: -1 is not >= 0"),
    (["--batches", "x"], "argument --batches: 'x' is not an integer"),
])
def test_bench_input_refuses_bad_counts_up_front(capsys, args, message):
    assert main(["benchmark", "input", "--batch", "1", "--batches", "1", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("where", ["missing/results.md", "."])
def test_bench_input_refuses_a_results_file_it_could_not_write_before_timing(capsys, tmp_path, where):
    # The section used to be written after every image was generated and timed, and then fail.
    results = tmp_path / where
    args = ["--images", "1", "--workers", "0", "--batch", "1", "--batches", "1", "--results", str(results)]
    assert main(["benchmark", "input", *args]) == 2
    captured = capsys.readouterr()
    assert f"--results {results}: give a file (new or to append to) in an existing folder" in captured.err
    assert "writing" not in captured.out


@pytest.fixture
def nonlocal_vs_rcca(monkeypatch):
    # The script sets XLA_FLAGS when loaded; restored afterwards for the tests that start subprocesses.
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    return load_experiment("nonlocal_vs_rcca")


def test_nonlocal_vs_rcca_refuses_a_size_below_one(capsys, nonlocal_vs_rcca):
    # --size 0 used to print a table of a 1x1 feature map; a negative size, a traceback.
    with pytest.raises(SystemExit) as done:
        nonlocal_vs_rcca.main(["--size", "0", "--variants", "baseline"])
    assert done.value.code == 2
    assert "argument --size: 0 is not >= 1" in capsys.readouterr().err


def test_nonlocal_vs_rcca_h100_without_the_plugin_says_what_to_install(capsys, monkeypatch, nonlocal_vs_rcca):
    def no_plugin(axis_names):
        raise RuntimeError("compiling for CUDA without a GPU needs jax's CUDA plugin: pip install ...")

    monkeypatch.setattr(nonlocal_vs_rcca, "compile_only_h100_mesh", no_plugin)
    with pytest.raises(SystemExit) as done:
        nonlocal_vs_rcca.main(["--h100", "--variants", "baseline"])
    assert done.value.code == 2
    assert "error: --h100: compiling for CUDA without a GPU needs jax's CUDA plugin" in capsys.readouterr().err


def test_tune_attention_refuses_a_zero_count_before_looking_for_the_gpu(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tune_attention.py", "--iters", "0"])
    with pytest.raises(SystemExit) as done:
        load_experiment("tune_attention").main()
    assert done.value.code == 2
    assert "argument --iters: 0 is not >= 1" in capsys.readouterr().err
