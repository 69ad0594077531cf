"""Every command the README shows in a code block runs as written, from a fresh checkout's root.

Each runs in this process (runpy, the module's own `__main__` with the README's argv), in an empty
folder that stands for the checkout's root, in README order, so that a command finds what the ones
before it made. Where a command would take minutes, small settings are appended (argparse keeps the
last value of a flag). Commands that need the Hugging Face Hub, unreachable here, and those that use
what such a command would have downloaded (and the files of an optional `pip install` the README
names), must end in one clear line; so must those that need the peer `make peer` builds (llama.cpp),
absent from a fresh checkout. `make demo`, `make test` and
`. .venv/bin/activate` are the suite and the shell themselves, so they are not run here.
"""

import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# appended to a command of this module: the same command, at a size a test can afford
SMALL = {
    "mlx_flash.generate": ["-m", "3"],
    "mlx_flash.evaluate": ["--tokens", "8", "--starts", "0", "--greedy", "0"],
    "mlx_flash.train_predictors": ["--tokens", "256", "--epochs", "1"],
    "mlx_flash.launch": ["-m", "3"],  # the command after `--` gets it: generate's
}
# runpy runs a command module that the package has imported already, as `python -m` would not
pytestmark = pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # --model org/name
DOWNLOADS = ("~/.cache/",)  # what an optional `pip install` the README names puts there (not a dependency)
PEER = "--peer"  # bench's rows beside llama.cpp, which `make peer` builds (not part of a fresh checkout)


def readme_commands() -> list:
    """The `python ...` lines of the README's code blocks (fenced, or indented by four spaces)."""
    text = README.read_text()
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    blocks += re.findall(r"((?:\n {4}\S.*)+)", re.sub(r"```.*?```", "", text, flags=re.S))
    out = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("python ") and line not in out:
                out.append(line)
    return out


def needs_a_download(argv: list, downloaded: set) -> bool:
    """A Hub id, a file an optional package installs, or what a command given one of those made."""
    model = argv[argv.index("--model") + 1] if "--model" in argv else None
    out = argv[argv.index("--out") + 1] if "--out" in argv else None
    if model and ((HUB_ID.match(model) and not Path(model).exists()) or model.startswith(DOWNLOADS)):
        downloaded.add(out or f"models/{Path(model).name}")
        return True
    return model in downloaded


def run(argv: list, capsys):
    """(exit status, stdout, stderr) of `python <argv>` run in this process."""
    if argv[0] == "-m":
        module, args = argv[1], argv[2:]
        target = lambda: runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        module, args = None, argv[1:]
        target = lambda: runpy.run_path(str(ROOT / argv[0]), run_name="__main__")
    old = sys.argv
    sys.argv = [argv[0] if module is None else module, *args, *SMALL.get(module, [])]
    try:
        target()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


def test_readme_lists_commands():
    cmds = readme_commands()
    assert any("mlx_flash.generate --model smollm2-135m --mode flash" in c for c in cmds)
    assert any("--estimate" in c for c in cmds) and len(cmds) >= 20


def test_every_readme_command_runs_as_written(smol_calibrated, tmp_path, monkeypatch, capsys):
    checkout = tmp_path / "checkout"
    (checkout / "models").mkdir(parents=True)
    (checkout / "models" / "configs").symlink_to(ROOT / "models" / "configs")
    # the built-in model where its first flash command prepares it (the checkout's models/), prepared once
    # per test session rather than by that command
    (checkout / "models" / "smollm2-135m").symlink_to(smol_calibrated)
    monkeypatch.chdir(checkout)
    monkeypatch.setenv("MLX_FLASH_MODELS", str(checkout / "models"))
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: set it there too
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # a fresh machine: no optional download in ~/.cache
    monkeypatch.setenv("MLX_FLASH_PEER", str(tmp_path / "peer"))  # and no `make peer` build
    downloaded = set()
    for line in readme_commands():
        argv = shlex.split(line)[1:]
        model = argv[argv.index("--model") + 1] if "--model" in argv else None
        first_hand = model not in downloaded  # a Hub id or an optional file itself, not what one made
        hub = needs_a_download(argv, downloaded)
        code, out, err = run(argv, capsys)
        assert "Traceback" not in err, f"{line}\n{err}"
        if PEER in argv:
            errors = [l for l in err.splitlines() if l.startswith("error: ")]
            assert code == 2 and len(errors) == 1 and "make peer" in errors[0], f"{line}\n{err}"
        elif hub:
            errors = [l for l in err.splitlines() if l.startswith("error: ")]
            assert code == 2 and len(errors) == 1, f"{line}\n{err}"
            if first_hand:
                assert "Hugging Face Hub" in errors[0] or "not found" in errors[0], f"{line}\n{err}"
        else:
            assert code == 0, f"{line} exited {code}\n{err[-2000:]}"
