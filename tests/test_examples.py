"""The scripts in python/ run end to end on a tiny trained model."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "python"

CASES = {
    "load_and_generate.py": ["[flash] 6 tokens", "tokens/s"],
    "stream_with_stats.py": ["per decode token", "predict", "memory", "io", "ffn", "MB/token", "FFN neurons"],
    "compare_dense_flash.py": ["dense: Hello", "flash: Hello", "greedy tokens agree: ", "ms/token", "MB read/token"],
}


def run(script, *args):
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs(script, trained_flash):
    folder = trained_flash("opt_pre_ln")
    r = run(script, "--model", str(folder), "--prompt", "Hello", "--max-tokens", "6")
    assert r.returncode == 0, r.stderr
    for marker in CASES[script]:
        assert marker in r.stdout, f"{marker!r} missing from the output of {script}:\n{r.stdout}"


def test_example_error_is_one_line(tmp_path):
    r = run("load_and_generate.py", "--model", str(tmp_path / "missing"))
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
