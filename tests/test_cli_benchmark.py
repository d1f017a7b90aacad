"""`ccnet benchmark` runs the experiments' benchmark scripts and passes their arguments on."""

import pytest

from ccnet_jax.cli import main
from ccnet_jax.commands.benchmark import run_script


def test_benchmark_attention_quick_prints_its_table(capsys):
    assert main(["benchmark", "attention", "--quick", "--dtypes", "float32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:3] == ["shape", "(B,H,W,Cqk,Cv)", "dtype"]
    # Rows: "(B, H, W, Cqk, Cv)  dtype  impl  numbers...", one per implementation run here.
    rows = {tuple(line.split(")", 1)[1].split()[:2]) for line in lines[2:] if line.startswith("(")}
    assert {("float32", "xla"), ("float32", "nonlocal"), ("float32", "floor")} <= rows


def test_benchmark_rejects_an_unknown_benchmark(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["benchmark", "kernels"])
    assert exit_.value.code == 2
    assert "invalid choice: 'kernels'" in capsys.readouterr().err


@pytest.mark.parametrize("body,code,err", [
    ("import sys; sys.exit('no GPU here: run it on a CUDA machine')", 1, "no GPU here: run it on a CUDA machine\n"),
    ("import sys; sys.exit(3)", 3, ""),
    ("import sys; sys.exit()", 0, ""),
    ("print('table')", 0, ""),
])
def test_run_script_keeps_the_scripts_exit_status_and_message(tmp_path, capsys, body, code, err):
    script = tmp_path / "script.py"
    script.write_text(body + "\n")
    assert run_script(script, []) == code
    assert capsys.readouterr().err == err
