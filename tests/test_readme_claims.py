"""What README.md names must exist: its `ccnet` commands and flags, its `--set` keys, its files,
and its Python snippets must run. The README is the user's contract, and it goes stale silently."""

import dataclasses
import re
from pathlib import Path

import numpy as np

from ccnet_jax import cli
from ccnet_jax import config as config_lib

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FENCED = re.findall(r"```\w*\n(.*?)```", README, flags=re.DOTALL)
# Inline spans only: a fenced block's backticks would pair up with the wrong neighbours.
SPANS = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", README, flags=re.DOTALL))


def _ccnet_invocations() -> list[list[str]]:
    """Every `ccnet CMD ...` the README shows, as tokens from the command name on, optional
    brackets dropped so that `[--batch-size N]` reads as `--batch-size N`."""
    texts = SPANS + [line for block in FENCED for line in block.replace("\\\n", " ").splitlines()]
    invocations = []
    for text in texts:
        for match in re.finditer(r"(?:^|[\s/])ccnet ([a-z].*)", " ".join(text.split())):
            invocations.append(match.group(1).replace("[", " ").replace("]", " ").split())
    return invocations


def _subparser(parser, name):
    action = next(a for a in parser._actions if a.choices and name in a.choices)
    return action.choices[name]


def _options(parser) -> dict:
    return {option: action for action in parser._actions for option in action.option_strings}


def test_every_ccnet_command_and_flag_the_readme_shows_exists_with_its_values():
    invocations = _ccnet_invocations()
    assert len(invocations) > 15  # the pattern still finds the README's commands
    checked = set()
    for tokens in invocations:
        command = tokens[0]
        assert command in cli.COMMANDS, f"README shows `ccnet {command}`, which does not exist"
        parser = _subparser(cli.build_parser([command]), command)
        if command == "benchmark":  # the benchmark's own flags go to its script
            scripts = next(action.choices for action in parser._actions if action.choices)
            assert set(tokens[1].split("|")) <= set(scripts)
            continue
        if command == "data":
            parser = _subparser(parser, tokens[1])
        options = _options(parser)
        for flag, value in zip(tokens, tokens[1:] + [""]):
            if not flag.startswith("--"):
                continue
            assert flag in options, f"README shows `ccnet {command} ... {flag}`, which `ccnet {command}` lacks"
            choices = options[flag].choices
            if choices and value[:1].islower():  # a literal value, not a METAVAR
                for choice in value.split("|"):
                    assert choice in choices, f"README: `ccnet {command} {flag} {choice}` is not a choice"
            checked.add((command, flag))
    assert ("export", "--platform") in checked and ("predict", "--attention") in checked


def test_every_config_key_the_readme_names_exists_and_every_override_it_shows_loads():
    sections = {field.name: field.type for field in dataclasses.fields(config_lib.ExperimentConfig)}
    # `model.x` in prose is the Python object (`model.backbone`); its settings go by CCNetConfig.
    keys = set(re.findall(r"^(data|train|eval)\.(\w+)", "\n".join(SPANS), flags=re.MULTILINE))
    overrides = re.findall(r"--set '?((?:model|data|train|eval)\.\w+=[^\s']+)", README)
    keys |= {tuple(o.split("=")[0].split(".")) for o in overrides}
    assert len(keys) >= 8 and len(overrides) >= 4
    defaults = config_lib.ExperimentConfig()
    for section, field in keys:
        assert field in {f.name for f in dataclasses.fields(getattr(defaults, section))}, (
            f"README names {section}.{field}, which {sections[section]} lacks")
    for override in overrides:
        config_lib.load(None, [override.rstrip(".,;)`")])


def test_every_file_the_readme_names_exists():
    names = {token for span in SPANS for token in span.split()}
    names |= set(re.findall(r"[\w./-]+\.(?:py|sh|json|md)\b", "\n".join(FENCED)))
    repo_files = {p.relative_to(ROOT).as_posix() for top in ("pallas_kernels", "ccnet_jax", "experiments", "tests")
                  for p in (ROOT / top).rglob("*") if p.is_file()}
    base_names = {path.rsplit("/", 1)[-1] for path in repo_files}
    checked = 0
    for name in names:
        name = name.strip("(),;:")
        if name.startswith(("DIR/", "WORKDIR/", "runs/", "out/")) or "*" in name:
            continue  # what a run writes, or a pattern the table below checks
        if re.fullmatch(r"(pallas_kernels|ccnet_jax|experiments|tests|\.ci)/[\w./-]*", name) or name in (
                ".python-version", "pyproject.toml"):
            assert (ROOT / name).exists(), f"README names {name}, which does not exist"
            checked += 1
        elif re.fullmatch(r"\w+\.(py|sh)", name) and name != "predict_exported.py":
            assert name in base_names, f"README names {name}, which no file of the repository is called"
            checked += 1
    assert checked > 40


def _where_things_are() -> list[tuple[str, list[str]]]:
    section = README.split("## Where things are")[1].split("\n## ")[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("| `"):
            _, where, what, _ = line.split("|")
            rows.append((re.findall(r"`([^`]+)`", where)[0], re.findall(r"`([\w*]+\.py)`", what)))
    return rows


def test_the_where_things_are_table_names_every_module_and_only_real_ones():
    rows = _where_things_are()
    assert len(rows) >= 8
    for where, names in rows:
        folder = ROOT / (where.rsplit("/", 1)[0] if where.endswith(".py") else where)
        named = set()
        for name in names:
            matches = set(folder.glob(name))
            assert matches, f"the table's {where} row names {name}, which is not in {folder.relative_to(ROOT)}"
            named |= matches
        if where.endswith("/") and where != "ccnet_jax/commands/":  # commands: "one module per command"
            modules = {p for p in folder.glob("*.py") if p.name != "__init__.py"}
            assert modules <= named, f"the table's {where} row omits {sorted(p.name for p in modules - named)}"
    top_level = {p.name for p in (ROOT / "ccnet_jax").glob("*.py")} - {"__init__.py"}
    assert top_level <= {name for _, names in rows for name in names}


def test_the_commands_the_readme_says_ci_runs_are_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = next(block.strip() for block in FENCED if "pytest" in block)
    assert test_command in ci
    assert "`.venv/bin/ruff check .`" in README and ".venv/bin/ruff check ." in ci
    demo = next(block.strip() for block in FENCED if block.strip().endswith("ccnet demo"))
    assert demo.split(" && ")[:2] == test_command.split(" && ")[:2]  # the same install


def test_the_data_prepare_help_names_every_long_range_config_and_the_readme_the_real_ones():
    from ccnet_jax.data.long_range import CcnetLongRange

    configs = {config.name for config in CcnetLongRange.BUILDER_CONFIGS}
    prepare = _subparser(_subparser(cli.build_parser(["data"]), "data"), "prepare")
    assert all(name in _options(prepare)["--config"].help for name in configs)
    readme_configs = set(re.findall(r"--config (\w+)(?![\w/.])", README))
    readme_configs |= set(re.findall(r"builder_config=(\w+)", README))
    assert readme_configs and readme_configs <= configs


def _snippet(marker: str) -> str:
    return next(block for block in FENCED if marker in block)


def test_the_op_snippet_runs_as_written():
    # Alone, in an empty scope: a snippet that leaned on names from elsewhere failed pasted.
    scope = {}
    exec(_snippet("out = criss_cross_attention(q, k, v)"), scope)
    assert scope["out"].shape == (2, 97, 97, 512) and np.isfinite(np.asarray(scope["out"])).all()


def test_the_model_snippets_run_alone_and_the_parameter_count_is_right():
    import jax
    from flax import nnx

    snippet = _snippet("model = CCNet(")
    claimed = int(re.search(r"# ([\d,]+) parameters", snippet).group(1).replace(",", ""))
    scope = {}
    # Traced, not run: the shapes and the count are the claims, and CCNet-101 runs slowly on a CPU.
    jax.eval_shape(lambda: exec(snippet, scope))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(scope["model"], nnx.Param))) == claimed
    assert scope["main_logits"].shape == scope["aux_logits"].shape == (1, 9, 9, 19)  # 1/8 resolution, rounded up
    scope = {}
    jax.eval_shape(lambda: exec(_snippet("layer = CrissCrossAttention("), scope))
    assert scope["layer"].attention_fn.implementation == "xla"
    assert scope["y"].shape == (2, 97, 97, 512)
